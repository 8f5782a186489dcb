"""Per-sample cross-entropy and distillation terms over the valid tokens.

The training loss of sample ``i`` is ``(1 − λ_i)·CE_i + λ_i·KD_i`` with

- ``CE_i``: the mean, over sample ``i``'s valid tokens, of the student's token cross-entropy
  against the gold labels, at temperature 1 and over the student's full vocabulary;
- ``KD_i = τ² · mean over the valid tokens of D(P_T^τ ‖ P_S^τ)``, where ``D`` is the chosen
  :class:`~kdcore.strategies.Divergence` and ``P^τ = softmax(logits / τ)``.

Conventions, stated because peers disagree on them:

- **τ² factor present** (Hinton et al.), so the gradient scale of the KD term does not shrink as
  ``1/τ²`` when the temperature rises. TRL's generalised JSD loss (GKD) has no τ² factor.
- **Temperature applied to both** the teacher and the student log-probabilities in the KD term.
- **Reduction**: mean over each sample's valid tokens, then (by the caller) mean over samples;
  a long sample does not weigh more than a short one. A token-weighted mean can be recovered
  from ``tokens``.
- **Padding excluded**: positions labelled ``IGNORE_INDEX`` (-100) count nowhere (not in CE, KD,
  confidence nor the token count). A sample with no valid token gets ``ce = kd = 0``,
  ``tokens = 0`` and no NaN.
- **CE at temperature 1**, whatever τ is; ``confidence`` (mean gold-token probability) too.
- **Vocabulary mismatch**: when the student's and the teacher's vocabularies differ in size (same
  tokenizer, embedding matrices padded differently) the KD term uses the shared prefix
  ``[:min(Vs, Vt)]`` of both, renormalised by the softmax over that prefix; CE uses the student's
  full vocabulary.

Memory: only the valid tokens are computed, ``chunk_tokens`` of them at a time, so at most one
chunk's softmaxes exist at once. When gradients are on and a chunk's ``[tokens, vocab]`` tensors
are large (at least :data:`CHECKPOINT_MIN_ELEMENTS` elements, 16 MiB in float32), each chunk runs
under ``torch.utils.checkpoint`` (non-reentrant): the backward pass recomputes the chunk's
softmaxes instead of keeping them, and only the inputs (views of the logits, the row indices) are
saved. The teacher logits therefore stay alive until the backward pass. Smaller chunks (a small
vocabulary, few tokens) keep their few MiB of softmaxes instead: recomputing them costs more time
than the memory is worth (checkpointed, the loss's forward + backward is ~1.65x slower at
vocabulary 259, ``bench/loss_time.py``). Chunks are views into the logits
made by one ``split``, so the backward pass writes the logits' gradient once, not once per chunk.

Sparse teacher (:class:`TopKTeacher`, read from a teacher cache, see :mod:`kdcore.teachers.cache`):
the teacher is known only by its ``K`` most likely tokens per position, as log-probabilities at
temperature 1, plus the log-mass of the rest (the *tail*). The KD term is then the divergence over
``K + 1`` categories: the ``K`` cached tokens and one "rest" bucket.

- Teacher at temperature τ (β = 1/τ): the cached token ``k`` gets the unnormalised log-weight
  ``β·log p_k`` and the rest bucket ``f(β) = log Σ_{j ∉ top-K} p_j^β``; one ``log_softmax`` over the
  ``K + 1`` weights normalises them. ``f`` is exact at β = 1 (the cached tail log-mass) and β = 1/2
  (τ = 2, cached too); elsewhere it is the quadratic through ``f(0) = log(V − K)``, ``f(1/2)`` and
  ``f(1)`` (``f`` is convex in β, and these three points pin it well for τ ≥ 1).
- Student: its log-softmax at τ over the (shared) vocabulary, gathered at the same ``K`` ids, and
  ``log q_rest = log1p(−exp(logsumexp(gathered)))``, clamped so that ``q_rest`` is never exactly 0
  where a gradient flows.
- With ``K = V`` the cache holds no tail (``tail is None``): the divergence runs over the ``K``
  tokens alone, which is the full-vocabulary KD term (the same numbers in another order).
- Merging the tail into one bucket can only lower the KL (data-processing inequality): the sparse
  term is the full term minus the divergence *inside* the tail; ``docs/performance.md`` measures it.
- Vocabulary mismatch: cached ids at or past the student's vocabulary size are dropped (weight 0
  on both sides), as the dense path drops them.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from kdcore.inputs.packing import IGNORE_INDEX

if TYPE_CHECKING:
    from kdcore.strategies import Divergence

__all__ = ["IGNORE_INDEX", "SampleTerms", "TopKTeacher", "per_sample_terms", "token_nll_sum"]

#: A chunk whose ``[tokens, vocab]`` tensors hold fewer elements than this is not checkpointed.
CHECKPOINT_MIN_ELEMENTS = 1 << 22


@dataclass
class SampleTerms:
    """Per-sample statistics of one batch, each of shape ``[B]``."""

    #: Mean token cross-entropy at temperature 1 over the valid tokens (differentiable).
    ce: torch.Tensor
    #: τ² · mean token divergence over the valid tokens (differentiable); zeros without a teacher.
    kd: torch.Tensor
    #: Mean probability the student gives the gold token, temperature 1 (detached).
    confidence: torch.Tensor
    #: Number of valid tokens, as float (detached).
    tokens: torch.Tensor


#: Log-probability standing for "probability 0" in the sparse KD term: exp() of it is 0 in float32
#: and float64, and differences of two of them are 0, so 0·log(0/0) terms vanish without NaN.
_LOG_ZERO = -1.0e4


@dataclass
class TopKTeacher:
    """A sparse teacher: its ``K`` most likely tokens per position and the log-mass of the rest.

    ``logprobs`` ``[B, T, K]`` are log-probabilities at temperature 1 over the teacher's full
    vocabulary of ``vocab_size`` tokens (so ``Σ_k exp`` ≤ 1) at the token ids ``indices``
    ``[B, T, K]``. ``tail`` ``[B, T, 2]`` holds ``log Σ_{j ∉ top-K} p_j^β`` for β = 1 and β = 1/2,
    or is ``None`` when ``K = vocab_size`` (nothing is left out). Positions whose label is ignored
    may hold anything. See the module docstring for how τ and the tail are applied.
    """

    logprobs: torch.Tensor
    indices: torch.Tensor
    tail: torch.Tensor | None
    vocab_size: int

    @property
    def shape(self) -> torch.Size:
        return self.logprobs.shape

    @property
    def requires_grad(self) -> bool:
        return False

    def rows(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The three tensors flattened to ``[B·T, ...]``."""
        k = self.logprobs.shape[-1]
        tail = None if self.tail is None else self.tail.reshape(-1, 2)
        return self.logprobs.reshape(-1, k), self.indices.reshape(-1, k), tail


