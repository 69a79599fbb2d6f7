"""The runtime tests' tiny checkpoint, for the live dashboard test."""
from tests.runtime.conftest import tiny_model  # noqa: F401
