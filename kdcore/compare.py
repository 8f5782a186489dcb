"""``kd compare``: a grid of strategies × seeds against one teacher, at equal training compute.

Every arm shares one base run config (models, data, steps, batch, sequence length, optimizer,
schedule); an arm may change only ``strategy`` fields. The teacher is resolved once, to a
directory, before anything runs, and every arm and seed gets ``model.teacher=<that directory>``,
so a spec teacher is trained exactly once (with ``teacher_seed``, not the arms' seeds).

Layout of a comparison directory::

    compare.yaml                 the resolved plan (base config, arms, seeds, teacher): --resume reads it
    runs/<arm>/seed-<s>/         one ordinary ``kd run`` directory per arm and seed
    runs/<arm>/seed-<s>.log      that run's console output (and the traceback if it failed)
    comparison.json              every number of the table, per run and per arm
    comparison.md                the table and the paired comparisons
    ppl.png, curves.png          eval perplexity per arm (mean ± sd), eval curves (mean ± sd band)

Arm specs (``--arm NAME=SPEC``), a small grammar::

    SPEC  := ITEM ("," ITEM)*                   commas inside (...) or [...] do not split
    ITEM  := KIND ":" NAME ["(" KEY=VALUE ("," KEY=VALUE)* ")"]      choose a strategy, with parameters
           | FIELD ("." FIELD)* "=" VALUE                            set one strategy field
    KIND  := scorer | pacing | reliance | divergence

``VALUE`` is read as YAML (``0.7`` is a number, ``[0.7, 0.9]`` a list, ``true`` a boolean).
Dotted fields are relative to ``strategy`` (``reliance.params.quantile=0.7``, ``temperature=4``,
``reverse=true``). Arms start from the base config's strategy; naming a different strategy of a
kind replaces that kind's parameters, naming the same one (or setting ``KIND.params.KEY``) merges.

Baselines added on top of the arms (so no comparison is unfair by construction):

- ``ce`` (reliance none) and ``kd`` (vanilla KD, reliance fixed) when no arm plays that role;
- the fixed-λ sweep ``kd@<λ>`` (default 0.1, 0.5, 0.9; ``kd`` itself stands for its own λ);
- ``kd@matched-<arm>`` for every arm whose reliance policy varies λ per sample: vanilla KD at the
  mean λ that arm actually used, per seed, run after that arm's run for the seed finishes.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
import shutil
import subprocess
import sys
import time
import traceback
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kdcore.config import (
    RunConfig,
    StrategyConfig,
    deep_merge,
    format_validation_error,
    load_file,
    set_path,
)
from kdcore.errors import KdError
from kdcore.files import atomic_write_json, atomic_write_text
from kdcore.stats import gap_closed, mean_sd, paired_difference
from kdcore.strategies import KINDS

PLAN = "compare.yaml"
SUMMARY = "summary.json"
STRATEGY_FIELDS = set(StrategyConfig.model_fields)
DEFAULT_SWEEP = (0.1, 0.5, 0.9)
#: reliance policies that give every sample the same λ (all others get a matched-λ baseline)
UNIFORM_RELIANCE = {"fixed", "none"}

PRESETS: dict[str, list[str]] = {
    "seed-paper": [
        "ce=reliance:none",
        "kd=reliance:fixed",
        "kd-cl=scorer:student-snapshot,pacing:root,reliance:fixed",
        "kd-cl-sr=scorer:student-snapshot,pacing:root,reliance:threshold",
        "kd-cl-sr-teacher=scorer:teacher-confidence,pacing:root,reliance:threshold",
    ],
}

_ARM_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
_ITEM_CHOICE = re.compile(r"^(?P<kind>[a-z]+):(?P<name>[^()=]+?)(?:\((?P<params>.*)\))?$", re.S)


# =============================================================================================
# arm specs
# =============================================================================================
@dataclass
class Arm:
    """One arm: a name, a complete strategy tree, and its role in the comparison."""

    name: str
    strategy: dict[str, Any]
    role: str = "arm"  # arm | ce | kd | sweep | matched
    spec: str = ""  # the text it came from (or a description)
    matched_to: str | None = None  # for role matched: the reliance arm whose mean λ it copies
    auto: bool = False  # added by kd compare, not asked for

    @property
    def reliance(self) -> str:
        return self.strategy["reliance"]["name"]

    def is_vanilla_kd(self) -> bool:
        s = self.strategy
        return (
            s["reliance"]["name"] == "fixed"
            and s["scorer"]["name"] == "none"
            and s["pacing"]["name"] == "none"
            and not s.get("reverse", False)
        )

    def is_ce(self) -> bool:
        return self.reliance == "none" and self.strategy["scorer"]["name"] == "none"

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
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Arm:
        return cls(**{k: data[k] for k in ("name", "strategy", "role", "spec", "matched_to", "auto")})


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
        return yaml.safe_load(raw)
    except yaml.YAMLError:
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
            kind, name = choice["kind"], choice["name"].strip()
            if kind not in KINDS:
                raise KdError(
                    f"{where}: '{kind}' in '{item}' is not a strategy kind; use one of {', '.join(KINDS)}"
                )
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
            continue
        if eq <= 0:
            raise KdError(
                f"{where}: '{item}' is neither KIND:NAME nor FIELD=VALUE; "
                "write e.g. reliance:threshold(quantile=0.7) or reliance.params.quantile=0.7"
            )
        dotted, raw = item[:eq].strip(), item[eq + 1 :]
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
                continue
            if len(rest) < 2 or rest[0] != "params":
                raise KdError(
                    f"{where}: '{dotted}' should be {head}.params.KEY=VALUE (or {head}:NAME to choose one)"
                )
        set_path(patch, dotted, _yaml_value(raw))
    return patch


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
        if kind in ("scorer", "pacing") and name == "none" and not params:
            continue
        if kind == "divergence" and name == default["divergence"]["name"] and not params:
            continue
        args = ",".join(f"{k}={_fmt_value(v)}" for k, v in params.items())
        parts.append(f"{kind}:{name}" + (f"({args})" if args else ""))
    for key in sorted(STRATEGY_FIELDS - set(KINDS)):
        if key in strategy and strategy[key] != default.get(key):
            parts.append(f"{key}={_fmt_value(strategy[key])}")
    return ",".join(parts)


def _fmt_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, dict)):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


# =============================================================================================
# the plan
# =============================================================================================
@dataclass
class Plan:
    """Everything a comparison needs; written to ``compare.yaml`` and read back by --resume."""

    base: dict[str, Any]  # a RunConfig dict; its strategy is the arms' starting point
    arms: list[Arm]
    seeds: list[int]
    teacher_seed: int = 0
    sweep: list[float] = field(default_factory=lambda: list(DEFAULT_SWEEP))
    matched: bool = True
    notes: list[str] = field(default_factory=list)
    teacher_dir: str | None = None
    command: str = ""
    teacher_cache: str | None = None  # None, "auto" (one cache built in the comparison dir) or a directory
    teacher_cache_k: int | None = None  # top-K of an auto cache; None: the whole vocabulary up to 512 tokens

    def to_yaml(self) -> str:
        data = {
            "base": self.base,
            "arms": [a.as_json() for a in self.arms],
            "seeds": self.seeds,
            "teacher_seed": self.teacher_seed,
            "sweep": self.sweep,
            "matched": self.matched,
            "notes": self.notes,
            "teacher_dir": self.teacher_dir,
            "teacher_cache": self.teacher_cache,
            "teacher_cache_k": self.teacher_cache_k,
            "command": self.command,
        }
        return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)

    @classmethod
    def load(cls, path: Path) -> Plan:
        data = yaml.safe_load(path.read_text())
        return cls(
            base=data["base"],
            arms=[Arm.from_json(a) for a in data["arms"]],
            seeds=list(data["seeds"]),
            teacher_seed=int(data.get("teacher_seed", 0)),
            sweep=list(data.get("sweep") or []),
            matched=bool(data.get("matched", True)),
            notes=list(data.get("notes") or []),
            teacher_dir=data.get("teacher_dir"),
            teacher_cache=data.get("teacher_cache"),
            teacher_cache_k=data.get("teacher_cache_k"),
            command=data.get("command", ""),
        )

    def arm(self, name: str) -> Arm:
        for a in self.arms:
            if a.name == name:
                return a
        raise KeyError(name)

    @property
    def ce(self) -> Arm:
        return next(a for a in self.arms if a.role == "ce")

    @property
    def kd(self) -> Arm:
        return next(a for a in self.arms if a.role == "kd")

    def reliance_arms(self) -> list[Arm]:
        return [a for a in self.arms if a.role in ("arm",) and a.varies_lambda()]


COMPARE_KEYS = {
    "arms",
    "seeds",
    "teacher_seed",
    "sweep",
    "matched",
    "base",
    "preset",
    "teacher_cache",
    "teacher_cache_k",
}


def parse_seeds(text: str | Sequence[int]) -> list[int]:
    if isinstance(text, (list, tuple)):
        values = list(text)
    else:
        try:
            values = [int(p) for p in str(text).split(",") if p.strip()]
        except ValueError:
            raise KdError(f"--seeds '{text}' must be comma-separated integers, e.g. 0,1,2") from None
    try:
        seeds = [int(v) for v in values]
    except (TypeError, ValueError):
        raise KdError(f"seeds {values} must be integers, e.g. [0, 1, 2]") from None
    if not seeds:
        raise KdError("--seeds is empty; give at least one seed, e.g. 0,1,2")
    if len(set(seeds)) != len(seeds):
        raise KdError(f"--seeds {seeds} repeats a seed")
    return seeds


def parse_sweep(value: str | Sequence[float] | None) -> list[float]:
    if value is None:
        return list(DEFAULT_SWEEP)
    if isinstance(value, str):
        if value.strip().lower() in ("", "none", "off"):
            return []
        try:
            values = [float(p) for p in value.split(",") if p.strip()]
        except ValueError:
            raise KdError(
                f"--sweep '{value}' must be comma-separated λ values in [0, 1], or 'none'"
            ) from None
    else:
        values = [float(v) for v in value]
    bad = [v for v in values if not 0 <= v <= 1]
    if bad:
        raise KdError(f"--sweep value {bad[0]} is not a λ in [0, 1]")
    return sorted(set(values))


def lambda_label(value: float) -> str:
    return f"{value:g}"


def build_plan(
    *,
    config: Path | None = None,
    arm_texts: Sequence[str] = (),
    preset: str | None = None,
    overrides: Mapping[str, Any] | None = None,
    seeds: str | Sequence[int] | None = None,
    teacher_seed: int | None = None,
    sweep: str | Sequence[float] | None = None,
    matched: bool | None = None,
    teacher_cache: str | None = None,
    teacher_cache_k: int | None = None,
    command: str = "",
) -> Plan:
    """Resolve the base config and every arm, and validate all of them before anything runs."""
    tree = load_file(config) if config else {}
    compare_part = {k: tree.pop(k) for k in list(tree) if k in COMPARE_KEYS}
    base_tree: dict[str, Any] = {}
    if "base" in compare_part:
        base_ref = compare_part["base"]
        if isinstance(base_ref, str):
            base_path = Path(base_ref)
            if not base_path.is_absolute() and config is not None:
                base_path = config.parent / base_path
            base_tree = load_file(base_path)
        elif isinstance(base_ref, Mapping):
            base_tree = dict(base_ref)
        else:
            raise KdError("base: must be a run-config file path or a mapping of sections")
    base_tree = deep_merge(base_tree, tree)
    overrides = dict(overrides or {})
    bad = sorted(k for k in overrides if k.split(".")[0] == "strategy")
    for key in bad:
        if key.split(".")[1:2] and key.split(".")[1] in KINDS:
            raise KdError(
                f"'{key}' chooses a strategy for every arm; compare arms with --arm NAME=SPEC instead"
            )
    try:
        base_cfg = _resolve_tree(base_tree, overrides)
    except KdError as exc:
        raise KdError(f"base config: {exc}") from None
    base = base_cfg.to_dict()
    base["output"]["dir"] = None

    # -- arms, in the order given ----------------------------------------------------------------
    specs: list[tuple[str, dict[str, Any], str]] = []
    preset = preset or compare_part.get("preset")
    if preset:
        if preset not in PRESETS:
            raise KdError(f"unknown preset '{preset}'; choose one of {', '.join(sorted(PRESETS))}")
        for text in PRESETS[preset]:
            name, patch = parse_arm(text)
            specs.append((name, patch, text.partition("=")[2]))
    yaml_arms = compare_part.get("arms") or {}
    if not isinstance(yaml_arms, Mapping):
        raise KdError("arms: must be a mapping {name: {strategy: {...}}} in the config file")
    for name, value in yaml_arms.items():
        check_arm_name(str(name))
        patch = patch_from_yaml(str(name), value)
        specs.append((str(name), patch, value if isinstance(value, str) else ""))
    for text in arm_texts:
        name, patch = parse_arm(text)
        specs.append((name, patch, text.partition("=")[2]))
    if not specs:
        raise KdError("no arms: pass --arm NAME=SPEC (repeatable), --preset seed-paper, or arms: in --config")
    seen: set[str] = set()
    for name, _, _ in specs:
        if name in seen:
            raise KdError(f"arm '{name}' is given twice; arm names must be unique")
        seen.add(name)

    base_strategy = base["strategy"]
    arms = [Arm(name, apply_patch(base_strategy, patch), spec=spec) for name, patch, spec in specs]
    notes: list[str] = []

    # -- the references: CE-only and vanilla KD ----------------------------------------------------
    ce = next((a for a in arms if a.name == "ce" and a.is_ce()), None) or next(
        (a for a in arms if a.is_ce()), None
    )
    if ce is None:
        if "ce" in seen:
            raise KdError("arm 'ce' must be the CE-only baseline (reliance:none); rename your arm")
        ce = Arm("ce", _reference_strategy(base_strategy, "none"), spec="reliance:none", auto=True)
        arms.insert(0, ce)
        notes.append("added arm 'ce' (reliance:none), the CE-only student the gap closed is measured from")
    ce.role = "ce"
    kd = next((a for a in arms if a.name == "kd" and a.is_vanilla_kd()), None) or next(
        (a for a in arms if a.is_vanilla_kd() and a.role == "arm"), None
    )
    if kd is None:
        if "kd" in seen:
            raise KdError(
                "arm 'kd' must be vanilla KD (reliance:fixed, no scorer or pacing); rename your arm"
            )
        kd = Arm("kd", _reference_strategy(base_strategy, "fixed"), spec="reliance:fixed", auto=True)
        arms.insert(1, kd)
        notes.append("added arm 'kd' (reliance:fixed), the vanilla KD every arm is compared with")
    kd.role = "kd"

    # -- the fixed-λ sweep ---------------------------------------------------------------------------
    plan_sweep = parse_sweep(sweep if sweep is not None else compare_part.get("sweep"))
    kd_lambda = kd.fixed_lambda()
    for value in plan_sweep:
        if kd_lambda is not None and abs(value - kd_lambda) < 1e-9:
            continue  # the kd arm is this sweep point
        name = f"kd@{lambda_label(value)}"
        if name in seen:
            raise KdError(f"arm name '{name}' is kept for the fixed-λ sweep")
        arms.append(
            Arm(
                name,
                _with_lambda(kd.strategy, value),
                role="sweep",
                spec=f"reliance:fixed(value={value:g})",
                auto=True,
            )
        )

    plan = Plan(
        base=base,
        arms=arms,
        seeds=parse_seeds(seeds if seeds is not None else compare_part.get("seeds", [0, 1, 2])),
        teacher_seed=int(teacher_seed if teacher_seed is not None else compare_part.get("teacher_seed", 0)),
        sweep=plan_sweep,
        matched=bool(matched if matched is not None else compare_part.get("matched", True)),
        notes=notes,
        command=command,
        teacher_cache=_teacher_cache_option(
            teacher_cache if teacher_cache is not None else compare_part.get("teacher_cache")
        ),
        teacher_cache_k=teacher_cache_k
        if teacher_cache_k is not None
        else compare_part.get("teacher_cache_k"),
    )
    if plan.base["model"].get("teacher_cache"):
        raise KdError(
            "model.teacher_cache in the base config: use --teacher-cache DIR (or auto) so that every arm "
            "reads the same cache"
        )
    if plan.teacher_cache and plan.base["data"]["dataset"] == "demo" and len(plan.seeds) > 1:
        raise KdError(
            "--teacher-cache needs the same training data for every seed, but the demo corpus is generated "
            "anew for each seed; use a text dataset or drop --teacher-cache"
        )
    if plan.teacher_cache_k is not None and int(plan.teacher_cache_k) < 1:
        raise KdError(f"--teacher-cache-k {plan.teacher_cache_k} must be at least 1")
    if plan.matched:
        for arm in plan.reliance_arms():
            notes.append(
                f"'kd@matched-{arm.name}' is vanilla KD at the mean λ '{arm.name}' used on the same seed"
            )
    validate_plan(plan)
    return plan


def _teacher_cache_option(value: Any) -> str | None:
    if value is None or str(value).strip().lower() in ("", "none", "off", "false"):
        return None
    text = str(value).strip()
    if text == "auto":
        return text
    path = Path(text)
    if not (path / "manifest.json").is_file():
        raise KdError(
            f"--teacher-cache '{text}' is not a teacher cache (no manifest.json); pass a directory written by "
            "kd cache-teacher, 'auto' to build one for this comparison, or 'none'"
        )
    return str(path.resolve())


def _resolve_tree(tree: Mapping[str, Any], overrides: Mapping[str, Any]) -> RunConfig:
    """resolve_config on an in-memory tree (the file part is already loaded)."""
    tree = json.loads(json.dumps(dict(tree), default=str))
    tree["strategy"] = deep_merge(StrategyConfig().model_dump(mode="json"), tree.get("strategy") or {})
    for dotted, value in overrides.items():
        set_path(tree, dotted, value)
    from pydantic import ValidationError

    try:
        return RunConfig.model_validate(tree)
    except ValidationError as exc:
        raise KdError(format_validation_error(exc)) from None


def _reference_strategy(base_strategy: Mapping[str, Any], reliance: str) -> dict[str, Any]:
    patch: dict[str, Any] = {
        "scorer": {"name": "none"},
        "pacing": {"name": "none"},
        "reliance": {"name": reliance},
    }
    out = apply_patch(base_strategy, patch)
    out["reverse"] = False
    return out


def _with_lambda(strategy: Mapping[str, Any], value: float) -> dict[str, Any]:
    out = apply_patch(strategy, {"reliance": {"name": "fixed", "params": {"value": float(value)}}})
    out["reliance"]["params"]["value"] = float(value)
    return out


def matched_strategy(strategy: Mapping[str, Any], value: float) -> dict[str, Any]:
    """Vanilla KD at λ = ``value`` with the arm's other KD settings (divergence, temperature):
    no scorer, no pacing, fixed reliance. Only the per-sample variation of λ (and the curriculum) differ."""
    out = _reference_strategy(strategy, "fixed")
    return _with_lambda(out, value)


def validate_plan(plan: Plan) -> None:
    """Every arm's run config resolves and its strategies instantiate, or one sentence says which fails."""
    from kdcore.plugins import instantiate_strategies

    for arm in plan.arms:
        cfg = arm_config(plan, arm, plan.seeds[0], Path("unused"))
        try:
            instantiate_strategies(cfg.strategy)
        except KdError as exc:
            raise KdError(f"arm '{arm.name}': {exc}") from None
    if plan.matched:
        for arm in plan.reliance_arms():
            probe = Arm(f"kd@matched-{arm.name}", matched_strategy(arm.strategy, 0.5))
            try:
                instantiate_strategies(arm_config(plan, probe, plan.seeds[0], Path("unused")).strategy)
            except KdError as exc:
                raise KdError(f"arm '{probe.name}': {exc}") from None


