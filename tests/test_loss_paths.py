"""The engine's two loss paths: fused (hidden states + LM heads, chunk by chunk) and logits.

Tolerances, float32: both paths do the same arithmetic in another order (the head projection on
row subsets, sums over chunks), about 1e-7 relative per operation; measured over the 12-step run
below the logged losses differ by at most 6e-8. 1e-5 on a logged loss and 1e-4 relative on a
weight after 12 AdamW steps leave room for that rounding to grow through the updates, and catch
any real difference (a wrong mask, τ², λ or vocabulary slice moves them by 1e-2 and more).
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_STUDENT, TINY_TEACHER, tiny_overrides
from rich.console import Console
from safetensors.torch import load_file

from kdcore.config import resolve_config
from kdcore.errors import KdError
from kdcore.runs.runner import run
from kdcore.training import loss_path


@pytest.fixture
def count_fused(monkeypatch):
    """How many times the training step called fused_sample_terms."""
    calls = []
    real = loss_path.fused_sample_terms

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(loss_path, "fused_sample_terms", spy)
    return calls


def _records(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def test_fused_and_logits_paths_agree_over_a_whole_run(
    tmp_path, count_fused, cached_tiny_teacher, one_thread
):
    results = {}
    for path in ("fused", "logits"):
        overrides = {"training.loss_path": path, "training.log_every": 1}
        cfg = resolve_config(None, tiny_overrides(tmp_path / path, **overrides))
        before = len(count_fused)
        results[path] = run(cfg, console=Console(quiet=True), show_progress=False)
        used = len(count_fused) - before
        assert (used > 0) if path == "fused" else (used == 0), (path, used)  # the path really taken
    fused, logits = (_records(results[p].run_dir) for p in ("fused", "logits"))
    assert [r["step"] for r in fused] == [r["step"] for r in logits]
    for a, b in zip(fused, logits, strict=True):
        for key in ("loss", "ce", "kd", "eval_ppl"):
            if key in a:
                assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-5), (a["step"], key)
    wa = load_file(results["fused"].run_dir / "student" / "model.safetensors")
    wb = load_file(results["logits"].run_dir / "student" / "model.safetensors")
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=1e-4, atol=1e-5)


def test_fused_and_logits_paths_agree_from_a_teacher_cache(
    tmp_path, count_fused, cached_tiny_teacher, one_thread
):
    """With a top-K cache the fused path projects the student alone against the cache's rows (auto takes
    it): the same run as the logits path with the same cache, at the tolerances above."""
    from kdcore.teachers.cache import build_cache

    build_cache(
        resolve_config(None, tiny_overrides(tmp_path / "unused")),
        tmp_path / "k16",
        top_k=16,
        console=Console(quiet=True),
    )
    results = {}
    for path in ("auto", "logits"):
        overrides = {
            "training.loss_path": path,
            "training.log_every": 1,
            "model.teacher_cache": str(tmp_path / "k16"),
        }
        cfg = resolve_config(None, tiny_overrides(tmp_path / path, **overrides))
        before = len(count_fused)
        results[path] = run(cfg, console=Console(quiet=True), show_progress=False)
        used = len(count_fused) - before
        assert (used > 0) if path == "auto" else (used == 0), (path, used)
    fused, logits = (_records(results[p].run_dir) for p in ("auto", "logits"))
    assert [r["step"] for r in fused] == [r["step"] for r in logits]
    for a, b in zip(fused, logits, strict=True):
        for key in ("loss", "ce", "kd", "eval_ppl"):
            if key in a:
                assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-5), (a["step"], key)
    assert max(r.get("kd", 0.0) for r in fused) > 0
    wa = load_file(results["auto"].run_dir / "student" / "model.safetensors")
    wb = load_file(results["logits"].run_dir / "student" / "model.safetensors")
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=1e-4, atol=1e-5)


def _tiny(spec: str, tokenizer, vocab: int, seed: int):
    from kdcore.inputs.models import build_from_spec, parse_spec

    return build_from_spec(
        parse_spec(f"{spec},vocab_size={vocab},resid_pdrop=0,embd_pdrop=0,attn_pdrop=0"), tokenizer, seed
    )


@pytest.mark.parametrize("path", ["fused", "logits"])
def test_first_step_terms_against_an_independent_computation_with_unequal_vocab_rows(
    tmp_path, path, one_thread
):
    """A teacher with more output rows (300) than the student (280), both more than the tokenizer (259): the
    Qwen2.5-7B → 0.5B case in small. CE runs over the student's 280 rows, KD over the shared first 280."""
    from kdcore.inputs.corpus import load_corpus
    from kdcore.inputs.packing import IGNORE_INDEX
    from kdcore.inputs.tokenization import build_tokenizer
    from kdcore.training.engine import Trainer, make_strategies

    cfg = resolve_config(None, tiny_overrides(tmp_path, **{"training.loss_path": path}))
    tokenizer = build_tokenizer("byte")
    train, eval_set = load_corpus(cfg.data, 0).pack(tokenizer, cfg.data.seq_len)
    teacher, student = _tiny(TINY_TEACHER, tokenizer, 300, 1), _tiny(TINY_STUDENT, tokenizer, 280, 0)
    before = copy.deepcopy(student)
    strategies, _ = make_strategies(cfg.strategy)  # fixed λ = 0.5, forward KL, τ = 2
    trainer = Trainer(student, teacher, train, eval_set, strategies, cfg.training, 2.0)
    assert trainer.loss_path == path
    metrics = trainer.train_step(0)

    ids, mask, labels = train.batch(trainer.sampler.batch(0))
    with torch.no_grad():
        s = before.eval()(input_ids=ids, attention_mask=mask).logits
        t = teacher.eval()(input_ids=ids, attention_mask=mask).logits
    valid = (labels != IGNORE_INDEX).float()
    gold = labels.clamp(min=0)
    ce_tok = -F.log_softmax(s, -1).gather(-1, gold.unsqueeze(-1)).squeeze(-1)
    p_t = F.softmax(t[..., :280] / 2.0, -1)
    kl_tok = (p_t * (p_t.log() - F.log_softmax(s[..., :280] / 2.0, -1))).sum(-1)
    ce = (ce_tok * valid).sum(1) / valid.sum(1)
    kd = 4.0 * (kl_tok * valid).sum(1) / valid.sum(1)
    assert float(metrics["ce"]) == pytest.approx(float(ce.mean()), rel=1e-5)
    assert float(metrics["kd"]) == pytest.approx(float(kd.mean()), rel=1e-5)
    assert float(metrics["loss"]) == pytest.approx(float((0.5 * ce + 0.5 * kd).mean()), rel=1e-5)


