"""Typed method settings: frozen dataclasses built from config mappings.

A method's settings class is the one place its defaults live. :func:`from_mapping` builds it from
a (Hydra) mapping, nested settings from nested mappings, and turns every bad value into one
:class:`~expansion.base.ExpansionError` line naming the key; :func:`signature_of` is what the
store key hashes (fields marked :func:`speed_only` left out); :func:`config_node` is the defaults
as a plain mapping, which ``experiments.config`` registers for the method configs to compose.

A field made with :func:`fidelity_quirk` is one way the official code departs from the paper: its
value under ``fidelity: paper`` and under ``fidelity: official``. A settings class with a
``fidelity`` field fills every quirk its mapping does not give (nested settings included) from that
preset (:func:`apply_fidelity`), and its config node interpolates the same choice
(``${fidelity_pick:...}``), so a user can switch the whole preset or one quirk at a time.
"""

from __future__ import annotations

import math
import types
import typing
from collections.abc import Mapping
from dataclasses import MISSING, Field, field, fields, is_dataclass
from typing import Any

from .errors import ExpansionError, SettingsError

_SPEED_ONLY = "speed_only"
_QUIRK = "fidelity_quirk"
_KEYED_WHEN_SET = "keyed_when_set"
FIDELITIES = ("paper", "official")


def speed_only(default: Any = None) -> Any:
    """A field that changes speed or memory only, never the output: kept out of the store key
    (``default=MISSING``: a required field)."""
    return field(default=default, metadata={_SPEED_ONLY: True})


def is_speed_only(f: Field) -> bool:
    return bool(f.metadata.get(_SPEED_ONLY))


def keyed_when_set(default: Any = None, *, default_factory: Any = MISSING) -> Any:
    """A setting added after stores were keyed: left out of the store key at its ``default`` (which
    reproduces the output from before it existed), so those stores are still found; nested settings give
    their class as ``default_factory``."""
    if default_factory is not MISSING:
        return field(default_factory=default_factory, metadata={_KEYED_WHEN_SET: True})
    return field(default=default, metadata={_KEYED_WHEN_SET: True})


def _default_of(f: Field) -> Any:
    return f.default_factory() if f.default_factory is not MISSING else f.default


def fidelity_quirk(paper: Any, official: Any, *, keyed_at_paper: bool = False) -> Any:
    """A setting where the official code departs from the paper: ``paper`` is the default,
    ``official`` what ``fidelity: official`` sets (both plain values); in the store key only when
    not ``paper`` (unless ``keyed_at_paper``: a setting older than the fidelity switch)."""
    metadata = {_QUIRK: {"paper": paper, "official": official}, _KEYED_WHEN_SET: not keyed_at_paper}
    return field(default=paper, metadata=metadata)


def quirk_values(f: Field) -> dict[str, Any] | None:
    """``{"paper": ..., "official": ...}`` of a :func:`fidelity_quirk` field, else None."""
    return f.metadata.get(_QUIRK)


def check_fidelity(fidelity: Any, key: str = "method.fidelity") -> str:
    if fidelity not in FIDELITIES:
        raise SettingsError(f"{key} must be one of {FIDELITIES}, got {fidelity!r}")
    return fidelity


def apply_fidelity(cls: type, values: Mapping[str, Any], fidelity: str) -> dict[str, Any]:
    """``values`` with every :func:`fidelity_quirk` field of ``cls`` it does not give set to the
    ``fidelity`` preset (one of :data:`FIDELITIES`), nested settings (a mapping, or absent) included."""
    out = dict(values)
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        quirk = quirk_values(f)
        if quirk is not None and f.name not in out:
            out[f.name] = quirk[fidelity]
            continue
        nested = next((o for o in _options(hints[f.name]) if is_dataclass(o)), None)
        if nested is not None and any(quirk_values(g) for g in fields(nested)):
            given = out.get(f.name)
            if given is None and f.name in out:
                continue  # explicitly null
            if given is None or isinstance(given, Mapping):
                out[f.name] = apply_fidelity(nested, given or {}, fidelity)
    return out


def check_ranges(settings: Any, checks: list[tuple[bool, str, str]]) -> None:
    """``checks``: ``(holds, key, allowed)``; the first that does not hold is one
    :class:`~expansion.errors.SettingsError` line naming the key, what is allowed and the value."""
    for holds, key, allowed in checks:
        if not holds:
            raise SettingsError(f"{key} must be {allowed}, got {getattr(settings, key)!r}")


def from_mapping(cls: type, values: Mapping[str, Any] | Any | None, what: str) -> Any:
    """``cls(**values)`` with nested settings built from nested mappings, lists turned into
    tuples, ints accepted for floats, and one clear error for an unknown key or a value of the
    wrong type (``what`` names the settings in the message, e.g. ``method gif_sd``)."""
    if isinstance(values, cls):
        return values
    if values is not None and not isinstance(values, Mapping):
        raise ExpansionError(f"{what} must be a mapping of settings, got {values!r}")
    values = dict(values or {})
    known = {f.name: f for f in fields(cls) if f.init}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ExpansionError(f"{what}: unknown setting(s) {unknown}; known: {sorted(known)}")
    if "fidelity" in known:
        fidelity = values.get("fidelity", known["fidelity"].default)
        values = apply_fidelity(cls, values, check_fidelity(fidelity, f"{what}: fidelity"))
    for name, value in values.items():  # a nested mapping starts from the field's own default, not its class's
        default = _default_of(known[name]) if known[name].default_factory is not MISSING else None
        if isinstance(value, Mapping) and is_dataclass(default):
            values[name] = {f.name: getattr(default, f.name) for f in fields(default) if f.init} | dict(value)
    hints = typing.get_type_hints(cls)
    kwargs = {name: _coerce(hints[name], value, f"{what}.{name}") for name, value in values.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError, ExpansionError) as exc:  # a missing setting, or a failed check
        raise ExpansionError(f"{what}: {exc}") from exc


