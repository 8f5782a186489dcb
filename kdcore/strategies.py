"""The five small interfaces a strategy implements.

A strategy is a class with a pydantic ``Params`` model; kdcore builds it as ``cls(params)``.
Nothing here imports torch at module level, so plugin modules that subclass these stay cheap to
import (``kd --help`` and ``kd list-plugins`` never load torch).

- :class:`DifficultyScorer` ranks training samples (higher score = harder).
- :class:`PacingFunction` says which share of the easy-to-hard ordering is open at a step.
- :class:`ReliancePolicy` maps a sample's difficulty percentile to its KD weight λ.
- :class:`Divergence` compares teacher and student token distributions.
- :class:`Source` says where a step's rows come from: the dataset's text, or continuations a model
  writes during training (on-policy distillation), through a :class:`SourceRequest`.

:data:`KINDS` is the one table of strategy kinds: each kind's base class, registration hook
(:mod:`kdcore.hookspecs`) and what a user calls it. Everything that lists kinds (the registry,
the engine's checkpoints, ``kd compare``'s arm grammar, the model card, ``kd list-plugins``,
``kd new-plugin``) reads it from here.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:
    import torch

__all__ = [
    "KINDS",
    "DifficultyScorer",
    "Divergence",
    "Kind",
    "NoParams",
    "PacingFunction",
    "ReliancePolicy",
    "ScorerContext",
    "Source",
    "SourceContext",
    "SourceRequest",
    "SourceRows",
    "Strategy",
]


class NoParams(BaseModel):
    """Parameters of a strategy that takes none; unknown keys are rejected."""

    model_config = ConfigDict(extra="forbid")


class Strategy(ABC):
    """Common base: parameters, a one-line description, and resumable state."""

    Params: ClassVar[type[BaseModel]] = NoParams
    #: One line for ``kd list-plugins``; defaults to the first line of the class docstring.
    description: ClassVar[str] = ""

    def __init__(self, params: BaseModel | None = None) -> None:
        self.params = params if params is not None else self.Params()

    @classmethod
    def summary(cls) -> str:
        """The one-line description shown to users."""
        if cls.description:
            return cls.description
        doc = (cls.__doc__ or "").strip()
        return doc.splitlines()[0] if doc else ""

    def state_dict(self) -> dict[str, Any]:
        """State to checkpoint; strategies without state return an empty dict."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""


@dataclass
class ScorerContext:
    """What a scorer may use before training starts.

    ``teacher_stats`` and ``student_stats`` each run one no-grad pass over the training set on
    first call and return per-sample tensors of shape ``[num_samples]`` with the keys
    ``ce`` (mean token cross-entropy), ``confidence`` (mean gold-token probability) and
    ``entropy`` (mean predictive entropy). They are memoised: calling them twice is free.
    """

    num_samples: int
    #: Valid (non-padding) tokens per sample, shape ``[num_samples]``.
    lengths: torch.Tensor
    seq_len: int
    seed: int
    teacher_stats: Callable[[], dict[str, torch.Tensor]]
    student_stats: Callable[[], dict[str, torch.Tensor]]
    #: Where the run is written; scorers may keep files here (``None`` in a dry context).
    run_dir: Path | None = None


class DifficultyScorer(Strategy):
    """Gives each training sample a difficulty score (higher = harder).

    The engine calls :meth:`prepare` once before training and :meth:`observe` after every
    micro-batch with statistics the training step already computed (no extra forward pass):

    - ``ce``: the student's mean token cross-entropy on the sample (temperature 1);
    - ``kd``: the divergence term between teacher and student (τ² included);
    - ``confidence``: the student's mean probability of the gold tokens;
    - ``tokens``: the number of valid tokens.

    All are float tensors of shape ``[batch]`` aligned with ``sample_ids``, detached, on the CPU.
    """

    #: Statistics the scorer needs from :meth:`observe`; ``"kd"`` forces a teacher forward pass
    #: even when every λ in the batch is zero.
    needs: ClassVar[frozenset[str]] = frozenset()

    def prepare(self, ctx: ScorerContext) -> None:
        """Run before training (e.g. one teacher pass). The default does nothing."""

    def observe(self, sample_ids: torch.Tensor, stats: Mapping[str, torch.Tensor]) -> None:
        """Receive per-sample statistics from a training step. The default ignores them."""

    @abstractmethod
    def scores(self) -> torch.Tensor | None:
        """One score per sample id, ``NaN`` where unknown; ``None`` when the scorer has no opinion."""


