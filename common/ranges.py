"""Allowed ranges of numeric config values, declared on the config dataclasses' fields.

A field declares its range where it is defined::

    epochs: int = ranged(20, ">= 1")
    dropout: float = ranged(0.1, "[0, 1)")
    betas: list[float] = ranged(spec="[0, 1)", factory=lambda: [0.9, 0.98])   # every item

Specs: ``>= a``, ``> a``, ``<= b``, ``< b`` and intervals ``[a, b]``, ``[a, b)``, ``(a, b]``,
``(a, b)``. ``None`` (an optional value left unset) is always allowed; NaN and infinities never.

:func:`check_ranges` walks a loaded config tree and checks every declared value with
:func:`genius.common.config_checks.check_number` (one message format for every stage: the dotted
key, the value, the allowed range, what to do). :func:`ranged_fields` and
:func:`unranged_numbers` let a test try a value outside every declared range and insist that
every number of a stage's config declares one.
"""
from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Union, get_args, get_origin

RANGE = "genius_range"  # the dataclass field metadata key

# Ranges shared by the stages. The upper bounds are far beyond any real setting; they exist so
# that a slip (an extra digit, 1e30) is refused before any work instead of overflowing a seed,
# segfaulting the thread pool or allocating terabytes after the previous run was moved aside.
SEED = "[0, 4294967295]"  # numpy's seeds are 32-bit
THREADS = "[1, 4096]"
WIDTH = "[1, 65536]"  # a vector or hidden width
BATCH = "[1, 1048576]"
EPOCHS = "[1, 100000]"


@dataclass(frozen=True)
class Range:
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    text: str = ""

    def outside(self) -> float | int:
        """A value just outside the range (for tests): below the lower bound, else above the upper."""
        if self.low is not None:
            return self.low if self.low_open else self.low - 1
        return self.high if self.high_open else self.high + 1


_BOUND = re.compile(r"^\s*(>=|>|<=|<)\s*(\S+)\s*$")
_INTERVAL = re.compile(r"^\s*([\[(])\s*(\S+)\s*,\s*(\S+)\s*([\])])\s*$")


def parse_range(spec: str) -> Range:
    if m := _BOUND.match(spec):
        op, value = m[1], float(m[2])
        if op.startswith(">"):
            return Range(low=value, low_open=op == ">", text=spec.strip())
        return Range(high=value, high_open=op == "<", text=spec.strip())
    if m := _INTERVAL.match(spec):
        return Range(float(m[2]), float(m[3]), m[1] == "(", m[4] == ")", text=spec.strip())
    raise ValueError(f"not a range spec: {spec!r}")


def ranged(default: Any = dataclasses.MISSING, spec: str = "", *, factory: Callable[[], Any] | None = None) -> Any:
    """A dataclass field whose value (each item, for a list) must lie in ``spec``."""
    metadata = {RANGE: parse_range(spec)}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def _values(key: str, value: Any) -> Iterator[tuple[str, Any]]:
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            yield f"{key}[{i}]", item
    else:
        yield key, value


def check_ranges(cfg: Any, prefix: str = "") -> None:
    """Raise (``ValueError``, one line) for the first value of the config tree ``cfg`` outside its
    field's declared range."""
    from genius.common.config_checks import check_number

    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        key, value = f"{prefix}{f.name}", getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            check_ranges(value, key + ".")
            continue
        if isinstance(value, (list, tuple)) and value and all(dataclasses.is_dataclass(v) for v in value):
            for i, item in enumerate(value):
                check_ranges(item, f"{key}[{i}].")
            continue
        allowed = f.metadata.get(RANGE)
        if allowed is None or value is None:
            continue
        integer = _integer(hints[f.name])
        for name, item in _values(key, value):
            check_number(name, item, lo=allowed.low, hi=allowed.high, lo_open=allowed.low_open,
                         hi_open=allowed.high_open, integer=integer, optional=_optional(hints[f.name]))


def _optional(tp: Any) -> bool:
    return get_origin(tp) in (Union, types.UnionType) and type(None) in get_args(tp)


def _integer(tp: Any) -> bool:
    if tp is int:
        return True
    return get_origin(tp) in (Union, types.UnionType, list, tuple) and \
        all(_integer(arg) for arg in get_args(tp) if arg is not type(None) and arg is not Ellipsis)


def _numeric(tp: Any) -> bool:
    if tp in (int, float):
        return True
    origin = get_origin(tp)
    if origin in (Union, types.UnionType, list, tuple):
        return any(_numeric(arg) for arg in get_args(tp) if arg is not type(None) and arg is not Ellipsis)
    return False


def ranged_fields(cls: type, prefix: str = "") -> dict[str, Range]:
    """Every field of the config tree ``cls`` that declares a range, by dotted key."""
    found: dict[str, Range] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            found.update(ranged_fields(tp, f"{prefix}{f.name}."))
        elif RANGE in f.metadata:
            found[f"{prefix}{f.name}"] = f.metadata[RANGE]
    return found


def unranged_numbers(cls: type, prefix: str = "") -> list[str]:
    """Dotted keys of numeric fields of the config tree ``cls`` that declare no range."""
    missing: list[str] = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            missing += unranged_numbers(tp, f"{prefix}{f.name}.")
        elif _numeric(tp) and RANGE not in f.metadata:
            missing.append(f"{prefix}{f.name}")
    return missing
