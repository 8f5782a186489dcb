"""The CLI end to end: train-teacher, then kd run from that directory, on local text and real corpora."""

from __future__ import annotations

import json

import pytest
from conftest import SHARED_DATA, TINY_STUDENT, TINY_TEACHER, run_kd

TINY_RUN = [
    "--seq-len",
    "48",
    "--max-steps",
    "6",
    "--batch-size",
    "8",
    "--set",
    "data.max_eval_samples=16",
    "--set",
    "training.log_every=3",
]


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "tiny.txt"
    lines = [f"line {i}: the quick brown fox {i % 7} jumps over the lazy dog {i % 5}." for i in range(300)]
    path.write_text("\n".join(lines))
    return path


def test_train_teacher_then_distil_from_its_directory(tmp_path, text_file):
    teacher_dir = tmp_path / "teacher"
    trained = run_kd(
        "train-teacher",
        "--model",
        TINY_TEACHER,
        "--dataset",
        str(text_file),
        "--tokenizer",
        "bpe:vocab_size=300",
        "--output-dir",
        str(teacher_dir),
        "--seq-len",
        "48",
        "--max-steps",
        "10",
        "--batch-size",
        "8",
    )
    assert trained.returncode == 0, trained.stderr
    # kd's own progress bar is the only one: no tqdm bar from transformers ("Writing model shards")
    assert "Writing model shards" not in trained.stderr and "it/s]" not in trained.stderr
    assert (teacher_dir / "config.json").is_file() and (teacher_dir / "tokenizer.json").is_file()
    assert json.loads((teacher_dir / "kdcore_teacher.json").read_text())["steps"] == 10

    result = run_kd(
        "run",
        "--teacher",
        str(teacher_dir),
        "--student",
        TINY_STUDENT,
        "--dataset",
        str(text_file),
        "--output-dir",
        str(tmp_path / "run"),
        *TINY_RUN,
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["teacher"] == str(teacher_dir) and summary["steps"] == 6
    # the student reuses the teacher's BPE tokenizer, saved beside it
    student_tok = json.loads((tmp_path / "run" / "student" / "tokenizer.json").read_text())
    teacher_tok = json.loads((teacher_dir / "tokenizer.json").read_text())
    assert student_tok["model"]["vocab"] == teacher_tok["model"]["vocab"]
    assert "student eval perplexity" in result.stderr  # the end-of-run table
    assert "it/s]" not in result.stderr and "Loading weights" not in result.stderr

    again = run_kd("train-teacher", "--model", TINY_TEACHER, "--output-dir", str(teacher_dir))
    assert again.returncode == 2 and "already holds a model" in again.stderr


def test_tokenizer_flag_with_a_pretrained_teacher_is_refused(tmp_path, text_file):
    result = run_kd(
        "run",
        "--teacher",
        str(tmp_path),
        "--tokenizer",
        "byte",
        "--dataset",
        str(text_file),
        "--output-dir",
        str(tmp_path / "run"),
    )
    assert result.returncode == 2
    assert "could not load" in result.stderr or "--tokenizer applies only" in result.stderr


def test_unknown_model_type_in_a_spec(tmp_path):
    result = run_kd("run", "--student", "gpt9:n_layer=1", "--output-dir", str(tmp_path / "run"), *TINY_RUN)
    assert result.returncode == 2
    assert "unknown model type 'gpt9'" in result.stderr


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data is not present")
def test_a_short_run_on_tinyshakespeare(tmp_path):
    result = run_kd(
        "run",
        "--teacher",
        TINY_TEACHER,
        "--student",
        TINY_STUDENT,
        "--teacher-steps",
        "10",
        "--dataset",
        str(SHARED_DATA / "tinyshakespeare.txt"),
        "--output-dir",
        str(tmp_path / "run"),
        *TINY_RUN,
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["difficulty_spearman"] is None  # no known levels outside the demo corpus
    assert summary["student_eval_ppl"] < summary["student_initial_eval_ppl"]
