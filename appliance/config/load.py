"""Finding, reading and checking the config file.

The TOML is parsed once; its tables go to pydantic-settings as an init
source placed after the environment source, so ``APPLIANCE_NODE__WORKERS=5``
overrides ``workers`` in the file. Every problem becomes a ``ConfigError``.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.resources
import os
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    SettingsError,
)

from . import report
from .checks import secret_problems
from .layout import resolve_dirs
from .problems import CONFIG_ENV, ConfigError, SchemaView, env_decode_errors, toml_error, validation_errors
from .schema import Settings

__all__ = [
    "DEFAULT_CONFIG_RESOURCE",
    "SYSTEM_CONFIG",
    "builtin_config_path",
    "check_file",
    "find_config",
    "load_settings",
]

SYSTEM_CONFIG = Path("/etc/appliance/appliance.toml")
DEFAULT_CONFIG_RESOURCE = "defaults/appliance.toml"


_TABLES = "file_tables"


class _FromFile(Settings):
    """Settings built from a config file: the one keyword argument
    ``file_tables`` holds the parsed TOML, and the environment beats it (for
    ``Settings`` itself, keyword arguments beat the environment)."""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        assert isinstance(init_settings, InitSettingsSource)
        tables = init_settings.init_kwargs[_TABLES]
        return env_settings, InitSettingsSource(settings_cls, init_kwargs=tables)


def builtin_config_path() -> Path:
    """Path of the built-in default config shipped in the package."""
    return Path(str(importlib.resources.files("appliance").joinpath(DEFAULT_CONFIG_RESOURCE)))


def find_config(explicit: str | os.PathLike[str] | None = None) -> Path | None:
    """The config file to use: ``explicit``, else $APPLIANCE_CONFIG, else
    /etc/appliance/appliance.toml if it exists, else None (the built-in default).

    An explicit path or $APPLIANCE_CONFIG is returned even if the file is
    missing, so that loading it reports the problem.
    """
    if explicit:
        return Path(explicit).expanduser()
    env = os.environ.get(CONFIG_ENV)
    if env:
        return Path(env).expanduser()
    if SYSTEM_CONFIG.is_file():
        return SYSTEM_CONFIG
    return None


@contextlib.contextmanager
def _builtin_file() -> Iterator[Path]:
    ref = importlib.resources.files("appliance").joinpath(DEFAULT_CONFIG_RESOURCE)
    with importlib.resources.as_file(ref) as p:
        yield Path(p)


def load_settings(path: str | os.PathLike[str] | None = None) -> Settings:
    """Read ``path`` (None: the built-in default), apply environment overrides,
    validate, and fill in the state and runtime directories.

    ``path`` is used as given; call ``find_config`` first to apply the search
    order. Raises ``ConfigError`` and nothing else for a bad configuration.
    """
    if path is None:
        with _builtin_file() as p:
            return _load_file(p)
    return _load_file(Path(path).expanduser())


def check_file(path: str | os.PathLike[str] | None) -> str:
    """Validate a config file; return ``"OK: <summary>"`` (and a line per
    note) or raise ``ConfigError``."""
    settings = load_settings(path)
    problems = secret_problems(settings)
    if problems:
        label = str(path) if path is not None else "the built-in config"
        raise ConfigError([f"{label}: {p}" for p in problems], Path(path) if path is not None else None)
    notes = report.notes(settings)
    return "\n".join([f"OK: {report.summary(settings)}", *(f"note: {n}" for n in notes)])


@functools.cache
def _schema() -> SchemaView:
    return SchemaView(Settings.model_json_schema())


def _load_file(path: Path) -> Settings:
    label = str(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read config file {label}: {e.strerror or e}", path) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{label}: not UTF-8 text (byte {e.start})", path) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(toml_error(label, text, e), path) from None
    try:
        kwargs: dict[str, Any] = {_TABLES: data}
        loaded = _FromFile(**kwargs)
    except ValidationError as e:
        env = _env_values()
        lines = validation_errors(e, _schema(), label, file_data=data, env_data=env, environ=os.environ)
        raise ConfigError(lines, path) from None
    except SettingsError as e:
        raise ConfigError(env_decode_errors(e, _schema(), os.environ), path) from None
    # A plain Settings (same validated values), not the loader's subclass.
    settings = Settings.model_construct(_fields_set=loaded.model_fields_set, **dict(loaded))
    return resolve_dirs(settings)


def _env_values() -> dict[str, Any]:
    """What the environment source reads (to tell which errors it caused)."""
    try:
        return EnvSettingsSource(Settings)()
    except Exception:
        return {}
