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
