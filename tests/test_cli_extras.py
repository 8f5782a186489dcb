"""Shell completion, kd --version, and kd run --dry-run (checks everything, trains and writes nothing)."""

from __future__ import annotations

import math

import pytest
from conftest import TINY_STUDENT, TINY_TEACHER, run_kd, tiny_overrides
from typer.testing import CliRunner

import kdcore
from kdcore.cli import app
from kdcore.config import resolve_config
from kdcore.errors import KdError
from kdcore.files import cache_root
from kdcore.runs.dry_run import FUSED_COPIES, LOSS_CHUNK_TOKENS, LOSS_COPIES, dry_run, logits_memory


@pytest.mark.parametrize(
    ("shell", "marker"), [("bash", "complete -o default -F _kd_completion kd"), ("zsh", "#compdef kd")]
)
def test_show_completion_prints_a_script(shell, marker):
    # typer 0.29 detects the shell (shellingham); its documented test switch takes the shell as the value instead
    result = run_kd(
        "--show-completion", shell, env_extra={"_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION": "1"}
    )
    assert result.returncode == 0, result.stderr
    assert marker in result.stdout
    assert "_KD_COMPLETE=complete_" in result.stdout


def test_show_completion_detects_the_shell():
    result = run_kd("--show-completion", env_extra={"SHELL": "/bin/bash"})
    if result.returncode != 0 and "Shell" in result.stderr:
        pytest.skip(f"no shell detectable here: {result.stderr.strip()[:120]}")
    assert result.returncode == 0, result.stderr
    assert "_KD_COMPLETE=complete_" in result.stdout


