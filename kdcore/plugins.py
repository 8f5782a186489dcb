"""The plugin manager: finds strategies through entry points and looks them up by name.

Every strategy, built-in or third-party, arrives the same way: a module listed in the ``kdcore``
entry-point group implements the registration hooks of :mod:`kdcore.hookspecs`. We load each
entry point ourselves, one at a time, so that one plugin that fails to import, fails validation
or raises inside its hook is *reported* (``kd list-plugins`` shows it as broken) instead of
taking the whole CLI down. A name registered twice is an error that names both distributions.

Environment switches:

- ``KD_DISABLE_PLUGINS=dist1,dist2`` skips those distributions; ``all`` keeps only kdcore's own.
- ``KD_TRACE_PLUGINS=1`` prints every hook call to stderr (pluggy's hook-call monitoring).
"""

from __future__ import annotations

import difflib
import importlib.metadata
import inspect
import math
import os
import re
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import pluggy
from pydantic import BaseModel, ValidationError

from kdcore import hookspecs
from kdcore.errors import PluginError
from kdcore.strategies import KINDS, Kind, Strategy

ENTRY_POINT_GROUP = "kdcore"
CORE_DISTRIBUTION = "kdcore"

_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]*$")


@dataclass
class PluginEntry:
    """One row of ``kd list-plugins``: a registered strategy, or a plugin that failed."""

    kind: str
    name: str
    description: str
    distribution: str
    version: str
    status: str = "ok"  # ok | broken | duplicate
    error: str | None = None
    cls: type[Strategy] | None = field(default=None, repr=False)

    def as_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "name": self.name,
            "description": self.description,
            "distribution": self.distribution,
            "version": self.version,
            "status": self.status,
            "error": self.error,
        }


@dataclass
class Registry:
    """All strategies found, by kind and name, plus the plugins that failed to load."""

    entries: list[PluginEntry]

    def names(self, kind: str) -> list[str]:
        return sorted({e.name for e in self.entries if e.kind == kind and e.status == "ok"})

    def entry(self, kind: str, name: str) -> PluginEntry:
        """The entry for ``name``, or a :class:`PluginError` saying what is known and what to do."""
        matches = [e for e in self.entries if e.kind == kind and e.name == name]
        if not matches:
            known = self.names(kind)
            hint = difflib.get_close_matches(name, known, n=1)
            suggestion = f" (did you mean '{hint[0]}'?)" if hint else ""
            broken = [e for e in self.entries if e.status == "broken" and e.kind in (kind, "plugin")]
            also = (
                "; some plugins failed to load, see `kd list-plugins`"
                if broken
                else "; install a plugin that provides it or check `kd list-plugins`"
            )
            raise PluginError(
                f"unknown {kind} '{name}'; known: {', '.join(known) or 'none'}{suggestion}{also}"
            )
        if matches[0].status != "ok":
            raise PluginError(matches[0].error or f"{kind} '{name}' is unavailable")
        return matches[0]

    def create(self, kind: str, name: str, params: Mapping[str, Any] | None = None) -> Strategy:
        """Instantiate a strategy with validated parameters."""
        entry = self.entry(kind, name)
        assert entry.cls is not None
        return entry.cls(validate_params(entry.cls, kind, name, params or {}))


def instantiate_strategies(
    strategy_cfg: Any, registry: Registry | None = None
) -> dict[str, tuple[Strategy, dict]]:
    """Build the scorer, pacing, reliance and divergence a config names, with their provenance.

    Fails with a :class:`PluginError` on an unknown name or bad parameters, before anything heavy loads.
    """
    registry = registry or get_registry()
    out: dict[str, tuple[Strategy, dict]] = {}
    for kind in KINDS:
        spec = getattr(strategy_cfg, kind)
        entry = registry.entry(kind, spec.name)
        strategy = registry.create(kind, spec.name, spec.params)
        meta = {
            "name": spec.name,
            "params": strategy.params.model_dump(mode="json"),
            "distribution": entry.distribution,
            "version": entry.version,
        }
        out[kind] = (strategy, meta)
    return out


