"""The appliance configuration (design contract 4): schema, layout and report, depending on nothing above them.

One TOML file, overridden by environment variables
(``APPLIANCE_NODE__WORKERS=5``), validated by pydantic models.

- ``schema``: ``Settings`` and its tables, each validating its own keys.
  ``Settings(...)`` with keyword arguments builds one from code.
- ``checks``: what rejects a config across tables (port clashes, the etcd
  topology, TLS off loopback), Settings' last validator; and the token
  files' check (``secret_problems``) that `config check` and `run` make.
- ``layout``: ``Layout(settings)``, the ports, endpoints and paths the
  settings imply (state and runtime directories, token file, admin
  sockets, HTTP ports, the embedded etcd's topology); ``resolve_dirs``.
- ``report``: what `config check` prints and `run` logs: ``summary``,
  ``notes``, ``warnings``, ``server_choice`` (which engine serves, from
  ``backend``: what is built here and what node.server allows).
- ``load``: ``find_config(explicit)`` (which file), ``load_settings(path)``
  (read, merge with the environment, validate, resolve directories) and
  ``check_file(path)`` (the summary ``appliance config check`` prints).
- ``problems``: ``ConfigError``, whose ``str()`` is the complete message for
  the user, one problem per line, each naming the file (or environment
  variable), the dotted key and what was expected.
- ``dirs``: default state and runtime directories, the admin socket names.
"""

from ..addr import join as join_hostport
from ..addr import split as split_hostport
from .dirs import default_runtime_dir, default_state_dir
from .layout import Layout, resolve_dirs
from .load import DEFAULT_CONFIG_RESOURCE, SYSTEM_CONFIG, builtin_config_path, check_file, find_config, load_settings
from .problems import ENV_PREFIX, ConfigError
from .schema import (
    AuthSettings,
    ClusterSettings,
    CredentialSettings,
    GroupSettings,
    NodeSettings,
    OpsSettings,
    Settings,
    TlsSettings,
)

__all__ = [
    "DEFAULT_CONFIG_RESOURCE",
    "ENV_PREFIX",
    "SYSTEM_CONFIG",
    "AuthSettings",
    "ClusterSettings",
    "CredentialSettings",
    "ConfigError",
    "GroupSettings",
    "Layout",
    "NodeSettings",
    "OpsSettings",
    "Settings",
    "TlsSettings",
    "builtin_config_path",
    "check_file",
    "default_runtime_dir",
    "default_state_dir",
    "find_config",
    "join_hostport",
    "load_settings",
    "resolve_dirs",
    "split_hostport",
]
