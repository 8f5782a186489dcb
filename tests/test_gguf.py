"""GGUF sources: parsing, loading a tiny generated GGUF back, the plain conversion and every error path."""

from __future__ import annotations

import sys

import pytest
import torch
from tiny_gguf import CHAT_TEMPLATE, tiny_llama, write_gguf

from kdcore.errors import KdError
from kdcore.inputs.gguf import (
    GgufSource,
    is_gguf_model,
    load_gguf,
    load_gguf_config,
    load_gguf_model,
    load_gguf_tokenizer,
    parse_gguf_source,
    plain_model,
)


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """A tiny untied Llama, and the GGUF file it was written to."""
    pytest.importorskip("gguf")
    model = tiny_llama(tie=False)
    path = write_gguf(model, tmp_path_factory.mktemp("gguf") / "tiny.gguf")
    return model, path


def test_parse_sources(tmp_path):
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    assert parse_gguf_source(str(tmp_path / "m.gguf")) == GgufSource(str(tmp_path), "m.gguf", local=True)
    assert parse_gguf_source(f"{tmp_path}:m.gguf") == GgufSource(str(tmp_path), "m.gguf", local=True)
    assert parse_gguf_source("models/missing.gguf") == GgufSource("models", "missing.gguf", local=True)
    hub = parse_gguf_source("HuggingFaceTB/SmolLM2-135M-Instruct-GGUF:sub/smollm2.Q4.gguf")
    assert hub == GgufSource("HuggingFaceTB/SmolLM2-135M-Instruct-GGUF", "sub/smollm2.Q4.gguf", local=False)
    assert str(hub) == "HuggingFaceTB/SmolLM2-135M-Instruct-GGUF:sub/smollm2.Q4.gguf"
    assert hub.name == "smollm2.Q4.gguf"
    for not_gguf in ("gpt2:n_layer=2", "org/repo", str(tmp_path), "demo"):
        assert parse_gguf_source(not_gguf) is None
    with pytest.raises(KdError, match="neither a local directory nor a hub repository id"):
        parse_gguf_source("no such/dir/x:m.gguf")
    with pytest.raises(KdError, match="names no GGUF file"):
        parse_gguf_source("org/repo:.gguf")


def test_round_trip_weights_config_and_tokenizer(written, capsys):
    model, path = written
    lines: list[str] = []
    loaded, tokenizer = load_gguf(str(path), echo=lines.append)
    assert len(lines) == 1 and "tiny.gguf" in lines[0] and "float32" in lines[0]
    captured = capsys.readouterr()
    assert "it/s" not in captured.err and "de-quantizing" not in captured.err  # no progress bars
    assert not is_gguf_model(loaded) and not hasattr(loaded.config, "quantization_config")
    assert loaded.config.num_hidden_layers == 2 and loaded.config.num_key_value_heads == 2
    assert not loaded.config.tie_word_embeddings
    expected = model.state_dict()
    got = loaded.state_dict()
    assert set(got) == set(expected)
    for key, tensor in expected.items():  # float32 written, float32 read: bit-exact, Q/K permutation undone
        assert torch.equal(got[key], tensor), key
    ids = torch.tensor([[3, 100, 260, 7, 42]])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model.eval()(ids).logits)
    # The tokenizer comes from the file's metadata: byte-level BPE with its merges and specials.
    assert len(tokenizer) == model.config.vocab_size
    assert tokenizer.chat_template == CHAT_TEMPLATE
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.bos_token == "<|im_start|>"
    vocab = tokenizer.get_vocab()
    assert tokenizer("the", add_special_tokens=False).input_ids == [vocab["t"], vocab["he"]]
    assert tokenizer(" the<|im_end|>", add_special_tokens=False).input_ids == [
        vocab["Ġthe"],
        vocab["<|im_end|>"],
    ]


def test_config_without_weights(written):
    model, path = written
    config = load_gguf_config(str(path))
    assert not hasattr(config, "quantization_config")
    for key in (
        "vocab_size",
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
    ):
        assert getattr(config, key) == getattr(model.config, key), key


def test_plain_model_saves_and_reloads(written, tmp_path):
    from transformers import AutoModelForCausalLM

    _, path = written
    raw = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name)
    assert is_gguf_model(raw)
    with pytest.raises(ValueError):  # what the conversion is for
        raw.save_pretrained(tmp_path / "refused")
    plain = plain_model(raw)
    assert type(plain) is type(raw)
    for (name, a), (_, b) in zip(plain.state_dict().items(), raw.state_dict().items(), strict=True):
        assert a.data_ptr() == b.data_ptr(), name  # shared, not copied
    plain.save_pretrained(tmp_path / "plain")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "plain")
    for key, tensor in raw.state_dict().items():
        assert torch.equal(reloaded.state_dict()[key], tensor), key
    assert plain_model(reloaded) is reloaded  # a plain model is returned as is


def test_tied_embeddings_stay_tied(tmp_path):
    pytest.importorskip("gguf")
    model = tiny_llama(tie=True, seed=1)
    path = write_gguf(model, tmp_path / "tied.gguf")
    loaded = load_gguf_model(f"{tmp_path}:tied.gguf")
    assert loaded.config.tie_word_embeddings
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    assert torch.equal(loaded.lm_head.weight, model.model.embed_tokens.weight)
    assert path.exists()


def test_missing_file(tmp_path):
    with pytest.raises(KdError, match=r"GGUF file '.*nope\.gguf' does not exist; check the path"):
        load_gguf_model(str(tmp_path / "nope.gguf"))


