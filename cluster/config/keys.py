"""Where the API's keys come from: the config, an environment variable, a file (a mounted Secret).

`load_api_keys(api)` is read at start and again every `api.keys_reload_s` by the API (api/auth.py):
  (1) `api.api_keys` / `api.admin_keys` from the YAML;
  (2) `LLM_CLUSTER_API_KEYS` / `LLM_CLUSTER_ADMIN_KEYS`: keys separated by commas or whitespace;
  (3) `api.api_keys_file` / `api.admin_keys_file`: a file of keys, one a line (blank lines and `#`
      comments skipped), or a directory, every visible file of it read that way: Kubernetes mounts a
      Secret as a directory with one file per data key, and swaps it whole when the Secret changes.
The union of the three is what a caller may present. A file that cannot be read is an error (a
deployment that points at keys and finds none must not come up open). Keys are never logged:
`ApiKeys` prints counts only.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from cluster.config.api import ApiConfig
from cluster.config.fields import ConfigError

ENV_API_KEYS = "LLM_CLUSTER_API_KEYS"
ENV_ADMIN_KEYS = "LLM_CLUSTER_ADMIN_KEYS"


@dataclass(frozen=True)
class ApiKeys:
    """The keys in force: `api` for /v1/* (and /health, /metrics when they need one), `admin` for /admin/*."""

    api: frozenset[str] = frozenset()
    admin: frozenset[str] = frozenset()

    def __repr__(self) -> str:
        return f"ApiKeys({len(self.api)} api, {len(self.admin)} admin)"


def load_api_keys(api: ApiConfig, environ: Mapping[str, str] | None = None) -> ApiKeys:
    """The union of the config's keys, the environment's and the files' (ConfigError naming a file it cannot read)."""
    environ = os.environ if environ is None else environ
    user = {*api.api_keys, *_split(environ.get(ENV_API_KEYS, "")), *_read(api.api_keys_file, "api_keys_file")}
    admin = {*api.admin_keys, *_split(environ.get(ENV_ADMIN_KEYS, "")), *_read(api.admin_keys_file, "admin_keys_file")}
    return ApiKeys(frozenset(user), frozenset(admin))


def key_files(api: ApiConfig) -> list[str]:
    """The files whose change means the keys may have changed (for the reload's cheap check)."""
    out = []
    for path in (api.api_keys_file, api.admin_keys_file):
        if path and os.path.isdir(path):
            out += [os.path.join(path, name) for name in sorted(os.listdir(path)) if not name.startswith(".")]
        elif path:
            out.append(path)
    return out


def _split(text: str) -> list[str]:
    return [k for k in text.replace(",", " ").split() if k]


def _read(path: str | None, name: str) -> list[str]:
    if not path:
        return []
    try:
        if os.path.isdir(path):  # a mounted Secret: its `..data` link and the like are hidden
            files = [os.path.join(path, f) for f in sorted(os.listdir(path)) if not f.startswith(".")]
            files = [f for f in files if os.path.isfile(f)]
        else:
            files = [path]
        keys = []
        for file in files:
            with open(file, encoding="utf-8") as f:
                keys += [k for line in f for k in _split(line.split("#", 1)[0])]
    except OSError as exc:
        raise ConfigError(f"ApiConfig.{name}={path!r} cannot be read: {exc.strerror}") from None
    return keys
