"""Chat data: assistant-only labels against a hand-computed mask, truncation, prompt/completion, bad rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kdcore.errors import KdError
from kdcore.inputs.chat import encode_chat, encode_conversation, load_chat_jsonl, read_jsonl
from kdcore.inputs.packing import IGNORE_INDEX

FIXTURE = Path(__file__).parent / "fixtures" / "chat.jsonl"

#: Words separated by spaces, so that one word is one token and masks can be written by hand.
TEMPLATE = (
    "{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> {% endfor %}"
    "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}"
)
#: The same rendering, with the assistant's part marked for transformers' own mask.
TEMPLATE_MARKED = (
    "{% for m in messages %}<|im_start|> {{ m['role'] }} "
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }} <|im_end|>{% endgeneration %} "
    "{% else %}{{ m['content'] }} <|im_end|> {% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}"
)
SPECIAL = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>"]


def word_tokenizer(template: str | None = TEMPLATE, extra_text: str = ""):
    """A word-level tokenizer over the fixture's words (fast, so transformers can mark assistant tokens)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"system", "user", "assistant"} | set(extra_text.split())
    for _, row in read_jsonl(FIXTURE):
        for message in row["messages"]:
            words.update(message["content"].split())
    vocab = {token: i for i, token in enumerate([*SPECIAL, *sorted(words - set(SPECIAL))])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        unk_token="<unk>",
        eos_token="<|im_end|>",
        additional_special_tokens=["<|im_start|>"],
    )
    tokenizer.chat_template = template
    return tokenizer


def hand_mask(messages: list[dict]) -> tuple[list[str], list[bool]]:
    """The rendering of TEMPLATE, by hand: the assistant's words and its <|im_end|> are the targets."""
    tokens, mask = [], []
    for m in messages:
        body = [*m["content"].split(), "<|im_end|>"]
        tokens += ["<|im_start|>", m["role"], *body]
        mask += [False, False, *([m["role"] == "assistant"] * len(body))]
    return tokens, mask


def test_one_conversation_by_hand():
    tokenizer = word_tokenizer(extra_text="hi ok")
    messages = [
        {"role": "user", "content": "What is 17 times 23?"},
        {"role": "assistant", "content": "17 times 23 is 391."},
    ]
    ids, mask = encode_conversation(messages, tokenizer)
    tokens = tokenizer.convert_ids_to_tokens(ids)
    assert tokens == [
        "<|im_start|>", "user", "What", "is", "17", "times", "23?", "<|im_end|>",
        "<|im_start|>", "assistant", "17", "times", "23", "is", "391.", "<|im_end|>",
    ]  # fmt: skip
    assert mask == [False] * 10 + [True] * 6


@pytest.mark.parametrize("template", [TEMPLATE, TEMPLATE_MARKED], ids=["prefix-diff", "generation-markers"])
def test_fixture_labels_equal_the_hand_mask(template):
    tokenizer = word_tokenizer(template)
    records = read_jsonl(FIXTURE)
    assert len(records) == 20
    seq_len = 96
    samples = load_chat_jsonl(FIXTURE, tokenizer, seq_len)
    assert samples.rows == list(range(1, 21)) and samples.truncated == [] and samples.dropped == []
    for i, (_, row) in enumerate(records):
        tokens, mask = hand_mask(row["messages"])
        ids = tokenizer.convert_tokens_to_ids(tokens)
        n = len(ids)
        assert samples.input_ids[i, :n].tolist() == ids
        assert samples.attention_mask[i].tolist() == [1] * n + [0] * (seq_len - n)
        expected = [t if target else IGNORE_INDEX for t, target in zip(ids, mask, strict=True)]
        assert samples.labels[i].tolist() == expected + [IGNORE_INDEX] * (seq_len - n)
        assert (samples.input_ids[i, n:] == tokenizer.pad_token_id).all()


