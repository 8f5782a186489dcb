"""Hostile inputs found by the second hardening round: each is one sentence and exit 2, or the behaviour a
user means, never a traceback."""

from __future__ import annotations

import pytest
from test_refusals import refused


def test_a_config_nested_too_deeply_or_binary_is_one_sentence(tmp_path):
    deep = tmp_path / "deep.yaml"
    deep.write_text("a: " + "[" * 5000 + "]" * 5000 + "\n")
    deep_json = tmp_path / "deep.json"
    deep_json.write_text('{"a": ' + "[" * 5000 + "]" * 5000 + "}")
    for path in (deep, deep_json):
        refused(
            ["run", "--print-config", "--config", str(path)],
            f"config file '{path}' is nested too deeply to read; a run config is a few levels of sections",
        )
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"ab\xa8\x00\xff")
    refused(
        ["run", "--print-config", "--config", str(binary)],
        f"config file '{binary}' is not UTF-8 text (byte 0xa8 at offset 2); pass a YAML or JSON file",
    )


def test_scientific_notation_is_a_float_everywhere(tmp_path):
    from kdcore.compare.arms import parse_strategy_spec
    from kdcore.config import load_yaml, parse_assignment, resolve_config
    from kdcore.inputs.models import parse_spec

    spec = parse_spec("llama:num_hidden_layers=1,hidden_size=16,num_attention_heads=2,rms_norm_eps=1e-5")
    assert spec.overrides["rms_norm_eps"] == 1e-5
    assert parse_assignment("strategy.reliance.params.value=5e-1") == ("strategy.reliance.params.value", 0.5)
    config = tmp_path / "config.yaml"
    config.write_text("training: {lr: 1e-5}\nstrategy: {reliance: {name: fixed, params: {value: 5E-1}}}\n")
    cfg = resolve_config(config)
    assert cfg.training.lr == 1e-5 and cfg.strategy.reliance.params["value"] == 0.5
    assert parse_strategy_spec("reliance:fixed(value=2e-1)", "--arm kd")["reliance"]["params"] == {
        "value": 0.2
    }
    # what YAML 1.1 already read stays as it was
    assert load_yaml("[12, 1.5e-3, 0x10, '1e-5', 1e5x, a1e5]") == [12, 1.5e-3, 16, "1e-5", "1e5x", "a1e5"]


@pytest.mark.parametrize("flag", ["--set=training.lr=1e-5", "--lr=1e-5"])
def test_scientific_notation_on_the_command_line(tmp_path, flag):
    from typer.testing import CliRunner

    from kdcore.cli import app

    result = CliRunner().invoke(app, ["run", "--print-config", flag])
    assert result.exit_code == 0, result.output
    assert "lr: 1.0e-05" in result.output


@pytest.mark.parametrize("below", [False, True])
def test_a_cache_root_that_is_a_file(tmp_path, monkeypatch, below):
    from test_refusals import tiny_args

    file = tmp_path / "cache"
    file.write_text("not a directory")
    root = file / "kd" if below else file
    monkeypatch.setenv("KD_CACHE_DIR", str(root))
    problem = f"cannot be created: '{file}' is a file" if below else "is a file"
    refused(
        ["run", *tiny_args(tmp_path / "run")],
        f"KD_CACHE_DIR '{root}' {problem}; set KD_CACHE_DIR to a directory",
    )
    assert not (tmp_path / "run").exists() and file.read_text() == "not a directory"


CHAT_ROW = b'{"prompt": "Say hi.", "completion": "hi"}\n'


