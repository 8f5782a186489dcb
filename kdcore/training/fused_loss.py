"""The distillation loss computed from final hidden states: no ``[tokens, vocab]`` logits of either model.

The unfused loss receives both models' logits, ``[B, T, V]`` each; at a vocabulary of 128k and 4k
tokens that is 2 GiB per tensor in float32, and its gradient as much again. Here the loss
receives the final hidden states ``[B, T, H]`` and the LM heads' weights ``[V, H]`` instead and
projects ``chunk`` valid tokens at a time, so at most one chunk's logits, softmaxes and logit
gradient exist at once (the idea of Liger-Kernel's fused linear cross-entropy, with a
divergence plugin instead of a fixed loss).

Same numbers as :func:`kdcore.training.losses.per_sample_terms` on the logits ``hidden @ Wᵀ + b``: per
sample the mean CE at τ = 1 over its valid tokens, ``τ² ·`` the mean divergence at τ, the mean
gold-token probability and the valid-token count; padding (label −100) counts nowhere, and a
vocabulary mismatch uses the shared prefix for KD. The result is a :class:`SampleTerms`, as there.

Gradients flow to the student's hidden states, head weight and bias (the teacher side is
constant). A custom autograd function keeps only its inputs between forward and backward and
redoes each chunk's projection in the backward pass with the per-sample upstream gradients.
When the caller knows how ``ce`` and ``kd`` will be weighted (``loss_weights``, the engine's
``1 − λ`` and ``λ``), each chunk's gradient is computed in the forward pass instead, while its
logits exist, and the backward pass only scales it: one projection per chunk instead of two.
Should the upstream gradients turn out not to be proportional to those weights, the backward
pass recomputes, so the result is right either way.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from kdcore.inputs.packing import IGNORE_INDEX
from kdcore.training.losses import SampleTerms, TopKTeacher, _sparse_divergence

if TYPE_CHECKING:
    from kdcore.strategies import Divergence

__all__ = [
    "CHUNK_ELEMENTS",
    "final_hidden_states",
    "fusable",
    "fused_sample_terms",
    "linear_head",
]

#: Default chunk: this many elements in one chunk's ``[tokens, vocab]`` tensor (16 MiB in float32).
CHUNK_ELEMENTS = 1 << 22


def _compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """float64 when every input is float64 (for gradient checks), float32 otherwise."""
    present = [t for t in tensors if t is not None]
    return torch.float64 if present and all(t.dtype == torch.float64 for t in present) else torch.float32


def _autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype autocast gives matrix products on ``device`` now, or None when autocast is off there."""
    kind = device.type
    try:
        enabled, dtype = torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind)
    except (TypeError, AttributeError):  # torch < 2.4: one query per device type
        if kind == "cpu":
            enabled, dtype = torch.is_autocast_cpu_enabled(), torch.get_autocast_cpu_dtype()
        elif kind == "cuda":
            enabled, dtype = torch.is_autocast_enabled(), torch.get_autocast_gpu_dtype()
        else:
            return None
    return dtype if enabled else None


def _cast(x: torch.Tensor | None, dtype: torch.dtype | None) -> torch.Tensor | None:
    """``x`` without gradient, in ``dtype`` (None: its own)."""
    if x is None:
        return None
    return x.detach() if dtype is None else x.detach().to(dtype)


def _logits(
    h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype
) -> torch.Tensor:
    """One chunk's logits: the projection in the weight's dtype (as the model's head), then upcast."""
    return F.linear(h.to(weight.dtype), weight, bias).to(dtype)


