"""``kd new-plugin``: write a complete, installable plugin package for one strategy.

The package it writes (``kd-plugin-NAME/``) is ready to ``pip install -e``: a ``pyproject.toml``
whose ``kdcore`` entry point names the module, the module itself (``kd_plugin_NAME/__init__.py``,
whose docstring is the author's quick guide) with a working strategy of the chosen kind, a
pydantic ``Params`` model and the registration hook, a test file that passes as generated, and a
README. Nothing here imports torch.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from string import Template

from kdcore.errors import KdError
from kdcore.strategies import KINDS

__all__ = ["KIND_CHOICES", "PluginNames", "plugin_names", "write_plugin"]


_VALID = re.compile(r"^[a-z][a-z0-9]*(-[a-z0-9]+)*$")
_MAX_LENGTH = 30
#: Names the generated module imports: a class must not shadow them.
_TAKEN = {
    "BaseModel",
    "ConfigDict",
    "DifficultyScorer",
    "Divergence",
    "Field",
    "KdError",
    "Literal",
    "PacingFunction",
    "ReliancePolicy",
    "ScorerContext",
}


@dataclass(frozen=True)
class PluginNames:
    """Every name derived from the strategy name ``name`` (e.g. ``loss-trend``)."""

    name: str  # the strategy's registry name: kd run --scorer loss-trend
    kind: str
    dist: str  # kd-plugin-loss-trend
    module: str  # kd_plugin_loss_trend
    cls: str  # LossTrend
    test_module: str  # test_loss_trend


def plugin_names(name: str, kind: str) -> PluginNames:
    """Validate ``name`` and ``kind`` and derive the package, module and class names."""
    if kind not in KIND_CHOICES:
        raise KdError(f"unknown plugin kind '{kind}'; choose one of {', '.join(KIND_CHOICES)}")
    if name.startswith("kd-plugin-"):
        raise KdError(
            f"give the strategy name without the 'kd-plugin-' prefix (e.g. '{name[len('kd-plugin-') :]}'); "
            "the package is named kd-plugin-NAME for you"
        )
    if not _VALID.match(name) or len(name) > _MAX_LENGTH:
        raise KdError(
            f"plugin name '{name}' is not valid: use lower-case letters, digits and single dashes, "
            f"starting with a letter and at most {_MAX_LENGTH} characters (e.g. 'loss-trend')"
        )
    snake = name.replace("-", "_")
    cls = "".join(part[:1].upper() + part[1:] for part in name.split("-"))
    if cls in _TAKEN:
        cls += "Strategy"
    return PluginNames(name, kind, f"kd-plugin-{name}", f"kd_plugin_{snake}", cls, f"test_{snake}")


def _check_not_registered(names: PluginNames) -> None:
    """Refuse a name the installed plugins already use for that kind (it would be a duplicate)."""
    from kdcore.plugins import get_registry

    taken = [e for e in get_registry().entries if e.kind == names.kind and e.name == names.name]
    if taken:
        raise KdError(
            f"{names.kind} '{names.name}' is already provided by {taken[0].distribution}; "
            "choose another name (kdcore refuses a strategy name registered twice)"
        )


def write_plugin(name: str, kind: str = "scorer", output_dir: Path | str = ".") -> Path:
    """Write ``<output_dir>/kd-plugin-NAME/`` and return its path.

    Raises :class:`KdError` for an invalid name or kind, a name already taken by an installed
    plugin of that kind, or an existing target directory (nothing is ever overwritten).
    """
    names = plugin_names(name, kind)
    output_dir = Path(output_dir)
    target = output_dir / names.dist
    if target.exists() or target.is_symlink():
        raise KdError(f"'{target}' already exists; remove it or choose another --output-dir")
    _check_not_registered(names)
    output_dir.mkdir(parents=True, exist_ok=True)

    files = render(names)
    # Write into a sibling temporary directory and rename it: no half-written package on failure.
    staging = Path(tempfile.mkdtemp(prefix=f".{names.dist}-", dir=output_dir))
    try:
        for relative, text in files.items():
            path = staging / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
        os.chmod(staging, 0o777 & ~_umask())
        os.rename(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def render(names: PluginNames) -> dict[str, str]:
    """The generated files, relative path -> text."""
    from kdcore import __version__

    kind, template = KINDS[names.kind], _TEMPLATES[names.kind]
    values = {
        "name": names.name,
        "kind": names.kind,
        "dist": names.dist,
        "module": names.module,
        "cls": names.cls,
        "test_module": names.test_module,
        "base": kind.base.__name__,
        "hook": kind.hook,
        "what": kind.what,
        "summary": template.summary,
        "kdcore_version": __version__,
    }

    def fill(template: str) -> str:
        return Template(template).substitute(values).lstrip("\n")

    values["strategy"] = fill(template.strategy).rstrip("\n")
    values["tests"] = fill(template.tests).rstrip("\n")
    values["readme_params"] = template.readme_params.strip("\n")
    values["imports"] = fill(template.imports).strip("\n")
    values["test_imports"] = fill(template.test_imports).strip("\n")
    values["test_setup"] = "torch.set_num_threads(1)\n" if "import torch" in template.test_imports else ""
    return {
        "pyproject.toml": fill(PYPROJECT),
        "README.md": fill(README),
        ".gitignore": "__pycache__/\n*.egg-info/\n.pytest_cache/\nbuild/\ndist/\n",
        f"{names.module}/__init__.py": fill(MODULE),
        f"tests/{names.test_module}.py": fill(TESTS),
    }


# ------------------------------------------------------------------------------------------------
# Templates (string.Template: $name placeholders, $$ for a literal dollar)
# ------------------------------------------------------------------------------------------------

PYPROJECT = """
[build-system]
requires = ["setuptools>=69"]
build-backend = "setuptools.build_meta"