def arm_config(
    plan: Plan,
    arm: Arm,
    seed: int,
    run_dir: Path,
    *,
    threads: int | None = None,
    teacher: str | None = None,
    teacher_cache: str | None = None,
) -> RunConfig:
    tree = json.loads(json.dumps(plan.base))
    tree["strategy"] = arm.strategy
    tree["training"]["seed"] = seed
    tree["output"]["dir"] = str(run_dir)
    if threads is not None and tree["training"].get("threads") is None:
        tree["training"]["threads"] = threads
    if teacher is not None:
        tree["model"]["teacher"] = teacher
        tree["model"]["tokenizer"] = None  # the teacher directory brings its tokenizer
    if teacher_cache is not None:
        tree["model"]["teacher_cache"] = teacher_cache
    try:
        return RunConfig.model_validate(tree)
    except Exception as exc:  # pydantic ValidationError
        from pydantic import ValidationError

        if isinstance(exc, ValidationError):
            raise KdError(f"arm '{arm.name}': {format_validation_error(exc)}") from None
        raise


# =============================================================================================
# running
# =============================================================================================
@dataclass
class Task:
    arm: Arm
    seed: int

    @property
    def key(self) -> tuple[str, int]:
        return self.arm.name, self.seed


@dataclass
class RunOutcome:
    arm: str
    seed: int
    status: str  # ok | failed | skipped
    run_dir: str
    summary: dict[str, Any] | None = None
    error: str | None = None
    reused: bool = False  # finished before this invocation (--resume)

    def as_json(self) -> dict[str, Any]:
        s = self.summary or {}
        return {
            "seed": self.seed,
            "status": self.status,
            "run_dir": self.run_dir,
            "error": self.error,
            "student_eval_ppl": s.get("student_eval_ppl"),
            "teacher_eval_ppl": s.get("teacher_eval_ppl"),
            "student_initial_eval_ppl": s.get("student_initial_eval_ppl"),
            "mean_lambda": s.get("mean_lambda"),
            "wall_seconds": s.get("wall_seconds"),
            "tokens_per_second": s.get("tokens_per_second"),
            "train_tokens": s.get("train_tokens"),
            "steps": s.get("steps"),
            "final_open_share": s.get("final_open_share"),
            "eval_curve": s.get("eval_curve"),
        }