class PacingFunction(Strategy):
    """Decides the share of the easy-to-hard ordering that is open at a step."""

    @abstractmethod
    def fraction(self, step: int, total_steps: int) -> float:
        """The open share in ``(0, 1]`` at ``step`` (0-based) of ``total_steps``."""


class ReliancePolicy(Strategy):
    """Sets λ, the weight of the teacher term, per sample.

    ``rank`` is each sample's difficulty percentile in ``[0, 1]`` among the current scores
    (``NaN`` for a sample with no score yet), ``score`` its raw score (``NaN`` likewise) and
    ``progress`` the share of training done, in ``[0, 1]``.
    """

    @abstractmethod
    def weights(self, rank: torch.Tensor, score: torch.Tensor, progress: float) -> torch.Tensor:
        """λ per sample in ``[0, 1]``, same shape as ``rank``."""

    def temperature(self, base: float, progress: float) -> float:
        """The distillation temperature at ``progress``; most policies keep ``base``."""
        return base


class Divergence(Strategy):
    """A divergence between teacher and student token distributions.

    Receives log-probabilities already softened by the temperature, shape ``[tokens, vocab]``,
    and returns one value per token, shape ``[tokens]``. kdcore applies the τ² factor, the
    padding mask and the per-sample mean.
    """

    @abstractmethod
    def per_token(self, student_logp: torch.Tensor, teacher_logp: torch.Tensor) -> torch.Tensor:
        """Divergence of the student from the teacher at each token."""


