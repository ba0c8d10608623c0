"""One base for every moekit configuration: a dataclass checked from its annotations, read and written
as JSON, overridden with ``--set key=value``.

A config is a ``@dataclass`` that derives from ``Config``. On construction every field is checked
against its annotation (``int``, ``float`` (finite), ``bool``, ``str``, ``X | None``, ``Literal``,
``tuple``/``list``/``dict``, a nested ``Config``) and against the range its ``spec(...)`` declares;
a nested config given as a dict is built from it; then the class's ``validate`` runs the checks that
span fields. Every failure is one ``ConfigError`` line naming the field and its value
(``router.top_k=0 must be an int >= 1``), with the config class, field and value also kept on the
error (``err.config``, ``err.field``, ``err.value``). ``from_dict`` names unknown keys and the
closest known one; ``load`` names the file for a missing file, bad JSON (line and column) and wrong
values; ``save`` writes atomically, so a crash leaves the old file or the new one, never half of it.

This module sits at the bottom of the import order (docs/architecture.md): it imports nothing from
moekit but ``moekit.errors``.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import math
import os
import tempfile
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

from .errors import ConfigError

C = TypeVar("C", bound="Config")

# Keys of a field's metadata that ``spec`` fills and the checks read.
_SPEC_KEYS = ("ge", "gt", "le", "lt", "choices", "nonempty", "secret", "hint")


def check(cond: bool, message: str) -> None:
    """Raise ``ConfigError(message)`` unless ``cond``; for checks that span fields (``Config.validate``)."""
    if not cond:
        raise ConfigError(message)


def spec(default: Any = dataclasses.MISSING, *, factory: Any = dataclasses.MISSING, ge: float | None = None,
         gt: float | None = None, le: float | None = None, lt: float | None = None,
         choices: Iterable[Any] | None = None, nonempty: bool = False, secret: bool = False, hint: str = "") -> Any:
    """A dataclass field with a declared range: ``top_k: int = spec(2, ge=1)``.

    ``ge``/``gt``/``le``/``lt`` bound a number; ``choices`` lists the allowed values (as ``Literal``
    does, for names kept in a tuple elsewhere); ``nonempty`` refuses ""; ``secret`` keeps the value out
    of messages; ``hint`` is appended to the message in parentheses."""
    meta = {"ge": ge, "gt": gt, "le": le, "lt": lt, "choices": None if choices is None else tuple(choices),
            "nonempty": nonempty, "secret": secret, "hint": hint}
    return dataclasses.field(default=default, default_factory=factory, metadata=meta)


class Config:
    """Base of moekit's configuration dataclasses (see the module docstring).

    ``section``: the name a config is known by inside its parent ("router"), prefixed to its
    field names in messages ("router.top_k=0 ..."); "" for a config used on its own."""

    section: typing.ClassVar[str] = ""

    def __post_init__(self) -> None:
        try:
            for f in dataclasses.fields(self):  # type: ignore[arg-type]
                setattr(self, f.name, _check_field(type(self), f, getattr(self, f.name)))
            self.validate()
        except ConfigError as err:
            if err.config is None:
                err.config = type(self).__name__
            raise

    def validate(self) -> None:
        """Checks that span fields (``check(cond, message)``); each field's own type and range are
        already checked when this runs."""

    # ------------------------------------------------------------------ dicts and files
    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values, nested configs as dicts; ``from_dict`` reads it back to an equal config."""
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls: type[C], data: Any, where: str | None = None) -> C:
        """Build from a dict of field values; unknown and missing keys are errors naming them.

        ``where`` (a file, or a field of the parent) is prefixed to errors of the values; without it
        errors are raised as the fields' own messages."""
        label = where or cls.section or cls.__name__
        if not isinstance(data, Mapping):
            raise ConfigError(f"{label}: expected a JSON object, got {type(data).__name__}", config=cls.__name__)
        names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
        unknown = sorted(str(key) for key in data if key not in names)
        if unknown:
            raise ConfigError(f"unknown key(s) {unknown} in {label}{suggest(unknown, names)}; known: {sorted(names)}",
                              config=cls.__name__, field=unknown[0])
        missing = [f.name for f in dataclasses.fields(cls)  # type: ignore[arg-type]
                   if f.name not in data and f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING]
        if missing:
            raise ConfigError(f"{label} is missing required key(s) {missing}", config=cls.__name__, field=missing[0])
        try:
            return cls(**data)
        except ConfigError as err:
            if where is None:
                raise
            raise err.within(where) from None

    def save(self, path: str | Path) -> None:
        """Write the config as indented JSON, atomically (a temporary file in the same folder, then
        renamed over ``path``); ``load`` reads it back to an equal config."""
        write_json(path, self.to_dict())

    @classmethod
    def load(cls: type[C], path: str | Path, overrides: Iterable[str] = ()) -> C:
        """Read a config written by ``save`` (or by hand), then apply ``key=value`` overrides (as
        ``--set``); every error is one line naming the file."""
        data = read_json(path)
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a JSON object, got {type(data).__name__}", config=cls.__name__)
        return cls.from_dict(apply_overrides(data, overrides, cls), where=str(path))

    def override(self: C, pairs: Iterable[str]) -> C:
        """A copy with ``key=value`` overrides applied (dotted keys reach nested configs)."""
        return type(self).from_dict(apply_overrides(self.to_dict(), pairs, type(self)))


