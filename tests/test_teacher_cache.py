"""The teacher cache: sparse top-K KD term, cache files, cached runs equal to live runs, refusals."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_TEACHER, tiny_overrides
from conftest import topk_teacher_in_memory as sparse
from safetensors.torch import load_file

from kdcore.config import resolve_config
from kdcore.errors import KdError
from kdcore.plugins import get_registry
from kdcore.runs.runner import run
from kdcore.teachers.cache import TeacherCache, build_cache
from kdcore.training.losses import per_sample_terms

B, T, V = 3, 7, 40


def divergence(name: str, **params):
    return get_registry().create("divergence", name, params)


def data(seed: int = 0, vs: int = V, vt: int = V):
    g = torch.Generator().manual_seed(seed)
    student = (torch.randn(B, T, vs, generator=g, dtype=torch.float64) * 2).requires_grad_(True)
    teacher = torch.randn(B, T, vt, generator=g, dtype=torch.float64) * 3
    labels = torch.randint(0, vs, (B, T), generator=g)
    labels[0, 4:] = -100
    labels[2, 1] = -100
    return student, teacher, labels


def bucket_reference(student, teacher, labels, k: int, tau: float) -> torch.Tensor:
    """τ² · per-sample mean of KL over the top-K tokens + one rest bucket, with the exact tail at τ."""
    s_logp = F.log_softmax(student.double() / tau, -1)
    t_logp = F.log_softmax(teacher.double() / tau, -1)
    idx = F.log_softmax(teacher.double(), -1).topk(k, -1).indices  # top-K at τ = 1, as cached
    t_k, s_k = t_logp.gather(-1, idx), s_logp.gather(-1, idx)
    t_rest = t_logp.scatter(-1, idx, float("-inf")).logsumexp(-1, keepdim=True)
    s_rest = s_logp.scatter(-1, idx, float("-inf")).logsumexp(-1, keepdim=True)
    t_all, s_all = torch.cat([t_k, t_rest], -1), torch.cat([s_k, s_rest], -1)
    kl = (t_all.exp() * (t_all - s_all)).sum(-1)
    mask = (labels != -100).double()
    return tau**2 * (kl * mask).sum(1) / mask.sum(1)


# -- the sparse KD term ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["forward-kl", "reverse-kl", "jsd"])
@pytest.mark.parametrize("tau", [1.0, 2.0, 3.0])
def test_top_k_equal_to_vocabulary_is_the_full_kd_term_values_and_gradients(name, tau):
    student, teacher, labels = data()
    div = divergence(name)
    dense = per_sample_terms(student, labels, teacher, div, tau, chunk_tokens=5)
    cached = per_sample_terms(student, labels, sparse(teacher, V), div, tau, chunk_tokens=5)
    torch.testing.assert_close(cached.kd, dense.kd, rtol=0, atol=1e-10)
    torch.testing.assert_close(cached.ce, dense.ce, rtol=0, atol=0)
    (g_dense,) = torch.autograd.grad(dense.kd.sum() + dense.ce.sum(), student)
    (g_cached,) = torch.autograd.grad(cached.kd.sum() + cached.ce.sum(), student)
    torch.testing.assert_close(g_cached, g_dense, rtol=0, atol=1e-10)


@pytest.mark.parametrize(("vs", "vt"), [(V, V + 6), (V + 6, V)])
def test_full_top_k_with_padded_vocabularies_matches_the_dense_shared_prefix(vs, vt):
    student, teacher, labels = data(1, vs, vt)
    div = divergence("forward-kl")
    dense = per_sample_terms(student, labels, teacher, div, 2.0)
    cached = per_sample_terms(student, labels, sparse(teacher, vt), div, 2.0)
    torch.testing.assert_close(cached.kd, dense.kd, rtol=0, atol=1e-10)


@pytest.mark.parametrize("tau", [1.0, 2.0])
@pytest.mark.parametrize("k", [1, 5, 20])
def test_top_k_plus_rest_bucket_is_exact_at_the_cached_temperatures(k, tau):
    """At τ = 1 and τ = 2 the tail bucket's mass is cached exactly: the K + 1 bucket KL, no approximation."""
    student, teacher, labels = data(2)
    got = per_sample_terms(student, labels, sparse(teacher, k), divergence("forward-kl"), tau).kd
    torch.testing.assert_close(got, bucket_reference(student, teacher, labels, k, tau), rtol=1e-9, atol=1e-9)


