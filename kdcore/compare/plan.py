"""The plan of a comparison: the base run config, every arm (references and sweep added), the seeds.

:func:`build_plan` resolves and validates all of it before anything runs; the plan is written to
``compare.yaml``, which ``kd compare --resume`` reads back, and :func:`arm_config` gives the run
config of one arm and seed.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kdcore.compare.arms import (
    PRESETS,
    Arm,
    Preset,
    apply_patch,
    check_arm_name,
    matched_strategy,
    parse_arm,
    patch_from_yaml,
    with_lambda,
)
from kdcore.config import (
    MAX_SEED,
    RunConfig,
    deep_merge,
    format_validation_error,
    load_file,
    resolve_tree,
    set_path,
)
from kdcore.errors import KdError
from kdcore.references import reference_strategy
from kdcore.strategies import KINDS

PLAN = "compare.yaml"
DEFAULT_SWEEP = (0.1, 0.5, 0.9)


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
    equal_time: bool = False  # also run each arm with a generating source at the kd arm's wall time

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
            "equal_time": self.equal_time,
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
            equal_time=bool(data.get("equal_time", False)),
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

    def timed_arms(self) -> list[Arm]:
        """The arms that also run at the kd arm's wall time (``equal_time``): those whose source is not
        the dataset, whose steps cost more."""
        return [a for a in self.arms if a.role == "arm" and a.source != "dataset"] if self.equal_time else []


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
    "equal_time",
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
    for seed in seeds:
        check_seed(seed, "--seeds")
    if len(set(seeds)) != len(seeds):
        raise KdError(f"--seeds {seeds} repeats a seed")
    return seeds


def check_seed(seed: int, option: str) -> None:
    """A seed every run accepts (training.seed), checked before anything runs."""
    if not 0 <= seed <= MAX_SEED:
        raise KdError(f"{option} {seed} is not a seed; use an integer from 0 to {MAX_SEED}")


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
    equal_time: bool | None = None,
    command: str = "",
) -> Plan:
    """Resolve the base config and every arm, and validate all of them before anything runs.

    Options given here win over the same keys in the ``config`` file (``seeds:``, ``sweep:``...).
    """
    tree = load_file(config) if config else {}
    compare_part = {k: tree.pop(k) for k in list(tree) if k in COMPARE_KEYS}

    def option(given: Any, key: str, default: Any = None) -> Any:
        return given if given is not None else compare_part.get(key, default)

    chosen = _preset(preset or compare_part.get("preset"))
    settings = chosen.settings if chosen else {}
    base = _base_config(config, tree, compare_part, overrides or {}, settings)
    specs = _arm_specs(chosen, compare_part.get("arms") or {}, arm_texts)
    given = {name for name, _, _ in specs}
    arms = [Arm(name, apply_patch(base["strategy"], patch), spec=spec) for name, patch, spec in specs]
    notes: list[str] = []
    if settings:
        values = ", ".join(f"{key}={value}" for key, value in settings.items())
        notes.append(
            f"preset '{preset or compare_part.get('preset')}' sets {values} "
            "unless --config, an option or --set gives another value"
        )
    kd = _add_references(arms, base["strategy"], given, notes)
    plan_sweep = parse_sweep(option(sweep, "sweep"))
    arms += _sweep_arms(kd, plan_sweep, given)
    plan = Plan(
        base=base,
        arms=arms,
        seeds=parse_seeds(option(seeds, "seeds", [0, 1, 2])),
        teacher_seed=int(option(teacher_seed, "teacher_seed", 0)),
        sweep=plan_sweep,
        matched=bool(option(matched, "matched", True)),
        notes=notes,
        command=command,
        teacher_cache=_teacher_cache_option(option(teacher_cache, "teacher_cache")),
        teacher_cache_k=option(teacher_cache_k, "teacher_cache_k"),
        equal_time=bool(option(equal_time, "equal_time", False)),
    )
    check_seed(plan.teacher_seed, "--teacher-seed")
    _check_teacher_cache(plan)
    if plan.matched:
        for arm in plan.reliance_arms():
            notes.append(
                f"'kd@matched-{arm.name}' is vanilla KD at the mean λ '{arm.name}' used on the same seed"
            )
    for arm in plan.timed_arms():
        notes.append(
            f"'{arm.name}@equal-time' is '{arm.name}' for the steps that take as long as '{plan.kd.name}'s "
            "run on the same seed (training time, generation included)"
        )
    if plan.equal_time and not plan.timed_arms():
        notes.append(
            "--equal-time adds no run: it reruns each arm whose source is not the dataset (e.g. source:on-policy) "
            f"for '{plan.kd.name}'s training time, and every arm here trains on the dataset"
        )
    validate_plan(plan)
    return plan


def _base_config(
    config: Path | None,
    tree: dict[str, Any],
    compare_part: Mapping[str, Any],
    overrides: Mapping[str, Any],
    preset_settings: Mapping[str, Any],
) -> dict[str, Any]:
    """The run config every arm starts from: the preset's settings, ``base:`` (a file or a mapping), the
    file's own run sections, then ``--set`` overrides; they may not choose strategies (that is what arms do)."""
    base_tree: dict[str, Any] = {}
    for dotted, value in preset_settings.items():
        set_path(base_tree, dotted, value)
    if "base" in compare_part:
        base_ref = compare_part["base"]
        if isinstance(base_ref, str):
            base_path = Path(base_ref)
            if not base_path.is_absolute() and config is not None:
                base_path = config.parent / base_path
            base_tree = deep_merge(base_tree, load_file(base_path))
        elif isinstance(base_ref, Mapping):
            base_tree = deep_merge(base_tree, base_ref)
        else:
            raise KdError("base: must be a run-config file path or a mapping of sections")
    for key in sorted(k for k in overrides if k.split(".")[0] == "strategy"):
        if key.split(".")[1:2] and key.split(".")[1] in KINDS:
            raise KdError(
                f"'{key}' chooses a strategy for every arm; compare arms with --arm NAME=SPEC instead"
            )
    try:
        base_cfg = resolve_tree(deep_merge(base_tree, tree), overrides)
    except KdError as exc:
        raise KdError(f"base config: {exc}") from None
    base = base_cfg.to_dict()
    base["output"]["dir"] = None
    return base