[project]
name = "$dist"
version = "0.1.0"
description = "kdcore plugin: the '$name' $what."
readme = "README.md"
requires-python = ">=3.10"
dependencies = ["kdcore>=$kdcore_version"]

[project.optional-dependencies]
test = ["pytest>=8"]

# kdcore finds strategies through this entry-point group; the value is the module with the hook.
[project.entry-points.kdcore]
$name = "$module"

[tool.setuptools]
packages = ["$module"]

[tool.pytest.ini_options]
testpaths = ["tests"]
pythonpath = ["."]

[tool.ruff]
line-length = 110
"""

README = """
# $dist

A kdcore plugin that adds the $what **`$name`**.

## Install and check

```bash
pip install -e .                 # from this directory
kd list-plugins                  # shows: $kind  $name  ...  $dist 0.1.0  ok
```

## Use

```bash
kd run --$kind $name
kd run --$kind $name --$kind-arg KEY=VALUE
```

or in a YAML run config:

```yaml
strategy:
  $kind: {name: $name, params: {}}
```

## Parameters

$readme_params

## Test

```bash
python -m pytest                 # from this directory
```

Start with the quick guide at the top of `$module/__init__.py`; the full guide is kdcore's
`docs/plugins.md`.
"""

MODULE = '''
"""$dist: the kdcore $what '$name'.

Quick guide
-----------
1. The strategy is the class ``$cls`` below; kdcore builds it as ``$cls(params)``. Its methods
   are the ones of ``kdcore.$base``; $summary
2. Parameters are the fields of ``${cls}Params`` (a pydantic model). Users set them with
   ``kd run --$kind $name --$kind-arg key=value`` or in YAML as
   ``$kind: {name: $name, params: {key: value}}``; kdcore validates them before anything heavy
   loads and reports a bad value by field. ``extra="forbid"`` turns a typo into an error.
3. The first line of the class docstring is the description ``kd list-plugins`` shows.
4. Import torch inside methods only (``if TYPE_CHECKING:`` for type hints), so ``kd --help``
   and ``kd list-plugins`` stay fast; use only names from ``kdcore.__all__``.
