"""The appliance configuration (design contract 4).

One TOML file, overridden by environment variables
(``APPLIANCE_NODE__WORKERS=5``), validated by pydantic models.

- ``models``: ``Settings`` and its tables, with their cross-checks.
  ``Settings(...)`` with keyword arguments builds one from code.
- ``load``: ``find_config(explicit)`` (which file), ``load_settings(path)``
  (read, merge with the environment, validate, resolve directories) and
  ``check_file(path)`` (the summary ``appliance config check`` prints).
- ``errors``: ``ConfigError``, whose ``str()`` is the complete message for
  the user, one problem per line, each naming the file (or environment
  variable), the dotted key and what was expected.
- ``dirs``: default state and runtime directories, the admin socket names.
"""

from ..addr import join as join_hostport
from ..addr import split as split_hostport
from .dirs import default_runtime_dir, default_state_dir
from .load import DEFAULT_CONFIG_RESOURCE, SYSTEM_CONFIG, builtin_config_path, check_file, find_config, load_settings
from .models import (
    AuthSettings,
    ClusterSettings,
    CredentialSettings,
    GroupSettings,
    NodeSettings,
    OpsSettings,
    Settings,
    TlsSettings,
    resolve_dirs,
)
from .problems import ENV_PREFIX, ConfigError

__all__ = [
    "DEFAULT_CONFIG_RESOURCE",
    "ENV_PREFIX",
    "SYSTEM_CONFIG",
    "AuthSettings",
    "ClusterSettings",
    "CredentialSettings",
    "ConfigError",
    "GroupSettings",
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
