"""``training.mixed_precision: bf16`` against float32 over a whole (short) run, on the fused path.

Tolerance, derived rather than tuned: bf16 keeps 8 significant bits, a unit roundoff u = 2⁻⁹ ≈ 1.95e-3
(its "about 3 significant digits"). Under autocast a matrix product rounds both factors to bf16, at most
2u relative on each product (its float32 accumulation adds nothing at that scale); a logged loss or an
eval log-perplexity passes through two such products in series (a model's layers, then its LM head):
at most 4u. The updates of a short run come from those losses' gradients, bf16 products too, so the
weights, and with them the later losses, may differ by as much again: 8u ≈ 1.6e-2 relative, on the
losses and on log(eval perplexity) (the perplexity itself is an exponential: a relative error of its
log times log(ppl)). The softmaxes, divergence and per-sample sums are float32 in both runs.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from accelerate.state import AcceleratorState
from conftest import tiny_overrides

from kdcore.config import resolve_config
from kdcore.runs.runner import run
from kdcore.training import fused_loss, loss_path

U = 2.0**-9  # bf16's unit roundoff
TOLERANCE = 8 * U


def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_bf16_matches_float32_over_a_short_run(tmp_path, monkeypatch, cached_tiny_teacher, one_thread):
    projections: list[torch.dtype] = []  # the dtype of every head projection in the training loss
    training_loss = [False]  # inside the engine's call of the fused loss (evaluation calls it too)
    teacher_autocast: list[torch.dtype | None] = []  # autocast's dtype around every model forward
    real_logits, real_hidden, real_terms = (
        fused_loss._logits,
        loss_path.final_hidden_states,
        loss_path.fused_sample_terms,
    )

    def terms_spy(*args, **kwargs):
        training_loss[0] = True
        try:
            return real_terms(*args, **kwargs)
        finally:
            training_loss[0] = False

    def logits_spy(h, weight, bias, dtype):
        if training_loss[0]:
            projections.append(weight.dtype)
        out = real_logits(h, weight, bias, dtype)
        assert out.dtype == torch.float32  # upcast before any softmax
        return out

    def hidden_spy(model, input_ids, mask):
        # the student's autocast is entered inside its (accelerate-wrapped) forward: None here
        teacher_autocast.append(fused_loss._autocast_dtype(input_ids.device))
        return real_hidden(model, input_ids, mask)

    monkeypatch.setattr(fused_loss, "_logits", logits_spy)
    monkeypatch.setattr(loss_path, "final_hidden_states", hidden_spy)
    monkeypatch.setattr(loss_path, "fused_sample_terms", terms_spy)
    records, seen = {}, {}
    for precision in ("no", "bf16"):
        AcceleratorState._reset_state(reset_partial_state=True)  # one precision per process otherwise
        projections.clear(), teacher_autocast.clear()
        overrides = {"training.mixed_precision": precision, "training.log_every": 1}
        result = run(
            resolve_config(None, tiny_overrides(tmp_path / precision, **overrides)), show_progress=False
        )
        records[precision] = _records(result.run_dir)
        seen[precision] = (set(projections), set(teacher_autocast))
    AcceleratorState._reset_state(reset_partial_state=True)

    assert seen["no"] == ({torch.float32}, {None})
    # bf16: the heads project in bf16 in the training loss, and the teacher's forward runs under bf16
    # autocast (evaluation projects in float32: its perplexity is not training time)
    assert seen["bf16"] == ({torch.bfloat16}, {None, torch.bfloat16})
    a, b = records["no"], records["bf16"]
    assert [r["step"] for r in a] == [r["step"] for r in b]
    compared = 0
    for x, y in zip(a, b, strict=True):
        for key in ("loss", "ce", "kd"):
            if key in x:
                assert y[key] == pytest.approx(x[key], rel=TOLERANCE), (x["step"], key)
                compared += 1
        if "eval_ppl" in x:
            assert math.log(y["eval_ppl"]) == pytest.approx(math.log(x["eval_ppl"]), rel=TOLERANCE), x["step"]
            compared += 1
    assert compared == 12 * 3 + 2
