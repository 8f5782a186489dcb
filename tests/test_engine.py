"""End-to-end runs: outputs on disk, learning, determinism, gradient accumulation, bad input."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from conftest import TINY_STUDENT, TINY_TEACHER, run_kd, tiny_overrides
from safetensors.torch import load_file

from kdcore.config import resolve_config
from kdcore.errors import KdError
from kdcore.runs.runner import run


def tiny_run(tmp_path, name="run", **extra):
    cfg = resolve_config(None, tiny_overrides(tmp_path / name, **extra))
    return run(cfg, show_progress=False)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    return tiny_run(tmp_path_factory.mktemp("engine"))


def test_a_run_writes_every_output(finished):
    run_dir = finished.run_dir
    for name in (
        "config.yaml",
        "strategies.yaml",
        "metrics.jsonl",
        "summary.json",
        "difficulty.parquet",
        "loss.png",
        "lambda_pacing.png",
    ):
        assert (run_dir / name).is_file(), name
    summary = json.loads((run_dir / "summary.json").read_text())
    for key in ("student_eval_ppl", "teacher_eval_ppl", "steps", "tokens_per_second", "wall_seconds"):
        assert isinstance(summary[key], (int, float)) and summary[key] > 0, key
    assert summary["strategy"] == {
        "scorer": "none",
        "pacing": "none",
        "reliance": "fixed",
        "divergence": "forward-kl",
    }
    assert summary["steps"] == 12
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [4, 8, 12]
    assert [r["step"] for r in records if "eval_ppl" in r] == [6, 12]
    assert records[-1]["eval_ppl"] == pytest.approx(summary["student_eval_ppl"])
    # the config written is the config that ran, and it loads back
    assert resolve_config(run_dir / "config.yaml") == resolve_config(None, tiny_overrides(run_dir))
    strategies = yaml.safe_load((run_dir / "strategies.yaml").read_text())
    assert strategies["reliance"] == {
        "name": "fixed",
        "params": {"value": 0.5},
        "distribution": "kdcore",
        "version": strategies["reliance"]["version"],
    }


def test_the_student_is_saved_in_hugging_face_format_and_learned(finished):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kdcore.inputs.corpus import load_corpus
    from kdcore.training.evaluation import perplexity

    student_dir = finished.run_dir / "student"
    model = AutoModelForCausalLM.from_pretrained(student_dir)
    tokenizer = AutoTokenizer.from_pretrained(student_dir)
    cfg = resolve_config(finished.run_dir / "config.yaml")
    _, eval_set = load_corpus(cfg.data, cfg.training.seed).pack(tokenizer, cfg.data.seq_len)
    reloaded_ppl = perplexity(model, eval_set)
    assert reloaded_ppl == pytest.approx(finished.summary["student_eval_ppl"], rel=1e-4)
    assert reloaded_ppl < finished.summary["student_initial_eval_ppl"]  # beats the untrained student
    weights = load_file(student_dir / "model.safetensors")
    assert weights, "weights written"


def test_same_config_and_seed_give_identical_numbers(tmp_path, finished):
    again = tiny_run(tmp_path)
    keys = ("student_eval_ppl", "teacher_eval_ppl", "student_initial_eval_ppl", "mean_lambda", "eval_curve")
    assert {k: again.summary[k] for k in keys} == {k: finished.summary[k] for k in keys}
    other_seed = tiny_run(tmp_path, name="seed1", **{"training.seed": 1})
    assert other_seed.summary["student_eval_ppl"] != finished.summary["student_eval_ppl"]


def test_gradient_accumulation_4x2_equals_batch_8(tmp_path):
    from kdcore.inputs.corpus import load_corpus
    from kdcore.inputs.models import build_from_spec, parse_spec
    from kdcore.inputs.tokenization import build_tokenizer
    from kdcore.training.engine import Trainer, make_strategies

    cfg = resolve_config(
        None, tiny_overrides(tmp_path, **{"training.max_steps": 3, "training.max_grad_norm": None})
    )
    corpus = load_corpus(cfg.data, 0)
    tokenizer = build_tokenizer("byte")
    train, eval_set = corpus.pack(tokenizer, cfg.data.seq_len)
    teacher = build_from_spec(parse_spec(TINY_TEACHER), tokenizer, seed=1)

    def weights_after(grad_accum: int) -> dict[str, torch.Tensor]:
        training = cfg.training.model_copy(update={"batch_size": 8, "grad_accum": grad_accum})
        student = build_from_spec(
            parse_spec(TINY_STUDENT + ",attn_pdrop=0,resid_pdrop=0,embd_pdrop=0"), tokenizer, 0
        )
        strategies, _ = make_strategies(cfg.strategy)
        trainer = Trainer(student, teacher, train, eval_set, strategies, training, 2.0)
        for step in range(3):
            trainer.train_step(step)
        return {k: v.detach().clone() for k, v in trainer.full_student()[0].state_dict().items()}

    whole, accumulated = weights_after(1), weights_after(4)
    for key in whole:
        torch.testing.assert_close(accumulated[key], whole[key], rtol=1e-5, atol=1e-6)


def test_output_dir_with_a_finished_run_is_refused(finished):
    with pytest.raises(KdError, match="already holds a finished run"):
        run(resolve_config(None, tiny_overrides(finished.run_dir)), show_progress=False)


def test_missing_dataset_file_is_one_sentence(tmp_path):
    result = run_kd("run", "--dataset", str(tmp_path / "nope.txt"), "--output-dir", str(tmp_path / "out"))
    assert result.returncode == 2
    assert "dataset" in result.stderr and "not found" in result.stderr
    assert "Traceback" not in result.stderr


def _save_model(path, spec, tokenizer, vocab=None):
    from kdcore.inputs.models import build_from_spec, parse_spec

    spec = parse_spec(spec + (f",vocab_size={vocab}" if vocab else ""))
    model = build_from_spec(spec, tokenizer, 0)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_mismatched_tokenizers_fail_before_training(tmp_path):
    from kdcore.inputs.corpus import load_corpus
    from kdcore.inputs.tokenization import build_tokenizer

    texts = load_corpus(resolve_config(None, tiny_overrides(tmp_path)).data, 0).train_texts
    teacher = _save_model(tmp_path / "teacher", TINY_TEACHER, build_tokenizer("byte"))
    student = _save_model(tmp_path / "student", TINY_STUDENT, build_tokenizer("bpe:vocab_size=300", texts))
    overrides = tiny_overrides(
        tmp_path / "out", **{"model.teacher": str(teacher), "model.student": str(student)}
    )
    with pytest.raises(KdError, match=r"use different tokenizers .*one shared tokenizer"):
        run(resolve_config(None, overrides), show_progress=False)
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_too_small_vocabulary_is_refused(tmp_path):
    from kdcore.inputs.tokenization import build_tokenizer

    teacher = _save_model(tmp_path / "teacher", TINY_TEACHER, build_tokenizer("byte"))
    overrides = tiny_overrides(
        tmp_path / "out", **{"model.teacher": str(teacher), "model.student": TINY_STUDENT + ",vocab_size=100"}
    )
    with pytest.raises(KdError, match=r"the tokenizer has 259 tokens but .* student .* has 100 output rows"):
        run(resolve_config(None, overrides), show_progress=False)


def test_padded_vocabularies_distil_over_the_shared_prefix(tmp_path, capsys):
    from rich.console import Console

    from kdcore.inputs.tokenization import build_tokenizer

    teacher = _save_model(tmp_path / "teacher", TINY_TEACHER, build_tokenizer("byte"), vocab=272)
    overrides = tiny_overrides(tmp_path / "out", **{"model.teacher": str(teacher), "training.max_steps": 2})
    console = Console(stderr=True, soft_wrap=True)
    result = run(resolve_config(None, overrides), console=console, show_progress=False)
    assert "distilling over the shared first 259 tokens" in capsys.readouterr().err
    assert result.summary["steps"] == 2


def test_summary_json_is_the_run_summary(finished):
    """summary.json holds exactly RunSummary's fields, in order, and reads back equal to what run() returned."""
    from dataclasses import fields

    from kdcore.summary import RunSummary

    data = json.loads((finished.run_dir / "summary.json").read_text())
    assert list(data) == [f.name for f in fields(RunSummary)]
    assert RunSummary.read(finished.run_dir) == finished.summary
    assert finished.summary["mean_lambda"] == finished.summary.mean_lambda == data["mean_lambda"]
    assert dict(finished.summary) == {**data, "eval_curve": finished.summary.eval_curve}