def test_other_temperatures_interpolate_the_tail_and_buckets_never_exceed_the_full_kl():
    student, teacher, labels = data(3)
    full = per_sample_terms(student, labels, teacher, divergence("forward-kl"), 3.0).kd
    for k in (5, 20):
        got = per_sample_terms(student, labels, sparse(teacher, k), divergence("forward-kl"), 3.0).kd
        want = bucket_reference(student, teacher, labels, k, 3.0)
        torch.testing.assert_close(got, want, rtol=0.05, atol=1e-3)  # tail mass interpolated at τ = 3
        assert (want <= full + 1e-9).all()  # merging categories lowers the KL
    # more tokens, smaller error
    err = [
        (per_sample_terms(student, labels, sparse(teacher, k), divergence("forward-kl"), 2.0).kd - full)
        .abs()
        .max()
        for k in (2, 10, 30)
    ]
    assert err[0] > err[1] > err[2]


def test_sparse_term_has_no_nan_when_the_student_puts_all_mass_on_the_top_k():
    student, teacher, labels = data(4)
    student = student.detach().clone()
    student[..., 5:] = -1e4  # the student's mass is all on ids 0..4
    student.requires_grad_(True)
    teacher = teacher.clone()
    teacher[..., :5] += 30  # the teacher's top-5 are ids 0..4, with a tiny tail
    for name in ("forward-kl", "reverse-kl", "jsd"):
        terms = per_sample_terms(student, labels, sparse(teacher, 5), divergence(name), 2.0)
        (grad,) = torch.autograd.grad(terms.kd.sum(), student)
        assert torch.isfinite(terms.kd).all() and torch.isfinite(grad).all(), name


# -- cache files and runs --------------------------------------------------------------------------
def _cfg(path, **extra):
    return resolve_config(None, tiny_overrides(path, **{"training.log_every": 1, **extra}))


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    root = tmp_path_factory.mktemp("teacher-cache")
    cfg = _cfg(root / "unused")
    full = build_cache(cfg, root / "full", top_k=100_000)
    small = build_cache(cfg, root / "k8", top_k=8, dtype="float16")
    return root, full, small


def test_manifest_records_what_the_cache_is(caches):
    root, full, small = caches
    assert full["top_k"] == full["vocab_size"] == 259 and not full["has_tail"]
    assert small["top_k"] == 8 and small["has_tail"] and small["dtype"] == "float16"
    for manifest in (full, small):
        for key in (
            "teacher",
            "teacher_id",
            "tokenizer_hash",
            "train_fingerprint",
            "eval_fingerprint",
            "seq_len",
        ):
            assert manifest[key], key
        assert manifest["seq_len"] == 48 and manifest["index_dtype"] == "uint16"
        assert math.isfinite(manifest["teacher_eval_ppl"]) and manifest["teacher_eval_ppl"] > 1
    assert set(small["files"]) >= {
        "logprobs.npy",
        "indices.npy",
        "tail.npy",
        "offsets.npy",
        "teacher_stats.safetensors",
    }
    assert "tail.npy" not in full["files"]
    on_disk = json.loads((root / "k8" / "manifest.json").read_text())
    assert on_disk == small
    cache = TeacherCache.open(root / "k8")  # checksums verified
    assert cache.offsets[-1] == small["num_tokens"]


