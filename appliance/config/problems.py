"""The messages a bad configuration gets: one line per problem, naming the
file (or environment variable), the dotted key and what was expected.

What a key expects is read from the settings' JSON schema (type, bounds,
enum, ``description``) and from each pydantic error's ``ctx``; nothing here
walks Python annotations. Pure functions of their arguments: the caller
hands in the schema and the environment.
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Iterator, Mapping
from typing import Any

from pydantic import ValidationError
from pydantic_settings import SettingsError

from ..quoting import show

ENV_PREFIX = "APPLIANCE_"
ENV_DELIMITER = "__"
CONFIG_ENV = "APPLIANCE_CONFIG"  # names the file; not a setting

Loc = tuple[str | int, ...]
Schema = dict[str, Any]


class ConfigError(Exception):
    """The configuration cannot be used. ``str(err)`` is the whole message.

    ``errors`` holds one line per problem. The CLI prints ``str(err)`` and
    exits with ``exit_code`` (2).
    """

    exit_code = 2

    def __init__(self, errors: list[str] | str, path: object = None):
        self.errors = [errors] if isinstance(errors, str) else list(errors)
        self.path = path
        super().__init__("\n".join(self.errors))


class FieldError(ValueError):
    """Raised by validators to point at a key below the model being validated.

    ``loc`` is relative to that model; ``message`` None means "describe what
    the field expects".
    """

    def __init__(self, loc: Loc, message: str | None):
        self.loc = tuple(loc)
        self.message = message
        super().__init__(message or "invalid value")


# --------------------------------------------------------------------------
# TOML syntax


def toml_error(label: str, text: str, e: Exception) -> str:
    """``file: line L, column C: invalid TOML: why`` for a tomllib error."""
    msg = str(e)
    line = getattr(e, "lineno", None)
    col = getattr(e, "colno", None)
    m = re.search(r"\s*\(at line (\d+), column (\d+)\)\s*$", msg)
    if m:
        line, col = int(m.group(1)), int(m.group(2))
        msg = msg[: m.start()]
    else:
        m = re.search(r"\s*\(at end of document\)\s*$", msg)
        if m:
            msg = msg[: m.start()]
            lines = text.splitlines() or [""]
            line, col = len(lines), len(lines[-1]) + 1
    msg = getattr(e, "msg", None) or msg
    if line is not None:
        return f"{label}: line {line}, column {col}: invalid TOML: {msg}"
    return f"{label}: invalid TOML: {msg}"


# --------------------------------------------------------------------------
# what a key expects, from the JSON schema


def dotted(loc: tuple[Any, ...]) -> str:
    """``("groups", "a b", "headers")`` -> ``groups."a b".headers``; list indexes as ``[0]``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            s = str(part)
            if not re.fullmatch(r"[A-Za-z0-9_-]+", s):
                s = json.dumps(s)
            out += ("." if out else "") + s
    return out