# ---------------------------------------------------------------------- files
def read_json(path: str | Path) -> Any:
    """Parse a JSON file; errors are one line naming the file (and line and column for bad JSON)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot read config file {path}: {err}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: invalid JSON at line {err.lineno} column {err.colno}: {err.msg}") from None


def write_json(path: str | Path, data: Any) -> None:
    """Write ``data`` as indented JSON to ``path`` atomically (temporary file, fsync, rename)."""
    path = Path(path)
    text = json.dumps(data, indent=2) + "\n"
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise ConfigError(f"cannot write config file {path}: {err.strerror or err}") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as err:
        Path(tmp).unlink(missing_ok=True)
        raise ConfigError(f"cannot write config file {path}: {err.strerror or err}") from None


# ---------------------------------------------------------------------- --set overrides
def apply_overrides(data: dict[str, Any], pairs: Iterable[str], cls: type[Config] | None = None) -> dict[str, Any]:
    """Apply ``key=value`` pairs to ``data`` in place and return it: dotted keys reach nested
    sections (``model.moe.router.top_k=1``); a value is parsed as JSON, else kept as a string.

    With ``cls``, each key is checked against its fields first, so a misspelt key is named with the
    closest field (``--set model.dimm=3: unknown key(s) ['dimm'] in model (did you mean 'dim'?)``)."""
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep:
            raise ConfigError(f"--set {pair!r} is not key=value")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        parts = key.split(".")
        if cls is not None:
            _check_key(cls, parts, pair)
        node = data
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:  # a section absent or null in the file ("moe": null) is started afresh
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"--set {key}: {part!r} is not a section of the config")
            node = child
        node[parts[-1]] = value
    return data


def _check_key(cls: type[Config], parts: list[str], pair: str) -> None:
    """Whether the dotted key ``parts`` names a field of ``cls`` (free-form dict fields end the check)."""
    where = cls.__name__
    for i, part in enumerate(parts):
        names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
        if part not in names:
            raise ConfigError(f"--set {pair}: unknown key(s) [{part!r}] in {where}{suggest([part], names)}; "
                              f"known: {sorted(names)}", config=cls.__name__, field=part)
        if i == len(parts) - 1:
            return
        tp, _ = _unwrap_optional(_hints(cls)[part])
        if isinstance(tp, type) and issubclass(tp, Config):
            cls, where = tp, ".".join(parts[:i + 1])
        elif _origin(tp) is dict or tp is Any:
            return
        else:
            raise ConfigError(f"--set {'.'.join(parts)}: {part!r} is not a section of the config")


def suggest(unknown: list[str], names: Iterable[str]) -> str:
    """" (did you mean 'top_k'?)" for the known names closest to the unknown keys, else ""."""
    pairs = []
    for key in unknown:
        close = difflib.get_close_matches(key, list(names), n=1, cutoff=0.6)
        if close:
            pairs.append((key, close[0]))
    if not pairs:
        return ""
    if len(unknown) == 1:
        return f" (did you mean {pairs[0][1]!r}?)"
    return " (did you mean " + ", ".join(f"{near!r} for {key!r}" for key, near in pairs) + "?)"


# ---------------------------------------------------------------------- field checks
@functools.lru_cache(maxsize=None)
def _hints(cls: type) -> dict[str, Any]:
    """Resolved annotations of a dataclass (string annotations under ``from __future__ import annotations``)."""
    return typing.get_type_hints(cls)


def _origin(tp: Any) -> Any:
    return typing.get_origin(tp)


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    """(X, True) for ``X | None`` / ``Optional[X]``, else (tp, False)."""
    if _origin(tp) in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) < len(typing.get_args(tp)):
            return (args[0] if len(args) == 1 else Union[tuple(args)]), True
    return tp, False


def _article(name: str) -> str:
    """"a" or "an" before a type name ("an LMConfig", "a RouterConfig", "an int")."""
    acronym = len(name) > 1 and name[:2].isupper()
    vowel_sound = name[0] in "AEIOUaeiou" or (acronym and name[0] in "AEFHILMNORSX")
    return f"an {name}" if vowel_sound else f"a {name}"


def _describe(tp: Any) -> str:
    """What a value of annotation ``tp`` must be, for messages ("an int", "a list of ints")."""
    plural = {int: "ints", float: "numbers", str: "strings", bool: "true/false values"}
    if tp is bool:
        return "true or false"
    if tp is int:
        return "an int"
    if tp is float:
        return "a finite number"
    if tp is str:
        return "a string"
    if isinstance(tp, type) and issubclass(tp, Config):
        return f"{_article(tp.__name__)} or a dict of its fields"
    origin, args = _origin(tp), typing.get_args(tp)
    if origin in (list, tuple):
        if origin is tuple and args and args[-1] is not Ellipsis:
            return f"a list of {len(args)} values"
        inner = args[0] if args else Any
        return f"a list of {plural.get(inner, 'values')}"
    if origin is dict:
        return "a dict with string keys"
    return getattr(tp, "__name__", str(tp))


def _is_type(value: Any, tp: Any) -> bool:
    """Whether ``value`` has the annotated type (bool is not an int; int is a float; floats are finite)."""
    if tp is Any or isinstance(tp, TypeVar):
        return True
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if tp is str:
        return isinstance(value, str)
    origin, args = _origin(tp), typing.get_args(tp)
    if origin is Literal:
        return value in args
    if origin in (Union, types.UnionType):
        return any(_is_type(value, a) for a in args)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(_is_type(v, a) for v, a in zip(value, args))
        return all(_is_type(v, args[0]) for v in value) if args else True
    if origin is dict:
        return isinstance(value, dict) and all(isinstance(k, str) for k in value) \
            and (not args or all(_is_type(v, args[1]) for v in value.values()))
    if isinstance(tp, type):
        return isinstance(value, tp)
    return True


def _bounds(meta: Mapping[str, Any]) -> str:
    """" >= 1", " > 0", " in [0, 1)" from a field's spec."""
    low = ("[", meta.get("ge")) if meta.get("ge") is not None else ("(", meta.get("gt"))
    high = ("]", meta.get("le")) if meta.get("le") is not None else (")", meta.get("lt"))
    if low[1] is not None and high[1] is not None:
        return f" in {low[0]}{low[1]}, {high[1]}{high[0]}"
    if low[1] is not None:
        return f" {'>=' if low[0] == '[' else '>'} {low[1]}"
    if high[1] is not None:
        return f" {'<=' if high[0] == ']' else '<'} {high[1]}"
    return ""