def test_cached_rows_are_the_teachers_top_k_and_stats_match_a_teacher_pass(caches):
    from kdcore.inputs.corpus import load_corpus
    from kdcore.inputs.models import load_pretrained
    from kdcore.training.evaluation import perplexity, sample_stats

    root, full, _ = caches
    cfg = _cfg(root / "unused")
    teacher = load_pretrained(full["teacher_source"])
    cache = TeacherCache.open(root / "k8")
    train, eval_set = load_corpus(cfg.data, 0).pack(cache.tokenizer(), 48)
    ids = torch.tensor([5, 0, 17])
    got = cache.topk(ids, train.batch(ids)[2])
    with torch.no_grad():
        logits = teacher(input_ids=train.input_ids[ids], attention_mask=train.attention_mask[ids]).logits
    logp = F.log_softmax(logits.float(), -1)
    valid = train.attention_mask[ids].clone()
    valid[:, :-1] = valid[:, 1:].clone()
    valid[:, -1] = 0
    valid = valid.bool()
    want = logp.topk(8, -1)
    torch.testing.assert_close(got.logprobs[valid], want.values[valid], rtol=2e-3, atol=2e-3)  # float16
    assert (got.indices[valid] == want.indices[valid]).float().mean() > 0.99  # ties may swap
    rest = logp.scatter(-1, want.indices, float("-inf")).logsumexp(-1)
    torch.testing.assert_close(got.tail[..., 0][valid], rest[valid], rtol=1e-4, atol=1e-4)

    stats, live = cache.stats(), sample_stats(teacher, train)
    for key in ("ce", "confidence", "entropy"):
        torch.testing.assert_close(stats[key], live[key], rtol=1e-5, atol=1e-5)
    assert cache.teacher_eval_ppl == pytest.approx(perplexity(teacher, eval_set), rel=1e-9)


def test_run_from_a_full_top_k_cache_equals_the_live_teacher_run(tmp_path, caches, monkeypatch):
    """The cached run differs from the live one only by float32 rounding of the teacher's log-probs,
    so the two cannot be bit-identical, and AdamW amplifies rounding in near-zero gradients over the
    steps (one ulp of the teacher's logits moves some weights by ~1e-5 after 12 steps). The tolerance
    is therefore measured, not picked: a live run whose teacher logits are scaled by (1 + 2^-23), one
    ulp, gives the float32 spread these 12 steps accumulate; the cached run must stay within 4 times
    it (the cache rounds each log-prob once, and log_softmax adds a few ulp more)."""
    import kdcore.training.loss_path

    root, _, _ = caches
    # Every run takes the logits path, whose teacher_logits the perturbation below reaches (the fused
    # path projects hidden states instead, and equals the logits path, live or cached:
    # tests/test_loss_paths.py).
    logits = {"training.loss_path": "logits"}
    live = run(_cfg(tmp_path / "live", **logits), show_progress=False)
    cached = run(
        _cfg(tmp_path / "cached", **{"model.teacher_cache": str(root / "full")}, **logits),
        show_progress=False,
    )
    teacher_logits = kdcore.training.loss_path.LossPath.teacher_logits
    monkeypatch.setattr(
        kdcore.training.loss_path.LossPath,
        "teacher_logits",
        lambda self, *a: teacher_logits(self, *a) * (1 + 2**-23),
    )
    one_ulp = run(_cfg(tmp_path / "one-ulp", **logits), show_progress=False)

    def losses(result):
        lines = (result.run_dir / "metrics.jsonl").read_text().splitlines()
        return torch.tensor([(r["step"], r["loss"], r["kd"]) for r in map(json.loads, lines) if "loss" in r])

    def weights(result):
        found = load_file(result.run_dir / "student" / "model.safetensors")
        return torch.cat([found[key].flatten() for key in sorted(found)])

    a, b, c = losses(live), losses(cached), losses(one_ulp)
    assert a[:, 0].tolist() == b[:, 0].tolist() == list(range(1, 13))
    loss_floor = (c[:, 1:] - a[:, 1:]).abs().max()
    weight_floor = (weights(one_ulp) - weights(live)).abs().max()
    assert loss_floor > 0 and weight_floor > 0  # the perturbation did reach the result
    assert (b[:, 1:] - a[:, 1:]).abs().max() <= 4 * loss_floor
    assert (weights(cached) - weights(live)).abs().max() <= 4 * weight_floor
    assert cached.summary["teacher_eval_ppl"] == live.summary["teacher_eval_ppl"]
    assert cached.summary["student_eval_ppl"] == pytest.approx(live.summary["student_eval_ppl"], rel=1e-4)