def test_truncation_keeps_the_start_and_drops_rows_without_targets(tmp_path):
    tokenizer = word_tokenizer(extra_text="hi ok")
    rows = [
        {"messages": [{"role": "user", "content": "Who wrote Pride and Prejudice?"},
                      {"role": "assistant", "content": "Jane Austen, published in 1813."}]},
        {"messages": [{"role": "system", "content": "You are a concise assistant. " * 3},
                      {"role": "user", "content": "Translate thank you into Spanish."},
                      {"role": "assistant", "content": "Gracias."}]},
    ]  # fmt: skip
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    samples = load_chat_jsonl(path, tokenizer, seq_len=12)
    # Row 1: 7 prompt tokens + "<|im_start|> assistant" + 6 targets = 15 tokens, cut to 12.
    # Row 2: the system prompt alone is 16 tokens; nothing of the answer survives: dropped.
    assert samples.rows == [1] and samples.truncated == [1] and samples.dropped == [2]
    tokens, mask = hand_mask(rows[0]["messages"])
    ids = tokenizer.convert_tokens_to_ids(tokens)[:12]
    assert samples.input_ids[0].tolist() == ids
    assert samples.labels[0].tolist() == [
        t if m else IGNORE_INDEX for t, m in zip(ids, mask[:12], strict=True)
    ]
    with pytest.raises(
        KdError, match=r"no row of .* keeps an assistant token within seq_len=8; raise data\.seq_len"
    ):
        load_chat_jsonl(path, tokenizer, seq_len=8)


def test_prompt_completion_rows():
    tokenizer = word_tokenizer(template=None)
    records = [(1, {"prompt": "Name three primary colours.", "completion": "Red, yellow and blue"})]
    samples = encode_chat(records, tokenizer, seq_len=10)
    prompt = tokenizer.convert_tokens_to_ids(["Name", "three", "primary", "colours."])
    completion = tokenizer.convert_tokens_to_ids(["Red,", "yellow", "and", "blue", "<|im_end|>"])
    assert samples.input_ids[0, :9].tolist() == prompt + completion
    assert samples.labels[0].tolist() == [IGNORE_INDEX] * 4 + completion + [IGNORE_INDEX]


def test_control_tokens_in_content_are_text():
    """A user typing ``<|im_end|>`` does not end the turn (byte-level BPE, as real chat tokenizers are)."""
    import inspect

    from kdcore.inputs.tokenization import build_tokenizer

    texts = [m["content"] for _, row in read_jsonl(FIXTURE) for m in row["messages"]]
    tokenizer = build_tokenizer("bpe:vocab_size=300", texts)
    if "sanitize_control_tokens" not in inspect.signature(tokenizer.apply_chat_template).parameters:
        pytest.skip("this transformers has no sanitize_control_tokens")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = TEMPLATE
    messages = [
        {"role": "user", "content": "say <|im_end|> please"},
        {"role": "assistant", "content": "Gracias."},
    ]
    ids, mask = encode_conversation(messages, tokenizer)
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert ids.count(end) == 2  # the template's two, not the one typed by the user
    assert (
        tokenizer.decode([i for i, m in zip(ids, mask, strict=True) if m]) == "Gracias. <|im_end|> "
    )  # the turn, as the template writes it


def test_shifted_labels_count_only_assistant_tokens():
    """How the engine consumes these labels: shifted by one, then per-sample CE over the targets only."""
    from kdcore.training.losses import per_sample_terms

    tokenizer = word_tokenizer(extra_text="hi ok")
    samples = load_chat_jsonl(FIXTURE, tokenizer, seq_len=96)
    shifted = torch.full_like(samples.labels, IGNORE_INDEX)
    shifted[:, :-1] = samples.labels[:, 1:]
    logits = torch.randn(len(samples), 96, len(tokenizer), generator=torch.Generator().manual_seed(0))
    terms = per_sample_terms(logits, shifted)
    expected_tokens = [sum(hand_mask(row["messages"])[1]) for _, row in read_jsonl(FIXTURE)]
    assert terms.tokens.tolist() == expected_tokens
    logp = torch.log_softmax(logits, -1)
    valid = shifted != IGNORE_INDEX
    gold = logp.gather(2, shifted.clamp(min=0).unsqueeze(2)).squeeze(2)
    mean_ce = -(gold * valid).sum(1) / valid.sum(1)
    torch.testing.assert_close(terms.ce, mean_ce, rtol=1e-5, atol=1e-5)  # float32 sums of ~30 terms


# --------------------------------------------------------------------------- bad rows


def _rows(tmp_path: Path, *rows) -> Path:
    path = tmp_path / "bad.jsonl"
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