def _preset(name: str | None) -> Preset | None:
    if not name:
        return None
    if name not in PRESETS:
        raise KdError(f"unknown preset '{name}'; choose one of {', '.join(sorted(PRESETS))}")
    return PRESETS[name]


def _arm_specs(
    preset: Preset | None, yaml_arms: Any, arm_texts: Sequence[str]
) -> list[tuple[str, dict[str, Any], str]]:
    """(name, strategy patch, spec text) of every arm asked for: the preset's, the config file's, then
    ``--arm``'s, in that order; names are unique."""
    specs: list[tuple[str, dict[str, Any], str]] = []
    for text in preset.arms if preset else ():
        name, patch = parse_arm(text)
        specs.append((name, patch, text.partition("=")[2]))
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
    return specs


def _add_references(arms: list[Arm], base_strategy: dict[str, Any], given: set[str], notes: list[str]) -> Arm:
    """Give the roles ``ce`` (CE only) and ``kd`` (vanilla KD) to arms that play them, adding the arms
    when none does; returns the ``kd`` arm."""
    ce = next((a for a in arms if a.name == "ce" and a.is_ce()), None) or next(
        (a for a in arms if a.is_ce()), None
    )
    if ce is None:
        if "ce" in given:
            raise KdError("arm 'ce' must be the CE-only baseline (reliance:none); rename your arm")
        ce = Arm("ce", reference_strategy(base_strategy, "none"), spec="reliance:none", auto=True)
        arms.insert(0, ce)
        notes.append("added arm 'ce' (reliance:none), the CE-only student the gap closed is measured from")
    ce.role = "ce"
    kd = next((a for a in arms if a.name == "kd" and a.is_vanilla_kd()), None) or next(
        (a for a in arms if a.is_vanilla_kd() and a.role == "arm"), None
    )
    if kd is None:
        if "kd" in given:
            raise KdError(
                "arm 'kd' must be vanilla KD (reliance:fixed, no scorer or pacing); rename your arm"
            )
        kd = Arm("kd", reference_strategy(base_strategy, "fixed"), spec="reliance:fixed", auto=True)
        arms.insert(1, kd)
        notes.append("added arm 'kd' (reliance:fixed), the vanilla KD every arm is compared with")
    kd.role = "kd"
    return kd


def _sweep_arms(kd: Arm, values: Sequence[float], given: set[str]) -> list[Arm]:
    """Vanilla KD at each fixed λ of the sweep (the ``kd`` arm stands for its own λ)."""
    arms = []
    kd_lambda = kd.fixed_lambda()
    for value in values:
        if kd_lambda is not None and abs(value - kd_lambda) < 1e-9:
            continue  # the kd arm is this sweep point
        name = f"kd@{lambda_label(value)}"
        if name in given:
            raise KdError(f"arm name '{name}' is kept for the fixed-λ sweep")
        strategy = with_lambda(kd.strategy, value)
        arms.append(Arm(name, strategy, role="sweep", spec=f"reliance:fixed(value={value:g})", auto=True))
    return arms


def _check_teacher_cache(plan: Plan) -> None:
    """One teacher cache serves every arm and seed only when they all train on the same data."""
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


def validate_plan(plan: Plan) -> None:
    """Every arm's run config resolves and its strategies instantiate, or one sentence says which fails."""
    from kdcore.plugins import instantiate_strategies

    for arm in plan.arms:
        cfg = arm_config(plan, arm, plan.seeds[0], Path("unused"))
        try:
            built = instantiate_strategies(cfg.strategy)
        except KdError as exc:
            raise KdError(f"arm '{arm.name}': {exc}") from None
        if plan.teacher_cache and built["source"][0].generates():
            raise KdError(
                f"arm '{arm.name}' trains on text written during training (source '{arm.source}'), which a "
                "teacher cache cannot score; drop --teacher-cache or that arm"
            )
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
    max_steps: int | None = None,
) -> RunConfig:
    """The run config of ``arm`` and ``seed``; ``max_steps`` replaces the base's (an equal-time run)."""
    tree = json.loads(json.dumps(plan.base))
    tree["strategy"] = arm.strategy
    tree["training"]["seed"] = seed
    if max_steps is not None:
        tree["training"]["max_steps"] = max_steps
    tree["output"]["dir"] = str(run_dir)
    tree["output"]["baseline"] = False  # the comparison's own ce arm is every run's CE-only baseline
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