def _in_bounds(value: Any, meta: Mapping[str, Any]) -> bool:
    checks = (("ge", lambda v, b: v >= b), ("gt", lambda v, b: v > b), ("le", lambda v, b: v <= b),
              ("lt", lambda v, b: v < b))
    return all(meta.get(key) is None or ok(value, meta[key]) for key, ok in checks)


def _check_field(cls: type[Config], f: dataclasses.Field, value: Any) -> Any:
    """The field's value, checked against its annotation and spec; nested dicts become configs and
    lists become tuples where the annotation says so."""
    tp, optional = _unwrap_optional(_hints(cls)[f.name])
    meta = f.metadata
    name = f"{cls.section}.{f.name}" if cls.section else f.name
    if value is None and optional:
        return value
    if isinstance(tp, type) and issubclass(tp, Config) and isinstance(value, Mapping):
        # A nested config with a section names its fields itself ("router.top_k"); others by the field.
        return tp.from_dict(value, where=None if tp.section else f.name)
    if _origin(tp) is tuple and isinstance(value, list):
        value = tuple(value)
    shown = name if meta.get("secret") else f"{name}={value!r}"
    hint = f" ({meta['hint']})" if meta.get("hint") else ""
    choices = meta.get("choices")
    if choices is None and _origin(tp) is Literal:
        choices = typing.get_args(tp)
    if choices is not None:
        if value not in choices:
            raise ConfigError(f"{shown} is not one of {list(choices)}{hint}", config=cls.__name__, field=f.name,
                              value=value)
        return value
    bounds = _bounds(meta)
    ok = _is_type(value, tp) and (not bounds or _in_bounds(value, meta)) \
        and not (meta.get("nonempty") and value == "")
    if not ok:
        what = "a non-empty string" if meta.get("nonempty") and tp is str else _describe(tp)
        raise ConfigError(f"{shown} must be {what}{bounds}{' or null' if optional else ''}{hint}",
                          config=cls.__name__, field=f.name, value=value)
    return value


__all__ = ["Config", "ConfigError", "apply_overrides", "check", "read_json", "spec", "suggest", "write_json"]