def _tail_logweight(tail: torch.Tensor, beta: float, n_tail: int) -> torch.Tensor:
    """``f(β) = log Σ_{j ∉ top-K} p_j^β`` from the cached ``f(1)``, ``f(1/2)`` and ``f(0) = log n_tail``."""
    f1, fh = tail[:, 0], tail[:, 1]
    if beta == 1.0:
        return f1
    if beta == 0.5:
        return fh
    f0 = math.log(n_tail)
    return f0 + beta * (4.0 * fh - f1 - 3.0 * f0) + beta * beta * (2.0 * f0 - 4.0 * fh + 2.0 * f1)


def _sparse_divergence(
    s: torch.Tensor,
    lse: torch.Tensor,
    teacher: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None],
    vocab_t: int,
    divergence: Divergence,
    temperature: float,
) -> torch.Tensor:
    """Per-token divergence over the teacher's top-K tokens plus one rest bucket (module docstring)."""
    t_lp, idx, tail = teacher
    shared = min(s.shape[-1], vocab_t)
    if temperature == 1.0 and shared == s.shape[-1]:
        s_logp = s - lse.unsqueeze(1)
    else:
        s_logp = F.log_softmax(s[:, :shared] / temperature, dim=-1)
    beta = 1.0 / temperature
    t_w = _upcast(t_lp).to(s.dtype) * beta
    idx = idx.long()
    dropped = None
    if shared < vocab_t:
        dropped = idx >= shared
        idx = idx.masked_fill(dropped, 0)
        t_w = t_w.masked_fill(dropped, float("-inf"))
    s_k = s_logp.gather(1, idx)
    if dropped is not None:
        s_k = s_k.masked_fill(dropped, _LOG_ZERO)
    if tail is not None:
        n_tail = vocab_t - idx.shape[1]
        f = _tail_logweight(_upcast(tail).to(s.dtype), beta, n_tail).clamp(min=_LOG_ZERO)
        t_w = torch.cat([t_w, f.unsqueeze(1)], dim=1)
        # q_rest = 1 − Σ_k q_k, from the log of Σ_k q_k; clamped below 0 so log1p(−exp) stays finite
        # (and its gradient too) when the student puts all its mass on the K tokens.
        in_k = torch.logsumexp(s_k, dim=1).clamp(max=-1e-7)
        s_k = torch.cat([s_k, torch.log1p(-torch.exp(in_k)).unsqueeze(1)], dim=1)
    t_logp = F.log_softmax(t_w, dim=-1).clamp(min=_LOG_ZERO)
    return divergence.per_token(s_k, t_logp)