GOOD = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"messages": [{"content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
         r"line 2 of '.*bad\.jsonl': message 1 has no 'role'; give every message a role \(system, user, assistant\)"),
        ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "  "}]},
         r"line 2 of .*: message 2 \(assistant\) has empty content; give it text or remove the message"),
        ({"messages": [{"role": "bot", "content": "Hi"}]},
         r"line 2 of .*: message 1 has role 'bot'; use one of system, user, assistant"),
        ({"messages": [{"role": "user", "content": ["Hi"]}]},
         r"line 2 of .*: message 1 \(user\) has no text 'content'"),
        ({"messages": [{"role": "user", "content": "Hi"}]},
         r"line 2 of .*: no assistant message, so nothing in it would be trained on"),
        ({"messages": []}, r"line 2 of .*: 'messages' must be a non-empty list"),
        ({"text": "Hi"}, r"line 2 of .* has neither 'messages' nor 'prompt' and 'completion'"),
        ({"prompt": "Hi", "completion": ""}, r"line 2 of .*: 'completion' must be non-empty text"),
        ("[1, 2]", r"line 2 of .* is not a JSON object"),
        ("{not json", r"line 2 of '.*bad\.jsonl' is not valid JSON"),
    ],
)  # fmt: skip
def test_bad_rows_name_the_line(tmp_path, bad, message):
    with pytest.raises(KdError, match=message):
        load_chat_jsonl(_rows(tmp_path, GOOD, bad), word_tokenizer(), seq_len=32)


def test_tokenizer_without_a_chat_template(tmp_path):
    with pytest.raises(KdError, match=r"the tokenizer has no chat template, so the messages of line 1 of"):
        load_chat_jsonl(_rows(tmp_path, GOOD), word_tokenizer(template=None), seq_len=32)


def test_template_breaking_the_prefix_property_is_refused(tmp_path):
    """A template that renders the last turn differently (as some drop earlier turns' reasoning)."""
    template = TEMPLATE.replace(
        "<|im_end|> {% endfor %}", "<|im_end|> {% if loop.last %}<|im_end|> {% endif %}{% endfor %}"
    )
    with pytest.raises(
        KdError,
        match=r"line 1 of .*: the chat template does not render message 2 \(assistant\) as an extension",
    ):
        load_chat_jsonl(_rows(tmp_path, GOOD), word_tokenizer(template), seq_len=32)


def test_template_error_is_one_sentence(tmp_path):
    template = "{{ raise_exception('Conversation roles must alternate user/assistant') }}"
    with pytest.raises(
        KdError, match=r"line 1 of .*: the chat template failed on it \(Conversation roles must alternate"
    ):
        load_chat_jsonl(_rows(tmp_path, GOOD), word_tokenizer(template), seq_len=32)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(KdError, match="does not exist"):
        read_jsonl(tmp_path / "none.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(KdError, match="holds no rows"):
        read_jsonl(tmp_path / "empty.jsonl")


# -- chat data through kd cache-teacher and kd run ----------------------------------------------------
#: Train rows and how many targets each has, counted by hand on the tiny GGUF tokenizer (bytes plus the
#: merges 'h e' and 'Ġt he'; '<|im_end|>' is one token and its EOS): the assistant's text, then
#: '<|im_end|>' and '\n' for a conversation; the completion's text, then EOS, for a prompt/completion row.
CHAT_ROWS = [
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]}, 2 + 2),
    (
        {
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "yes"},
                {"role": "user", "content": "and?"},
                {"role": "assistant", "content": "no"},
            ]
        },
        (3 + 2) + (2 + 2),
    ),
    ({"prompt": "hi", "completion": "no"}, 2 + 1),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}, 1 + 2),
]
#: The held-out last row: 'the' is 't' + 'he', so its last 4 tokens are its targets.
EVAL_ROW = ({"messages": [{"role": "user", "content": "what"}, {"role": "assistant", "content": "the"}]}, 4)


def test_chat_rows_through_cache_teacher_and_kd_run(tmp_path):
    pytest.importorskip("gguf")
    from conftest import run_kd
    from tiny_gguf import tiny_llama, write_gguf

    from kdcore.inputs.models import load_tokenizer
    from kdcore.summary import RunSummary

    model = tiny_llama(seed=3).eval()
    gguf_file = write_gguf(model, tmp_path / "tiny.gguf")
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row, _ in [*CHAT_ROWS, EVAL_ROW]))
    env = {"KD_CACHE_DIR": str(tmp_path / "kd-cache"), "COLUMNS": "200"}
    common = ["--teacher", str(gguf_file), "--dataset", str(data), "--seq-len", "96"]  # no row is cut
    result = run_kd(
        "cache-teacher",
        *common,
        "--set",
        "data.eval_fraction=0.2",
        "--output",
        str(tmp_path / "cache"),
        env_extra=env,
    )
    assert result.returncode == 0, result.stderr
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert manifest["num_samples"] == 4 and manifest["num_tokens"] == sum(n for _, n in CHAT_ROWS) == 19

    out = tmp_path / "run"
    run_args = [
        "--student",
        str(gguf_file),
        "--max-steps",
        "1",
        "--batch-size",
        "4",
        "--output-dir",
        str(out),
    ]
    sets = ["--set", "data.eval_fraction=0.2", "--set", "training.log_every=1", "--set", "training.threads=1"]
    result = run_kd("run", *common, *run_args, *sets, env_extra=env)
    assert result.returncode == 0, result.stderr
    summary = RunSummary.read(out)
    assert summary.train_tokens == 19  # one step over the whole training set: its targets only
    # The eval perplexity counts the eval row's last 4 tokens only, computed here from the model itself.
    tokenizer = load_tokenizer(str(gguf_file))
    ids = torch.tensor(
        [tokenizer.apply_chat_template(EVAL_ROW[0]["messages"], tokenize=True, return_dict=False)]
    )
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1], -1)
    nll = -logp.gather(1, ids[0, 1:].unsqueeze(1)).squeeze(1)[-EVAL_ROW[1] :]
    assert summary.teacher_eval_ppl == pytest.approx(float(nll.mean().exp()), rel=1e-5)
    assert summary.student_initial_eval_ppl == pytest.approx(summary.teacher_eval_ppl, rel=1e-5)


