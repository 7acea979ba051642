"""Strict YAML configs mapped onto typed dataclasses.

Every stage declares one dataclass tree (fields with types and defaults) and loads it with
``load_config``. The YAML holds only what differs from the defaults. Anything the dataclasses do
not declare, a value of the wrong type, or a string outside a ``Literal[...]`` set fails before
any work starts, with the dotted key and the valid choices in the message. ``--set a.b=value``
overrides are applied to the parsed mapping, never written back to the YAML file.
"""
from __future__ import annotations

import codecs
import contextlib
import dataclasses
import json
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, Iterator, Literal, TypeVar, Union, get_args, get_origin

import yaml

from genius.common.io import atomic_write_text

T = TypeVar("T")

REPO_ROOT = Path(__file__).resolve().parent.parent


class ConfigError(ValueError):
    """A config file or override that does not fit the stage's schema."""


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(c) for c in get_args(tp))
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against annotation ``tp`` and return it converted (e.g. int -> float)."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key}: {value!r} is not a valid choice; valid choices: {', '.join(map(repr, choices))}")
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} does not fit {tp}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping (section {tp.__name__}), got {type(value).__name__}")
        return _build(tp, value, key)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        args = get_args(tp) or (Any,)
        if origin is tuple and Ellipsis not in args:  # tuple[float, float]: exactly that many items
            if len(value) != len(args):
                raise ConfigError(f"{key}: expected a list of {len(args)} items, got {len(value)}: {value!r}")
            return tuple(_convert(v, item_tp, f"{key}[{i}]") for i, (v, item_tp) in enumerate(zip(value, args)))
        items = [_convert(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
        k_tp, v_tp = get_args(tp) or (Any, Any)
        return {_convert(k, k_tp, f"{key}.{k}"): _convert(v, v_tp, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if not -2**63 <= value < 2**63:  # every integer is stored, seeded or allocated as a 64-bit one
            raise ConfigError(f"{key}: {value} does not fit a 64-bit integer; use a smaller value")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            return float(value)
        except OverflowError:  # an integer of hundreds of digits
            raise ConfigError(f"{key}: {value} is too large for a floating-point number; use a smaller value") from None
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"config field {key} has an unsupported annotation {tp}")


class _Refused(yaml.MarkedYAMLError):
    pass


class StrictLoader(yaml.SafeLoader):
    """The YAML loader of configs and ``--set`` values: PyYAML's safe loader (no Python objects)
    that refuses a key given twice in one mapping (the later one would silently win) and reads
    ``1e-3`` as a number, as YAML 1.2 does (YAML 1.1 wants ``1.0e-3`` and reads ``1e-3`` as a string).
    The integers YAML 1.1 reads otherwise than 1.2 and than a reader expects, ``017`` (octal 15)
    and ``1:30`` (base 60: 90), are refused."""

    def construct_yaml_int(self, node: yaml.ScalarNode) -> int:
        digits = str(node.value).replace("_", "").lstrip("+-")
        if ":" in digits or (len(digits) > 1 and digits[0] == "0" and digits.isdigit()):
            raise _Refused(problem=f"{node.value!r} is read as octal or base 60 by YAML 1.1; write the number "
                                   "without a leading zero or colon, or quote it for a string",
                           problem_mark=node.start_mark)
        return super().construct_yaml_int(node)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                continue  # merge keys may repeat what they merge; unhashable keys: the safe loader's error
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise _Refused(problem=f"key {key!r} is given twice in one section; keep one of them",
                               problem_mark=key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


class _StrictDumper(yaml.SafeDumper):
    """The safe dumper quoting every string StrictLoader would read as something else ("1e5")."""


StrictLoader.add_constructor("tag:yaml.org,2002:int", StrictLoader.construct_yaml_int)
for _cls in (StrictLoader, _StrictDumper):
    _cls.add_implicit_resolver("tag:yaml.org,2002:float",
                               re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))


def _yaml_problem(err: yaml.YAMLError) -> tuple[int | None, str]:
    """A YAML error's line (1-based; None when it has none) and problem, without PyYAML's excerpt."""
    mark = getattr(err, "problem_mark", None)
    return (mark.line + 1 if mark is not None else None), " ".join((getattr(err, "problem", None) or str(err)).split())


def _build(cls: type[T], data: dict, prefix: str = "") -> T:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f"section '{prefix}'" if prefix else "the top level"
        raise ConfigError(
            f"unknown config key '{_join(prefix, unknown[0])}' in {where}; valid keys: {', '.join(sorted(fields))}"
        )
    kwargs = {name: _convert(value, hints[name], _join(prefix, name)) for name, value in data.items()}
    obj = cls(**kwargs)
    check = getattr(obj, "validate", None)
    if check is not None:
        try:
            check()
        except ValueError as err:
            raise ConfigError(f"{prefix or 'config'}: {err}") from None
    return obj


def require_positive(values: dict[str, float | int | None]) -> None:
    """For a section's ``validate``: every named value that is set (not None) must be > 0."""
    bad = [name for name, value in values.items() if value is not None and value <= 0]
    if bad:
        raise ValueError(f"{', '.join(bad)} must be positive")


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (['a', 'b', 'c'], value parsed as a YAML scalar, list or mapping). A
    key part may index a list the config file sets: ``report.ks[0]=5``."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key part")
    try:
        value = yaml.load(raw, Loader=StrictLoader) if raw != "" else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override {text!r}: the value is not valid YAML ({_yaml_problem(err)[1]}); "
                          "quote it (key='\"text\"') or fix it") from None
    return key.split("."), value


_INDEXED = re.compile(r"^(.+)\[(\d+)\]$")


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """``data`` (plain YAML data, copied) with each ``--set`` applied. A mapping given for a section
    is merged into it (``train={epochs: 2}`` changes only ``train.epochs``)."""
    data = json.loads(json.dumps(data))  # deep copy of plain YAML data
    for text in overrides:
        path, value = parse_override(text)
        node: Any = data
        for depth, part in enumerate(path):
            last = depth == len(path) - 1
            indexed = _INDEXED.match(part)
            if indexed:  # an item of a list the config file sets
                name, index = indexed[1], int(indexed[2])
                items = node.get(name)
                if not isinstance(items, list) or index >= len(items):
                    held = f"holds {len(items)} items" if isinstance(items, list) else "does not set it as a list"
                    raise ConfigError(f"override {text!r}: the config file {held}; give the whole list "
                                      f"(--set {'.'.join(path[:depth] + [name])}=[...])")
                node, part = items, index
            elif not last:
                node.setdefault(part, {})  # a section the file does not set yet
            if last:
                old = node[part] if isinstance(node, list) else node.get(part)
                node[part] = _merged(old, value) if isinstance(value, dict) and isinstance(old, dict) else value
            else:
                node = node[part]
                if not isinstance(node, dict):
                    raise ConfigError(f"override {text!r}: '{path[depth]}' is a value, not a section")
    return data


def _merged(base: dict, update: dict) -> dict:
    """``base`` with ``update``'s keys set, sections merged key by key."""
    out = dict(base)
    for key, value in update.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def load_config(cls: type[T], path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> T:
    """Read ``path`` (YAML; may be None for pure defaults), apply overrides, validate into ``cls``."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            what = ("is a folder" if path.is_dir() else "does not exist" if not path.exists()
                    else "is not a regular file")
            raise ConfigError(f"config file {path} {what}; pass the stage's YAML file (relative paths resolve "
                              "against the current folder)")
        raw = path.read_bytes()
        raw = raw[len(codecs.BOM_UTF8):] if raw.startswith(codecs.BOM_UTF8) else raw
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            line = raw[:err.start].count(b"\n") + 1
            raise ConfigError(f"{path}:{line}: byte 0x{raw[err.start]:02x} is not UTF-8 text; save the file as "
                              "UTF-8") from None
        try:
            data = yaml.load(text, Loader=StrictLoader) or {}
        except yaml.YAMLError as err:
            line, problem = _yaml_problem(err)
            raise ConfigError(f"{path}{'' if line is None else f':{line}'}: not valid YAML: {problem}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
    data = apply_overrides(data, overrides or [])
    try:
        cfg = _build(cls, data)
        _check_declared_ranges(cfg)
        return cfg
    except ConfigError as err:
        given = _override_of(str(err), overrides or [])
        where = f"--set {given}" if given is not None else path
        raise ConfigError(f"{where}: {err}" if where is not None else str(err)) from None


_NAMED_KEY = re.compile(r"^unknown config key '([^']+)'|^([A-Za-z_][\w.\[\]]*):")


def _override_of(message: str, overrides: list[str]) -> str | None:
    """The last ``--set`` that gave the key a config error names (itself, or a section holding
    it), so the error points at the command line rather than at the file; None: the file's."""
    named = _NAMED_KEY.match(message)
    if named is None:
        return None
    key = named[1] or named[2]
    for text in reversed(overrides):
        given = text.split("=", 1)[0]
        if key == given or key.startswith((f"{given}.", f"{given}[")):
            return text
    return None


def _check_declared_ranges(cfg: Any) -> None:
    """Every number whose field declares a range (``common.ranges.ranged``) lies in it."""
    from genius.common.ranges import check_ranges

    try:
        check_ranges(cfg)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def config_to_dict(cfg: Any) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def save_config(cfg: Any, path: str | os.PathLike) -> None:
    """Write the resolved config (defaults filled in, overrides applied) as YAML, atomically."""
    atomic_write_text(path, yaml.dump(config_to_dict(cfg), Dumper=_StrictDumper, sort_keys=False))


def project_root() -> Path:
    """Where relative config paths resolve: $GENIUS_ROOT if set, else the repository root.

    Setting GENIUS_ROOT moves a whole setting's data and artefacts (worlds/, extracted_embed/,
    checkpoint/, results/) elsewhere without editing any YAML; the tests use it to run the
    real run scripts inside a temporary folder.
    """
    return Path(os.environ.get("GENIUS_ROOT") or REPO_ROOT)


@contextlib.contextmanager
def project_root_set_to(root: str | os.PathLike) -> Iterator[None]:
    """Resolve relative config paths against ``root`` inside the block (a finished run's manifest
    records the root its configs were resolved against, so loading it later finds the same files)."""
    before = os.environ.get("GENIUS_ROOT")
    os.environ["GENIUS_ROOT"] = str(root)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("GENIUS_ROOT", None)
        else:
            os.environ["GENIUS_ROOT"] = before


def resolve_path(path: str | os.PathLike, root: str | os.PathLike | None = None) -> Path:
    """A config path: absolute as given, relative against ``root`` (default: ``project_root()``)."""
    path = Path(os.path.expanduser(str(path)))
    if path.is_absolute():
        return path
    return Path(root if root is not None else project_root()) / path