def test_grad_norm_is_the_norm_before_clipping(tmp_path):
    """metrics' grad_norm against the gradients the optimizer receives (read by a step pre-hook)."""
    from kdcore.inputs.corpus import load_corpus
    from kdcore.inputs.models import build_from_spec, parse_spec
    from kdcore.inputs.tokenization import build_tokenizer
    from kdcore.training.engine import Trainer, make_strategies

    cfg = resolve_config(None, tiny_overrides(tmp_path))
    tokenizer = build_tokenizer("byte")
    train, eval_set = load_corpus(cfg.data, 0).pack(tokenizer, cfg.data.seq_len)
    teacher = build_from_spec(parse_spec(TINY_TEACHER), tokenizer, seed=1)

    def first_step(max_grad_norm: float | None) -> tuple[float, float]:
        """(grad_norm reported, norm of the gradient the optimizer applied) of step 1."""
        student = build_from_spec(
            parse_spec(TINY_STUDENT + ",attn_pdrop=0,resid_pdrop=0,embd_pdrop=0"), tokenizer, 0
        )
        strategies, _ = make_strategies(cfg.strategy)
        training = cfg.training.model_copy(update={"max_grad_norm": max_grad_norm})
        trainer = Trainer(student, teacher, train, eval_set, strategies, training, 2.0)
        applied = []
        trainer.optimizer.optimizer.register_step_pre_hook(
            lambda opt, args, kwargs: applied.append(
                float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in student.parameters()])))
            )
        )
        return float(trainer.train_step(0)["grad_norm"]), applied[0]

    reported, applied = first_step(None)
    assert reported == pytest.approx(applied, rel=1e-6)  # no clipping: the same norm, summed in another order
    assert reported > 0.01
    clipped_reported, clipped_applied = first_step(0.01)
    assert clipped_reported == pytest.approx(reported, rel=1e-6)  # reported before clipping
    assert clipped_applied == pytest.approx(0.01, rel=1e-4)  # what the optimizer got was clipped