@dataclass
class _Chunks:
    """How the flattened ``[B·T]`` rows are cut so that each piece holds ``chunk`` valid tokens."""

    sizes: list[int]  # rows of each piece; they partition [0, B·T)
    local_rows: list[torch.Tensor | None]  # valid rows inside each piece (None: all of them)
    gold: list[torch.Tensor]  # gold label of each valid token, per piece
    sample_of_token: torch.Tensor  # [N] sample index of each valid token, in piece order
    tokens: torch.Tensor  # [B] valid tokens per sample (long)


def _plan(labels: torch.Tensor, chunk_tokens: int | None) -> _Chunks | None:
    """Locate the valid tokens and cut them into chunks; ``None`` when there is no valid token."""
    if chunk_tokens is not None and chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be a positive integer or None, got {chunk_tokens}")
    batch, seq = labels.shape
    flat = labels.reshape(-1)
    valid = flat != IGNORE_INDEX
    rows = valid.nonzero().squeeze(1)  # [N] flat indices of the valid tokens
    n = rows.numel()
    if n == 0:
        return None
    tokens = valid.reshape(batch, seq).sum(1)
    gold = flat.index_select(0, rows)
    chunk = n if chunk_tokens is None else chunk_tokens
    all_valid = n == flat.numel()
    # Piece j starts at the flat row of valid token j·chunk, so it holds exactly `chunk` valid
    # tokens (the last one fewer) plus whatever padding lies between them.
    starts = [0, *rows[chunk::chunk].tolist()] if not all_valid else list(range(0, n, chunk))
    bounds = [*starts, flat.numel()]
    sizes = [b - a for a, b in itertools.pairwise(bounds)]
    local_rows: list[torch.Tensor | None] = []
    golds: list[torch.Tensor] = []
    for j, start in enumerate(starts):
        sel = slice(j * chunk, min((j + 1) * chunk, n))
        local_rows.append(None if all_valid else rows[sel] - start)
        golds.append(gold[sel])
    return _Chunks(sizes, local_rows, golds, torch.div(rows, seq, rounding_mode="floor"), tokens)


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """Half-precision logits are computed in float32; float32 and float64 are kept."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _chunk_terms(
    student: torch.Tensor,
    teacher: torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None,
    local_rows: torch.Tensor | None,
    gold: torch.Tensor,
    divergence: Divergence | None,
    temperature: float,
    vocab_t: int = 0,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Per-token (CE, divergence, log p(gold)) for one piece of rows, in float32 at least.

    ``teacher`` is dense logits, or (log-probs, ids, tail) rows of a :class:`TopKTeacher` whose
    vocabulary has ``vocab_t`` tokens.
    """
    sparse = isinstance(teacher, tuple)
    if local_rows is not None:
        student = student.index_select(0, local_rows)
        if sparse:
            teacher = tuple(None if x is None else x.index_select(0, local_rows) for x in teacher)
        elif teacher is not None:
            teacher = teacher.index_select(0, local_rows)
    s = _upcast(student)
    lse = torch.logsumexp(s, dim=-1)
    logp_gold = s.gather(1, gold.unsqueeze(1)).squeeze(1) - lse
    if teacher is None or divergence is None:
        return -logp_gold, None, logp_gold
    if sparse:
        return -logp_gold, _sparse_divergence(s, lse, teacher, vocab_t, divergence, temperature), logp_gold
    t = _upcast(teacher)
    shared = min(s.shape[-1], t.shape[-1])
    if temperature == 1.0 and shared == s.shape[-1]:
        s_logp = s - lse.unsqueeze(1)  # reuse the CE normaliser
    else:
        s_logp = F.log_softmax(s[:, :shared] / temperature, dim=-1)
    t_logp = F.log_softmax(t[:, :shared] / temperature, dim=-1)
    return -logp_gold, divergence.per_token(s_logp, t_logp), logp_gold