@pytest.mark.parametrize("chat", [False, True])
@pytest.mark.parametrize("line", [1, 2])
def test_a_chat_file_that_is_not_utf8_names_its_line(tmp_path, chat, line):
    from test_refusals import tiny_args

    data = tmp_path / "chat.jsonl"
    bad = b'{"prompt": "caf\xe9", "completion": "hi"}\n'
    data.write_bytes(CHAT_ROW * (line - 1) + bad + CHAT_ROW)
    flag = ["--set=data.format=chat"] if chat else []
    refused(
        ["run", *tiny_args(tmp_path / "run", f"--dataset={data}", *flag)],
        f"could not read line {line} of '{data}': it is not UTF-8 text (byte 0xe9 is not valid UTF-8); "
        "convert it, e.g. iconv -f latin1 -t utf-8 IN > OUT",
    )
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name", ["empty.jsonl", "blank.jsonl", "empty.json", "empty.csv", "empty.txt"])
def test_an_empty_data_file_says_it_is_empty(tmp_path, name):
    from test_refusals import tiny_args

    data = tmp_path / name
    data.write_text("\n \n" if name.startswith("blank") else "")
    for dry in ([], ["--dry-run"]):
        refused(
            ["run", *tiny_args(tmp_path / "run", f"--dataset={data}", *dry)],
            f"dataset file '{data}' is empty; pass a file with text in it",
        )
    assert not (tmp_path / "run").exists()


def test_a_chat_file_with_a_byte_order_mark_is_chat(tmp_path):
    from kdcore.config import DataConfig
    from kdcore.inputs.chat import read_jsonl
    from kdcore.inputs.corpus import _chat_format

    data = tmp_path / "chat.jsonl"
    data.write_bytes(b"\xef\xbb\xbf" + CHAT_ROW * 3)
    assert _chat_format(DataConfig(dataset=str(data)))
    assert [record for _, record in read_jsonl(data)] == [{"prompt": "Say hi.", "completion": "hi"}] * 3


# -- crafted checkpoints and run directories ----------------------------------------------------------------
@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    """A finished 12-step run with checkpoints step-8 and step-12."""
    from conftest import tiny_overrides

    from kdcore.config import resolve_config
    from kdcore.runs.runner import run

    tmp = tmp_path_factory.mktemp("short")
    overrides = {**tiny_overrides(tmp / "run"), "training.checkpoint_every": 4}
    return run(resolve_config(None, overrides), show_progress=False).run_dir