def _token_terms(
    s: torch.Tensor,
    t: torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None,
    gold: torch.Tensor,
    divergence: Divergence | None,
    temperature: float,
    vocab_t: int = 0,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Per-token CE, divergence and log p(gold) of one chunk, as :mod:`kdcore.training.losses` computes them;
    ``t``: the teacher's dense logits, or the (log-probs, ids, tail) rows of a top-K teacher of ``vocab_t``."""
    lse = torch.logsumexp(s, dim=-1)
    logp_gold = s.gather(1, gold.unsqueeze(1)).squeeze(1) - lse
    if t is None:
        return -logp_gold, None, logp_gold
    if isinstance(t, tuple):
        return -logp_gold, _sparse_divergence(s, lse, t, vocab_t, divergence, temperature), logp_gold
    shared = min(s.shape[-1], t.shape[-1])
    if temperature == 1.0 and shared == s.shape[-1]:
        s_logp = s - lse.unsqueeze(1)
    else:
        s_logp = F.log_softmax(s[:, :shared] / temperature, dim=-1)
    t_logp = F.log_softmax(t[:, :shared] / temperature, dim=-1)
    return -logp_gold, divergence.per_token(s_logp, t_logp), logp_gold


class _TeacherRows:
    """The teacher side of the loss, one chunk of rows at a time: dense logits projected from its hidden
    rows through its head (in the matmul dtype), or a top-K teacher's rows; ``None`` without a teacher."""

    def __init__(
        self,
        th: torch.Tensor | None,
        t_weight: torch.Tensor | None,
        t_bias: torch.Tensor | None,
        topk: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None,
        matmul: torch.dtype | None,
        dtype: torch.dtype,
    ) -> None:
        self.th, self.topk, self.dtype = th, topk, dtype
        self.weight, self.bias = _cast(t_weight, matmul), _cast(t_bias, matmul)

    @property
    def present(self) -> bool:
        return self.th is not None or self.topk is not None

    def chunk(self, rows: slice) -> torch.Tensor | tuple | None:
        if self.th is not None:
            return _logits(self.th[rows], self.weight, self.bias, self.dtype)
        if self.topk is not None:
            return tuple(None if x is None else x[rows] for x in self.topk)
        return None


class _FusedHeadLoss(torch.autograd.Function):
    """Per-sample (ce, kd, confidence) from hidden rows; see the module docstring for the two gradient modes."""

    @staticmethod
    def forward(
        ctx: Any,
        h: torch.Tensor,  # [N, H] the valid rows of the student's hidden states
        weight: torch.Tensor,  # [Vs, H]
        bias: torch.Tensor | None,
        th: torch.Tensor | None,  # [N, Ht] the teacher's rows, or None
        t_weight: torch.Tensor | None,
        t_bias: torch.Tensor | None,
        t_logprobs: torch.Tensor | None,  # [N, K] a top-K teacher's rows instead of th, or None
        t_indices: torch.Tensor | None,
        t_tail: torch.Tensor | None,
        t_vocab: int,
        gold: torch.Tensor,  # [N]
        sample: torch.Tensor,  # [N] sample index of each row
        denom: torch.Tensor,  # [B] valid tokens per sample, at least 1
        divergence: Divergence | None,
        temperature: float,
        chunk: int,
        hint: tuple[torch.Tensor, torch.Tensor] | None,  # per-sample weights of ce and kd
        matmul: torch.dtype | None,  # the projections' dtype under autocast (None: the weights')
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        dtype = _compute_dtype(h, weight)
        topk = None if t_logprobs is None else (t_logprobs, t_indices, t_tail)
        teacher = _TeacherRows(th, t_weight, t_bias, topk, matmul, dtype)
        batch = denom.shape[0]
        ce_tok = torch.empty(h.shape[0], dtype=dtype, device=h.device)
        kd_tok = torch.zeros_like(ce_tok)
        conf_tok = torch.empty_like(ce_tok)
        w, b = _cast(weight, matmul), _cast(bias, matmul)
        wants_grad = hint is not None and any(ctx.needs_input_grad[:3])
        grads = _Grads(h, weight, bias, ctx.needs_input_grad, w) if wants_grad else None
        if wants_grad:
            w_ce, w_kd = _token_weights(hint[0], hint[1], sample, denom, temperature, dtype)
        with torch.autocast(h.device.type, enabled=False):  # the dtypes are chosen here
            for start in range(0, h.shape[0], chunk):
                rows = slice(start, start + chunk)
                t = teacher.chunk(rows)
                if grads is None:
                    s = _logits(h[rows], w, b, dtype)
                    ce, kd, logp_gold = _token_terms(s, t, gold[rows], divergence, temperature, t_vocab)
                else:
                    with torch.enable_grad():
                        s = _logits(h[rows].detach(), w, b, dtype).requires_grad_(True)
                        ce, kd, logp_gold = _token_terms(s, t, gold[rows], divergence, temperature, t_vocab)
                        loss = (w_ce[rows] * ce).sum()
                        if teacher.present:
                            loss = loss + (w_kd[rows] * kd).sum()
                        (ds,) = torch.autograd.grad(loss, s)
                    grads.add(rows, ds)
                    ce, kd, logp_gold = ce.detach(), None if kd is None else kd.detach(), logp_gold.detach()
                ce_tok[rows] = ce
                if teacher.present:
                    kd_tok[rows] = kd
                conf_tok[rows] = logp_gold.exp()
                del s, t, ce, kd, logp_gold

        def per_sample(values: torch.Tensor) -> torch.Tensor:
            return torch.zeros(batch, dtype=dtype, device=h.device).index_add_(0, sample, values) / denom.to(
                dtype
            )

        ce_s, conf_s = per_sample(ce_tok), per_sample(conf_tok)
        kd_s = per_sample(kd_tok) * (temperature * temperature)
        ctx.save_for_backward(
            h, weight, bias, th, t_weight, t_bias, t_logprobs, t_indices, t_tail, gold, sample, denom
        )
        ctx.divergence, ctx.temperature, ctx.chunk, ctx.t_vocab = divergence, temperature, chunk, t_vocab
        ctx.hint, ctx.grads, ctx.matmul = hint, grads, matmul
        ctx.mark_non_differentiable(conf_s)
        return ce_s, kd_s, conf_s

    @staticmethod
    def backward(ctx: Any, g_ce: torch.Tensor | None, g_kd: torch.Tensor | None, _g_conf: Any) -> tuple:
        h, weight, bias, th, t_weight, t_bias, t_lp, t_idx, t_tail, gold, sample, denom = ctx.saved_tensors
        batch = denom.shape[0]
        topk = None if t_lp is None else (t_lp, t_idx, t_tail)
        g_ce = torch.zeros(batch, device=h.device) if g_ce is None else g_ce
        g_kd = torch.zeros(batch, device=h.device) if g_kd is None or (th is None and topk is None) else g_kd
        grads = ctx.grads
        scale = _proportion(g_ce, g_kd, ctx.hint) if grads is not None else None
        if scale is None:  # no forward gradient, or weighted otherwise than announced: recompute
            dtype, matmul = _compute_dtype(h, weight), ctx.matmul
            teacher = _TeacherRows(th, t_weight, t_bias, topk, matmul, dtype)
            w, b = _cast(weight, matmul), _cast(bias, matmul)
            grads = _Grads(h, weight, bias, ctx.needs_input_grad, w)
            w_ce, w_kd = _token_weights(g_ce, g_kd, sample, denom, ctx.temperature, dtype)
            with torch.autocast(h.device.type, enabled=False):
                for start in range(0, h.shape[0], ctx.chunk):
                    rows = slice(start, start + ctx.chunk)
                    with torch.no_grad():
                        t = teacher.chunk(rows)
                    with torch.enable_grad():
                        s = _logits(h[rows].detach(), w, b, dtype).requires_grad_(True)
                        ce, kd, _ = _token_terms(
                            s, t, gold[rows], ctx.divergence, ctx.temperature, ctx.t_vocab
                        )
                        loss = (w_ce[rows] * ce).sum()
                        if kd is not None:
                            loss = loss + (w_kd[rows] * kd).sum()
                        (ds,) = torch.autograd.grad(loss, s)
                    grads.add(rows, ds)
                    del s, t, ce, kd, ds
            scale = 1.0
        ctx.grads = None
        g_h, g_w, g_b = grads.result(scale)
        return g_h, g_w, g_b, *([None] * 16)


def _detach(x: torch.Tensor | None) -> torch.Tensor | None:
    return None if x is None else x.detach()


def _token_weights(
    ce_w: torch.Tensor,
    kd_w: torch.Tensor,
    sample: torch.Tensor,
    denom: torch.Tensor,
    temperature: float,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token weights of the per-token CE and divergence in ``Σ_i ce_w_i·ce_i + kd_w_i·kd_i``."""
    per = 1.0 / denom.to(dtype)
    w_ce = (ce_w.to(dtype) * per)[sample]
    w_kd = (kd_w.to(dtype) * per * (temperature * temperature))[sample]
    return w_ce, w_kd


def _proportion(
    g_ce: torch.Tensor, g_kd: torch.Tensor, hint: tuple[torch.Tensor, torch.Tensor]
) -> float | None:
    """``c`` with ``(g_ce, g_kd) = c · hint``, or None when the upstream gradients are weighted otherwise."""
    a, b = hint[0].to(g_ce), hint[1].to(g_ce)
    both_hint, both_grad = torch.cat([a, b]), torch.cat([g_ce, g_kd])
    ref = int(both_hint.abs().argmax())
    if float(both_hint[ref]) == 0.0:
        return 0.0 if not both_grad.any() else None
    c = float(both_grad[ref] / both_hint[ref])
    return c if torch.allclose(both_grad, c * both_hint, rtol=1e-5, atol=0.0) else None


class _Grads:
    """Accumulates the student's gradients chunk by chunk: hidden rows, head weight and bias.

    ``projection``: the head weight the forward projected with (the weight itself, or its copy in the
    autocast dtype); with a copy in another dtype, the two gradient products run in that dtype too, and
    each chunk's weight gradient is added to a float32 sum.
    """

    def __init__(
        self,
        h: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        needs: tuple,
        projection: torch.Tensor,
    ) -> None:
        self.h, self.weight, self.projection = h, weight, projection
        self.acc = (
            _compute_dtype(h, weight) if weight.dtype not in (torch.float32, torch.float64) else weight.dtype
        )
        self.low = projection.dtype != weight.dtype  # autocast: products in the projection's dtype
        self.g_h = torch.empty_like(h) if needs[0] else None
        self.g_w = torch.zeros(weight.shape, dtype=self.acc, device=weight.device) if needs[1] else None
        self.g_b = torch.zeros(bias.shape, dtype=self.acc, device=bias.device) if needs[2] else None

    def add(self, rows: slice, ds: torch.Tensor) -> None:
        """``ds`` = d loss / d logits of the chunk ``rows``."""
        w = self.projection
        if self.g_h is not None:
            self.g_h[rows] = (ds.to(w.dtype) @ w).to(self.h.dtype)
        if self.g_w is not None:
            if self.low:
                self.g_w += ds.t().to(w.dtype) @ self.h[rows].to(w.dtype)
            else:
                self.g_w.addmm_(ds.t().to(self.acc), self.h[rows].to(self.acc))
        if self.g_b is not None:
            self.g_b += ds.sum(0).to(self.acc)

    def result(self, scale: float) -> tuple[torch.Tensor | None, ...]:
        out = []
        for g, like in ((self.g_h, self.h), (self.g_w, self.weight), (self.g_b, self.weight)):
            if g is not None and scale != 1.0:
                g.mul_(scale)
            out.append(None if g is None else g.to(like.dtype))
        return tuple(out)


def fused_sample_terms(
    student_hidden: torch.Tensor,
    student_head: torch.Tensor,
    labels: torch.Tensor,
    teacher_hidden: torch.Tensor | None = None,
    teacher_head: torch.Tensor | None = None,
    divergence: Divergence | None = None,
    temperature: float = 1.0,
    *,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    chunk_tokens: int | None = None,
    loss_weights: tuple[torch.Tensor, torch.Tensor] | None = None,
    teacher_topk: TopKTeacher | None = None,
) -> SampleTerms:
    """Per-sample ``ce``, ``kd``, ``confidence`` and ``tokens`` (``[B]`` each) from final hidden states.

    ``student_hidden`` ``[B, T, H]`` and ``labels`` ``[B, T]`` are aligned as for
    ``per_sample_terms`` (the hidden state at ``t`` predicts ``labels[t]``); ``student_head`` is the
    LM head's weight ``[Vs, H]``. ``teacher_hidden`` ``[B, T, Ht]`` with ``teacher_head`` ``[Vt, Ht]``
    (and ``divergence``) add the KD term; the teacher side gets no gradient. ``chunk_tokens``: valid
    tokens per chunk, by default ``CHUNK_ELEMENTS // max(Vs, Vt)`` (at least 1). ``loss_weights``:
    the per-sample weights ``(a, b)`` of the loss ``Σ c·(a_i·ce_i + b_i·kd_i)`` the caller will
    differentiate, for any scalar ``c`` — gradients are then computed in the forward pass.

    ``teacher_topk`` instead of ``teacher_hidden``: a sparse teacher (a teacher cache's
    :class:`~kdcore.training.losses.TopKTeacher` ``[B, T, K]``), its KD term computed over the ``K``
    tokens plus the rest bucket exactly as :func:`~kdcore.training.losses.per_sample_terms` computes it.

    Under autocast (``torch.autocast`` enabled on the hidden states' device, as ``training.mixed_precision``
    makes it) the head projections and the gradient products run in autocast's dtype, the heads' weights
    cast once per call; the logits of each chunk are upcast, and softmaxes, the divergence, the per-sample
    sums and the weight gradient's sum are float32 (float64 inputs outside autocast stay float64).
    """
    if student_hidden.dim() != 3 or labels.shape != student_hidden.shape[:2]:
        raise ValueError(
            f"expected student_hidden [B, T, H] and labels [B, T], got {tuple(student_hidden.shape)} "
            f"and {tuple(labels.shape)}"
        )
    if student_head.dim() != 2 or student_head.shape[1] != student_hidden.shape[2]:
        raise ValueError(f"student_head {tuple(student_head.shape)} is not [V, {student_hidden.shape[2]}]")
    if teacher_hidden is not None and teacher_topk is not None:
        raise TypeError("fused_sample_terms: give teacher_hidden or teacher_topk, not both")
    if teacher_topk is not None:
        if divergence is None:
            raise TypeError("fused_sample_terms: teacher_topk needs a divergence")
        if teacher_topk.shape[:2] != labels.shape:
            raise ValueError(
                f"teacher_topk {tuple(teacher_topk.shape)} does not match labels {tuple(labels.shape)}"
            )
    teacher = teacher_hidden is not None
    if teacher:
        if teacher_head is None or divergence is None:
            raise TypeError("fused_sample_terms: teacher_hidden needs teacher_head and a divergence")
        if teacher_hidden.shape[:2] != labels.shape or teacher_head.shape[1] != teacher_hidden.shape[2]:
            raise ValueError(
                f"teacher_hidden {tuple(teacher_hidden.shape)} / teacher_head {tuple(teacher_head.shape)} do not "
                f"match labels {tuple(labels.shape)}"
            )
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if chunk_tokens is not None and chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be a positive integer or None, got {chunk_tokens}")
    dense, teacher = teacher, teacher or teacher_topk is not None

    batch, seq, hidden = student_hidden.shape
    device = student_hidden.device
    flat = labels.reshape(-1)
    valid = flat != IGNORE_INDEX
    rows = valid.nonzero().squeeze(1)
    tokens = valid.reshape(batch, seq).sum(1).float()
    if rows.numel() == 0:  # zeros still attached to the graph, so backward() works
        dtype = _compute_dtype(student_hidden, student_head)
        zero = student_hidden.reshape(-1)[:0].sum().to(dtype) + student_head.reshape(-1)[:0].sum().to(dtype)
        zeros = torch.zeros(batch, device=device, dtype=dtype)
        kd = zeros + zero if teacher else zeros.clone()
        return SampleTerms(ce=zeros + zero, kd=kd, confidence=zeros.clone(), tokens=tokens)
    widest = max(student_head.shape[0], teacher_head.shape[0] if dense else 0)
    chunk = chunk_tokens or max(1, CHUNK_ELEMENTS // widest)
    h = student_hidden.reshape(batch * seq, hidden).index_select(0, rows)
    th = None
    if dense:
        th = teacher_hidden.detach().reshape(batch * seq, -1).index_select(0, rows)
    topk: list[torch.Tensor | None] = [None, None, None]
    if teacher_topk is not None:
        topk = [None if x is None else x.index_select(0, rows) for x in teacher_topk.rows()]
    hint = None
    if loss_weights is not None:
        ce_w = loss_weights[0].detach().reshape(batch).to(device)
        kd_w = loss_weights[1].detach().reshape(batch).to(device) if teacher else torch.zeros_like(ce_w)
        hint = (ce_w, kd_w)
    ce, kd, confidence = _FusedHeadLoss.apply(
        h,
        student_head,
        student_bias,
        th,
        _detach(teacher_head),
        _detach(teacher_bias),
        *topk,
        teacher_topk.vocab_size if teacher_topk is not None else 0,
        flat.index_select(0, rows),
        torch.div(rows, seq, rounding_mode="floor"),
        tokens.clamp(min=1.0),
        divergence,
        temperature,
        chunk,
        hint,
        _autocast_dtype(device),
    )
    if not teacher:
        kd = torch.zeros_like(ce)
    return SampleTerms(ce=ce, kd=kd, confidence=confidence, tokens=tokens)


def _sharded(weight: torch.Tensor) -> bool:
    """An FSDP2 shard (a DTensor) or a DeepSpeed ZeRO-3 partition (``ds_id``), not the whole weight."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch build without distributed support shards nothing
        return hasattr(weight, "ds_id")
    return isinstance(weight, DTensor) or hasattr(weight, "ds_id")


def linear_head(model: Any) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """``(weight, bias)`` when ``model``'s logits are exactly its output layer applied to the final hidden
    states, else None (soft-capped or scaled logits, a non-linear head, or a head sharded over processes
    by FSDP or DeepSpeed, whose weight only the model's own forward gathers): then use the logits path."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, torch.nn.Linear) or _sharded(head.weight):
        return None
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for attribute in ("final_logit_softcapping", "logit_scale", "output_multiplier_scale", "logits_scaling"):
        value = getattr(text, attribute, None)
        if value not in (None, 1, 1.0):
            return None
    return head.weight, head.bias


def final_hidden_states(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The hidden states the LM head would project, ``[B, T, H]``, through the model's own forward (so DDP
    wrappers and hooks see the call) with no logits computed (``logits_to_keep`` selects no position)."""
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        output_hidden_states=True,
        use_cache=False,
        logits_to_keep=torch.empty(0, dtype=torch.long, device=input_ids.device),
    )
    return out.hidden_states[-1]


def fusable(model: Any) -> bool:
    """Whether :func:`final_hidden_states` and :func:`linear_head` together reproduce ``model``'s logits."""
    forward = getattr(model, "forward", None)
    takes_keep = forward is not None and "logits_to_keep" in inspect.signature(forward).parameters
    return takes_keep and linear_head(model) is not None