def test_packed_chat_data_has_labels_and_prompt_lengths():
    """PackedDataset from chat rows: labels where targets are, prompt_lengths = tokens before the first one."""
    from kdcore.inputs.chat import ChatCorpus

    tokenizer = word_tokenizer(extra_text="hi ok")
    rows = [(1, {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]})]
    corpus = ChatCorpus(rows, rows, "a.jsonl", "a.jsonl")
    train, _ = corpus.pack(tokenizer, 32)
    ids, _, labels = train.batch(slice(None))
    first = int((train.labels[0] != IGNORE_INDEX).nonzero()[0])
    assert int(train.prompt_lengths[0]) == first > 0
    assert train[0]["prompt_length"] == first and torch.equal(train[0]["labels"], train.labels[0])
    # shifted: position t predicts labels[t + 1]; nothing before the prompt's last token is a target
    assert (labels[0, : first - 1] == IGNORE_INDEX).all() and labels[0, first - 1] == ids[0, first]
    assert train.fingerprint != type(train)(train.input_ids, train.attention_mask).fingerprint


@pytest.mark.parametrize(
    ("template", "bad_row", "message"),
    [
        ("chat", {"messages": [{"role": "user", "content": "hi"}, {"content": "ok"}]},
         r"line 3 of '.*chat\.jsonl': message 2 has no 'role'; give every message a role"),
        (None, None, r"the tokenizer has no chat template, so the messages of line 1 of '.*chat\.jsonl' cannot"),
    ],
    ids=["bad-row", "template-less-tokenizer"],
)  # fmt: skip
def test_kd_run_refuses_bad_chat_data_in_one_sentence(tmp_path, template, bad_row, message):
    """Through the CLI: a non-zero exit, one sentence naming the row or the tokenizer, no traceback."""
    pytest.importorskip("gguf")
    import re

    from conftest import run_kd
    from tiny_gguf import CHAT_TEMPLATE, tiny_llama, write_gguf

    gguf_file = write_gguf(tiny_llama(), tmp_path / "tiny.gguf", CHAT_TEMPLATE if template else None)
    rows = [row for row, _ in CHAT_ROWS[:2]] + ([bad_row] if bad_row else []) + [EVAL_ROW[0]]
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    env = {"KD_CACHE_DIR": str(tmp_path / "kd-cache"), "COLUMNS": "300"}
    result = run_kd(
        "run", "--dry-run", "--teacher", str(gguf_file), "--student", "from-teacher:num_layers=1",
        "--dataset", str(data), "--output-dir", str(tmp_path / "run"), env_extra=env,
    )  # fmt: skip
    assert result.returncode != 0
    assert re.search(message, " ".join(result.stderr.split())), result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert not (tmp_path / "run").exists()


def test_a_share_of_chat_rows_is_refused_in_one_sentence():
    """data.train_share cuts plain text by characters; chat rows are refused, not silently kept whole."""
    from kdcore.config import DataConfig
    from kdcore.errors import KdError
    from kdcore.inputs.corpus import load_corpus

    assert len(load_corpus(DataConfig(dataset=str(FIXTURE)), 0).train_rows) > 0  # share 1: every row
    with pytest.raises(KdError) as info:
        load_corpus(DataConfig(dataset=str(FIXTURE), train_share=0.5), 0)
    assert str(info.value) == (
        f"data.train_share 0.5 keeps a share of plain text, and {FIXTURE} holds chat rows; keep the rows "
        "you want in the .jsonl and leave data.train_share at 1"
    )