def test_damaged_weights_with_a_rewritten_hash_fall_back_to_the_previous_checkpoint(
    short_run, tmp_path, capsys
):
    import hashlib
    import json

    from conftest import assert_same_run
    from test_resume import resume_in_process, unfinished_copy

    run_dir = unfinished_copy(short_run, tmp_path)
    step = run_dir / "checkpoints" / "step-12"
    weights = step / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[10:20] = b"\xff" * 10  # inside the JSON header
    weights.write_bytes(bytes(data))
    meta = json.loads((step / "checkpoint.json").read_text())
    meta["files"]["model.safetensors"] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (step / "checkpoint.json").write_text(json.dumps(meta))
    resume_in_process(run_dir)
    err = capsys.readouterr().err
    assert f"checkpoint {step} is damaged: model.safetensors cannot be read (Error while deserializing" in err
    assert f"Resuming {run_dir} from {run_dir / 'checkpoints' / 'step-8'} (step 8)" in err
    assert_same_run(run_dir, short_run)


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (
            {"files": {"model.safetensors": "oops"}},
            'the entry of model.safetensors is "oops", not its bytes and sha256',
        ),
        ({"files": ["model.safetensors"]}, "its files are not a mapping of file names"),
        ({"backend": "ddp"}, 'its backend is "ddp", not a mapping with a type'),
        ({"world_size": "two"}, 'its world_size is "two", not a number of processes'),
        ({"step": -12}, "its step is -12 in a directory named step-12"),
        ({"step": 4}, "its step is 4 in a directory named step-12"),
        ({"format": "2"}, 'its format is "2", not a number from 1 to 2'),
        ({"format": None}, "its format is null, not a number from 1 to 2"),
        ({"metrics_bytes": -1}, "its metrics_bytes is -1, not a size"),
    ],
)
def test_a_checkpoint_json_with_wrong_types_is_damaged(short_run, tmp_path, change, problem):
    import json

    from test_resume import unfinished_copy

    from kdcore.training.checkpoint import CheckpointDamaged, verify

    run_dir = unfinished_copy(short_run, tmp_path)
    step = run_dir / "checkpoints" / "step-12"
    meta = {**json.loads((step / "checkpoint.json").read_text()), **change}
    (step / "checkpoint.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointDamaged) as caught:
        verify(step)
    assert str(caught.value) == f"checkpoint {step} is damaged: checkpoint.json is not valid ({problem})"
    import shutil

    shutil.rmtree(run_dir / "checkpoints" / "step-8")
    refused(
        ["run", "--resume", str(run_dir)],
        f"no valid checkpoint in {run_dir / 'checkpoints'} (checkpoint {step} is damaged: checkpoint.json "
        f"is not valid ({problem})); remove that directory",
    )


def test_a_checkpoint_of_a_newer_format_is_refused(short_run, tmp_path):
    import json

    from test_resume import unfinished_copy

    run_dir = unfinished_copy(short_run, tmp_path)
    step = run_dir / "checkpoints" / "step-12"
    meta = {**json.loads((step / "checkpoint.json").read_text()), "format": 3}
    (step / "checkpoint.json").write_text(json.dumps(meta))
    refused(
        ["run", "--resume", str(run_dir)],
        f"checkpoint {step} has format 3, written by a newer kdcore (this one reads formats 1 to 2); resume "
        "it with that kdcore, or upgrade kdcore",
    )
    assert not (run_dir / "summary.json").exists()


def test_a_trainer_state_whose_step_is_not_its_directory_s_is_damaged(short_run, tmp_path):
    import io

    import torch
    from test_resume import unfinished_copy

    from kdcore.training.checkpoint import CheckpointDamaged, read_state

    run_dir = unfinished_copy(short_run, tmp_path)
    step = run_dir / "checkpoints" / "step-12"
    state = read_state(step)
    state["step"] = -3
    buffer = io.BytesIO()
    torch.save(state, buffer)
    (step / "trainer_state.pt").write_bytes(buffer.getvalue())
    with pytest.raises(CheckpointDamaged, match=r"step-12 is damaged: trainer_state.pt holds step -3"):
        read_state(step)


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (None, "is missing, so"),
        ('scorer: !!python/object/apply:os.system ["touch PAYLOAD"]\n', "is damaged (could not determine a "),
        ("scorer: [\n", "is damaged (while parsing a flow node)"),
        ("- scorer\n- pacing\n", "is damaged (it is not a mapping of strategy kinds)"),
    ],
)
def test_a_run_s_strategies_yaml_missing_unsafe_or_garbled_is_refused_on_resume(
    short_run, tmp_path, monkeypatch, content, problem
):
    from test_resume import unfinished_copy

    monkeypatch.chdir(tmp_path)
    run_dir = unfinished_copy(short_run, tmp_path)
    path = run_dir / "strategies.yaml"
    if content is None:
        path.unlink()
    else:
        path.write_text(content)
    sentence = refused(["run", "--resume", str(run_dir)], f"'{path}' {problem}")
    assert sentence.endswith("cannot be checked; restore it, or start a new run")
    assert not (tmp_path / "PAYLOAD").exists() and not (run_dir / "summary.json").exists()


@pytest.mark.parametrize(
    ("command", "flag", "pair"),
    [
        (["run", "--print-config"], ["--lr", "0.01"], "training.lr=0.1"),
        (["run", "--print-config"], ["--max-steps", "5"], "training.max_steps=7"),
        (["run", "--print-config"], ["--train-share", "0.5"], "data.train_share=0.2"),
        (["run", "--print-config"], ["--lambda", "0.3"], "strategy.reliance.params.value=0.2"),
        (["run", "--print-config"], ["--reliance-arg", "value=0.3"], "strategy.reliance.params.value=0.2"),
        (["compare", "--arm", "kd=reliance:fixed"], ["--max-steps", "5"], "training.max_steps=7"),
        (["compare", "--arm", "kd=reliance:fixed"], ["--train-share", "0.5"], "data.train_share=0.2"),
        (["cache-teacher", "--output", "CACHE"], ["--seq-len", "32"], "data.seq_len=64"),
    ],
)
def test_a_set_that_contradicts_a_flag_is_refused(tmp_path, command, flag, pair):
    command = [str(tmp_path / "c") if part == "CACHE" else part for part in command]
    out = ["--output-dir", str(tmp_path / "out")] if command[0] == "compare" else []
    field = pair.split("=")[0]
    refused(
        [*command, *out, *flag, "--set", pair],
        f"--set {pair} contradicts {' '.join(flag)}, which sets {field} too; pass only one of them",
    )
    assert list(tmp_path.iterdir()) == []