def _is_nan(value: Any) -> bool:
    """NaN as a number or as text (``nan``, ``.nan``: pydantic reads both as a float)."""
    if isinstance(value, str):
        return value.strip().lower() in ("nan", ".nan", "+nan", "-nan")
    return isinstance(value, float) and math.isnan(value)


def validate_params(cls: type[Strategy], kind: str, name: str, params: Mapping[str, Any]) -> BaseModel:
    """Validate ``params`` against the class's ``Params`` model, as one readable sentence on failure.

    NaN is refused first: it compares false with every bound, so a model would report the bound it fails.
    """
    fields = ", ".join(cls.Params.model_fields) or "none"
    for key, value in params.items():
        if _is_nan(value):
            raise PluginError(
                f"bad parameters for {kind} '{name}': {key} is nan, not a number; give a number "
                f"(accepted parameters: {fields})"
            )
    try:
        return cls.Params.model_validate(dict(params))
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'params'}: {err['msg']}" for err in exc.errors()
        )
        raise PluginError(
            f"bad parameters for {kind} '{name}': {problems} (accepted parameters: {fields})"
        ) from None


def disabled_distributions() -> set[str]:
    raw = os.environ.get("KD_DISABLE_PLUGINS", "")
    return {part.strip().lower() for part in raw.split(",") if part.strip()}


def _is_disabled(dist_name: str, disabled: set[str]) -> bool:
    if dist_name.lower() == CORE_DISTRIBUTION:
        return False
    return "all" in disabled or dist_name.lower() in disabled


def _dist_of(ep: importlib.metadata.EntryPoint) -> tuple[str, str]:
    dist = getattr(ep, "dist", None)
    if dist is None:
        return ("unknown", "")
    return (dist.metadata["Name"], dist.version)


def _make_manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager(ENTRY_POINT_GROUP)
    pm.add_hookspecs(hookspecs)
    if os.environ.get("KD_TRACE_PLUGINS"):

        def before(hook_name: str, hook_impls: list, kwargs: dict) -> None:
            plugins = ", ".join(impl.plugin_name for impl in hook_impls)
            print(f"[kd plugins] {hook_name} -> {plugins}", file=sys.stderr)

        def after(outcome: Any, hook_name: str, hook_impls: list, kwargs: dict) -> None:
            if outcome.exception is not None:
                print(f"[kd plugins] {hook_name} raised {outcome.exception!r}", file=sys.stderr)

        pm.add_hookcall_monitoring(before, after)
    return pm


def _one_line(exc: BaseException) -> str:
    """An exception as one line (pluggy's validation messages span several)."""
    text = "; ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    return f"{type(exc).__name__}: {text}".rstrip(": ")


def build_registry(entry_points: Iterable[importlib.metadata.EntryPoint] | None = None) -> Registry:
    """Load every ``kdcore`` entry point and collect what each registers.

    ``entry_points`` defaults to the installed ones; tests pass their own.
    """
    if entry_points is None:
        entry_points = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
    pm = _make_manager()
    entries: list[PluginEntry] = []
    provenance = _load_plugins(pm, entry_points, entries)
    by_key: dict[tuple[str, str], PluginEntry] = {}
    for kind in KINDS.values():
        for plugin_name, plugin in pm.list_name_plugin():
            if plugin is None or plugin_name not in provenance:
                continue
            hook = getattr(pm.hook, kind.hook)
            if any(impl.plugin is plugin for impl in hook.get_hookimpls()):
                _call_register_hook(pm, kind, plugin_name, plugin, provenance[plugin_name], by_key, entries)
    return Registry(entries)


