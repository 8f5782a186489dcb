"""The arm grammar of ``kd compare``: ``--arm NAME=SPEC`` into a complete strategy tree, and back.

An arm is a name and a complete ``strategy`` tree; ``kd compare`` adds reference arms (CE only,
vanilla KD), a fixed-λ sweep and matched-λ baselines built from the same trees. The grammar::

    SPEC  := ITEM ("," ITEM)*                   commas inside (...) or [...] do not split
    ITEM  := KIND ":" NAME ["(" KEY=VALUE ("," KEY=VALUE)* ")"]      choose a strategy, with parameters
           | FIELD ("." FIELD)* "=" VALUE                            set one strategy field
    KIND  := one of kdcore.strategies.KINDS (scorer | pacing | reliance | divergence | source)

``VALUE`` is read as YAML (``0.7`` is a number, ``[0.7, 0.9]`` a list, ``true`` a boolean).
Dotted fields are relative to ``strategy`` (``reliance.params.quantile=0.7``, ``temperature=4``,
``reverse=true``). Arms start from the base config's strategy; naming a different strategy of a
kind replaces that kind's parameters, naming the same one (or setting ``KIND.params.KEY``) merges.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

from kdcore.config import StrategyConfig, deep_merge, load_yaml, set_path
from kdcore.errors import KdError
from kdcore.references import reference_strategy
from kdcore.strategies import KINDS

STRATEGY_FIELDS = set(StrategyConfig.model_fields)
#: reliance policies that give every sample the same λ (all others get a matched-λ baseline)
UNIFORM_RELIANCE = {"fixed", "none"}


@dataclass(frozen=True)
class Preset:
    """A named set of arms (``--preset``), and base-config values it runs them with: defaults that
    ``--config``, the options and ``--set`` override."""

    arms: tuple[str, ...]
    settings: Mapping[str, Any] = field(default_factory=dict)  # dotted base-config field -> value


SEED_PAPER_ARMS = (
    "ce=reliance:none",
    "kd=reliance:fixed",
    "kd-cl=scorer:student-snapshot,pacing:root,reliance:fixed",
    "kd-cl-sr=scorer:student-snapshot,pacing:root,reliance:threshold",
    "kd-cl-sr-teacher=scorer:teacher-confidence,pacing:root,reliance:threshold",
)

#: The regime of ``seed-paper-multi-epoch``, in this one place: a data-limited student trained for many
#: epochs (the first 5 % of the training text; 800 steps × 16 samples are about 33 epochs of that share of
#: tinyshakespeare), at τ = 1. Every value is a default of the preset's base config.
MULTI_EPOCH_REGIME: dict[str, Any] = {
    "data.train_share": 0.05,
    "training.max_steps": 800,
    "strategy.temperature": 1.0,
}

PRESETS: dict[str, Preset] = {
    "seed-paper": Preset(SEED_PAPER_ARMS),
    "seed-paper-multi-epoch": Preset(
        (
            *SEED_PAPER_ARMS,
            # the reversed-reliance control of kd-cl-sr: the teacher on the easy samples, the same λ values
            "kd-cl-sr-inverted=scorer:student-snapshot,pacing:root,reliance:threshold(invert=true)",
        ),
        MULTI_EPOCH_REGIME,
    ),
}

_ARM_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
_ITEM_CHOICE = re.compile(r"^(?P<kind>[a-z]+):(?P<name>[^()=]+?)(?:\((?P<params>.*)\))?$", re.S)


@dataclass
class Arm:
    """One arm: a name, a complete strategy tree, and its role in the comparison."""

    name: str
    strategy: dict[str, Any]
    role: str = "arm"  # arm | ce | kd | sweep | matched
    spec: str = ""  # the text it came from (or a description)
    matched_to: str | None = None  # for role matched: the reliance arm whose mean λ it copies
    auto: bool = False  # added by kd compare, not asked for
    timed_to: str | None = None  # for role equal-time: the arm it runs at the kd arm's wall time

    @property
    def reliance(self) -> str:
        return self.strategy["reliance"]["name"]

    @property
    def source(self) -> str:
        return (self.strategy.get("source") or {}).get("name", "dataset")

    def is_vanilla_kd(self) -> bool:
        s = self.strategy
        return (
            s["reliance"]["name"] == "fixed"
            and s["scorer"]["name"] == "none"
            and s["pacing"]["name"] == "none"
            and self.source == "dataset"
            and not s.get("reverse", False)
        )

    def is_ce(self) -> bool:
        return (
            self.reliance == "none" and self.strategy["scorer"]["name"] == "none" and self.source == "dataset"
        )

    def varies_lambda(self) -> bool:
        return self.reliance not in UNIFORM_RELIANCE

    def fixed_lambda(self) -> float | None:
        if self.reliance != "fixed":
            return None
        return float(self.strategy["reliance"].get("params", {}).get("value", 0.5))

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "role": self.role,
            "spec": self.spec,
            "strategy": self.strategy,
            "matched_to": self.matched_to,
            "auto": self.auto,
            "timed_to": self.timed_to,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Arm:
        keys = ("name", "strategy", "role", "spec", "matched_to", "auto", "timed_to")
        return cls(**{k: data[k] for k in keys if k in data})


def split_top(text: str) -> list[str]:
    """Split on commas that are not inside (...) or [...] (or {...})."""
    parts, depth, current = [], 0, []
    for ch in text:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced '{ch}'")
        if ch == "," and depth == 0:
            parts.append("".join(current).strip())
            current = []
        else:
            current.append(ch)
    if depth != 0:
        raise ValueError("unbalanced parentheses or brackets")
    parts.append("".join(current).strip())
    return parts


def _yaml_value(raw: str) -> Any:
    raw = raw.strip()
    if not raw:
        return ""
    try:
        return load_yaml(raw)
    except (yaml.YAMLError, RecursionError):
        return raw


def parse_strategy_spec(spec: str, where: str) -> dict[str, Any]:
    """Parse SPEC into a strategy *patch*: ``{kind: {name, params}, field: value, ...}``."""
    if not spec.strip():
        raise KdError(f"{where}: the strategy is empty; write e.g. reliance:fixed")
    try:
        items = split_top(spec)
    except ValueError as exc:
        raise KdError(f"{where}: {exc} in '{spec}'") from None
    patch: dict[str, Any] = {}
    for item in items:
        if not item:
            raise KdError(f"{where}: empty item in '{spec}' (two commas in a row?)")
        choice = _ITEM_CHOICE.match(item)
        eq, colon = item.find("="), item.find(":")
        if choice and (eq < 0 or colon < eq):
            _choose(patch, choice, item, where)
        elif eq <= 0:
            raise KdError(
                f"{where}: '{item}' is neither KIND:NAME nor FIELD=VALUE; "
                "write e.g. reliance:threshold(quantile=0.7) or reliance.params.quantile=0.7"
            )
        else:
            _set_field(patch, item[:eq].strip(), item[eq + 1 :], where)
    return patch


def _choose(patch: dict[str, Any], choice: re.Match, item: str, where: str) -> None:
    """``KIND:NAME(KEY=VALUE,...)``: choose a strategy of a kind, with parameters."""
    kind, name = choice["kind"], choice["name"].strip()
    if kind not in KINDS:
        raise KdError(f"{where}: '{kind}' in '{item}' is not a strategy kind; use one of {', '.join(KINDS)}")
    params: dict[str, Any] = {}
    if choice["params"] is not None and choice["params"].strip():
        try:
            pairs = split_top(choice["params"])
        except ValueError as exc:
            raise KdError(f"{where}: {exc} in '{item}'") from None
        for pair in pairs:
            key, sep, raw = pair.partition("=")
            if not sep or not key.strip():
                raise KdError(
                    f"{where}: '{pair}' in '{item}' is not key=value; write e.g. {kind}:{name}(key=0.7)"
                )
            params[key.strip()] = _yaml_value(raw)
    entry = patch.setdefault(kind, {})
    if "name" in entry and entry["name"] != name:
        raise KdError(f"{where}: {kind} is chosen twice ('{entry['name']}' and '{name}')")
    entry["name"] = name
    entry.setdefault("params", {}).update(params)


def _set_field(patch: dict[str, Any], dotted: str, raw: str, where: str) -> None:
    """``FIELD.FIELD=VALUE``: set one strategy field (relative to ``strategy``)."""
    head = dotted.split(".")[0]
    if head == "strategy":
        dotted = dotted.partition(".")[2]
        head = dotted.split(".")[0]
    if head not in STRATEGY_FIELDS:
        raise KdError(
            f"{where}: '{dotted}' is not a strategy field; arms differ only in strategy "
            f"({', '.join(sorted(STRATEGY_FIELDS))}), set anything else for all arms with --set"
        )
    if head in KINDS:
        rest = dotted.split(".")[1:]
        if rest[:1] == ["name"] and len(rest) == 1:
            patch.setdefault(head, {})["name"] = str(_yaml_value(raw))
            return
        if len(rest) < 2 or rest[0] != "params":
            raise KdError(
                f"{where}: '{dotted}' should be {head}.params.KEY=VALUE (or {head}:NAME to choose one)"
            )
    set_path(patch, dotted, _yaml_value(raw))


def parse_arm(text: str) -> tuple[str, dict[str, Any]]:
    """``NAME=SPEC`` → (name, strategy patch); errors are one sentence naming the arm."""
    name, sep, spec = text.partition("=")
    name = name.strip()
    if not sep or not name:
        raise KdError(f"arm '{text}' must be NAME=SPEC, e.g. --arm kd-cl=scorer:student-snapshot,pacing:root")
    check_arm_name(name)
    return name, parse_strategy_spec(spec, f"arm '{name}'")


def check_arm_name(name: str) -> None:
    if not _ARM_NAME.match(name):
        hint = " ('@' is kept for the baselines kd compare adds)" if "@" in name else ""
        raise KdError(
            f"arm name '{name}' may use only letters, digits and . _ + - (and must start with a letter or digit){hint}"
        )


def apply_patch(base: Mapping[str, Any], patch: Mapping[str, Any]) -> dict[str, Any]:
    """The arm's complete strategy tree: ``base`` with ``patch`` applied (see the module docs)."""
    out = json.loads(json.dumps(dict(base)))
    for key, value in patch.items():
        if key in KINDS:
            value = {"name": value} if isinstance(value, str) else dict(value)
            current = out.get(key) or {"name": "none", "params": {}}
            if isinstance(current, str):
                current = {"name": current, "params": {}}
            name = value.get("name", current["name"])
            params = dict(value.get("params") or {})
            if name == current["name"]:
                params = deep_merge(dict(current.get("params") or {}), params)
            out[key] = {"name": name, "params": params}
        else:
            out[key] = value
    return out