def test_a_set_that_agrees_with_a_flag_is_fine():
    from typer.testing import CliRunner

    from kdcore.cli import app

    result = CliRunner().invoke(app, ["run", "--print-config", "--lr", "0.1", "--set", "training.lr=0.1"])
    assert result.exit_code == 0 and "lr: 0.1" in result.output


# -- one huge row costs what seq_len tokens do ---------------------------------------------------------------------
def _spy_on_calls(monkeypatch, tokenizer) -> list[int]:
    """The longest text (or message content) each call to ``tokenizer`` was handed."""
    seen: list[int] = []
    cls = type(tokenizer)
    call, template = cls.__call__, cls.apply_chat_template

    def spy_call(self, text, *args, **kwargs):
        seen.append(max(map(len, [text] if isinstance(text, str) else text), default=0))
        return call(self, text, *args, **kwargs)

    def spy_template(self, conversation, *args, **kwargs):
        seen.append(max((len(m["content"]) for m in conversation), default=0))
        return template(self, conversation, *args, **kwargs)

    monkeypatch.setattr(cls, "__call__", spy_call)
    monkeypatch.setattr(cls, "apply_chat_template", spy_template)
    return seen


def _bpe():
    from kdcore.inputs.tokenization import build_tokenizer

    return build_tokenizer("bpe:vocab_size=300", ["the cat sat on the mat, and the dog sat on the log"] * 20)


def test_a_huge_text_row_reaches_the_tokenizer_in_bounded_pieces(monkeypatch):
    from kdcore.inputs import tokenization
    from kdcore.inputs.tokenization import encode_texts, pieces

    tokenizer = _bpe()
    row = "the cat sat on the mat " * 2000 + "x" * 5000  # words, then one word longer than a piece
    whole = tokenizer(row[:46000], add_special_tokens=False, split_special_tokens=True)["input_ids"]
    monkeypatch.setattr(tokenization, "MAX_CHARS_PER_CALL", 2000)
    assert "".join(pieces(row)) == row and max(map(len, pieces(row))) <= 2000
    seen = _spy_on_calls(monkeypatch, tokenizer)
    short, long = encode_texts(["the dog", row], tokenizer)
    assert seen and max(seen) <= 2000
    assert long[: len(whole) - 1].tolist() == whole[:-1]  # cut before spaces: the words' own tokens
    assert short.tolist() == tokenizer("the dog", add_special_tokens=False)["input_ids"]