def test_forcing_the_fused_path_where_it_cannot_work_is_one_sentence(tmp_path):
    from kdcore.inputs.tokenization import build_tokenizer
    from kdcore.training.engine import Trainer, make_strategies

    cfg = resolve_config(None, tiny_overrides(tmp_path, **{"training.loss_path": "fused"}))
    tokenizer = build_tokenizer("byte")
    student = _tiny(TINY_STUDENT, tokenizer, 259, 0)
    student.config.logit_scale = 0.5  # logits that are not the plain head's output
    from kdcore.inputs.packing import PackedDataset

    data = PackedDataset(torch.ones(8, 8, dtype=torch.long), torch.ones(8, 8, dtype=torch.long))  # one batch
    strategies, _ = make_strategies(cfg.strategy)
    with pytest.raises(
        KdError, match=r"^training.loss_path is fused but the student's logits are not a plain linear head"
    ):
        Trainer(student, None, data, data, strategies, cfg.training, 2.0)
    assert (
        Trainer(
            student, None, data, data, strategies, cfg.training.model_copy(update={"loss_path": "auto"}), 2.0
        ).loss_path
        == "logits"
    )


def test_perplexity_from_hidden_states_equals_the_logits(tmp_path, one_thread):
    """Evaluation projects hidden states chunk by chunk when it can; the number is the full logits' one."""
    from kdcore.inputs.corpus import load_corpus
    from kdcore.inputs.packing import IGNORE_INDEX
    from kdcore.inputs.tokenization import build_tokenizer
    from kdcore.training.evaluation import perplexity
    from kdcore.training.fused_loss import fusable

    cfg = resolve_config(None, tiny_overrides(tmp_path))
    tokenizer = build_tokenizer("byte")
    _, eval_set = load_corpus(cfg.data, 0).pack(tokenizer, cfg.data.seq_len)
    model = _tiny(TINY_TEACHER, tokenizer, 300, 1).eval()
    ids, mask, labels = eval_set.batch(slice(None))
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    nll = F.cross_entropy(logits.reshape(-1, 300), labels.reshape(-1), ignore_index=IGNORE_INDEX)
    assert fusable(model)
    assert perplexity(model, eval_set, batch_size=7) == pytest.approx(float(nll.exp()), rel=1e-5)
