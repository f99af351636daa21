"""YAML recipes -> typed dataclasses, with errors a user can act on.

Every recipe section is a dataclass. `load_config` reads a YAML file and builds the dataclass tree,
rejecting unknown keys and bad values with the file, the line, the dotted key and what is allowed.
`to_dict` is the inverse used to store the resolved recipe next to an output.
"""
from __future__ import annotations

import dataclasses
import enum
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from lpq.schema import KeyedError

T = TypeVar("T")


class ConfigError(ValueError):
    """A recipe that cannot be used; the message names file, line and key."""


# A file a recipe reads: a relative path is resolved against the folder of the recipe file, so a
# recipe works from any working directory (output folders stay relative to the working directory;
# a value given on the command line is relative to the working directory too).
RELATIVE_TO_RECIPE = "relative to the recipe file"
RecipePath = typing.Annotated[Path, RELATIVE_TO_RECIPE]


class _Where:
    """Maps dotted key paths of a YAML document to their line numbers; knows the recipe's folder."""

    def __init__(self, source: str, node: yaml.Node | None, base: Path | None = None,
                 from_cwd: frozenset[str] = frozenset(), options: dict[str, str] | None = None):
        self.source = source
        self.base = base               # the recipe file's folder (None: paths stay as given)
        self.from_cwd = from_cwd       # dotted keys given on the command line
        self.options = options or {}   # dotted key -> the command-line option that gave it
        self.lines: dict[str, int] = {}
        if node is not None:
            self._walk(node, "")

    def _walk(self, node: yaml.Node, prefix: str) -> None:
        self.lines.setdefault(prefix, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                key = f"{prefix}.{k.value}" if prefix else str(k.value)
                self.lines[key] = k.start_mark.line + 1
                self._walk(v, key)
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                self._walk(v, f"{prefix}[{i}]")

    def error(self, key: str, msg: str) -> ConfigError:
        option = next((self.options[k] for k in _key_and_parents(key) if k in self.options), None)
        if option is None and key not in self.lines:
            # A key the file does not have came from an option that set a key below it (`--set a.b=1`
            # with no section `a`).
            option = next((o for k, o in self.options.items() if k.startswith(f"{key}.")), None)
        if option is not None:
            return ConfigError(f"{option}: {msg}")
        line = self.lines.get(key)
        while line is None and key:
            key_parent = key.rsplit(".", 1)[0] if "." in key else ""
            line = self.lines.get(key_parent)
            key = key_parent
        loc = f"{self.source}:{line}" if line else self.source
        return ConfigError(f"{loc}: {msg}")


def _key_and_parents(key: str) -> list[str]:
    """'eval.tasks[0]' -> ['eval.tasks[0]', 'eval.tasks', 'eval']."""
    out = [key]
    while (cut := max(key.rfind("."), key.rfind("["))) > 0:
        key = key[:cut]
        out.append(key)
    return out


class _RecipeLoader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 floats: `1e-3` (no dot) is the float 0.001, as in YAML 1.2
    and JSON, not the string '1e-3' of YAML 1.1."""


_RecipeLoader.add_implicit_resolver("tag:yaml.org,2002:float",
                                    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9][0-9_]*)[eE][-+]?[0-9]+$"),
                                    list("-+0123456789."))


def parse_value(text: str) -> Any:
    """One YAML value as a recipe file reads it (for `--set key=value`)."""
    return yaml.load(text, Loader=_RecipeLoader)


def _refuse_duplicate_keys(node: yaml.Node, source: str, prefix: str = "", seen: set | None = None) -> None:
    """PyYAML keeps the last of two equal keys silently; a recipe must not say two things."""
    seen = set() if seen is None else seen
    if id(node) in seen:          # an alias of an anchored node: already checked
        return
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        first: dict[tuple[str, str], int] = {}
        for k, v in node.value:
            key = f"{prefix}.{k.value}" if prefix else str(k.value)
            if k.tag == "tag:yaml.org,2002:merge":    # `<<: *anchor` may be overridden by explicit keys
                _refuse_duplicate_keys(v, source, prefix, seen)
                continue
            if isinstance(k, yaml.ScalarNode):
                line = k.start_mark.line + 1
                if (k.tag, k.value) in first:
                    raise ConfigError(f"{source}:{line}: duplicate key '{key}' (first at line "
                                      f"{first[k.tag, k.value]}); keep one of them")
                first[k.tag, k.value] = line
            _refuse_duplicate_keys(v, source, key, seen)
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            _refuse_duplicate_keys(v, source, f"{prefix}[{i}]", seen)


def _yaml_error(path: Path, e: yaml.YAMLError) -> str:
    """PyYAML's several-line message as one line: file:line, then what it expected and found."""
    mark = getattr(e, "problem_mark", None)
    where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
    parts = [getattr(e, "context", None), getattr(e, "problem", None)]
    what = ", ".join(p for p in parts if p) or str(e).splitlines()[0]
    return f"{where}: not valid YAML: {what}"


def load_config(path: str | Path, cls: type[T], overrides: dict[str, Any] | None = None,
                options: dict[str, str] | None = None) -> T:
    """Read `path` as YAML and build `cls` from it; `overrides` are dotted keys set afterwards, and
    `options` names the command-line option that set an override (an error about it names the option)."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path}: a folder, not a recipe file")
    if not path.is_file():
        raise ConfigError(f"{path}: recipe file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}); a recipe is a YAML text file") from None
    try:
        loader = _RecipeLoader(text)
        try:
            node = loader.get_single_node()
            if node is not None:
                _refuse_duplicate_keys(node, str(path))
            data = (loader.construct_document(node) if node is not None else None) or {}
        finally:
            loader.dispose()
    except yaml.YAMLError as e:
        raise ConfigError(_yaml_error(path, e)) from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}:1: a recipe must be a mapping of sections, got {type(data).__name__}")
    for dotted, value in (overrides or {}).items():
        _set_dotted(data, dotted, value)
    return from_dict(data, cls, _Where(str(path), node, path.resolve().parent, frozenset(overrides or ()), options))


def from_dict(data: Any, cls: type[T], where: _Where | None = None, key: str = "") -> T:
    """Build `cls` (a dataclass or a type annotation) from plain data, validating as it goes."""
    where = where or _Where("<recipe>", None)
    return _convert(data, cls, where, key)


def from_options(data: dict, cls: type[T], options: dict[str, str], source: str) -> T:
    """Build `cls` from values given as command-line options (no recipe file): an error names the
    option that gave the bad value (`options`: dotted key -> option), else `source`."""
    return from_dict(data, cls, _Where(source, None, options=options))


def to_dict(obj: Any) -> Any:
    """Dataclass tree -> plain data (enums by value), suitable for YAML/JSON."""
    if hasattr(obj, "to_config") and not isinstance(obj, type):
        return obj.to_config()
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


def yaml_text(obj: Any) -> str:
    """A recipe (dataclass) as the YAML that loads it back."""
    return yaml.safe_dump(to_dict(obj), sort_keys=False)


def dump_yaml(obj: Any, path: str | Path) -> None:
    Path(path).write_text(yaml_text(obj))


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    for p in parents:
        data = data.setdefault(p, {})
    data[last] = value


def _type_name(tp: Any) -> str:
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return "one of " + ", ".join(repr(m.value) for m in tp)
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, where: _Where, key: str) -> Any:
    origin = typing.get_origin(tp)
    label = key or "<top>"
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        choices = [a for a in args if a is not type(None)]
        if len(choices) == 1:  # Optional[X]: X's own error is the useful one
            return _convert(value, choices[0], where, key)
        for arg in choices:
            try:
                return _convert(value, arg, where, key)
            except ConfigError:
                continue
        raise where.error(key, f"'{label}': {value!r} matches none of " + ", ".join(map(_type_name, choices)))
    if isinstance(tp, type) and hasattr(tp, "from_config"):
        # A type that parses its own YAML shape (e.g. an algorithm entry whose settings depend on its
        # name); it reports errors through `error(subkey, message)` so they keep file:line:key.
        if isinstance(value, tp):
            return value

        def error(sub: str, msg: str) -> ConfigError:
            return where.error(f"{key}.{sub}" if sub else key, f"'{label}': {msg}")

        try:
            return tp.from_config(value, lambda v, t: _convert(v, t, where, key), error)
        except ConfigError:
            raise
        except (ValueError, TypeError) as e:
            raise where.error(key, f"'{label}': {e}") from None
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise where.error(key, f"'{label}' must be a mapping, got {value!r}")
        hints = typing.get_type_hints(tp, include_extras=True)
        fields = {f.name: f for f in dataclasses.fields(tp) if f.init}
        unknown = [k for k in value if k not in fields]
        if unknown:
            sub = f"{key}.{unknown[0]}" if key else str(unknown[0])
            section = f"in '{key}'" if key else "at the top level"
            raise where.error(sub, f"unknown key '{sub}'; allowed {section}: " + ", ".join(fields))
        kwargs = {}
        for name, f in fields.items():
            sub = f"{key}.{name}" if key else name
            if name in value and value[name] is None and f.default is None:
                kwargs[name] = None   # an optional section written out as null (e.g. by to_dict)
            elif name in value:
                kwargs[name] = _convert(value[name], hints[name], where, sub)
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise where.error(key, f"missing required key '{sub}'")
        try:
            obj = tp(**kwargs)
        except (ValueError, TypeError) as e:
            # A whole-recipe check (the message names its keys) has no section to prefix; one about a
            # single key (KeyedError) is reported where that key is.
            at = e.key if isinstance(e, KeyedError) else None
            located = key if at is None else (f"{key}.{at}" if key else at)
            raise where.error(located, f"'{label}': {e}" if key else str(e)) from None
        return obj
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        try:
            return tp(value)
        except ValueError:
            raise where.error(key, f"'{label}': {value!r} is not allowed; use {_type_name(tp)}") from None
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise where.error(key, f"'{label}' must be a list, got {value!r}")
        (arg, *_rest) = typing.get_args(tp) or (Any,)
        return [_convert(v, arg, where, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise where.error(key, f"'{label}' must be a mapping, got {value!r}")
        kt, vt = typing.get_args(tp) or (Any, Any)
        return {k: _convert(v, vt, where, f"{key}.{k}") for k, v in value.items()}
    if origin is typing.Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise where.error(key, f"'{label}': {value!r} is not allowed; use one of "
                                   + ", ".join(repr(a) for a in allowed))
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typing.get_origin(tp) is typing.Annotated:
        inner, *meta = typing.get_args(tp)
        out = _convert(value, inner, where, key)
        if RELATIVE_TO_RECIPE in meta and isinstance(out, Path):
            out = out.expanduser()
            if not out.is_absolute():
                out = Path(os.path.normpath((Path.cwd() if key in where.from_cwd or where.base is None
                                             else where.base) / out))
        return out
    if tp is Path and isinstance(value, str):
        return Path(value)
    if isinstance(tp, type) and not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise where.error(key, f"'{label}' must be {_type_name(tp)}, got {value!r}")
    return value