def per_sample_terms(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    teacher_logits: torch.Tensor | TopKTeacher | None = None,
    divergence: Divergence | None = None,
    temperature: float = 1.0,
    chunk_tokens: int | None = 2048,
) -> SampleTerms:
    """Per-sample CE, KD term, confidence and token count for one batch.

    ``student_logits`` ``[B, T, Vs]`` and ``labels`` ``[B, T]`` are aligned (the logits at ``t``
    predict ``labels[t]``); ``IGNORE_INDEX`` (-100) marks ignored positions. ``teacher_logits`` ``[B, T, Vt]`` is
    optional (dense logits, or a sparse :class:`TopKTeacher` from a teacher cache); with it,
    ``divergence`` is required. ``chunk_tokens`` bounds how many valid tokens
    are processed at once (``None``: all in one chunk). See the module docstring for conventions.

    Pass contiguous logits: align them with the labels by shifting the *labels* (``labels[:, t]``
    = token ``t + 1``, ``IGNORE_INDEX`` at the last position) rather than slicing ``logits[:, :-1]``, which
    would make this function copy the whole tensor.
    """
    _check_inputs(student_logits, labels, teacher_logits, divergence, temperature)
    batch, seq, vocab = student_logits.shape
    device = student_logits.device
    plan = _plan(labels, chunk_tokens)
    if plan is None:
        return _no_valid_token(student_logits, teacher_logits is not None)

    use_ckpt = _use_checkpoint(student_logits, teacher_logits, max(plan.sizes))
    s_pieces = student_logits.reshape(batch * seq, vocab).split(plan.sizes)
    t_pieces, vocab_t = _teacher_pieces(teacher_logits, plan.sizes)

    ce_tok, kd_tok, logp_gold = [], [], []
    for s, t, rows, gold in zip(s_pieces, t_pieces, plan.local_rows, plan.gold, strict=True):
        args = (s, t, rows, gold, divergence, temperature, vocab_t)
        if use_ckpt:
            out = checkpoint(_chunk_terms, *args, use_reentrant=False, preserve_rng_state=False)
        else:
            out = _chunk_terms(*args)
        ce_tok.append(out[0])
        kd_tok.append(out[1])
        logp_gold.append(out[2].detach())

    idx = plan.sample_of_token
    tokens = plan.tokens.float()
    denom = tokens.clamp(min=1.0)

    def per_sample_mean(values: list[torch.Tensor]) -> torch.Tensor:
        flat = torch.cat(values)
        return torch.zeros(batch, device=device, dtype=flat.dtype).index_add(0, idx, flat) / denom

    ce = per_sample_mean(ce_tok)
    if teacher_logits is not None:
        kd = per_sample_mean(kd_tok) * (temperature * temperature)
    else:
        kd = torch.zeros(batch, device=device, dtype=ce.dtype)
    confidence = per_sample_mean([lp.exp() for lp in logp_gold])
    return SampleTerms(ce=ce, kd=kd, confidence=confidence, tokens=tokens)