def test_a_huge_chat_row_is_cut_before_it_is_tokenised(monkeypatch):
    from test_chat import word_tokenizer

    from kdcore.inputs.chat import encode_chat
    from kdcore.inputs.tokenization import longest_token

    huge = "the cat sat " * 400_000  # 4.8 M characters
    seq_len = 16
    bpe = _bpe()
    limit = (seq_len + 1) * longest_token(bpe)
    seen = _spy_on_calls(monkeypatch, bpe)
    rows = [(1, {"prompt": "hi", "completion": huge}), (2, {"prompt": huge, "completion": "ok"})]
    samples = encode_chat([*rows, (3, {"prompt": "hi", "completion": "the cat"})], bpe, seq_len)
    assert max(seen) <= limit < 1000
    assert samples.rows == [1, 3] and samples.truncated == [1] and samples.dropped == [2]
    small = encode_chat([(1, {"prompt": "hi", "completion": huge[:5000]})], bpe, seq_len)
    assert samples.input_ids[0].tolist() == small.input_ids[0].tolist()

    words = word_tokenizer(extra_text="the cat sat hi ok")
    seen = _spy_on_calls(monkeypatch, words)
    talk = [
        (1, {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": huge}]}),
        (2, {"messages": [{"role": "user", "content": huge}, {"role": "assistant", "content": "ok"}]}),
        (3, {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]}),
    ]
    samples = encode_chat(talk, words, seq_len)
    assert max(seen) <= (seq_len + 1) * longest_token(words) + 100 < 1000  # the content and the template
    assert samples.rows == [1, 3] and samples.truncated == [1] and samples.dropped == [2]
    small = encode_chat(
        [(1, {"messages": [*talk[0][1]["messages"][:1], {"role": "assistant", "content": huge[:600]}]})],
        words,
        seq_len,
    )
    assert samples.input_ids[0].tolist() == small.input_ids[0].tolist()


@pytest.mark.slow
def test_a_50_mb_row_stays_within_a_bounded_memory(tmp_path):
    """Peak memory of packing one 50 MB row with a BPE tokenizer, in a fresh process: its token ids, not the
    ~9 GB the tokenizer would hold for the whole row at once."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(
        """
        import resource
        from kdcore.inputs.packing import pack
        from kdcore.inputs.tokenization import build_tokenizer
        tokenizer = build_tokenizer("bpe:vocab_size=300", ["the cat sat on the mat"] * 20)
        row = "the cat sat on the mat " * 2_200_000
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        packed = pack([row], tokenizer, 128)
        print(len(packed), (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    samples, peak_mb = map(int, out.stdout.split())
    assert samples > 1000 and peak_mb < 1500, out.stdout


# -- GGUF teachers ------------------------------------------------------------------------------------------------
def test_a_directory_named_like_a_gguf_file(tmp_path):
    from test_refusals import tiny_args

    folder = tmp_path / "x.gguf"
    folder.mkdir()
    for dry in ([], ["--dry-run"]):
        refused(
            ["run", *tiny_args(tmp_path / "run", f"--teacher={folder}", *dry)],
            f"'{folder}' is a directory, not a GGUF file; pass the .gguf file itself, or a save_pretrained "
            "directory",
        )
    (folder / "model.gguf").write_bytes(b"GGUF")
    refused(
        ["run", *tiny_args(tmp_path / "run", f"--teacher={folder}")],
        f"'{folder}' is a directory, not a GGUF file; pass the .gguf file itself such as "
        f"'{folder / 'model.gguf'}', or",
    )
    assert not (tmp_path / "run").exists()


def test_a_teacher_cache_follows_the_gguf_file_s_content_not_its_path(tmp_path, monkeypatch):
    pytest.importorskip("gguf")
    from conftest import tiny_overrides
    from rich.console import Console
    from tiny_gguf import tiny_llama, write_gguf
    from typer.testing import CliRunner

    from kdcore.cli import app
    from kdcore.config import resolve_config
    from kdcore.inputs.corpus import load_corpus
    from kdcore.teachers.cache import open_for_run

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("KD_CACHE_DIR", str(tmp_path / "kd-cache"))
    write_gguf(tiny_llama(seed=0), tmp_path / "teacher.gguf")
    data = ["--set", "data.demo_samples=40", "--set", "data.max_eval_samples=8", "--seq-len", "24"]
    data += ["--set", "data.train_share=1"]
    result = CliRunner().invoke(
        app, ["cache-teacher", "--output", "cache", "--teacher", "teacher.gguf", "--top-k", "4", *data]
    )
    assert result.exit_code == 0, result.output

    def open_with(teacher: str) -> None:
        overrides = tiny_overrides(tmp_path / "run", **{"data.seq_len": 24, "data.demo_samples": 40})
        overrides.update(
            {"data.max_eval_samples": 8, "model.teacher": teacher, "model.teacher_cache": "cache"}
        )
        cfg = resolve_config(None, overrides)
        open_for_run(cfg, load_corpus(cfg.data, 0), Console(quiet=True))

    open_with("teacher.gguf")
    open_with(str(tmp_path / "teacher.gguf"))  # the same file by its absolute path
    write_gguf(tiny_llama(seed=1), tmp_path / "teacher.gguf")  # another model at the same path
    with pytest.raises(Exception, match=r"does not match this run: its teacher .*a GGUF file is its content"):
        open_with("teacher.gguf")


# -- messages that name the problem and the fix -------------------------------------------------------------------
def test_on_policy_with_lambda_0_says_to_raise_lambda(tmp_path):
    from test_refusals import tiny_args

    refused(
        ["run", *tiny_args(tmp_path / "run", "--source=on-policy", "--lambda=0", "--dry-run")],
        "source 'on-policy' trains on the teacher term alone and reliance 'fixed' sets every λ to 0, so "
        "nothing would be learnt; raise --lambda above 0, or choose another reliance policy",
    )


@pytest.mark.parametrize(
    ("args", "sentence"),
    [
        (["--lambda=nan"], "bad parameters for reliance 'fixed': value is nan, not a number; give a number"),
        (
            ["--reliance=threshold", "--reliance-arg", "quantile=nan"],
            "bad parameters for reliance 'threshold': quantile is nan, not a number; give a number",
        ),
        (
            ["--set", "data.train_share=nan"],
            "invalid config: data.train_share: Input should be a finite number",
        ),
        (["--set", "training.lr=.inf"], "invalid config: training.lr: Input should be a finite number"),
    ],
)
def test_nan_is_not_a_number(tmp_path, args, sentence):
    from test_refusals import tiny_args

    refused(["run", *tiny_args(tmp_path / "run", *args, "--dry-run")], sentence)


def test_a_fsdp_variable_is_named_as_such(monkeypatch):
    from accelerate.utils import DistributedType

    from kdcore.errors import KdError
    from kdcore.training import parallel

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.delenv("FSDP_VERSION", raising=False)
    with pytest.raises(KdError) as caught:
        parallel.check_backend(DistributedType.NO)
    assert str(caught.value).startswith(
        "ACCELERATE_USE_FSDP=true (from an accelerate config or the environment) with no FSDP_VERSION asks "
        "for FSDP version 1; kdcore shards with FSDP2"
    )


def test_strategy_parameters_in_a_kd_run_name_point_to_the_arg_flag(tmp_path):
    from test_refusals import tiny_args

    refused(
        ["run", *tiny_args(tmp_path / "run", "--reliance=threshold(invert=true, quantile=0.5)")],
        "--reliance takes a name alone, not 'threshold(invert=true, quantile=0.5)'; pass its parameters "
        "with --reliance-arg, e.g. --reliance threshold --reliance-arg invert=true --reliance-arg quantile=0.5",
    )


def test_lambda_with_another_policy_suggests_only_what_it_accepts(tmp_path, monkeypatch):
    from pydantic import BaseModel
    from test_refusals import tiny_args

    from kdcore import plugins

    refused(
        ["run", *tiny_args(tmp_path / "run", "--reliance=threshold", "--lambda=0.3")],
        "--lambda sets the fixed policy's λ; reliance 'threshold' takes its own parameters, e.g. "
        "--reliance-arg lambda_hard=... (it accepts quantile, lambda_hard,",
    )
    refused(
        ["run", *tiny_args(tmp_path / "run", "--reliance=none", "--lambda=0.3")],
        "--lambda sets the fixed policy's λ; reliance 'none' takes no parameters; drop --lambda, or use "
        "--reliance fixed",
    )

    class Params(BaseModel):  # a plugin's policy: no lambda_hard
        strength: float = 0.5

    class Entry:
        cls = type("Mine", (), {"Params": Params})

    class Registry:
        def entry(self, kind, name):
            return Entry()

    monkeypatch.setattr(plugins, "get_registry", lambda: Registry())
    from kdcore.cli.run import _own_parameters

    assert _own_parameters("reliance", "mine") == (
        "takes its own parameters, e.g. --reliance-arg strength=... (it accepts strength)"
    )


def test_a_truncated_converted_gguf_copy_says_to_delete_the_cache_entry(tmp_path, monkeypatch):
    pytest.importorskip("gguf")
    from tiny_gguf import tiny_llama, write_gguf

    from kdcore.errors import KdError
    from kdcore.inputs.gguf import converted_directory
    from kdcore.inputs.models import load_pretrained

    monkeypatch.setenv("KD_CACHE_DIR", str(tmp_path / "cache"))
    path = write_gguf(tiny_llama(seed=0), tmp_path / "tiny.gguf")
    directory = converted_directory(str(path))
    weights = directory / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(KdError) as caught:
        load_pretrained(str(path))
    assert str(caught.value) == (
        f"the converted copy of tiny.gguf in {directory} is damaged (model.safetensors: Error while "
        "deserializing header: incomplete metadata, file not fully covered); delete that directory, and the "
        "next run converts the GGUF file again"
    )


def test_cache_teacher_with_a_cut_teacher_does_not_suggest_student(tmp_path):
    refused(
        ["cache-teacher", "--output", str(tmp_path / "c"), "--teacher", "from-teacher:num_layers=1"],
        "'from-teacher:num_layers=1' describes a student cut from a teacher, and kd cache-teacher caches a "
        "teacher's outputs; pass --teacher a hub id, directory, GGUF file or spec",
    )
    assert not (tmp_path / "c").exists()


def test_a_cut_that_fails_prints_no_success_first(tmp_path):
    from test_refusals import tiny_args
    from typer.testing import CliRunner

    from kdcore.cli import app

    opt = "opt:num_hidden_layers=2,hidden_size=32,num_attention_heads=2,ffn_dim=64,max_position_embeddings=64"
    args = ["run", *tiny_args(tmp_path / "run", f"--teacher={opt}", "--student=from-teacher:num_layers=1")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "error: cannot cut a student from a 'opt' teacher" in result.output
    assert "Student cut from the teacher" not in result.output
    assert not (tmp_path / "run").exists()


def test_a_cache_from_another_train_share_names_the_share(tmp_path):
    from test_refusals import tiny_args

    cache = tmp_path / "cache"
    data = ["--set=data.demo_samples=160", "--set=data.max_eval_samples=32", "--seq-len=48"]
    teacher = ["--teacher=gpt2:n_layer=2,n_embd=32,n_head=2", "--set=model.teacher_steps=40"]
    from typer.testing import CliRunner

    from kdcore.cli import app

    made = ["cache-teacher", "--output", str(cache), *teacher, *data, "--set=data.train_share=0.5"]
    result = CliRunner().invoke(app, made)
    assert result.exit_code == 0, result.output
    for dry in (["--dry-run"], []):
        refused(
            ["run", *tiny_args(tmp_path / "run", f"--teacher-cache={cache}", *dry)],
            f"teacher cache '{cache}' holds the first 0.5 of the training text (data.train_share) and this run "
            "trains on 1; pass --train-share 0.5, or rebuild the cache with kd cache-teacher --set "
            "data.train_share=1",
        )
    assert not (tmp_path / "run").exists()


def test_equal_time_without_a_generating_arm_says_so_in_a_note():
    from kdcore import compare as cmp

    plan = cmp.build_plan(arm_texts=["kd=reliance:fixed"], sweep="none", matched=False, equal_time=True)
    assert plan.timed_arms() == []
    assert plan.notes[-1] == (
        "--equal-time adds no run: it reruns each arm whose source is not the dataset (e.g. source:on-policy) "
        "for 'kd's training time, and every arm here trains on the dataset"
    )
    timed = cmp.build_plan(
        arm_texts=["op=source:on-policy,reliance:fixed"], sweep="none", matched=False, equal_time=True
    )
    assert not any(note.startswith("--equal-time adds no run") for note in timed.notes)