class SchemaView:
    """Looks keys up in ``Settings.model_json_schema()``."""

    def __init__(self, schema: Schema) -> None:
        self.root = schema
        self._defs: dict[str, Schema] = schema.get("$defs", {})

    def _resolve(self, node: Schema) -> Schema:
        """Follow ``$ref`` and drop the ``null`` of an optional value."""
        while True:
            ref = node.get("$ref")
            if ref is not None:
                node = self._defs[ref.rsplit("/", 1)[-1]]
                continue
            options = [o for o in node.get("anyOf", ()) if o.get("type") != "null"]
            if len(options) == 1:
                rest = {k: v for k, v in node.items() if k != "anyOf"}
                node = {**rest, **options[0]}
                continue
            return node

    def at(self, loc: tuple[Any, ...]) -> tuple[Schema | None, Schema | None, Schema]:
        """(the key's own schema, the same resolved, the table it is looked up in).

        The first two are None when ``loc`` leaves the schema (an unknown key).
        """
        node, parent = self.root, self.root
        field: Schema | None = self.root
        for part in loc:
            parent = node
            props = node.get("properties", {})
            extra = node.get("additionalProperties")
            items = node.get("items")
            if isinstance(part, str) and part in props:
                field = props[part]
            elif isinstance(part, str) and isinstance(extra, dict):
                field = extra
            elif isinstance(part, int) and isinstance(items, dict):
                field = items
            else:
                return None, None, parent
            node = self._resolve(field)
        return field, node, parent

    def keys_of(self, table: Schema) -> list[str]:
        return list(table.get("properties", {}))

    def is_complex(self, loc: tuple[Any, ...]) -> str | None:
        """``"list"`` or ``"object"`` for a key whose env value must be JSON, else None."""
        _, node, _ = self.at(loc)
        if node is None:
            return None
        if node.get("type") == "array":
            return "list"
        if node.get("type") == "object" or "properties" in node:
            return "object"
        return None

    def describe(self, loc: tuple[Any, ...], ctx: Mapping[str, Any] | None = None) -> str:
        """What the key at ``loc`` expects, as the object of "expected …"."""
        field, node, _ = self.at(loc)
        if field is None or node is None:
            return "a valid value"
        if field.get("description") and field is not self.root:
            return str(field["description"])
        # All the key's bounds are in the schema (as written); the error's ctx
        # names the one broken, which is all there is for a key the schema lacks.
        rng = _range_text({**_ctx_bounds(ctx or {}), **_schema_bounds(node)})
        fmt = node.get("format")
        if fmt == "byte-size":
            return f'a size{rng} like "64MiB" or a number of bytes'
        if fmt == "human-duration":
            return f'a duration{rng} like "5s" or "500ms", or a number of seconds'
        if "enum" in node:
            return "one of " + ", ".join(json.dumps(v) for v in node["enum"])
        if ctx and "expected" in ctx:
            return f"one of {ctx['expected']}"
        kind = node.get("type")
        if kind == "boolean":
            return "true or false"
        if kind == "integer":
            return f"an integer{rng}"
        if kind == "number":
            return f"a number{rng}"
        if kind == "string":
            return "an absolute path" if fmt == "path" else "a string"
        if kind == "array":
            return "a list"
        if "properties" in node:
            key = dotted(loc)
            if not key:
                return "a table"
            required = node.get("required", [])
            at_least = " with at least " + ", ".join(f"{r} = …" for r in required) if required else ""
            return f"a table [{key}]{at_least}"
        if kind == "object":
            values = node.get("additionalProperties")
            if isinstance(values, dict) and values.get("type") == "string":
                return "a table of strings"
            return "a table"
        return "a valid value"


_SCHEMA_BOUNDS = {"minimum": "ge", "exclusiveMinimum": "gt", "maximum": "le", "exclusiveMaximum": "lt"}


def _schema_bounds(node: Schema) -> dict[str, Any]:
    return {name: node[key] for key, name in _SCHEMA_BOUNDS.items() if key in node}


def _ctx_bounds(ctx: Mapping[str, Any]) -> dict[str, Any]:
    return {name: ctx[name] for name in ("ge", "gt", "le", "lt") if name in ctx}


def _range_text(bounds: Mapping[str, Any]) -> str:
    ge, gt, le, lt = (bounds.get(k) for k in ("ge", "gt", "le", "lt"))
    if ge is not None and le is not None:
        return f" from {ge} to {le}"
    lo = f"from {ge}" if ge is not None else (f"greater than {gt}" if gt is not None else "")
    hi = f"to {le}" if le is not None else (f"less than {lt}" if lt is not None else "")
    if ge is not None and not hi:
        return f" of at least {ge}"
    if le is not None and not lo:
        return f" of at most {le}"
    parts = [p for p in (lo, hi) if p]
    return (" " + " and ".join(parts)) if parts else ""


# --------------------------------------------------------------------------
# validation errors


