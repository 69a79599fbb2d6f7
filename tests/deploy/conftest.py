"""The runtime tests' tiny checkpoint, for the deploy tests that start a real cluster."""
from tests.runtime.conftest import tiny_model  # noqa: F401