def test_not_a_gguf(tmp_path):
    fake = tmp_path / "model.gguf"
    fake.write_text('{"not": "a gguf"}')
    with pytest.raises(KdError, match="is not a GGUF file"):
        load_gguf_model(str(fake))
    with pytest.raises(KdError, match="is not a GGUF file"):
        load_gguf_tokenizer(str(fake))


def test_truncated_gguf(written, tmp_path):
    _, path = written
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(path.read_bytes()[:200])
    with pytest.raises(KdError, match=r"could not (read|load) the model .*GGUF file '.*cut\.gguf'"):
        load_gguf_model(str(cut))


def test_without_the_gguf_package(tmp_path, monkeypatch):
    path = tmp_path / "m.gguf"
    path.write_bytes(b"GGUF" + bytes(60))  # the magic bytes pass; the package is needed next
    monkeypatch.setitem(sys.modules, "gguf", None)  # `import gguf` now raises ImportError
    with pytest.raises(KdError) as err:
        load_gguf_model(str(path))
    assert str(err.value) == (
        f"loading '{path}' needs the gguf package; install it with pip install \"kdcore[gguf]\""
    )


def test_hub_source_offline_is_one_sentence(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(KdError, match=r"could not download 'm\.gguf' from hub repository 'no-org/no-repo'"):
        load_gguf_model("no-org/no-repo:m.gguf")


def test_hub_source_is_downloaded_then_loaded(written, monkeypatch):
    """A hub file is fetched with hf_hub_download(repo, file) and loaded from the local copy (no network)."""
    import huggingface_hub

    model, path = written
    calls = []

    def download(repo_id, filename):
        calls.append((repo_id, filename))
        return str(path)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    tokenizer = load_gguf_tokenizer("org/repo:dir/m.Q4.gguf")
    assert calls == [("org/repo", "dir/m.Q4.gguf")]
    assert len(tokenizer) == model.config.vocab_size


# -- through kdcore: converted once, then loaded from the cache ---------------------------------------
def test_converted_once_then_reused(written, tmp_path, monkeypatch):
    from kdcore.inputs import gguf as gguf_module
    from kdcore.inputs.gguf import converted_directory
    from kdcore.inputs.models import load_pretrained, load_tokenizer

    model, path = written
    monkeypatch.setenv("KD_CACHE_DIR", str(tmp_path / "cache"))
    assert converted_directory(str(path), convert=False) is None
    lines: list[str] = []
    directory = converted_directory(str(path), echo=lines.append)
    assert directory.parent == tmp_path / "cache" / "gguf"
    assert lines == [
        f"Converting tiny.gguf (GGUF, de-quantised to float32) once; later runs load it from {directory}"
    ]
    monkeypatch.setattr(gguf_module, "load_gguf", lambda *a, **k: pytest.fail("converted twice"))
    lines.clear()
    assert converted_directory(str(path), echo=lines.append) == directory
    assert lines == [f"Loading tiny.gguf from its converted copy in {directory}"]
    loaded = load_pretrained(str(path))  # from the converted directory: the same weights, bit for bit
    for key, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], tensor), key
    assert load_tokenizer(str(path)).get_vocab() == load_gguf_tokenizer(str(path)).get_vocab()


def test_gguf_teacher_and_student_through_kd_run(written, tmp_path):
    """kd run --teacher FILE.gguf --student FILE.gguf: one loading line each, no progress bars, and the
    teacher's eval perplexity is the written model's own."""
    from conftest import run_kd, tiny_overrides

    from kdcore.config import resolve_config
    from kdcore.inputs.corpus import load_corpus
    from kdcore.inputs.models import load_tokenizer
    from kdcore.summary import RunSummary
    from kdcore.training.evaluation import perplexity

    model, path = written
    out = tmp_path / "run"
    overrides = tiny_overrides(out, **{"training.max_steps": 4, "training.threads": 1})
    overrides.pop("model.teacher"), overrides.pop("model.student")
    sets = [arg for key, value in overrides.items() for arg in ("--set", f"{key}={value}")]
    env = {"KD_CACHE_DIR": str(tmp_path / "cache"), "COLUMNS": "200"}
    result = run_kd(
        "run", "--teacher", str(path), "--student", f"{path.parent}:tiny.gguf", *sets, env_extra=env
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("Converting tiny.gguf") == 1  # the student is the same file: converted once
    assert result.stderr.count("Loading tiny.gguf from its converted copy") == 1
    assert "it/s" not in result.stderr and "%|" not in result.stderr
    summary = RunSummary.read(out)
    cfg = resolve_config(None, overrides)
    _, eval_set = load_corpus(cfg.data, 0).pack(load_tokenizer(str(path)), cfg.data.seq_len)
    assert summary.teacher_eval_ppl == pytest.approx(perplexity(model, eval_set), rel=1e-6)
    assert summary.student_initial_eval_ppl == pytest.approx(summary.teacher_eval_ppl, rel=1e-6)


def test_kd_run_without_the_gguf_package(tmp_path):
    """An importable 'gguf' that raises ImportError stands in for a missing package."""
    from conftest import run_kd

    fake = tmp_path / "site"
    fake.mkdir()
    (fake / "gguf.py").write_text("raise ImportError('No module named gguf')\n")
    model_file = tmp_path / "m.gguf"
    model_file.write_bytes(b"GGUF" + bytes(60))
    env = {"PYTHONPATH": str(fake), "KD_CACHE_DIR": str(tmp_path / "cache"), "COLUMNS": "200"}
    result = run_kd("run", "--teacher", str(model_file), "--max-steps", "1", env_extra=env)
    assert result.returncode == 2  # kd's exit status for a KdError
    assert result.stderr.strip().endswith(
        f"loading '{model_file}' needs the gguf package; install it with pip install \"kdcore[gguf]\""
    )
    assert "Traceback" not in result.stderr