def _load_plugins(
    pm: pluggy.PluginManager,
    entry_points: Iterable[importlib.metadata.EntryPoint],
    entries: list[PluginEntry],
) -> dict[str, tuple[str, str]]:
    """Import and register each entry point's module, kdcore's own first; one that fails is a broken
    entry. Returns plugin name -> (distribution, version) of those that loaded."""
    disabled = disabled_distributions()
    provenance: dict[str, tuple[str, str]] = {}
    for ep in sorted(entry_points, key=lambda e: (_dist_of(e)[0] != CORE_DISTRIBUTION, e.name)):
        dist, version = _dist_of(ep)
        if _is_disabled(dist, disabled):
            continue
        plugin_name = f"{dist}:{ep.name}"
        try:
            module = ep.load()
            pm.register(module, name=plugin_name)
        except Exception as exc:  # a broken plugin must never break the CLI
            entries.append(
                PluginEntry(
                    "plugin",
                    ep.name,
                    f"entry point {ep.value}",
                    dist,
                    version,
                    "broken",
                    f"plugin '{ep.name}' from {dist} failed to load: {_one_line(exc)}",
                )
            )
            continue
        provenance[plugin_name] = (dist, version)
    return provenance


def _call_register_hook(
    pm: pluggy.PluginManager,
    kind: Kind,
    plugin_name: str,
    plugin: Any,
    provenance: tuple[str, str],
    by_key: dict[tuple[str, str], PluginEntry],
    entries: list[PluginEntry],
) -> None:
    """Call one plugin's registration hook for ``kind`` alone, so that a raise is that plugin's fault;
    a name registered twice marks both entries as duplicates."""
    dist, version = provenance
    others = [p for _, p in pm.list_name_plugin() if p is not plugin]
    caller = pm.subset_hook_caller(kind.hook, remove_plugins=others)

    def register(name: str, cls: type) -> None:
        entry = _check_registration(kind.name, name, cls, kind.base, dist, version)
        previous = by_key.get((kind.name, entry.name))
        if previous is not None:
            msg = (
                f"{kind.name} '{entry.name}' is registered by both {previous.distribution} and "
                f"{dist}; uninstall one or disable it with KD_DISABLE_PLUGINS={dist}"
            )
            for clash in (previous, entry):
                clash.status, clash.error = "duplicate", msg
        else:
            by_key[(kind.name, entry.name)] = entry
        entries.append(entry)

    try:
        caller(register=register)
    except Exception as exc:
        entries.append(
            PluginEntry(
                kind.name,
                plugin_name.split(":", 1)[1],
                f"{kind.hook} hook",
                dist,
                version,
                "broken",
                f"plugin {plugin_name} raised in {kind.hook}: {_one_line(exc)}",
            )
        )


def _check_registration(
    kind: str, name: Any, cls: Any, base: type[Strategy], dist: str, version: str
) -> PluginEntry:
    """Reject a bad registration now, at load time, rather than mid-training."""
    description = cls.summary() if inspect.isclass(cls) and issubclass(cls, Strategy) else ""
    entry = PluginEntry(kind, str(name), description, dist, version, cls=cls)
    problem = None
    if not isinstance(name, str) or not _NAME.match(name):
        problem = f"name {name!r} must be lower-case letters, digits, '-', '_' or '.'"
    elif not inspect.isclass(cls) or not issubclass(cls, base):
        problem = f"{cls!r} is not a subclass of kdcore.{base.__name__}"
    elif inspect.isabstract(cls):
        missing = ", ".join(sorted(getattr(cls, "__abstractmethods__", ())))
        problem = f"{cls.__name__} does not implement {missing}"
    elif not (inspect.isclass(cls.Params) and issubclass(cls.Params, BaseModel)):
        problem = f"{cls.__name__}.Params must be a pydantic BaseModel"
    if problem:
        entry.status, entry.cls = "broken", None
        entry.error = f"{kind} '{name}' from {dist} was rejected: {problem}"
    return entry


_cache: dict[str, Registry] = {}


def get_registry() -> Registry:
    """The registry for the current environment, built once per ``KD_DISABLE_PLUGINS`` value."""
    key = os.environ.get("KD_DISABLE_PLUGINS", "")
    if key not in _cache:
        _cache[key] = build_registry()
    return _cache[key]
