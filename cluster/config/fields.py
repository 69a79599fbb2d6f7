"""What every config module shares: the error that names a field, the checks that raise it, and
`from_dict`, which builds a nested config from plain dicts (a YAML file) naming unknown keys."""
from __future__ import annotations

import os
from dataclasses import fields


class ConfigError(ValueError):
    """A config value is wrong; the message names the field."""


def _require(ok: bool, owner: str, name: str, value: object, rule: str) -> None:
    if not ok:
        raise ConfigError(f"{owner}.{name}={value!r} {rule}")


def _positive_int(owner: str, name: str, value: object) -> None:
    _require(isinstance(value, int) and not isinstance(value, bool) and value >= 1, owner, name, value, "must be an integer >= 1")


def _is_positive_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


def from_dict(cls, data: dict | None, owner: str | None = None, base=None):
    """Build a (nested) config dataclass from plain dicts, naming unknown keys.

    A nested mapping overrides only the keys it names: `prefill: {tp: 2}` keeps the
    prefill pool's other defaults (its one instance), it does not reset them.
    """
    owner = owner or cls.__name__
    data = dict(data or {})
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(f"{owner}: unknown field(s) {', '.join(unknown)}; known: {', '.join(known)}")
    kwargs = {f.name: getattr(base, f.name) for f in fields(cls)} if base is not None else {}
    hints = _hints(cls)
    for name, value in data.items():
        sub = _nested_config_type(cls, known[name])
        if sub and isinstance(value, dict):
            current = kwargs.get(name, _field_default(known[name]))
            value = from_dict(sub, value, f"{owner}.{name}", current)
        elif hints.get(name) is bool and not isinstance(value, bool):  # YAML `no` is a bool, "no" is not
            raise ConfigError(f"{owner}.{name} = {value!r}: must be true or false")
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"{owner}: {exc}") from None
    except ConfigError as exc:  # name the path in the file, not just the class (prefill.tp, not PoolConfig.tp)
        raise ConfigError(f"{owner}: {exc}" if owner != cls.__name__ else str(exc)) from None


def _field_default(f):
    from dataclasses import MISSING

    return f.default_factory() if f.default_factory is not MISSING else None


def _hints(cls) -> dict:
    import typing

    return typing.get_type_hints(cls)


def _nested_config_type(cls, f):
    hint = _hints(cls).get(f.name)
    return hint if isinstance(hint, type) and hasattr(hint, "__dataclass_fields__") else None


def env_cache_dir() -> str:
    """Where made models and other cached artefacts live (LLM_CLUSTER_CACHE)."""
    return os.environ.get("LLM_CLUSTER_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "llm-cluster"))