def test_version():
    result = run_kd("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"kdcore {kdcore.__version__}"


def teacher_dirs() -> set[str]:
    root = cache_root() / "teachers"
    return {p.name for p in root.iterdir()} if root.is_dir() else set()


def test_dry_run_cli_prints_the_plan_and_writes_nothing(tmp_path):
    out = tmp_path / "run"
    before = teacher_dirs()
    args = [f"--{k}={v}" for k, v in (("teacher", TINY_TEACHER), ("student", TINY_STUDENT))]
    result = CliRunner().invoke(  # the real typer app, in-process (no second torch import)
        app,
        [
            "run",
            "--dry-run",
            *args,
            "--teacher-steps=13",  # a teacher nobody trains: the dry run must not train it either
            "--seq-len=48",
            "--max-steps=12",
            "--batch-size=8",
            "--set=data.demo_samples=160",
            "--set=data.train_share=1",
            "--output-dir",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    text = " ".join(result.stdout.split())
    for expected in (
        "dry-run",
        "total steps",
        "steps per epoch",
        "20 (batch 8)",
        "loss path │ fused: both heads",
        "teacher hidden states",
        "will be trained",
    ):
        assert expected in text, expected
    assert not out.exists()
    assert teacher_dirs() == before


def test_dry_run_numbers(tmp_path):
    overrides = {"model.teacher_steps": 11, "training.loss_path": "logits"}
    cfg = resolve_config(None, tiny_overrides(tmp_path / "run", **overrides))
    report = dry_run(cfg)
    assert not (tmp_path / "run").exists()
    assert report.loss_path == "logits" and report.loss_path_reason == "training.loss_path is logits"
    assert report.train_samples == 160 and report.eval_samples == 32  # the demo corpus: one sample per text
    assert report.steps_per_epoch == math.ceil(160 / 8) == 20
    assert report.total_steps == 12
    assert report.tokenizer_size == 259 == report.teacher.vocab_size == report.student.vocab_size
    tokens = 8 * 48
    assert report.memory["student logits"] == tokens * 259 * 4
    assert report.memory["student logits gradient"] == tokens * 259 * 4
    assert report.memory["teacher logits"] == tokens * 259 * 4
    assert report.memory["loss softmax copies"] == min(LOSS_CHUNK_TOKENS, tokens) * 259 * 4 * LOSS_COPIES
    parts = ("student logits", "student logits gradient", "teacher logits", "loss softmax copies")
    assert report.memory["logits total"] == sum(report.memory[k] for k in parts)
    from kdcore.inputs.models import build_from_spec, parse_spec

    class Tok:  # what build_from_spec reads from a tokenizer
        pad_token_id, eos_token_id, bos_token_id = 0, 1, None

        def __len__(self):
            return 259

    student = build_from_spec(parse_spec(TINY_STUDENT), Tok(), 0)
    assert report.student.parameters == sum(p.numel() for p in student.parameters())
    assert report.memory["student weights + grads + AdamW"] == 16 * report.student.parameters


def test_dry_run_takes_the_fused_path_when_both_heads_are_linear(tmp_path):
    cfg = resolve_config(None, tiny_overrides(tmp_path / "run", **{"model.teacher_steps": 11}))
    report = dry_run(cfg)
    assert report.loss_path == "fused"
    assert "student logits" not in report.memory and "teacher logits" not in report.memory
    tokens = 8 * 48  # student n_embd 16, teacher n_embd 32; the whole micro-batch fits one chunk
    assert report.memory["student hidden states and gradient"] == 2 * tokens * 16 * 4
    assert report.memory["teacher hidden states"] == tokens * 32 * 4
    assert report.memory["fused loss chunk"] == tokens * 259 * 4 * FUSED_COPIES
    parts = ("student hidden states and gradient", "teacher hidden states", "fused loss chunk")
    assert report.memory["loss total"] == sum(report.memory[k] for k in parts)


def test_half_precision_halves_the_student_logits():
    full = logits_memory(4, 100, 1000, 1000, "no")
    half = logits_memory(4, 100, 1000, 1000, "bf16")
    assert half["student logits"] * 2 == full["student logits"]
    assert half["teacher logits"] == full["teacher logits"]


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory):
    """A byte-tokenizer model directory and a BPE-tokenizer one (save_pretrained, no training)."""
    from kdcore.inputs.demo import generate_demo_corpus
    from kdcore.inputs.models import build_from_spec, parse_spec
    from kdcore.inputs.tokenization import build_tokenizer

    root = tmp_path_factory.mktemp("models")
    byte = build_tokenizer("byte")
    bpe = build_tokenizer("bpe:vocab_size=300", [text for text, _ in generate_demo_corpus(200, 0)])
    for name, tok in (("byte", byte), ("bpe", bpe)):
        model = build_from_spec(parse_spec(TINY_STUDENT), tok, 0)
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    return root


def test_dry_run_reads_directory_configs(saved_models, tmp_path):
    cfg = resolve_config(
        None, tiny_overrides(tmp_path / "run", **{"model.teacher": str(saved_models / "byte")})
    )
    report = dry_run(cfg)
    assert report.teacher.kind == "directory" and report.teacher.vocab_size == 259
    assert report.student.kind == "spec"
    assert not any("trained" in note for note in report.notes)


def test_dry_run_catches_different_tokenizers(saved_models, tmp_path):
    overrides = {"model.teacher": str(saved_models / "byte"), "model.student": str(saved_models / "bpe")}
    with pytest.raises(KdError, match="different tokenizers"):
        dry_run(resolve_config(None, tiny_overrides(tmp_path / "run", **overrides)))


def test_dry_run_catches_a_vocabulary_too_small(tmp_path):
    small = f"{TINY_STUDENT},vocab_size=100"
    cfg = resolve_config(
        None, tiny_overrides(tmp_path / "run", **{"model.student": small, "model.teacher_steps": 11})
    )
    with pytest.raises(KdError, match="the tokenizer has 259 tokens"):
        dry_run(cfg)


def test_dry_run_runs_the_sources_own_check_as_the_run_does(tmp_path):
    """The source's check (prompt + max_new_tokens within the models' positions) ran only once the
    models had loaded (after a spec teacher had trained); the dry run now runs it, with the same context."""
    student = f"{TINY_STUDENT},n_positions=64"
    overrides = {"model.student": student, "model.teacher_steps": 17}
    too_long = {"name": "on-policy", "params": {"max_new_tokens": 40}}
    cfg = resolve_config(None, tiny_overrides(tmp_path / "run", **overrides, **{"strategy.source": too_long}))
    before = teacher_dirs()
    with pytest.raises(KdError, match=r"^source 'on-policy': a prompt of 32 tokens and max_new_tokens 40 exceed "
                       r"the models' 64 positions; lower max_new_tokens or prompt_tokens$"):  # fmt: skip
        dry_run(cfg)
    fits = {"name": "on-policy", "params": {"max_new_tokens": 32}}
    dry_run(resolve_config(None, tiny_overrides(tmp_path / "run", **overrides, **{"strategy.source": fits})))
    assert teacher_dirs() == before and not (tmp_path / "run").exists()


def test_dry_run_with_a_teacher_cache(tmp_path):
    from rich.console import Console

    from kdcore.teachers.cache import build_cache

    cfg = resolve_config(None, tiny_overrides(tmp_path / "run"))
    build_cache(cfg, tmp_path / "cache", top_k=16, console=Console(quiet=True))
    cached = cfg.model_copy(
        update={"model": cfg.model.model_copy(update={"teacher_cache": tmp_path / "cache"})}
    )
    report = dry_run(cached)
    assert report.teacher.kind == "teacher cache, top-16" and report.teacher.vocab_size == 259
    # the student's head is linear: fused against the cache's top-K, no teacher hidden states nor logits
    assert report.loss_path == "fused" and "teacher cache's top-K" in report.loss_path_reason
    assert "teacher logits" not in report.memory and "teacher hidden states" not in report.memory
    assert report.memory["teacher top-K rows"] == 8 * 48 * 16 * 12
    parts = ("student hidden states and gradient", "fused loss chunk", "teacher top-K rows")
    assert report.memory["loss total"] == sum(report.memory[part] for part in parts)
    assert list(report.memory)[: len(parts) + 1] == [*parts, "loss total"]
    logits = dry_run(
        cached.model_copy(update={"training": cached.training.model_copy(update={"loss_path": "logits"})})
    )
    assert logits.loss_path == "logits" and "teacher logits" not in logits.memory
    assert logits.memory["teacher top-K rows"] == 8 * 48 * 16 * 12
    assert not (tmp_path / "run").exists()


def test_dry_run_counts_the_samples_a_train_share_leaves(tmp_path):
    from kdcore.runs.dry_run import data_row

    text = "".join(chr(97 + (i * 7) % 26) for i in range(20_000))  # 20,000 one-byte characters
    (tmp_path / "text.txt").write_text(text)
    overrides = tiny_overrides(tmp_path / "run", **{"data.dataset": str(tmp_path / "text.txt")})
    cfg = resolve_config(None, {**overrides, "data.seq_len": 64, "data.train_share": 0.05})
    report = dry_run(cfg)
    # 18,000 training characters after the 10 % held out; 5 % of them = 900 bytes = 14 rows of 64 + 4 tokens
    train = round(0.05 * (20_000 - 2_000))
    assert train == 900 and report.train_samples == math.ceil(train / 64) == 15
    assert report.eval_samples == 32  # 2,000 held-out bytes, capped at data.max_eval_samples
    assert data_row(cfg, report).endswith(
        "15 train / 32 eval samples (train: the first 0.05 of the training text)"
    )
    refused = CliRunner().invoke(app, ["run", "--dry-run", "--train-share=0"])
    assert refused.exit_code == 2 and "data.train_share: Input should be greater than 0" in refused.output


def test_trust_remote_code_names_the_models_whose_code_will_run(saved_models, tmp_path):
    teacher = str(saved_models / "byte")
    base = ["run", "--dry-run", f"--teacher={teacher}", f"--student={TINY_STUDENT}", "--seq-len=48"]
    base += ["--set=data.demo_samples=160", "--set=data.train_share=1", "--output-dir", str(tmp_path / "run")]
    trusted = CliRunner().invoke(app, [*base, "--trust-remote-code"])
    assert trusted.exit_code == 0, trusted.output
    lines = [line for line in trusted.output.splitlines() if "trust_remote_code" in line]
    assert lines == [
        f"warning: model.trust_remote_code is on: the Python code that comes with '{teacher}' will run on "
        "this machine"
    ]
    plain = CliRunner().invoke(app, base)
    assert plain.exit_code == 0 and "trust_remote_code" not in plain.output
    from kdcore.inputs.models import remote_code_warning

    assert remote_code_warning(TINY_TEACHER, TINY_STUDENT, True) is None  # specs bring no code
    assert "'a/b' and 'c/d'" in remote_code_warning("a/b", "c/d", True)


def test_dry_run_refuses_an_estimate_above_the_available_memory(tmp_path, monkeypatch):
    import kdcore.runs.dry_run as dr

    cfg = resolve_config(None, tiny_overrides(tmp_path / "run", **{"model.teacher_steps": 11}))
    report = dry_run(cfg)
    need = report.estimated_bytes()
    assert report.loss_path == "fused"  # both heads are linear: the loss's chunks, not full logits
    assert need == report.memory["loss total"] + 16 * report.student.parameters + 4 * (
        report.teacher.parameters
    )
    assert report.available is not None and report.available[0] > need  # the tiny run fits here
    monkeypatch.setattr(dr, "available_memory", lambda: (need - 1, "RAM"))
    with pytest.raises(KdError) as caught:
        dry_run(cfg)
    assert str(caught.value) == (
        f"this run needs at least {dr.human_bytes(need)} (one micro-batch's fused loss "
        f"{dr.human_bytes(report.memory['loss total'])}, plus the weights) but only "
        f"{dr.human_bytes(need - 1)} of RAM is available; lower --batch-size or --seq-len, or raise --grad-accum for smaller micro-batches"
    )
    monkeypatch.setattr(dr, "available_memory", lambda: (need, "RAM"))
    assert dry_run(cfg).available == (need, "RAM")
