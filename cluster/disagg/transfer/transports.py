"""KV transports by name (`DisaggConfig.transport`): `make_transport`.

Apart from base.py so that the interface does not import its implementations (each of which
imports the interface): the dependency runs transports -> loopback/torchdist -> base, one way.
"""
from __future__ import annotations

from cluster.disagg.transfer.base import KVTransport


def make_transport(name: str, **kwargs) -> KVTransport:
    """By name from config; heavy backends imported only when chosen."""
    if name == "loopback":
        from cluster.disagg.transfer.loopback import LoopbackTransport

        return LoopbackTransport(**kwargs)
    if name == "torchdist":
        from cluster.disagg.transfer.torchdist import TorchDistTransport

        return TorchDistTransport(**kwargs)
    raise ValueError(f"DisaggConfig.transport={name!r} is not known (loopback, torchdist)")