def _problems(e: ValidationError, schema: SchemaView) -> Iterator[tuple[Loc, str]]:
    """(dotted location, message) per problem, the first one per location."""
    seen: set[Loc] = set()
    for err in e.errors(include_url=False):
        loc: Loc = tuple(err.get("loc", ()))
        typ = err.get("type", "")
        ctx = err.get("ctx") or {}
        cause = ctx.get("error")
        if isinstance(cause, FieldError):
            loc = loc + cause.loc
            if cause.message is None:
                msg = f"expected {schema.describe(loc)}, got {show(err.get('input'))}"
            else:
                msg = cause.message
        elif typ == "extra_forbidden":
            _, _, table = schema.at(loc)
            names = schema.keys_of(table)
            close = difflib.get_close_matches(str(loc[-1]), names, n=1) if names else []
            hint = f"did you mean {close[0]!r}? " if close else ""
            msg = f"unknown key ({hint}expected one of: {', '.join(names)})" if names else "unknown key"
        elif typ == "missing":
            msg = f"missing required key (expected {schema.describe(loc)})"
        elif typ == "value_error":
            msg = str(err.get("msg", "")).removeprefix("Value error, ")
            if "expected" not in msg:
                msg = f"expected {schema.describe(loc)}: {msg}"
        else:
            msg = f"expected {schema.describe(loc, ctx)}, got {show(err.get('input'))}"
        if loc in seen:
            continue
        seen.add(loc)
        yield loc, msg


def validation_errors(
    e: ValidationError,
    schema: SchemaView,
    label: str,
    *,
    file_data: Mapping[str, Any],
    env_data: Mapping[str, Any],
    environ: Mapping[str, str],
) -> list[str]:
    """One line per problem, each blamed on the file ``label`` or on the
    APPLIANCE_* variable that set the key (``env_data`` is what the env
    source read)."""
    have_env = any(n.upper().startswith(ENV_PREFIX) for n in environ)
    lines = []
    for loc, msg in _problems(e, schema):
        key = dotted(loc)
        source = label
        if have_env:
            if msg.startswith("missing required key"):
                # Blame the env only when it alone created the table that lacks the key.
                parent = loc[:-1]
                if parent and _has(parent, env_data, fold_case=True) and not _has(parent, file_data):
                    want = [str(p).lower() for p in parent]
                    names = sorted(n for n in environ if _env_path(n)[: len(parent)] == want)
                    if names:
                        source = ", ".join(names)
            elif _has(loc, env_data, fold_case=True):
                var = _env_var_for(loc, environ)
                if var is not None:
                    name, depth = var
                    if depth == len(loc):
                        lines.append(f"{name}: {msg}")
                        continue
                    source = name
        lines.append(f"{source}: {key}: {msg}" if key else f"{source}: {msg}")
    return lines


def env_decode_errors(e: SettingsError, schema: SchemaView, environ: Mapping[str, str]) -> list[str]:
    """A table or list given in an env variable that is not valid JSON."""
    lines = []
    for name, value in environ.items():
        if not name.upper().startswith(ENV_PREFIX) or name.upper() == CONFIG_ENV:
            continue
        kind = schema.is_complex(tuple(_env_path(name)))
        if kind is None:
            continue
        try:
            json.loads(value)
        except ValueError as err:
            msg = getattr(err, "msg", str(err))
            col = getattr(err, "colno", "?")
            lines.append(f"{name}: expected a JSON {kind} ({msg} at column {col}), got {show(value)}")
    return lines or [f"environment: {e}"]


def _has(loc: tuple[Any, ...], data: Mapping[str, Any], *, fold_case: bool = False) -> bool:
    """Whether ``data`` holds a value at ``loc`` (env keys match case-insensitively)."""
    cur: Any = data
    for part in loc:
        if isinstance(cur, Mapping):
            if fold_case and isinstance(part, str):
                match = next((k for k in cur if isinstance(k, str) and k.lower() == part.lower()), None)
            else:
                match = part if part in cur else None
            if match is None:
                return False
            cur = cur[match]
        elif isinstance(cur, list) and isinstance(part, int):
            if not 0 <= part < len(cur):
                return False
            cur = cur[part]
        elif fold_case:
            return True  # a raw env string that pydantic looked into
        else:
            return False
    return True


def _env_path(name: str) -> list[str]:
    if not name.upper().startswith(ENV_PREFIX):
        return []
    return name[len(ENV_PREFIX) :].lower().split(ENV_DELIMITER)


def _env_var_for(loc: tuple[Any, ...], environ: Mapping[str, str]) -> tuple[str, int] | None:
    """The environment variable that set ``loc`` (or a parent of it), and its depth."""
    want = [str(p).lower() for p in loc]
    best: tuple[str, int] | None = None
    for name in environ:
        if not name.upper().startswith(ENV_PREFIX):
            continue
        path = _env_path(name)
        if want[: len(path)] == path and (best is None or len(path) > best[1]):
            best = (name, len(path))
    return best