def test_teacher_confidence_scores_come_from_the_cache(tmp_path, caches):
    root, _, small = caches
    result = run(
        _cfg(
            tmp_path / "tc",
            **{
                "model.teacher_cache": str(root / "k8"),
                "strategy.scorer": {"name": "teacher-confidence"},
                "strategy.pacing": {"name": "linear"},
                "training.max_steps": 4,
            },
        ),
        show_progress=False,
    )
    scores = load_file(result.run_dir / "teacher_scores.safetensors")["scores"]
    stats = load_file(root / "k8" / "teacher_stats.safetensors")
    torch.testing.assert_close(scores, 1.0 - stats["confidence"])
    assert result.summary["teacher_eval_ppl"] == small["teacher_eval_ppl"]


def test_a_cache_that_does_not_match_the_run_is_refused_naming_the_field(tmp_path, caches):
    from kdcore.inputs.corpus import load_corpus

    root, full, _ = caches
    cache_dir = str(root / "full")
    with pytest.raises(KdError, match=r"its seq_len is 48 but the run's is 40"):
        run(
            _cfg(tmp_path / "a", **{"model.teacher_cache": cache_dir, "data.seq_len": 40}),
            show_progress=False,
        )
    # The trained teacher's directory as --teacher: same teacher, so the data check is the one that fails.
    by_dir = build_cache(
        _cfg(tmp_path / "u", **{"model.teacher": full["teacher_source"]}), tmp_path / "dir", top_k=4
    )
    with pytest.raises(
        KdError, match=r"its dataset \(fingerprint of the text\) is '\w+' but the run's is '\w+'"
    ):
        overrides = {"model.teacher": full["teacher_source"], "model.teacher_cache": str(tmp_path / "dir")}
        run(_cfg(tmp_path / "b", **overrides, **{"data.demo_samples": 170}), show_progress=False)
    cache = TeacherCache.open(tmp_path / "dir")
    train, eval_set = load_corpus(_cfg(tmp_path).data, 0).pack(cache.tokenizer(), 48)
    cache.check_data(train, eval_set)
    with pytest.raises(KdError, match=r"its training data fingerprint is '\w+' but the run's is '\w+'"):
        cache.check_data(train.head(10), eval_set)
    with pytest.raises(KdError) as other_teacher:  # --teacher-cache alone: the run has another teacher
        run(_cfg(tmp_path / "c", **{"model.teacher_cache": str(tmp_path / "dir")}), show_progress=False)
    assert str(other_teacher.value) == (
        f"teacher cache '{tmp_path / 'dir'}' holds teacher '{full['teacher_source']}' but this run's teacher "
        f"is '{TINY_TEACHER}'; pass --teacher {full['teacher_source']} with --teacher-cache (and the options "
        f"the cache was made with), or rebuild the cache with kd cache-teacher --teacher {TINY_TEACHER}"
    )
    with pytest.raises(KdError, match=r"its teacher \([^)]*\) is '\S+' but the run's is '\S+'"):
        other_steps = {"model.teacher_steps": 41, "model.teacher_cache": str(root / "full")}
        run(_cfg(tmp_path / "e", **other_steps), show_progress=False)  # same name, another training
    # a tampered tokenizer hash and a corrupted file
    manifest = dict(by_dir, tokenizer_hash="0" * 16)
    (tmp_path / "dir" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(KdError, match=r"its tokenizer \(sha256 of the sorted vocabulary\) is '0+'"):
        overrides = {"model.teacher": full["teacher_source"], "model.teacher_cache": str(tmp_path / "dir")}
        run(_cfg(tmp_path / "d", **overrides), show_progress=False)
    with (tmp_path / "dir" / "logprobs.npy").open("r+b") as handle:
        handle.seek(-4, 2)
        handle.write(b"\x01\x02\x03\x04")
    with pytest.raises(KdError, match=r"checksum of 'logprobs.npy' does not match"):
        TeacherCache.open(tmp_path / "dir")
    assert not (tmp_path / "a" / "summary.json").exists()


def test_a_train_share_needs_its_own_cache_from_the_same_teacher(tmp_path, caches):
    from kdcore.inputs.corpus import load_corpus

    root, full, _ = caches
    with pytest.raises(
        KdError,
        match=r"holds the first 1 of the training text \(data.train_share\) and this run trains on 0.5; "
        r"pass --train-share 1, or rebuild the cache with kd cache-teacher --set data.train_share=0.5",
    ):
        run(
            _cfg(tmp_path / "a", **{"model.teacher_cache": str(root / "full"), "data.train_share": 0.5}),
            show_progress=False,
        )
    half = build_cache(_cfg(tmp_path / "u", **{"data.train_share": 0.5}), tmp_path / "half", top_k=4)
    assert half["teacher_id"] == full["teacher_id"]  # the same spec teacher, trained on all the text
    assert half["eval_fingerprint"] == full["eval_fingerprint"]
    cfg = _cfg(tmp_path / "b", **{"data.train_share": 0.5})
    corpus = load_corpus(cfg.data, 0)
    whole = [len(t) for t in load_corpus(_cfg(tmp_path).data, 0).train_texts]  # the demo: one sample per text
    # the text in which the cut at half the characters falls is the last one kept
    n_half = next(i + 1 for i, end in enumerate(itertools.accumulate(whole)) if end >= round(sum(whole) / 2))
    assert len(corpus.train_texts) == half["num_samples"] == n_half
    train, eval_set = corpus.pack(TeacherCache.open(tmp_path / "half").tokenizer(), 48)
    assert half["train_fingerprint"] == train.fingerprint != full["train_fingerprint"]
    TeacherCache.open(tmp_path / "half").check_data(train, eval_set)


def test_cli_cache_teacher_and_a_refused_run(tmp_path, caches):
    import yaml
    from typer.testing import CliRunner

    from kdcore.cli import app

    _, full, _ = caches
    config = tmp_path / "run.yaml"
    tree: dict = {}
    for dotted, value in tiny_overrides(tmp_path / "run").items():
        section, key = dotted.split(".")
        tree.setdefault(section, {})[key] = value
    config.write_text(yaml.safe_dump(tree))
    runner = CliRunner()
    made = runner.invoke(
        app, ["cache-teacher", "--config", str(config), "--output", str(tmp_path / "c"), "--top-k", "16"]
    )
    assert made.exit_code == 0, made.output
    assert "top-16 of 259 tokens" in " ".join(made.output.split())
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert manifest["train_fingerprint"] == full["train_fingerprint"] and manifest["top_k"] == 16
    with pytest.raises(KdError, match="already holds a teacher cache"):
        build_cache(resolve_config(config), tmp_path / "c")
    refused = runner.invoke(
        app, ["run", "--config", str(config), "--teacher-cache", str(tmp_path / "c"), "--seq-len", "32"]
    )
    assert refused.exit_code == 2, refused.output  # friendly_errors: one sentence, no traceback
    assert "its seq_len is 48 but the run's is 32" in " ".join(refused.output.split())


def test_only_chunks_above_the_size_threshold_are_checkpointed(monkeypatch):
    """Small [tokens, vocab] chunks keep their softmaxes (faster); large ones are recomputed; same numbers."""
    import kdcore.training.losses as losses

    student, teacher, labels = data(5)
    div = divergence("forward-kl")

    def run_once(threshold: int):
        monkeypatch.setattr(losses, "CHECKPOINT_MIN_ELEMENTS", threshold)
        saved: list[torch.Tensor] = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            terms = per_sample_terms(student, labels, sparse(teacher, 8), div, 2.0, chunk_tokens=4)
        (grad,) = torch.autograd.grad((terms.ce + terms.kd).sum(), student)
        own = {student.untyped_storage().data_ptr()}
        kept = [t for t in saved if t.numel() >= V and t.untyped_storage().data_ptr() not in own]
        return terms.kd.detach(), grad, kept

    kd_small, grad_small, kept_small = run_once(1 << 40)  # nothing is large enough: no checkpoint
    kd_ckpt, grad_ckpt, kept_ckpt = run_once(0)  # everything is checkpointed
    assert kept_small and not kept_ckpt
    torch.testing.assert_close(kd_small, kd_ckpt, rtol=0, atol=1e-12)
    torch.testing.assert_close(grad_small, grad_ckpt, rtol=0, atol=1e-12)