def patch_from_yaml(name: str, value: Any) -> dict[str, Any]:
    """An arm from YAML: ``{strategy: {...}}``, or a SPEC string."""
    where = f"arm '{name}'"
    if isinstance(value, str):
        return parse_strategy_spec(value, where)
    if not isinstance(value, Mapping):
        raise KdError(f"{where}: expected a mapping like {{strategy: {{reliance: fixed}}}} or a SPEC string")
    extra = sorted(set(value) - {"strategy"})
    if extra:
        raise KdError(
            f"{where}: only 'strategy' may differ between arms, but it sets {', '.join(extra)}; "
            "put shared settings in the base config"
        )
    strategy = value.get("strategy") or {}
    if not isinstance(strategy, Mapping):
        raise KdError(f"{where}: strategy must be a mapping")
    unknown = sorted(set(strategy) - STRATEGY_FIELDS)
    if unknown:
        raise KdError(
            f"{where}: '{unknown[0]}' is not a strategy field ({', '.join(sorted(STRATEGY_FIELDS))})"
        )
    return dict(strategy)


def format_strategy(strategy: Mapping[str, Any]) -> str:
    """A compact SPEC string for a strategy tree (the arm grammar; defaults left out)."""
    default = StrategyConfig().model_dump(mode="json")
    parts = []
    for kind in KINDS:
        spec = strategy.get(kind)
        if not spec:
            continue
        name, params = spec.get("name", "none"), spec.get("params") or {}
        if kind != "reliance" and name == default[kind]["name"] and not params:
            continue  # a kind at its default is left out (the reliance policy always shows)
        args = ",".join(f"{k}={_fmt_value(v)}" for k, v in params.items())
        parts.append(f"{kind}:{name}" + (f"({args})" if args else ""))
    for key in sorted(STRATEGY_FIELDS - set(KINDS)):
        if key in strategy and strategy[key] != default.get(key):
            parts.append(f"{key}={_fmt_value(strategy[key])}")
    return ",".join(parts)


def format_matched(strategy: Mapping[str, Any]) -> str:
    """A matched-λ baseline's SPEC: its strategy (the arm's source, divergence, temperature) with λ shown
    as ``matched``, the arm's mean λ per seed."""
    shown = json.loads(json.dumps(strategy))
    shown["reliance"] = {"name": "fixed", "params": {"value": "matched"}}
    return format_strategy(shown)


def _fmt_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, dict)):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def with_lambda(strategy: Mapping[str, Any], value: float) -> dict[str, Any]:
    out = apply_patch(strategy, {"reliance": {"name": "fixed", "params": {"value": float(value)}}})
    out["reliance"]["params"]["value"] = float(value)
    return out


def matched_strategy(strategy: Mapping[str, Any], value: float) -> dict[str, Any]:
    """Vanilla KD at λ = ``value`` with the arm's other KD settings (divergence, temperature, source):
    no scorer, no pacing, fixed reliance. Only the per-sample variation of λ (and the curriculum) differ."""
    out = reference_strategy(strategy, "fixed")
    if strategy.get("source"):
        out["source"] = json.loads(json.dumps(strategy["source"]))  # the same rows, a constant λ
    return with_lambda(out, value)