def run_dir_for(out_dir: Path, arm: str, seed: int) -> Path:
    return out_dir / "runs" / arm / f"seed-{seed}"


def first_error_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    for line in reversed(lines):
        if line.startswith("error:"):
            return line[len("error:") :].strip()
    return lines[-1] if lines else "unknown error"


def resumable(run_dir: Path) -> bool:
    """A partial run the engine can continue (``kd run --resume``): it wrote config.yaml, not summary.json."""
    return (run_dir / "config.yaml").is_file() and not (run_dir / SUMMARY).exists()


def _failure(exc: BaseException) -> dict[str, Any]:
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return {"status": "failed", "error": f"{type(exc).__name__}: {message}".rstrip(": ")}


def execute_in_process(cfg_dict: dict[str, Any], log_path: str, resume: bool = False) -> dict[str, Any]:
    """Run one arm-seed in this process; never raises (the outcome says ok or failed).

    ``resume``: continue the partial run in ``output.dir`` from its last checkpoint; if that fails,
    remove the directory and run it from scratch.
    """
    from rich.console import Console

    from kdcore.runs import runner

    cfg = RunConfig.model_validate(cfg_dict)
    run_dir = Path(cfg.output.dir)
    with open(log_path, "a" if resume else "w") as handle:
        console = Console(file=handle, width=120, soft_wrap=True)
        if resume and resumable(run_dir):
            try:
                return {
                    "status": "ok",
                    "summary": runner.run(cfg, console=console, show_progress=False, resume=True).summary,
                }
            except Exception:
                handle.write(traceback.format_exc())
                handle.write("\nresume failed; running from scratch\n")
        if run_dir.exists():
            shutil.rmtree(run_dir)
        try:
            result = runner.run(cfg, console=console, show_progress=False)
        except Exception as exc:
            handle.write(traceback.format_exc())
            return _failure(exc)
    return {"status": "ok", "summary": result.summary}


