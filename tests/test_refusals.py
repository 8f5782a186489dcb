"""Bad input is refused before anything trains or is written: one sentence naming the problem and the
fix, exit code 2, no traceback."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import TINY_STUDENT, TINY_TEACHER
from typer.testing import CliRunner

from kdcore.cli import app


def tiny_args(output_dir: Path, *extra: str) -> list[str]:
    """kd run options for the tiny run of conftest.tiny_overrides."""
    return [
        f"--teacher={TINY_TEACHER}",
        f"--student={TINY_STUDENT}",
        "--teacher-steps=40",
        "--seq-len=48",
        "--set=data.demo_samples=160",
        "--set=data.train_share=1",
        "--set=data.max_eval_samples=32",
        "--max-steps=12",
        "--batch-size=8",
        "--output-dir",
        str(output_dir),
        *extra,
    ]


def refused(args: list[str], sentence: str) -> str:
    """Run ``kd ARGS`` in-process; it must exit 2 with ``error: SENTENCE...`` and no traceback."""
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, (result.output, result.exception)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {sentence}"), result.output
    assert "Traceback" not in result.output
    return errors[0]


@pytest.mark.parametrize("dry", [True, False])
def test_a_batch_larger_than_the_training_set(tmp_path, dry):
    out = tmp_path / "run"
    args = ["run", *tiny_args(out, "--batch-size=200"), *(["--dry-run"] if dry else [])]
    refused(
        args,
        "training.batch_size 200 is larger than the 160 training samples; lower --batch-size to at "
        "most 160, or train on more data",
    )
    assert not out.exists()


@pytest.mark.parametrize("dry", [True, False])
def test_samples_longer_than_a_model_s_positions(tmp_path, dry):
    out, flag = tmp_path / "run", ["--dry-run"] if dry else []
    refused(
        ["run", *tiny_args(out, "--seq-len=1500"), *flag],
        f"data.seq_len 1500 is longer than the 1024 positions teacher '{TINY_TEACHER}' accepts; lower "
        "--seq-len to at most 1024",
    )
    student = f"{TINY_STUDENT},n_positions=32"
    refused(
        ["run", *tiny_args(out, f"--student={student}"), *flag],
        f"data.seq_len 48 is longer than the 32 positions student '{student}' accepts; lower --seq-len "
        "to at most 32",
    )
    assert not out.exists()


def test_train_teacher_and_cache_teacher_check_the_positions_too(tmp_path):
    refused(
        ["train-teacher", f"--model={TINY_TEACHER},n_positions=16", "--output-dir", str(tmp_path / "t")],
        f"data.seq_len 128 is longer than the 16 positions model '{TINY_TEACHER},n_positions=16' accepts",
    )
    refused(
        ["cache-teacher", "--output", str(tmp_path / "c"), f"--teacher={TINY_TEACHER}", "--seq-len=2048"],
        f"data.seq_len 2048 is longer than the 1024 positions teacher '{TINY_TEACHER}' accepts",
    )
    assert not (tmp_path / "t").exists() and not (tmp_path / "c").exists()


@pytest.mark.parametrize(
    ("student", "sentence"),
    [
        (
            "gpt2:n_layers=1,n_embd=32,n_head=2",
            "model spec 'gpt2:n_layers=1,n_embd=32,n_head=2' has an unknown key 'n_layers'; did you mean "
            "'n_layer'?",
        ),
        (
            f"{TINY_STUDENT},bogus_key=3",
            f"model spec '{TINY_STUDENT},bogus_key=3' has an unknown key 'bogus_key'; see the fields of "
            "transformers.GPT2Config",
        ),
        (
            "gpt2:n_layer=two",
            "bad value in model spec 'gpt2:n_layer=two': Field 'n_layer' expected int, got str (value: "
            "'two'); e.g. gpt2:n_layer=2,n_embd=64",
        ),
    ],
)
def test_a_spec_with_an_unknown_key_or_a_bad_value(tmp_path, student, sentence):
    for flag in (["--dry-run"], []):
        refused(["run", *tiny_args(tmp_path / "run", f"--student={student}"), *flag], sentence)
    assert not (tmp_path / "run").exists()


def test_spec_keys_include_aliases_and_common_config_fields():
    from kdcore.inputs.models import parse_spec

    spec = parse_spec(
        "gpt2:num_hidden_layers=1,hidden_size=32,num_attention_heads=2,tie_word_embeddings=false"
    )
    assert spec.overrides["num_hidden_layers"] == 1 and spec.overrides["tie_word_embeddings"] is False
    assert parse_spec("llama:num_hidden_layers=2,hidden_size=64,intermediate_size=128").model_type == "llama"


@pytest.fixture(scope="module")
def broken_models(tmp_path_factory):
    """A saved tiny model with truncated weights, one without weights, one that needs its own code."""
    import json
    import shutil

    from kdcore.inputs.models import build_from_spec, parse_spec
    from kdcore.inputs.tokenization import build_tokenizer

    root = tmp_path_factory.mktemp("broken")
    tokenizer = build_tokenizer("byte")
    build_from_spec(parse_spec(TINY_STUDENT), tokenizer, 0).save_pretrained(root / "good")
    tokenizer.save_pretrained(root / "good")
    for name in ("truncated", "no-weights", "custom-code"):
        shutil.copytree(root / "good", root / name)
    weights = root / "truncated" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    (root / "no-weights" / "model.safetensors").unlink()
    config_path = root / "custom-code" / "config.json"
    config = json.loads(config_path.read_text())
    config.update(model_type="my-arch", auto_map={"AutoConfig": "configuration_my.MyConfig"})
    config_path.write_text(json.dumps(config))
    return root


def test_models_that_do_not_load_say_why_and_what_to_do(broken_models, tmp_path):
    out = tmp_path / "run"
    cases = {
        "truncated": "the weights of '{d}' are damaged or incomplete (Error while deserializing header: "
        "incomplete metadata, file not fully covered); save or download the model again",
        "no-weights": "could not load the model in '{d}': it has no weights (Error no file named "
        "model.safetensors, or pytorch_model.bin, found in directory {d}); pass a directory "
        "save_pretrained wrote, weights included",
        "custom-code": "'{d}' needs its own Python code to load (custom code in its repository); pass "
        "--trust-remote-code (model.trust_remote_code: true) if you trust that code",
    }
    for name, sentence in cases.items():
        directory = broken_models / name
        refused(["run", *tiny_args(out, f"--teacher={directory}")], sentence.format(d=directory))
    refused(
        ["run", "--dry-run", *tiny_args(out, f"--teacher={broken_models / 'custom-code'}")],
        cases["custom-code"].format(d=broken_models / "custom-code"),
    )
    assert not out.exists()


def test_an_output_dir_that_is_a_file_or_cannot_be_created(tmp_path):
    file = tmp_path / "a-file"
    file.write_text("not a directory")
    blocked = file / "below"
    for command, option in (
        (["run", *tiny_args(file)], "--output-dir"),
        (["train-teacher", f"--model={TINY_TEACHER}", "--output-dir", str(file)], "--output-dir"),
        (["cache-teacher", f"--teacher={TINY_TEACHER}", "--output", str(file)], "--output"),
        (["new-plugin", "my-scorer", "--output-dir", str(file)], "--output-dir"),
        (["compare", "--arm", "kd=reliance:fixed", "--output-dir", str(file)], "--output-dir"),
    ):
        refused(command, f"{option} '{file}' is a file; pass a directory")
        command[command.index(str(file))] = str(blocked)
        refused(
            command, f"{option} '{blocked}' cannot be created: '{file}' is a file; pass another directory"
        )
    assert file.read_text() == "not a directory"


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc")
def test_an_output_dir_in_proc_is_refused_before_training(tmp_path):
    where = "(No such file or directory in '/proc'); pass a directory you can write to"
    refused(
        ["run", *tiny_args(Path("/proc/x"))], f"--output-dir '/proc/x' cannot be created or written {where}"
    )
    refused(
        ["cache-teacher", f"--teacher={TINY_TEACHER}", "--output", "/proc/x"],
        f"--output '/proc/x' cannot be created or written {where}",
    )
    run_dir = tmp_path / "run"
    (run_dir).mkdir()
    (run_dir / "config.yaml").write_text("model: {}\n")
    refused(
        ["report", str(run_dir), "-o", "/proc/x/report.html"],
        f"the directory of --output '/proc/x' cannot be created or written {where}",
    )
    refused(["report", str(run_dir), "-o", str(tmp_path)], f"--output '{tmp_path}' is a directory")


def test_a_negative_seed_is_refused_in_run_and_compare(tmp_path):
    refused(
        ["run", *tiny_args(tmp_path / "run", "--seed=-1")],
        "invalid config: training.seed: Input should be greater than or equal to 0",
    )
    arm = ["compare", "--arm", "kd=reliance:fixed", "--output-dir", str(tmp_path / "cmp")]
    refused([*arm, "--seeds", "0,-1"], "--seeds -1 is not a seed; use an integer from 0 to 4294967295")
    refused([*arm, "--teacher-seed", "-3"], "--teacher-seed -3 is not a seed; use an integer from 0 to")
    assert not (tmp_path / "run").exists() and not (tmp_path / "cmp").exists()


@pytest.mark.parametrize(
    ("name", "content", "byte"),
    [
        ("latin1.txt", "café au lait\n".encode("latin-1") * 50, "0xe9"),
        ("binary.txt", bytes(range(128, 256)), "0x80"),
    ],
)
def test_data_that_is_not_utf8_names_the_encoding_and_the_fix(tmp_path, name, content, byte):
    data = tmp_path / name
    data.write_bytes(content)
    refused(
        ["run", *tiny_args(tmp_path / "run", f"--dataset={data}")],
        f"could not read {data}: it is not UTF-8 text (byte {byte} is not valid UTF-8); convert it, e.g. "
        "iconv -f latin1 -t utf-8 IN > OUT, or pass a text file if it is binary",
    )
    assert not (tmp_path / "run").exists()


def test_a_set_without_a_field_name(tmp_path):
    refused(["run", "--print-config", "--set", "=3"], "expected key=value, got '=3' with nothing before '='")
    refused(["run", "--print-config", "--scorer-arg", "=3"], "expected key=value, got '=3'")
    for dotted in ("training.", ".seed", "training..seed"):
        refused(
            ["run", "--print-config", "--set", f"{dotted}=3"],
            f"'{dotted}' is not a config field: a name between dots is empty; e.g. training.seed",
        )


def test_a_directory_as_config(tmp_path):
    refused(
        ["run", "--print-config", "--config", str(tmp_path)],
        f"config file '{tmp_path}' is a directory; pass a YAML or JSON file",
    )
    (tmp_path / "config.yaml").write_text("training: {seed: 1}\n")
    refused(
        ["run", "--print-config", "--config", str(tmp_path)],
        f"config file '{tmp_path}' is a directory; pass a YAML or JSON file such as '{tmp_path / 'config.yaml'}'",
    )


def test_kd_report_refuses_a_garbled_summary(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("model: {}\n")
    (run_dir / "summary.json").write_text('{"student_eval_ppl": 12.')
    sentence = refused(
        ["report", str(run_dir)], f"'{run_dir / 'summary.json'}' is damaged, it is not valid JSON ("
    )
    assert sentence.endswith("); restore it, or remove it to report what is left")
    assert not (run_dir / "report.html").exists()
    (run_dir / "summary.json").unlink()
    assert CliRunner().invoke(app, ["report", str(run_dir)]).exit_code == 0  # an unfinished run is reported


def test_a_start_that_fails_writes_nothing_and_a_failed_start_does_not_block_a_rerun(
    cached_tiny_teacher, tmp_path, monkeypatch
):
    from conftest import tiny_overrides

    import kdcore.runs.runner
    from kdcore.config import resolve_config
    from kdcore.errors import KdError

    out = tmp_path / "run"

    def failing_trainer(*args, **kwargs):  # the last check before training, e.g. the batch size
        raise KdError("simulated refusal")

    monkeypatch.setattr(kdcore.runs.runner, "Trainer", failing_trainer)
    with pytest.raises(KdError, match="simulated refusal"):
        kdcore.runs.runner.run(resolve_config(None, tiny_overrides(out)), show_progress=False)
    assert not out.exists()
    out.mkdir()  # what a start that failed later (a tracker that would not start) leaves
    (out / "config.yaml").write_text("stale: true\n")
    (out / "strategies.yaml").write_text("stale: true\n")
    assert kdcore.runs.runner.check_run_dir(out) == out  # reused: a rerun overwrites both files
    (out / "metrics.jsonl").write_text("{}\n")  # a run that trained is another matter
    with pytest.raises(KdError, match=f"output directory '{out}' is not empty"):
        kdcore.runs.runner.check_run_dir(out)
