"""Search spaces over settings: ranges and choices, shared by the defenses' tuning spaces (each
defense's ``SEARCH_SPACE``, next to its ``Settings``) and the adaptive attacker's.

    SEARCH_SPACE = {"rho": Float(0.01, 10.0, log=True), "alignment_steps": Scale(0.5, 2.0)}

``Scale`` multiplies the setting's current value (its preset or the bench's override), for
settings whose sensible range depends on the run (phase lengths in steps).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional


@dataclass(frozen=True)
class Float:
    low: float
    high: float
    log: bool = False


@dataclass(frozen=True)
class Int:
    low: int
    high: int
    log: bool = False


@dataclass(frozen=True)
class Choice:
    options: tuple


@dataclass(frozen=True)
class Scale:
    """A multiplier (log-uniform in [low, high]) of the setting's base value; an int setting is
    rounded and kept >= 1."""
    low: float
    high: float


Param = Any  # Float | Int | Choice | Scale


def check_param(name: str, p: Param, where: str) -> None:
    """One line naming ``where.name`` for an empty or inverted range, or an empty choice."""
    key = f"{where}.{name}" if where else name
    if isinstance(p, Choice):
        if not isinstance(p.options, (tuple, list)) or not p.options:
            raise ValueError(f"{key}: expected at least one option, got {p.options!r}")
        return
    if not isinstance(p, (Float, Int, Scale)):
        raise ValueError(f"{key}: expected a Float, Int, Choice or Scale, got {p!r}")
    lo, hi = p.low, p.high
    ok = all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in (lo, hi))
    if isinstance(p, Int):
        ok = ok and isinstance(lo, int) and isinstance(hi, int)
    if not ok or lo > hi:
        raise ValueError(f"{key}: expected a range low <= high of finite numbers, got [{lo!r}, {hi!r}]")
    if (getattr(p, "log", False) or isinstance(p, Scale)) and lo <= 0:
        raise ValueError(f"{key}: a log range needs low > 0, got [{lo!r}, {hi!r}]")


def check_space(space: Mapping[str, Param], where: str) -> None:
    if not isinstance(space, Mapping):
        raise ValueError(f"{where}: expected a mapping setting -> range, got {type(space).__name__}")
    for name, p in space.items():
        check_param(name, p, where)


def suggest(trial, name: str, p: Param, base: Optional[Any] = None) -> Any:
    """The trial's value for ``name`` (an Optuna trial); ``base`` is the setting's value that a
    ``Scale`` multiplies."""
    if isinstance(p, Float):
        return trial.suggest_float(name, float(p.low), float(p.high), log=p.log)
    if isinstance(p, Int):
        return trial.suggest_int(name, p.low, p.high, log=p.log)
    if isinstance(p, Choice):
        return trial.suggest_categorical(name, list(p.options))
    if isinstance(p, Scale):
        if not isinstance(base, (int, float)) or isinstance(base, bool):
            raise ValueError(f"{name}: a Scale range needs a numeric base value, got {base!r}")
        m = trial.suggest_float(f"{name}_scale", float(p.low), float(p.high), log=True)
        return max(1, round(base * m)) if isinstance(base, int) else base * m
    raise ValueError(f"{name}: unknown range {p!r}")


def contains(p: Param, value: Any, base: Optional[Any] = None) -> bool:
    """Whether ``value`` lies in ``p`` (a Scale: whether value / base does)."""
    if isinstance(p, Choice):
        return value in p.options
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    if isinstance(p, Scale):
        return isinstance(base, (int, float)) and base > 0 and p.low <= value / base <= p.high
    return p.low <= value <= p.high


def require_int(what: str, value: Any, least: int, note: str = "") -> None:
    """One line when ``value`` is not an int >= ``least`` (a bool is not an int here):
    "<what> must be an int >= <least><note>, got <value>"."""
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ValueError(f"{what} must be an int >= {least}{note}, got {value!r}")


def require_number(what: str, value: Any, *, low: float = 0.0, low_open: bool = False,
                   high: float = math.inf) -> None:
    """One line when ``value`` is not a finite number >= ``low`` (> when ``low_open``) and below
    ``high`` (a bool is not a number here)."""
    ok = (not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
          and (value > low if low_open else value >= low) and value < high)
    if not ok:
        if math.isinf(high):
            expected = f"a finite number {'>' if low_open else '>='} {low:g}"
        else:
            expected = f"a number in {'(' if low_open else '['}{low:g}, {high:g})"
        raise ValueError(f"{what} must be {expected}, got {value!r}")


def describe(space: Mapping[str, Param]) -> dict:
    """A JSON-able view: name -> {"kind", ...}."""
    out = {}
    for name, p in space.items():
        if isinstance(p, Choice):
            out[name] = {"kind": "choice", "options": list(p.options)}
        elif isinstance(p, Scale):
            out[name] = {"kind": "scale", "low": p.low, "high": p.high}
        else:
            out[name] = {"kind": "int" if isinstance(p, Int) else "float", "low": p.low, "high": p.high,
                         "log": p.log}
    return out


__all__ = ["Choice", "Float", "Int", "Param", "Scale", "check_param", "check_space", "contains", "describe",
           "require_int", "require_number", "suggest"]