def execute_subprocess(
    cfg_dict: dict[str, Any], log_path: str, threads: int, resume: bool = False
) -> dict[str, Any]:
    """Run one arm-seed as ``python -m kdcore run --config <yaml>`` (for --jobs > 1).

    ``resume``: first ``python -m kdcore run --resume <run dir>``; if that fails, from scratch.
    """
    run_dir = Path(cfg_dict["output"]["dir"])
    config_path = Path(log_path).with_suffix(".yaml")
    config_path.write_text(yaml.safe_dump(cfg_dict, sort_keys=False))
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(threads)
    summary_path = run_dir / SUMMARY
    attempts = []
    if resume and resumable(run_dir):
        attempts.append(["run", "--resume", str(run_dir)])
    attempts.append(["run", "--config", str(config_path)])
    proc = None
    with open(log_path, "a" if resume else "w") as handle:
        for i, args in enumerate(attempts):
            if args[1] == "--config" and run_dir.exists():
                shutil.rmtree(run_dir)
            if i:
                handle.write("\nresume failed; running from scratch\n")
                handle.flush()
            proc = subprocess.run(
                [sys.executable, "-m", "kdcore", *args], stdout=handle, stderr=subprocess.STDOUT, env=env
            )
            if proc.returncode == 0 and summary_path.is_file():
                return {"status": "ok", "summary": json.loads(summary_path.read_text())}
    text = Path(log_path).read_text(errors="replace")
    code = proc.returncode if proc is not None else "?"
    return {"status": "failed", "error": first_error_line(text) + f" (exit code {code})"}