def _options(tp: Any) -> tuple[Any, ...]:
    """The members of a ``X | Y`` / ``Optional[X]`` annotation, or ``(tp,)``."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return typing.get_args(tp)
    return (tp,)


def _coerce(tp: Any, value: Any, what: str) -> Any:
    options = _options(tp)
    if value is None:
        if type(None) in options or tp is Any:
            return None
        raise ExpansionError(f"{what} must be set (got null)")
    for option in options:
        if is_dataclass(option) and isinstance(value, Mapping | option):
            return from_mapping(option, value, what)
    for option in options:
        if option is bool and isinstance(value, bool):
            return value
        if option is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if option is float and isinstance(value, int | float) and not isinstance(value, bool):
            if not math.isfinite(float(value)):
                raise ExpansionError(f"{what} must be a finite number, got {value!r}")
            return float(value)
        if option is str and isinstance(value, str):
            return value
        origin = typing.get_origin(option) or option
        if origin is tuple and isinstance(value, list | tuple):
            return tuple(value)
        if origin in (dict, Mapping) and isinstance(value, Mapping):
            return dict(value)
        if option is Any:
            return value
    names = " or ".join(_type_name(o) for o in options)
    raise ExpansionError(f"{what} must be {names}, got {value!r}")


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    origin = typing.get_origin(tp)
    return {tuple: "a list", dict: "a mapping"}.get(origin, getattr(tp, "__name__", str(tp)))


def _jsonable(value: Any) -> Any:
    if is_dataclass(value):
        return signature_of(value)
    if isinstance(value, tuple | list):
        return [_jsonable(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


def field_signature(settings: Any) -> dict[str, Any]:
    """Every field that is not speed-only (nor a :func:`keyed_when_set` field at its default),
    nested settings by their own signature."""
    return {
        f.name: _jsonable(getattr(settings, f.name))
        for f in fields(settings)
        if not is_speed_only(f)
        and not (f.metadata.get(_KEYED_WHEN_SET) and getattr(settings, f.name) == _default_of(f))
    }


def signature_of(settings: Any) -> dict[str, Any]:
    """What of ``settings`` changes the output: its ``signature()`` if it defines one, else
    :func:`field_signature`."""
    own = getattr(type(settings), "signature", None)
    return own(settings) if callable(own) else field_signature(settings)


def config_node(cls: type) -> dict[str, Any]:
    """The defaults of settings class ``cls`` as a plain mapping (nested settings as mappings,
    tuples as lists), every field included: what a method config composes. With a ``fidelity``
    field, every quirk is the interpolation ``${fidelity_pick:<fidelity>,<paper>,<official>}``."""
    with_fidelity = any(f.name == "fidelity" for f in fields(cls))
    return _node(cls, None, depth=0 if with_fidelity else None)


def _node(cls: type, value: Any, depth: int | None) -> dict[str, Any]:
    node: dict[str, Any] = {}
    for f in fields(cls):
        if not f.init:
            continue
        if value is not None:
            v = getattr(value, f.name)
        elif f.default is not MISSING:
            v = f.default
        elif f.default_factory is not MISSING:
            v = f.default_factory()
        else:
            continue  # required: the method config must give it
        quirk = quirk_values(f)
        if quirk is not None and depth is not None:
            node[f.name] = quirk_interpolation(quirk, "." * (depth + 1) + "fidelity")
        elif is_dataclass(v):
            node[f.name] = _node(type(v), v, None if depth is None else depth + 1)
        else:
            node[f.name] = _plain(v)
    return node


def quirk_interpolation(quirk: Mapping[str, Any], fidelity_key: str) -> str:
    """``${fidelity_pick:${<fidelity_key>},<paper>,<official>}`` (null for None)."""
    paper, official = (yaml_literal(quirk[name]) for name in FIDELITIES)
    return f"${{fidelity_pick:${{{fidelity_key}}},{paper},{official}}}"


def yaml_literal(value: Any) -> str:
    """``value`` as it is written inside an interpolation's arguments (null, true, 0.9, a quoted string
    where it holds a character that would end or nest the argument)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    text = str(value)
    if isinstance(value, str) and not text.startswith("${") and any(c in text for c in ",{}[]'\" :"):
        return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return text


def fidelity_pick(fidelity: str, paper: Any, official: Any) -> Any:
    """The ``fidelity_pick`` resolver: ``paper`` or ``official`` by ``fidelity`` (a list as an
    OmegaConf list, so that ``OmegaConf.resolve`` can store it)."""
    value = {"paper": paper, "official": official}[check_fidelity(fidelity)]
    if isinstance(value, list):
        from omegaconf import OmegaConf

        return OmegaConf.create(value)
    return value


def _plain(value: Any) -> Any:
    if is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in fields(value) if f.init}
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    return value