@dataclass
class SourceRows:
    """The rows a micro-batch trains on, one per requested sample, in its order: ``[b, W]`` tensors,
    left-justified (each row starts at column 0) and right-padded (mask 0).

    ``labels`` are the next-token targets the loss covers (``labels[:, t]`` is the target of position
    ``t``; -100 elsewhere: padding, the last position, the prompt of a generated row). ``generated``
    ``[b]`` marks rows whose continuation was written during training; ``labelled`` ``[b]`` marks rows
    whose targets are text to learn (the dataset's, or the teacher's): they keep ``(1 − λ)·CE + λ·KD``,
    the others (the student's own text) ``λ·KD`` alone. ``prompt_labels`` ``[b, W]`` holds the gold
    targets inside generated rows' prompts, from which the scorer's ``ce`` and ``confidence`` come
    (``None`` when no row is generated).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    generated: torch.Tensor
    labelled: torch.Tensor
    prompt_labels: torch.Tensor | None = None


@dataclass
class SourceContext:
    """What a source may check once, before training: the run's lengths and the models' limit."""

    seq_len: int
    #: Positions both models can attend to (``n_positions``/``max_position_embeddings``); None: no limit known.
    max_positions: int | None
    #: The longest prompt the dataset gives (chat samples' ``prompt_lengths``); None for plain text.
    longest_prompt: int | None = None


def prompt_lengths(
    attention_mask: torch.Tensor, dataset_prompts: torch.Tensor | None, prompt_tokens: int
) -> torch.Tensor:
    """``[b]`` the prompt of each sample: the dataset's prompt lengths when it gives them (chat samples),
    else its first ``prompt_tokens`` valid tokens; never more than its valid tokens."""
    valid = attention_mask.sum(1)
    lengths = dataset_prompts if dataset_prompts is not None else valid.clamp(max=prompt_tokens)
    return lengths.to(valid.device).minimum(valid).long()


@dataclass
class SourceRequest(ABC):
    """A micro-batch's samples (this process's share) and what a source may use to write their rows.

    kdcore builds one for every micro-batch, under ``torch.no_grad()``. Randomness comes only from
    :meth:`generate` and :meth:`coin`, seeded by ``(seed, step, sample id)``: a source that draws from
    torch's global RNG would change the training step's dropout masks and break ``--resume``.
    """

    sample_ids: torch.Tensor  # [b] int64
    #: The samples' dataset rows, as packed: what the ``dataset`` source trains on.
    dataset: SourceRows
    #: [b] the dataset's prompt lengths (chat samples: user turns and assistant header), or None.
    prompt_lengths: torch.Tensor | None
    step: int  # the optimizer step, 0-based
    seed: int
    progress: float  # the share of training done, in [0, 1)
    student: torch.nn.Module
    teacher: torch.nn.Module | None

    def prompts(self, prompt_tokens: int) -> torch.Tensor:
        """``[b]`` each sample's prompt length: the dataset's when it gives them, else its first
        ``prompt_tokens`` valid tokens (all of a shorter sample)."""
        return prompt_lengths(self.dataset.attention_mask, self.prompt_lengths, prompt_tokens)

    def with_rows(self, rows: SourceRows, prompt_lengths: torch.Tensor | None = None) -> SourceRequest:
        """This request with ``rows`` (one per sample, left-justified) in place of the dataset rows: what
        :meth:`generate` continues and :meth:`prompts` measures, so that a source can continue prompts of
        its own. ``prompt_lengths``: the new rows' prompts for :meth:`prompts` (None: their first
        ``prompt_tokens``). Sample ids, seeds and the run's account of generation time are this request's."""
        if len(rows.input_ids) != len(self.sample_ids):
            raise ValueError(
                f"with_rows needs one row per sample: {len(self.sample_ids)}, not {len(rows.input_ids)}"
            )
        return replace(self, dataset=rows, prompt_lengths=prompt_lengths)

    @abstractmethod
    def generate(
        self,
        model: torch.nn.Module,
        prompt_lengths: torch.Tensor,
        *,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        labelled: bool = False,
    ) -> SourceRows:
        """Rows whose continuation ``model`` writes after the first ``prompt_lengths[i]`` tokens of each
        sample's dataset row: at most ``max_new_tokens``, through its first EOS, sampled at
        ``temperature`` (0: greedy) from the nucleus ``top_p``, with the KV cache, in eval mode. A row
        whose prompt length is below 2 stays its dataset row (pass 0 to keep one). ``labelled``: the
        continuation is text to learn (the teacher's), not the student's own."""

    @abstractmethod
    def coin(self, stream: str) -> torch.Tensor:
        """``[b]`` uniform draws in [0, 1), one per sample, from ``(stream, seed, step, sample id)``."""


class Source(Strategy):
    """Where a step's rows come from: the dataset's text, or continuations written during training.

    kdcore calls :meth:`rows` for every micro-batch; the loss then covers each row's ``labels``.
    """

    def generates(self) -> bool:
        """Whether rows may hold text written during training (a teacher cache knows the dataset only)."""
        return True

    def has_labels(self) -> bool:
        """Whether some rows are text to learn; False when every row is the student's own text, so that
        the loss is the teacher term alone (and a reliance policy giving λ = 0 everywhere is refused)."""
        return True

    def check(self, ctx: SourceContext) -> None:
        """Refuse an impossible run before training with one :class:`~kdcore.errors.KdError` sentence."""

    @abstractmethod
    def rows(self, request: SourceRequest) -> SourceRows:
        """The rows of ``request.sample_ids``, one per sample, in that order."""


@dataclass(frozen=True)
class Kind:
    """One strategy kind: the config field and CLI option it is chosen with, its base class, its hook."""

    name: str  # strategy.<name> in a config, --<name> on the command line
    base: type[Strategy]
    hook: str  # the registration hook in kdcore.hookspecs
    what: str  # what a user calls one, e.g. "difficulty scorer"


#: Every strategy kind, in the order kdcore lists them.
KINDS: dict[str, Kind] = {
    kind.name: kind
    for kind in (
        Kind("scorer", DifficultyScorer, "kd_register_scorers", "difficulty scorer"),
        Kind("pacing", PacingFunction, "kd_register_pacings", "pacing function"),
        Kind("reliance", ReliancePolicy, "kd_register_reliances", "reliance policy"),
        Kind("divergence", Divergence, "kd_register_divergences", "divergence"),
        Kind("source", Source, "kd_register_sources", "source"),
    )
}