class Comparison:
    """Runs a :class:`Plan` into ``out_dir`` and writes the table."""

    def __init__(
        self,
        plan: Plan,
        out_dir: Path,
        *,
        jobs: int = 1,
        log: Callable[[str], None] = print,
        console: Any = None,
    ) -> None:
        self.plan, self.out_dir, self.jobs = plan, out_dir, max(1, jobs)
        self.log = log
        self.console = console
        self.outcomes: dict[tuple[str, int], RunOutcome] = {}
        self.matched_arms: dict[str, Arm] = {}
        self.teacher: dict[str, Any] = {}
        self.threads = max(1, (os.cpu_count() or 1) // self.jobs)
        self.cache_dir: str | None = None
        self._resume: set[tuple[str, int]] = set()

    # -- teacher -----------------------------------------------------------------------------------
    def resolve_teacher(self) -> str:
        """The teacher as a directory (or hub id): trained once with the teacher seed if it is a spec."""
        if self.plan.teacher_dir and Path(self.plan.teacher_dir).is_dir():
            return self.plan.teacher_dir
        from rich.console import Console

        from kdcore.inputs.corpus import load_corpus
        from kdcore.inputs.models import parse_spec, quiet_transformers
        from kdcore.teachers.resolve import resolve_teacher

        quiet_transformers()
        cfg = RunConfig.model_validate(self.plan.base)
        source = cfg.model.teacher
        if parse_spec(source) is None:
            self.plan.teacher_dir = source
            return source
        import torch

        threads = cfg.training.threads or (os.cpu_count() or 1)
        torch.set_num_threads(threads)
        training = cfg.training.model_copy(update={"seed": self.plan.teacher_seed})
        corpus = load_corpus(cfg.data, self.plan.teacher_seed)
        start = time.perf_counter()
        console = self.console or Console(stderr=True)
        directory, _ = resolve_teacher(cfg.model, corpus, cfg.data.seq_len, training, console)
        self.teacher["resolve_seconds"] = time.perf_counter() - start
        self.plan.teacher_dir = directory
        return directory

    def prepare_teacher_cache(self) -> str | None:
        """One teacher cache for every arm: an existing directory, or built once in ``out_dir``."""
        option = self.plan.teacher_cache
        if option is None:
            return None
        if option != "auto":
            return option
        directory = self.out_dir / "teacher-cache"
        if (directory / "manifest.json").is_file():
            self.log(f"teacher cache: {directory} (built before)")
            return str(directory.resolve())
        from rich.console import Console

        from kdcore.teachers.cache import build_cache

        cfg = RunConfig.model_validate(self.plan.base)
        k = self.plan.teacher_cache_k
        if k is None:
            from kdcore.inputs.models import load_tokenizer

            vocab = len(load_tokenizer(self.plan.teacher_dir))
            k = vocab if vocab <= 512 else 64
        model = cfg.model.model_copy(update={"teacher": self.plan.teacher_dir, "tokenizer": None})
        training = cfg.training.model_copy(
            update={"seed": self.plan.teacher_seed, "threads": cfg.training.threads or (os.cpu_count() or 1)}
        )
        cache_cfg = cfg.model_copy(update={"model": model, "training": training})
        start = time.perf_counter()
        manifest = build_cache(
            cache_cfg, directory, top_k=int(k), console=self.console or Console(stderr=True)
        )
        self.teacher["cache_seconds"] = time.perf_counter() - start
        self.teacher["cache_top_k"] = manifest.get("top_k")
        self.log(f"teacher cache: {directory} (top-{manifest.get('top_k')})")
        return str(directory.resolve())

    def describe_models(self) -> None:
        """Parameter counts of the teacher and the student (for the table's header)."""
        try:
            from kdcore.inputs.models import build_from_spec, load_pretrained, load_tokenizer, parse_spec

            cfg = RunConfig.model_validate(self.plan.base)
            teacher = load_pretrained(self.plan.teacher_dir or cfg.model.teacher)
            self.teacher["params"] = sum(p.numel() for p in teacher.parameters())
            spec = parse_spec(cfg.model.student)
            if spec is not None:
                tokenizer = load_tokenizer(self.plan.teacher_dir)
                student = build_from_spec(spec, tokenizer, 0)
            else:
                student = load_pretrained(cfg.model.student)
            self.teacher["student_params"] = sum(p.numel() for p in student.parameters())
            info = Path(self.plan.teacher_dir or "") / "kdcore_teacher.json"
            if info.is_file():
                self.teacher["training"] = json.loads(info.read_text())
        except Exception as exc:  # counts are informative only
            self.teacher["params_error"] = str(exc).splitlines()[0] if str(exc) else type(exc).__name__

    # -- tasks ---------------------------------------------------------------------------------------
    def matched_arm(self, source: Arm) -> Arm:
        name = f"kd@matched-{source.name}"
        if name not in self.matched_arms:
            self.matched_arms[name] = Arm(
                name,
                matched_strategy(source.strategy, 0.5),
                role="matched",
                spec=f"reliance:fixed(value=<mean λ of {source.name}>)",
                matched_to=source.name,
                auto=True,
            )
        return self.matched_arms[name]

    def config_for(self, task: Task, lam: float | None = None) -> RunConfig:
        arm = task.arm
        if lam is not None:
            arm = Arm(arm.name, matched_strategy(arm.strategy, lam), role=arm.role)
        return arm_config(
            self.plan,
            arm,
            task.seed,
            run_dir_for(self.out_dir, task.arm.name, task.seed),
            threads=self.threads,
            teacher=self.plan.teacher_dir,
            teacher_cache=self.cache_dir,
        )

    def run(self) -> dict[str, Any]:
        self.started = time.perf_counter()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        teacher_dir = self.resolve_teacher()
        atomic_write_text(self.out_dir / PLAN, self.plan.to_yaml())
        self.log(f"teacher: {teacher_dir}")
        self.describe_models()
        self.cache_dir = self.prepare_teacher_cache()
        primary = [Task(arm, seed) for seed in self.plan.seeds for arm in self.plan.arms]
        total = len(primary) + (
            len(self.plan.reliance_arms()) * len(self.plan.seeds) if self.plan.matched else 0
        )
        self._done = 0
        self._total = total
        ready: deque[tuple[Task, float | None]] = deque()
        for task in primary:
            if not self._reuse(task):
                ready.append((task, None))
            else:
                self._release(task, ready)
        self._drain(ready)
        return self.finish()

    def _reuse(self, task: Task) -> bool:
        """A run directory with summary.json is done; a partial one is removed (and redone)."""
        run_dir = run_dir_for(self.out_dir, task.arm.name, task.seed)
        summary = run_dir / SUMMARY
        if summary.is_file():
            try:
                data = json.loads(summary.read_text())
            except json.JSONDecodeError:
                data = None
            if data is not None:
                self.outcomes[task.key] = RunOutcome(
                    task.arm.name, task.seed, "ok", str(run_dir), data, reused=True
                )
                self._done += 1
                self.log(
                    f"[{self._done}/{self._total}] {task.arm.name} seed {task.seed}: finished before, reused"
                )
                return True
        if resumable(run_dir):
            self._resume.add(task.key)
            self.log(
                f"{task.arm.name} seed {task.seed}: a partial run, continuing it from its last checkpoint"
            )
        elif run_dir.exists():
            shutil.rmtree(run_dir)
            self.log(f"{task.arm.name} seed {task.seed}: removed a partial run directory, redoing it")
        return False

    def _release(self, task: Task, ready: deque) -> None:
        """After a reliance arm's run: queue its matched-λ baseline for the same seed (first in line)."""
        if not (self.plan.matched and task.arm.role == "arm" and task.arm.varies_lambda()):
            return
        outcome = self.outcomes[task.key]
        matched = self.matched_arm(task.arm)
        follow = Task(matched, task.seed)
        if outcome.status != "ok":
            self.outcomes[follow.key] = RunOutcome(
                matched.name,
                task.seed,
                "skipped",
                str(run_dir_for(self.out_dir, matched.name, task.seed)),
                error=f"{task.arm.name} seed {task.seed} failed, so its mean λ is unknown",
            )
            self._done += 1
            return
        if self._reuse(follow):
            return
        lam = round(float(outcome.summary["mean_lambda"]), 4)
        ready.appendleft((follow, lam))

    def _record(self, task: Task, result: dict[str, Any], seconds: float) -> None:
        run_dir = str(run_dir_for(self.out_dir, task.arm.name, task.seed))
        outcome = RunOutcome(
            task.arm.name, task.seed, result["status"], run_dir, result.get("summary"), result.get("error")
        )
        self.outcomes[task.key] = outcome
        self._done += 1
        if outcome.status == "ok":
            s = outcome.summary
            detail = (
                f"student ppl {s['student_eval_ppl']:.3f}, mean λ {s['mean_lambda']:.3f}, {seconds:.0f} s"
            )
        else:
            detail = f"FAILED: {outcome.error}"
        self.log(f"[{self._done}/{self._total}] {task.arm.name} seed {task.seed}: {detail}")

    def _log_path(self, task: Task) -> str:
        path = run_dir_for(self.out_dir, task.arm.name, task.seed).with_suffix(".log")
        path.parent.mkdir(parents=True, exist_ok=True)
        return str(path)

    def _drain(self, ready: deque) -> None:
        if self.jobs == 1:
            while ready:
                task, lam = ready.popleft()
                start = time.perf_counter()
                result = execute_in_process(
                    self.config_for(task, lam).to_dict(), self._log_path(task), task.key in self._resume
                )
                self._record(task, result, time.perf_counter() - start)
                self._release(task, ready)
            return
        running: dict[Future, tuple[Task, float]] = {}
        with ThreadPoolExecutor(self.jobs) as pool:
            while ready or running:
                while ready and len(running) < self.jobs:
                    task, lam = ready.popleft()
                    cfg = self.config_for(task, lam).to_dict()
                    future = pool.submit(
                        execute_subprocess, cfg, self._log_path(task), self.threads, task.key in self._resume
                    )
                    running[future] = (task, time.perf_counter())
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    task, start = running.pop(future)
                    try:
                        result = future.result()
                    except Exception as exc:  # the launcher itself failed
                        result = {"status": "failed", "error": f"{type(exc).__name__}: {exc}"}
                    self._record(task, result, time.perf_counter() - start)
                    self._release(task, ready)

    # -- the table -----------------------------------------------------------------------------------
    def collect(self) -> dict[str, Any]:
        """The table from the runs that have finished so far; runs nothing (``--table-only``)."""
        self.table_only = True
        self._done, self._total = 0, 0
        for seed in self.plan.seeds:
            for arm in self.plan.arms:
                tasks = [Task(arm, seed)]
                if self.plan.matched and arm.role == "arm" and arm.varies_lambda():
                    tasks.append(Task(self.matched_arm(arm), seed))
                for task in tasks:
                    summary = run_dir_for(self.out_dir, task.arm.name, task.seed) / SUMMARY
                    if summary.is_file():
                        data = json.loads(summary.read_text())
                        self.outcomes[task.key] = RunOutcome(
                            task.arm.name, task.seed, "ok", str(summary.parent), data, reused=True
                        )
        self.describe_models()
        return self.finish()

    def planned_runs(self) -> int:
        matched = len(self.plan.reliance_arms()) if self.plan.matched else 0
        return (len(self.plan.arms) + matched) * len(self.plan.seeds)

    def finish(self) -> dict[str, Any]:
        data = summarise(self.plan, list(self.matched_arms.values()), self.outcomes, self.teacher)
        data["output_dir"] = str(self.out_dir)
        data["runs_planned"] = self.planned_runs()
        data["runs_finished"] = sum(o.status == "ok" for o in self.outcomes.values())
        if getattr(self, "table_only", False):
            data["table_only"] = True
        else:
            data["wall_seconds"] = time.perf_counter() - getattr(self, "started", time.perf_counter())
            data["jobs"] = self.jobs
        atomic_write_json(self.out_dir / "comparison.json", data)
        atomic_write_text(self.out_dir / "comparison.md", render_markdown(data))
        try:
            write_comparison_plots(self.out_dir, data)
        except Exception as exc:  # plots never lose the table
            self.log(f"plots failed: {exc}")
        return data


# =============================================================================================
# statistics over the outcomes
# =============================================================================================
def summarise(
    plan: Plan,
    matched_arms: Sequence[Arm],
    outcomes: Mapping[tuple[str, int], RunOutcome],
    teacher: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """comparison.json: per run and per arm numbers, references and paired tests."""
    arms = list(plan.arms)
    known = {a.name for a in arms}
    for source in plan.reliance_arms() if plan.matched else []:
        for m in matched_arms:
            if m.matched_to == source.name and m.name not in known:
                arms.append(m)
                known.add(m.name)

    def ppl_by_seed(name: str) -> dict[int, float]:
        return {
            seed: float(o.summary["student_eval_ppl"])
            for (arm, seed), o in outcomes.items()
            if arm == name and o.status == "ok"
        }

    ok_runs = [o for o in outcomes.values() if o.status == "ok"]
    teacher_ppls = [float(o.summary["teacher_eval_ppl"]) for o in ok_runs]
    teacher_ppl, teacher_sd = mean_sd(teacher_ppls)
    ce_by_seed = ppl_by_seed(plan.ce.name)

    def gap(by_seed: Mapping[int, float]) -> float | None:
        """Gap closed on the means over the seeds both this arm and the CE arm finished."""
        common = sorted(set(by_seed) & set(ce_by_seed))
        if not common:
            return None
        ce_mean = mean_sd([ce_by_seed[s] for s in common])[0]
        return gap_closed(ce_mean, mean_sd([by_seed[s] for s in common])[0], teacher_ppl)

    # the best fixed λ: the sweep points plus the kd arm (its own λ)
    sweep_points = [(plan.kd.fixed_lambda(), plan.kd.name)] + [
        (a.fixed_lambda(), a.name) for a in arms if a.role == "sweep"
    ]
    best_fixed = None
    best_mean = None
    for _lam, name in sweep_points:
        mean = mean_sd(list(ppl_by_seed(name).values()))[0]
        if mean is not None and (best_mean is None or mean < best_mean):
            best_fixed, best_mean = name, mean

    rows = []
    for arm in arms:
        runs = [outcomes[(arm.name, s)] for s in plan.seeds if (arm.name, s) in outcomes]
        ok = [o for o in runs if o.status == "ok"]
        ppl = ppl_by_seed(arm.name)
        mean, sd = mean_sd(list(ppl.values()))
        lam_mean, lam_sd = mean_sd([float(o.summary["mean_lambda"]) for o in ok])
        wall = mean_sd([float(o.summary["wall_seconds"]) for o in ok])[0]
        tps = mean_sd([float(o.summary["tokens_per_second"]) for o in ok])[0]
        failed = [o for o in runs if o.status != "ok"]
        missing = [s for s in plan.seeds if (arm.name, s) not in outcomes]
        status = "ok" if ok and not failed and not missing else ("failed" if not ok else "partial")
        if not runs:
            status = "not run"
        row: dict[str, Any] = {
            "name": arm.name,
            "role": arm.role,
            "auto": arm.auto,
            "spec": arm.spec,
            "strategy": format_strategy(arm.strategy)
            if arm.role != "matched"
            else "reliance:fixed(value=matched)",
            "strategy_config": arm.strategy,
            "matched_to": arm.matched_to,
            "fixed_lambda": arm.fixed_lambda() if arm.role != "matched" else None,
            "status": status,
            "error": failed[0].error if failed else None,
            "n_ok": len(ok),
            "n_seeds": len(plan.seeds),
            "ppl_mean": mean,
            "ppl_sd": sd,
            "gap_closed": None if arm.role == "ce" else gap(ppl),
            "mean_lambda": lam_mean,
            "mean_lambda_sd": lam_sd,
            "wall_seconds_mean": wall,
            "tokens_per_second_mean": tps,
            "runs": [o.as_json() for o in runs],
            "best_fixed": arm.name == best_fixed,
        }
        comparisons: dict[str, Any] = {}
        if arm.role not in ("kd",):
            comparisons["kd"] = paired_difference(ppl, ppl_by_seed(plan.kd.name), plan.kd.name).as_json()
        if arm.role == "arm" and arm.varies_lambda():
            matched_name = f"kd@matched-{arm.name}"
            if plan.matched:
                comparisons["matched"] = paired_difference(
                    ppl, ppl_by_seed(matched_name), matched_name
                ).as_json()
            if best_fixed is not None and best_fixed != plan.kd.name:
                comparisons["best_fixed"] = paired_difference(
                    ppl, ppl_by_seed(best_fixed), best_fixed
                ).as_json()
        row["vs"] = comparisons
        rows.append(row)

    return {
        "version": 1,
        "created": _dt.datetime.now().isoformat(timespec="seconds"),
        "command": plan.command,
        "seeds": plan.seeds,
        "teacher_seed": plan.teacher_seed,
        "notes": plan.notes,
        "teacher": {
            "source": plan.base["model"]["teacher"],
            "dir": plan.teacher_dir,
            "eval_ppl": teacher_ppl,
            "eval_ppl_sd": teacher_sd,
            **dict(teacher or {}),
        },
        "student": {"source": plan.base["model"]["student"], "params": (teacher or {}).get("student_params")},
        "base_config": {k: v for k, v in plan.base.items() if k != "strategy"},
        "references": {"ce": plan.ce.name, "kd": plan.kd.name, "best_fixed": best_fixed},
        "sweep": plan.sweep,
        "matched": plan.matched,
        "arms": rows,
    }


# =============================================================================================
# rendering
# =============================================================================================
def _num(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _pm(mean: float | None, sd: float | None, digits: int = 3) -> str:
    if mean is None:
        return "–"
    return f"{mean:.{digits}f} ± {sd:.{digits}f}" if sd is not None else f"{mean:.{digits}f}"


def format_paired(p: Mapping[str, Any] | None, digits: int = 3) -> str:
    if not p or p.get("mean_diff") is None:
        return (p or {}).get("note") or "–"
    text = f"{p['mean_diff']:+.{digits}f}"
    if p.get("ci_low") is not None:
        text += f" [{p['ci_low']:+.{digits}f}, {p['ci_high']:+.{digits}f}]"
    if p.get("p_value") is not None:
        text += f", p={p['p_value']:.3g} {p['verdict']}"
    else:
        text += f" ({p.get('note') or 'n/a'})"
    return text


ROLE_LABEL = {
    "ce": "CE-only reference",
    "kd": "vanilla KD reference",
    "sweep": "fixed-λ sweep",
    "matched": "matched-λ baseline",
    "arm": "arm",
}


def role_text(row: Mapping[str, Any]) -> str:
    text = ROLE_LABEL.get(row["role"], row["role"])
    if row["role"] == "matched":
        text += f" of {row['matched_to']}"
    if row["role"] == "kd" and row.get("fixed_lambda") is not None:
        text += f" (λ={row['fixed_lambda']:g})"
    if row.get("best_fixed"):
        text += ", **best fixed λ**"
    if row.get("auto"):
        text += " (added)"
    return text


def render_markdown(data: Mapping[str, Any]) -> str:
    t, st = data["teacher"], data["student"]
    base = data["base_config"]
    lines = ["# kd compare", ""]
    teacher_params = f", {t['params']:,} parameters" if t.get("params") else ""
    student_params = f", {st['params']:,} parameters" if st.get("params") else ""
    lines += [
        f"- teacher: `{t['source']}`{teacher_params}, eval ppl {_num(t.get('eval_ppl'))}"
        f" (trained once, teacher seed {data['teacher_seed']}; `{t.get('dir')}`)",
        f"- student: `{st['source']}`{student_params}",
        f"- data: `{base['data']['dataset']}`, eval `{base['data'].get('eval_dataset') or 'held-out tail'}`, "
        f"seq len {base['data']['seq_len']}, max eval samples {base['data'].get('max_eval_samples')}",
        f"- training (every arm): {base['training']['max_steps']} steps × batch {base['training']['batch_size']}, "
        f"lr {base['training']['lr']:g}, seeds {', '.join(map(str, data['seeds']))}",
    ]
    if data.get("command"):
        lines.append(f"- command: `{data['command']}`")
    if data.get("runs_planned") and data.get("runs_finished") != data["runs_planned"]:
        lines.append(
            f"- **incomplete**: {data['runs_finished']} of {data['runs_planned']} runs finished"
            + (
                " (table rebuilt from the finished runs only, nothing was run)"
                if data.get("table_only")
                else ""
            )
        )
    if data.get("wall_seconds") is not None:
        extra = [
            f"{label} {t[key] / 60:.1f} min"
            for key, label in (("resolve_seconds", "teacher training"), ("cache_seconds", "teacher cache"))
            if (t.get(key) or 0) > 1
        ]
        lines.append(
            f"- wall time of this invocation: {data['wall_seconds'] / 60:.1f} min with --jobs {data.get('jobs', 1)}"
            + (f" ({', '.join(extra)})" if extra else "")
        )
    for note in data.get("notes") or []:
        lines.append(f"- note: {note}")
    lines += [
        "",
        "Student eval perplexity, mean ± sd over seeds (lower is better). Gap closed = "
        "(ppl_ce − ppl_arm)/(ppl_ce − ppl_teacher) on the means over the seeds both finished. Δ = arm − reference, paired over seeds, "
        "mean [95% CI], paired t-test p; negative Δ means the arm is better.",
        "",
        "| arm | role | strategy | seeds | student ppl | gap closed | mean λ | Δ vs kd | Δ vs matched λ | wall s | tokens/s | status |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in data["arms"]:
        vs = row.get("vs", {})
        status = row["status"]
        if row.get("error"):
            status += f": {row['error']}"
        lines.append(
            "| "
            + " | ".join(
                [
                    f"**{row['name']}**",
                    role_text(row),
                    f"`{row['strategy']}`",
                    f"{row['n_ok']}/{row['n_seeds']}",
                    _pm(row["ppl_mean"], row["ppl_sd"]),
                    "–" if row["gap_closed"] is None else f"{row['gap_closed']:.1%}",
                    _pm(row["mean_lambda"], row["mean_lambda_sd"]),
                    format_paired(vs["kd"]) if "kd" in vs else "–",
                    format_paired(vs.get("matched")) if "matched" in vs else "–",
                    _num(row["wall_seconds_mean"], 0),
                    _num(row["tokens_per_second_mean"], 0),
                    status.replace("|", "/"),
                ]
            )
            + " |"
        )
    pairs = [
        (row["name"], key, p)
        for row in data["arms"]
        for key, p in (row.get("vs") or {}).items()
        if row["role"] == "arm"
    ]
    if pairs:
        lines += [
            "",
            "## Paired comparisons",
            "",
            "| arm | reference | seeds | Δ ppl (arm − ref) | 95% CI | p (paired t) | verdict |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, _key, p in pairs:
            ci = "–" if p.get("ci_low") is None else f"[{p['ci_low']:+.3f}, {p['ci_high']:+.3f}]"
            lines.append(
                f"| {name} | {p['reference']} | {p['n']} | "
                f"{'–' if p.get('mean_diff') is None else format(p['mean_diff'], '+.3f')} | {ci} | "
                f"{'–' if p.get('p_value') is None else format(p['p_value'], '.3g')} | {p['verdict']} |"
            )
    lines += ["", verdict_sentences(data), ""]
    return "\n".join(lines)


def verdict_sentences(data: Mapping[str, Any]) -> str:
    """Plain sentences: which arms beat vanilla KD and their matched baseline, significantly or not."""
    out = []
    for row in data["arms"]:
        if row["role"] != "arm":
            continue
        for key, label in (
            ("kd", "vanilla KD"),
            ("matched", "KD at its matched mean λ"),
            ("best_fixed", "the best fixed λ"),
        ):
            p = (row.get("vs") or {}).get(key)
            if not p or p.get("mean_diff") is None:
                continue
            better = "lower" if p["mean_diff"] < 0 else "higher"
            if p.get("p_value") is None:
                tail = f"({p.get('note')})"
            elif p["p_value"] < 0.05:
                tail = f"(p={p['p_value']:.3g}, significant)"
            else:
                tail = f"(p={p['p_value']:.3g}, not significant)"
            out.append(
                f"- **{row['name']}** vs {label} (`{p['reference']}`): {abs(p['mean_diff']):.3f} {better} ppl {tail}."
            )
    return "\n".join(out)


def write_comparison_plots(out_dir: Path, data: Mapping[str, Any]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from kdcore.runs.outputs import save_figure

    rows = [r for r in data["arms"] if r["ppl_mean"] is not None]
    written = []
    if not rows:
        return written
    fig, ax = plt.subplots(figsize=(max(5, 0.9 * len(rows) + 2), 3.8))
    xs = np.arange(len(rows))
    colors = [f"C{i % 10}" for i in range(len(rows))]
    for x, row, color in zip(xs, rows, colors, strict=True):
        ax.errorbar(x, row["ppl_mean"], yerr=row["ppl_sd"] or 0, fmt="o", capsize=4, color=color)
        seeds = [r["student_eval_ppl"] for r in row["runs"] if r["status"] == "ok"]
        ax.scatter([x + 0.12] * len(seeds), seeds, s=8, color=color, alpha=0.5)
    teacher = data["teacher"].get("eval_ppl")
    if teacher:
        ax.axhline(teacher, ls="--", color="grey", lw=1, label=f"teacher {teacher:.3f}")
        ax.legend(fontsize="small")
    ax.set_xticks(xs, [r["name"] for r in rows], rotation=30, ha="right")
    ax.set(ylabel="student eval perplexity", title="eval perplexity per arm (mean ± sd over seeds)")
    path = out_dir / "ppl.png"
    save_figure(fig, path)
    plt.close(fig)
    written.append(path)

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for row, color in zip(rows, colors, strict=True):
        curves = [r["eval_curve"] for r in row["runs"] if r["status"] == "ok" and r.get("eval_curve")]
        if not curves:
            continue
        steps = [step for step, _ in curves[0]]
        common = [c for c in curves if [s for s, _ in c] == steps]
        values = np.array([[v for _, v in c] for c in common], dtype=float)
        if len(steps) > 2:  # the untrained model's perplexity (step 0) would flatten every difference
            steps, values = steps[1:], values[:, 1:]
        mean = values.mean(axis=0)
        sd = values.std(axis=0, ddof=1) if len(values) > 1 else np.zeros_like(mean)
        style = "--" if row["role"] in ("sweep", "matched") else "-"
        ax.plot(steps, mean, style, color=color, label=row["name"], lw=1.3)
        ax.fill_between(steps, mean - sd, mean + sd, color=color, alpha=0.15)
    if teacher:
        ax.axhline(teacher, ls=":", color="grey", lw=1, label="teacher")
    ax.set(
        xlabel="step",
        ylabel="eval perplexity",
        title="eval curves (mean ± sd over seeds; step 0 left out)",
    )
    ax.legend(fontsize="x-small", ncol=2)
    path = out_dir / "curves.png"
    save_figure(fig, path)
    plt.close(fig)
    written.append(path)
    return written


# =============================================================================================
# entry point
# =============================================================================================
def default_output_dir() -> Path:
    return Path("comparisons") / _dt.datetime.now().strftime("%Y%m%d-%H%M%S")


def prepare_output(out_dir: Path) -> None:
    if (out_dir / PLAN).exists():
        raise KdError(
            f"'{out_dir}' already holds a comparison; finish it with kd compare --resume {out_dir}, "
            "or choose another --output-dir"
        )
    if out_dir.exists() and any(out_dir.iterdir()):
        raise KdError(f"output directory '{out_dir}' is not empty; choose another --output-dir")


def compare(
    plan: Plan, out_dir: Path, *, jobs: int = 1, log: Callable[[str], None] = print, console: Any = None
) -> dict[str, Any]:
    """Run a new comparison into ``out_dir`` (which must be new or empty)."""
    prepare_output(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / PLAN, plan.to_yaml())
    return Comparison(plan, out_dir, jobs=jobs, log=log, console=console).run()


def resume(
    out_dir: Path, *, jobs: int = 1, log: Callable[[str], None] = print, console: Any = None
) -> dict[str, Any]:
    """Finish a comparison: reuse every run with summary.json, redo the rest."""
    path = out_dir / PLAN
    if not path.is_file():
        raise KdError(
            f"'{out_dir}' is not a kd compare directory (no {PLAN}); pass the directory kd compare wrote"
        )
    plan = Plan.load(path)
    validate_plan(plan)
    return Comparison(plan, out_dir, jobs=jobs, log=log, console=console).run()


def table_only(out_dir: Path, *, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Rebuild comparison.json/.md and the plots from the runs finished so far, running nothing."""
    path = out_dir / PLAN
    if not path.is_file():
        raise KdError(
            f"'{out_dir}' is not a kd compare directory (no {PLAN}); pass the directory kd compare wrote"
        )
    return Comparison(Plan.load(path), out_dir, log=log).collect()