5. Anything the strategy learns during training goes in ``state_dict()`` / ``load_state_dict()``
   so that ``kd run --resume`` continues with it.
6. Test: ``python -m pytest`` in this directory. Install: ``pip install -e .``, then check that
   ``kd list-plugins`` shows '$name' with status ok, and run ``kd run --$kind $name``.
7. To rename the strategy, change the name in ``$hook`` below *and* the entry point in
   ``pyproject.toml``, then ``pip install -e .`` again. Full guide: kdcore's docs/plugins.md.
"""

from __future__ import annotations

$imports

__all__ = ["$cls", "${cls}Params", "$hook"]


$strategy


@hookimpl
def $hook(register):
    register("$name", $cls)
'''

TESTS = '''
"""Tests for the '$name' $what: hand-computed values, parameters, registration."""

from __future__ import annotations

$test_imports

from $module import (
    $cls,
    $hook,
)

${test_setup}NAN = float("nan")


$tests


def test_unknown_parameters_are_rejected():
    with pytest.raises(ValidationError, match="bogus"):
        $cls.Params.model_validate({"bogus": 1})


def test_the_hook_registers_the_class():
    registered = []
    $hook(register=lambda name, cls: registered.append((name, cls)))
    assert registered == [("$name", $cls)]
    assert $cls.summary() and "\\n" not in $cls.summary()


def test_the_entry_point_is_installed():
    try:
        dist = importlib.metadata.distribution("$dist")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("not installed yet: run `pip install -e .` in this package's directory")
    points = {ep.name: ep.value for ep in dist.entry_points if ep.group == "kdcore"}
    assert points == {"$name": "$module"}
'''


@dataclass(frozen=True)
class _Kind:
    summary: str
    strategy: str
    tests: str
    readme_params: str
    imports: str
    test_imports: str


SCORER = _Kind(
    summary="""kdcore calls
   ``prepare(ctx)`` once before training, ``observe(sample_ids, stats)`` after every
   micro-batch (``stats``: ``ce``, ``kd``, ``confidence``, ``tokens``, float CPU tensors of
   shape ``[batch]``) and ``scores()`` at every curriculum re-sort (each epoch): one float per
   sample id, higher = harder, ``NaN`` = unknown.""",
    strategy='''
class ${cls}Params(BaseModel):
    model_config = ConfigDict(extra="forbid")
    signal: Literal["loss", "confidence"] = Field(
        "loss",
        description="loss: the student's mean token CE; confidence: 1 − its mean gold-token probability",
    )


class $cls(DifficultyScorer):
    """The student's latest loss on each sample (higher = harder); NaN until first seen."""

    Params = ${cls}Params
    #: Statistics needed beyond the default ones; {"kd"} forces a teacher pass even when λ = 0.
    needs = frozenset()

    def __init__(self, params: BaseModel | None = None) -> None:
        super().__init__(params)
        self._scores: torch.Tensor | None = None  # [num_samples] float32, NaN = unknown

    def prepare(self, ctx: ScorerContext) -> None:
        import torch

        if self._scores is None:  # not restored by load_state_dict (a resumed run keeps its state)
            self._scores = torch.full((ctx.num_samples,), float("nan"), dtype=torch.float32)
        elif self._scores.numel() != ctx.num_samples:
            raise KdError(
                f"scorer '$name': the saved scores cover {self._scores.numel()} samples "
                f"but the dataset has {ctx.num_samples}"
            )

    def observe(self, sample_ids: torch.Tensor, stats: Mapping[str, torch.Tensor]) -> None:
        import torch

        if self._scores is None:
            raise RuntimeError("scorer '$name': observe() called before prepare()")
        value = stats["ce"] if self.params.signal == "loss" else 1.0 - stats["confidence"]
        value = value.detach().to("cpu", torch.float32).reshape(-1)
        keep = torch.isfinite(value)  # a sample without valid tokens reports NaN: ignore it
        # Vectorised: no Python loop over samples (the sampler never repeats an id in a batch).
        self._scores[sample_ids.reshape(-1).cpu()[keep]] = value[keep]

    def scores(self) -> torch.Tensor:
        if self._scores is None:
            raise RuntimeError("scorer '$name': scores() called before prepare()")
        return self._scores.clone()

    def state_dict(self) -> dict[str, Any]:
        return {} if self._scores is None else {"scores": self._scores.clone()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        import torch

        if state:
            self._scores = torch.as_tensor(state["scores"], dtype=torch.float32).clone()
''',
    tests='''
def context(n: int):
    """A ScorerContext without models (this scorer only needs the number of samples)."""
    from kdcore import ScorerContext

    def no_pass():
        raise AssertionError("this scorer makes no model pass")

    return ScorerContext(
        num_samples=n,
        lengths=torch.full((n,), 8),
        seq_len=8,
        seed=0,
        teacher_stats=no_pass,
        student_stats=no_pass,
    )


def stats(ce, confidence=None):
    """Per-sample statistics shaped like the ones the training step passes to observe()."""
    ce = torch.tensor(ce, dtype=torch.float32)
    conf = torch.zeros_like(ce) if confidence is None else torch.tensor(confidence, dtype=torch.float32)
    return {"ce": ce, "kd": torch.zeros_like(ce), "confidence": conf, "tokens": torch.full_like(ce, 8.0)}


def close(actual, expected):
    return torch.allclose(actual, torch.tensor(expected), atol=1e-6, equal_nan=True)


def test_scores_are_the_latest_loss_and_nan_until_seen():
    scorer = $cls($cls.Params())
    scorer.prepare(context(3))
    assert torch.isnan(scorer.scores()).all()
    scorer.observe(torch.tensor([0, 2]), stats([2.0, 3.0]))
    scorer.observe(torch.tensor([0]), stats([1.5]))
    assert close(scorer.scores(), [1.5, NAN, 3.0])
    scorer.observe(torch.tensor([1]), stats([NAN]))  # non-finite: ignored
    assert close(scorer.scores(), [1.5, NAN, 3.0])


def test_confidence_signal():
    scorer = $cls($cls.Params(signal="confidence"))
    scorer.prepare(context(2))
    scorer.observe(torch.tensor([1]), stats([9.0], confidence=[0.25]))
    assert close(scorer.scores(), [NAN, 0.75])


def test_state_dict_round_trip_survives_prepare():
    first = $cls($cls.Params())
    first.prepare(context(2))
    first.observe(torch.tensor([1]), stats([4.0]))
    resumed = $cls($cls.Params())
    resumed.load_state_dict(first.state_dict())
    resumed.prepare(context(2))  # kdcore restores a checkpoint before prepare()
    assert close(resumed.scores(), [NAN, 4.0])


def test_bad_parameter_values_are_rejected():
    with pytest.raises(ValidationError, match="signal"):
        $cls.Params.model_validate({"signal": "vibes"})
''',
    readme_params="""
| parameter | default | meaning |
|-----------|---------|---------|
| `signal`  | `loss`  | `loss`: the student's mean token CE; `confidence`: 1 − its mean gold-token probability |
""",
    imports="""
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal

from kdcore import DifficultyScorer, KdError, ScorerContext, hookimpl
from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    import torch
""",
    test_imports="""
import importlib.metadata

import pytest
import torch
from pydantic import ValidationError
""",
)

PACING = _Kind(
    summary="""kdcore calls
   ``fraction(step, total_steps)`` at every step: the share in ``(0, 1]`` of the easy-to-hard
   ordering that is open. It must be non-decreasing in ``step``, give 1 from ``total_steps`` on
   (and for ``total_steps <= 0``); kdcore's test suite checks this for every installed pacing.""",
    strategy='''
class ${cls}Params(BaseModel):
    model_config = ConfigDict(extra="forbid")
    s0: float = Field(0.2, gt=0, le=1, description="share of the easiest samples open at step 0")
    ramp: float = Field(0.8, gt=0, le=1, description="share of training after which everything is open")


class $cls(PacingFunction):
    """Linear ramp from s0 at step 0 to everything open at ramp · total_steps."""

    Params = ${cls}Params

    def fraction(self, step: int, total_steps: int) -> float:
        if total_steps <= 0:
            return 1.0
        progress = min(1.0, max(0.0, step / total_steps) / self.params.ramp)
        if progress >= 1.0:
            return 1.0
        s0 = float(self.params.s0)
        return min(1.0, s0 + (1.0 - s0) * progress)
''',
    tests="""
def test_hand_computed_shares():
    pacing = $cls($cls.Params(s0=0.2, ramp=0.5))
    assert pacing.fraction(0, 100) == 0.2
    assert pacing.fraction(25, 100) == pytest.approx(0.6)  # 0.2 + 0.8 · (0.25 / 0.5)
    assert pacing.fraction(50, 100) == 1.0
    assert pacing.fraction(0, 0) == 1.0


def test_monotone_in_range_and_one_at_the_end():
    pacing = $cls($cls.Params())
    for total in (1, 7, 100):
        shares = [pacing.fraction(step, total) for step in range(total + 3)]
        assert all(0.0 < s <= 1.0 and isinstance(s, float) for s in shares)
        assert shares == sorted(shares)
        assert pacing.fraction(total, total) == 1.0


def test_bad_parameter_values_are_rejected():
    with pytest.raises(ValidationError, match="s0"):
        $cls.Params.model_validate({"s0": 0})
""",
    readme_params="""
| parameter | default | meaning |
|-----------|---------|---------|
| `s0`      | `0.2`   | share of the easiest samples open at step 0 |
| `ramp`    | `0.8`   | share of training after which everything is open |
""",
    imports="""
from kdcore import PacingFunction, hookimpl
from pydantic import BaseModel, ConfigDict, Field
""",
    test_imports="""
import importlib.metadata

import pytest
from pydantic import ValidationError
""",
)

RELIANCE = _Kind(
    summary="""kdcore calls
   ``weights(rank, score, progress)`` for every micro-batch: λ (the weight of the teacher term)
   per sample as a float32 tensor of ``rank``'s shape, in ``[0, 1]``. ``rank`` is the difficulty
   percentile (0 = easiest, 1 = hardest, ``NaN`` = unknown), ``score`` the raw score, ``progress``
   the share of training done. ``temperature(base, progress)`` may change τ over training.""",
    strategy='''
class ${cls}Params(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lambda_easy: float = Field(0.2, ge=0, le=1, description="λ for the easiest sample (rank 0)")
    lambda_hard: float = Field(0.8, ge=0, le=1, description="λ for the hardest sample (rank 1)")


class $cls(ReliancePolicy):
    """λ linear in the difficulty rank, from lambda_easy to lambda_hard; unknown samples get the mean."""

    Params = ${cls}Params

    def weights(self, rank: torch.Tensor, score: torch.Tensor, progress: float) -> torch.Tensor:
        import torch

        easy, hard = float(self.params.lambda_easy), float(self.params.lambda_hard)
        lam = easy + (hard - easy) * rank.to(torch.float32)
        unknown = torch.full_like(lam, (easy + hard) / 2)  # the mean λ over a uniform rank
        return torch.where(torch.isnan(rank), unknown, lam).clamp(0.0, 1.0)

    def temperature(self, base: float, progress: float) -> float:
        return base
''',
    tests="""
def test_hand_computed_lambdas():
    policy = $cls($cls.Params(lambda_easy=0.2, lambda_hard=0.8))
    rank = torch.tensor([0.0, 0.5, 1.0, NAN])
    lam = policy.weights(rank, rank.clone(), progress=0.3)
    assert lam.dtype == torch.float32 and lam.shape == rank.shape
    assert lam.tolist() == pytest.approx([0.2, 0.5, 0.8, 0.5])
    assert policy.temperature(2.0, 0.3) == 2.0


def test_any_shape_including_empty():
    policy = $cls($cls.Params())
    rank = torch.tensor([[0.0, NAN], [1.0, 0.25]])
    assert policy.weights(rank, rank, 1.0).shape == (2, 2)
    assert policy.weights(torch.empty(0), torch.empty(0), 0.0).shape == (0,)


def test_bad_parameter_values_are_rejected():
    with pytest.raises(ValidationError, match="lambda_hard"):
        $cls.Params.model_validate({"lambda_hard": 1.5})
""",
    readme_params="""
| parameter     | default | meaning |
|---------------|---------|---------|
| `lambda_easy` | `0.2`   | λ for the easiest sample (rank 0) |
| `lambda_hard` | `0.8`   | λ for the hardest sample (rank 1) |
""",
    imports="""
from typing import TYPE_CHECKING

from kdcore import ReliancePolicy, hookimpl
from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    import torch
""",
    test_imports="""
import importlib.metadata

import pytest
import torch
from pydantic import ValidationError
""",
)

DIVERGENCE = _Kind(
    summary="""kdcore calls
   ``per_token(student_logp, teacher_logp)`` with log-probabilities already softened by the
   temperature, shape ``[tokens, vocab]``; return one value per token, shape ``[tokens]``,
   differentiable in ``student_logp``. kdcore applies τ², the padding mask and the per-sample
   mean.""",
    strategy='''
class ${cls}Params(BaseModel):
    model_config = ConfigDict(extra="forbid")
    weight: float = Field(
        0.5, ge=0, le=1, description="w in w·KL(teacher ‖ student) + (1 − w)·KL(student ‖ teacher)"
    )


def _kl(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ q) per row, from log-probabilities."""
    return (logp.exp() * (logp - logq)).sum(-1)


class $cls(Divergence):
    """Weighted mix of forward and reverse KL: w·KL(T‖S) + (1−w)·KL(S‖T)."""

    Params = ${cls}Params

    def per_token(self, student_logp: torch.Tensor, teacher_logp: torch.Tensor) -> torch.Tensor:
        w = float(self.params.weight)
        return w * _kl(teacher_logp, student_logp) + (1.0 - w) * _kl(student_logp, teacher_logp)
''',
    tests="""
def test_hand_computed_values():
    teacher = torch.tensor([[0.5, 0.5]]).log()
    student = torch.tensor([[0.25, 0.75]]).log()
    forward = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    reverse = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    out = $cls($cls.Params(weight=0.25)).per_token(student, teacher)
    assert out.shape == (1,)
    assert out.item() == pytest.approx(0.25 * forward + 0.75 * reverse, rel=1e-5)


def test_zero_for_identical_distributions_and_differentiable():
    logits = torch.randn(3, 5, generator=torch.Generator().manual_seed(0), requires_grad=True)
    logp = torch.log_softmax(logits, -1)
    out = $cls($cls.Params()).per_token(logp, logp.detach())
    assert torch.allclose(out, torch.zeros(3), atol=1e-6)
    out.sum().backward()
    assert logits.grad is not None


def test_bad_parameter_values_are_rejected():
    with pytest.raises(ValidationError, match="weight"):
        $cls.Params.model_validate({"weight": -1})
""",
    readme_params="""
| parameter | default | meaning |
|-----------|---------|---------|
| `weight`  | `0.5`   | w in w·KL(teacher ‖ student) + (1 − w)·KL(student ‖ teacher) |
""",
    imports="""
from typing import TYPE_CHECKING

from kdcore import Divergence, hookimpl
from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    import torch
""",
    test_imports="""
import importlib.metadata
import math

import pytest
import torch
from pydantic import ValidationError
""",
)

_TEMPLATES: dict[str, _Kind] = {
    "scorer": SCORER,
    "pacing": PACING,
    "reliance": RELIANCE,
    "divergence": DIVERGENCE,
}
#: The kinds ``kd new-plugin`` has a template for.
KIND_CHOICES = tuple(kind for kind in KINDS if kind in _TEMPLATES)