def _use_checkpoint(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor | TopKTeacher | None, chunk_rows: int
) -> bool:
    """Recompute each chunk's softmaxes in the backward pass when gradients flow and a chunk's
    ``[tokens, vocab]`` tensors are large (see the module docstring)."""
    widest = max(student_logits.shape[-1], teacher_logits.shape[-1] if teacher_logits is not None else 0)
    return (
        torch.is_grad_enabled()
        and (student_logits.requires_grad or (teacher_logits is not None and teacher_logits.requires_grad))
        and chunk_rows * widest >= CHECKPOINT_MIN_ELEMENTS
    )


def _no_valid_token(student_logits: torch.Tensor, has_teacher: bool) -> SampleTerms:
    """No valid token anywhere: zeros, still attached to the graph so backward() works."""
    zero = _upcast(student_logits.reshape(-1)[:0]).sum()
    zeros = torch.zeros(student_logits.shape[0], device=student_logits.device, dtype=zero.dtype)
    kd = zeros + zero if has_teacher else zeros.clone()
    return SampleTerms(ce=zeros + zero, kd=kd, confidence=zeros.clone(), tokens=zeros.clone())


def _check_inputs(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    teacher_logits: torch.Tensor | TopKTeacher | None,
    divergence: Divergence | None,
    temperature: float,
) -> None:
    if student_logits.dim() != 3 or labels.shape != student_logits.shape[:2]:
        raise ValueError(
            f"expected student_logits [B, T, V] and labels [B, T], got {tuple(student_logits.shape)} "
            f"and {tuple(labels.shape)}"
        )
    if teacher_logits is not None:
        if divergence is None:
            raise TypeError("per_sample_terms: a divergence is required when teacher_logits is given")
        if len(teacher_logits.shape) != 3 or teacher_logits.shape[:2] != student_logits.shape[:2]:
            raise ValueError(
                f"teacher_logits {tuple(teacher_logits.shape)} does not match student_logits "
                f"{tuple(student_logits.shape)} in batch and sequence dimensions"
            )
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")


def _teacher_pieces(teacher_logits: torch.Tensor | TopKTeacher | None, sizes: list[int]) -> tuple[list, int]:
    """The teacher's rows cut like the student's (one piece per chunk), and a sparse teacher's vocabulary
    size (0 for dense logits or no teacher)."""
    if isinstance(teacher_logits, TopKTeacher):
        t_lp, t_idx, t_tail = teacher_logits.rows()
        tails = t_tail.split(sizes) if t_tail is not None else [None] * len(sizes)
        return list(zip(t_lp.split(sizes), t_idx.split(sizes), tails, strict=True)), teacher_logits.vocab_size
    if teacher_logits is not None:
        batch, seq, vocab_t = teacher_logits.shape
        return list(teacher_logits.reshape(batch * seq, vocab_t).split(sizes)), 0
    return [None] * len(sizes), 0


@torch.no_grad()
def token_nll_sum(
    logits: torch.Tensor, labels: torch.Tensor, chunk_tokens: int | None = 2048
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of token negative log-likelihood over the valid tokens, and their count.

    Both are 0-d tensors (float32 sum, int64 count) for perplexity = exp(Σ sum / Σ count) over an
    evaluation set; chunked like :func:`per_sample_terms`, without gradient.
    """
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(
            f"expected logits [B, T, V] and labels [B, T], got {tuple(logits.shape)} and {tuple(labels.shape)}"
        )
    batch, seq, vocab = logits.shape
    plan = _plan(labels, chunk_tokens)
    if plan is None:
        return (
            torch.zeros((), device=logits.device),
            torch.zeros((), dtype=torch.long, device=logits.device),
        )
    total = torch.zeros((), device=logits.device)
    pieces = logits.reshape(batch * seq, vocab).split(plan.sizes)
    for s, rows, gold in zip(pieces, plan.local_rows, plan.gold, strict=True):
        total = total + _chunk_terms(s, None, rows, gold, None, 1.0)[0].sum()
    return total, plan.tokens.sum()
