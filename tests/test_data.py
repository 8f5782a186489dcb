"""Loading, tokenizers and packing (kdcore.inputs.corpus)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch

from kdcore.config import DataConfig
from kdcore.errors import KdError
from kdcore.inputs.corpus import Corpus, load_corpus, load_splits, load_texts, split_tail
from kdcore.inputs.demo import generate_demo_corpus
from kdcore.inputs.packing import PackedDataset, pack, shift_labels
from kdcore.inputs.tokenization import build_tokenizer, encode_texts

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
SHAKESPEARE = SHARED / "tinyshakespeare.txt"
WIKI_VALID = SHARED / "wikitext2-valid.txt"


@pytest.fixture(scope="module")
def byte_tok():
    return build_tokenizer("byte")


@pytest.fixture(scope="module")
def shakespeare() -> str:
    if not SHAKESPEARE.is_file():
        pytest.skip(f"{SHARED} is absent")
    return SHAKESPEARE.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def small_bpe():
    texts = [t for t, _ in generate_demo_corpus(300, seed=0)]
    return build_tokenizer("bpe:vocab_size=400", texts)


# --------------------------------------------------------------------------- tokenizers


def test_byte_tokenizer_ids(byte_tok):
    assert len(byte_tok) == 259
    assert (byte_tok.pad_token_id, byte_tok.eos_token_id) == (0, 1)
    assert build_tokenizer(None).pad_token_id == 0  # None means byte


@pytest.mark.parametrize("source", ["inline", "shared"])
def test_byte_fast_path_equals_tokenizer(byte_tok, source):
    # literal '<unk>' / '</s>' stay text (WikiText is full of '<unk>'), as with split_special_tokens
    samples = ["héllo wörld 🙂\n\ttabs  ", "", "a <unk> b </s> c <pad>", "x" * 500]
    if source == "shared":
        if not SHAKESPEARE.is_file() or not WIKI_VALID.is_file():
            pytest.skip(f"{SHARED} is absent")
        shakespeare = SHAKESPEARE.read_text(encoding="utf-8")
        samples = [shakespeare[:3000], shakespeare[-2000:], WIKI_VALID.read_text(encoding="utf-8")[:3000]]
    fast = encode_texts(samples, byte_tok)
    for text, ids in zip(samples, fast, strict=True):
        slow = byte_tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        assert ids.tolist() == slow
        assert byte_tok.decode(ids.tolist()) == text


def test_bpe_trains_deterministically_and_round_trips(tmp_path, small_bpe):
    from transformers import AutoTokenizer

    pairs = generate_demo_corpus(300, seed=0)
    texts = [t for t, _ in pairs]
    again = build_tokenizer("bpe:vocab_size=400", texts)
    assert small_bpe.get_vocab() == again.get_vocab()
    assert len(small_bpe) == 400
    assert small_bpe.convert_ids_to_tokens([0, 1]) == ["<pad>", "<eos>"]
    assert (small_bpe.pad_token_id, small_bpe.eos_token_id) == (0, 1)

    small_bpe.save_pretrained(tmp_path / "tok")
    loaded = AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert (loaded.pad_token_id, loaded.eos_token_id) == (0, 1)
    text = "the red cat sees a fox.  Ünïcode 🙂 <eos> 1+2=3\n\tend"
    ids = encode_texts([text], small_bpe)[0]
    assert encode_texts([text], loaded)[0].tolist() == ids.tolist()
    assert small_bpe.eos_token_id not in ids.tolist()  # literal '<eos>' in text is text
    assert loaded.decode(ids.tolist()) == text
    # it learned merges: fewer tokens than bytes on text like its training data
    template = next(t for t, level in pairs if level == 2)
    assert len(encode_texts([template], small_bpe)[0]) < 0.7 * len(template)


def test_bpe_min_frequency_and_shakespeare(shakespeare):
    tok = build_tokenizer("bpe:vocab_size=600,min_frequency=3", [shakespeare[:50_000]])
    sample = shakespeare[50_000:52_000]
    ids = encode_texts([sample], tok)[0]
    assert tok.decode(ids.tolist()) == sample
    assert len(ids) < 0.6 * len(sample)


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ("wordpiece", "unknown tokenizer spec 'wordpiece'"),
        ("bpe", "vocab_size is missing"),
        ("bpe:vocab=300", "unknown key 'vocab'"),
        ("bpe:vocab_size=abc", "integer"),
        ("bpe:vocab_size=100", ">= 259"),
        ("bpe:vocab_size", "malformed"),
    ],
)
def test_bad_tokenizer_spec(spec, fragment):
    with pytest.raises(KdError) as info:
        build_tokenizer(spec, ["some text"])
    message = str(info.value)
    assert fragment in message
    assert "'byte' or 'bpe:vocab_size=N'" in message


def test_bpe_needs_training_text():
    with pytest.raises(KdError, match="needs training text"):
        build_tokenizer("bpe:vocab_size=300", ["", ""])


# --------------------------------------------------------------------------- packing


def test_pack_layout_joins_docs_with_eos(byte_tok):
    # stream: a b <eos> c d e <eos> f  (empty docs skipped) -> rows of 3, last row 2 tokens + pad
    packed = pack(["ab", "", "cde", "f"], byte_tok, seq_len=3)
    a, b, c, d, e, f = (ord(ch) + 3 for ch in "abcdef")
    assert packed.input_ids.tolist() == [[a, b, 1], [c, d, e], [1, f, 0]]
    assert packed.attention_mask.tolist() == [[1, 1, 1], [1, 1, 1], [1, 1, 0]]
    assert packed.input_ids.dtype == torch.long and packed.attention_mask.dtype == torch.long
    assert packed.lengths().tolist() == [3, 3, 2]
    assert packed.levels is None
    # a last chunk of a single token has nothing to predict: dropped
    assert len(pack(["abcd"], byte_tok, seq_len=3)) == 1
    with pytest.raises(KdError, match="too few"):
        pack(["a"], byte_tok, seq_len=3)


def test_pack_per_document_keeps_levels(byte_tok):
    packed = pack(["abcdef", "xy"], byte_tok, seq_len=4, levels=[3, 0], per_document=True)
    assert packed.input_ids.tolist() == [[ord(ch) + 3 for ch in "abcd"], [ord("x") + 3, ord("y") + 3, 0, 0]]
    assert packed.lengths().tolist() == [4, 2]
    assert packed.levels.tolist() == [3, 0]
    assert packed[1]["sample_id"] == 1 and packed[1]["level"] == 0
    with pytest.raises(ValueError):
        pack(["a", "b"], byte_tok, seq_len=4, levels=[1])  # levels need per_document


def test_shift_labels():
    ids = torch.tensor([[5, 6, 7, 0], [8, 9, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    assert shift_labels(ids, mask).tolist() == [[6, 7, -100, -100], [9, -100, -100, -100]]


def test_pack_shakespeare_fast_stable_and_lossless(byte_tok, shakespeare):
    start = time.perf_counter()
    first = pack([shakespeare], byte_tok, seq_len=128)
    elapsed = time.perf_counter() - start
    assert elapsed < 3.0, f"packing 1.1 MB took {elapsed:.2f}s"
    n_bytes = len(shakespeare.encode())
    assert first.input_ids.shape == (-(-n_bytes // 128), 128)
    assert int(first.lengths().sum()) == n_bytes
    assert first.attention_mask[:-1].all()
    last = first.attention_mask[-1]
    assert last[: n_bytes % 128].all() and not last[n_bytes % 128 :].any()
    assert (first.input_ids[-1][last == 0] == byte_tok.pad_token_id).all()
    valid = first.input_ids[first.attention_mask.bool()] - 3
    assert valid.numpy().astype(np.uint8).tobytes().decode("utf-8") == shakespeare

    second = pack([shakespeare], byte_tok, seq_len=128)
    assert torch.equal(first.input_ids, second.input_ids)
    assert torch.equal(first.attention_mask, second.attention_mask)
    assert first.fingerprint == second.fingerprint
    assert len(first.fingerprint) == 16
    int(first.fingerprint, 16)


def test_fingerprint_tracks_data(byte_tok):
    texts = [t for t, _ in generate_demo_corpus(50, seed=0)]
    base = pack(texts, byte_tok, seq_len=64)
    changed = texts.copy()
    changed[10] = changed[10][:-1] + ("x" if changed[10][-1] != "x" else "y")
    assert pack(changed, byte_tok, seq_len=64).fingerprint != base.fingerprint
    assert pack(texts, byte_tok, seq_len=32).fingerprint != base.fingerprint
    assert pack(texts, byte_tok, seq_len=64).fingerprint == base.fingerprint
    head = base.head(5)
    assert len(head) == 5 and head.fingerprint != base.fingerprint
    assert base.head(None) is base
    with pytest.raises(ValueError):
        PackedDataset(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 4, dtype=torch.long))


def test_prompt_lengths_are_optional_per_sample_and_kept_by_head():
    ids, mask = torch.arange(12).view(3, 4), torch.ones(3, 4, dtype=torch.long)
    plain = PackedDataset(ids, mask)
    assert plain.prompt_lengths is None and plain.head(2).prompt_lengths is None
    chat = PackedDataset(ids, mask, prompt_lengths=torch.tensor([2, 3, 1]))
    assert (
        chat.fingerprint == plain.fingerprint
    )  # the token ids and mask are the data; prompts do not change it
    assert chat.head(2).prompt_lengths.tolist() == [2, 3]
    with pytest.raises(ValueError, match=r"prompt_lengths \(2,\) must be \[3\]"):
        PackedDataset(ids, mask, prompt_lengths=torch.tensor([2, 3]))


def test_pack_with_bpe(small_bpe):
    texts = [t for t, _ in generate_demo_corpus(40, seed=1)]
    packed = pack(texts, small_bpe, seq_len=32)
    stream = packed.input_ids[packed.attention_mask.bool()].tolist()
    assert stream.count(small_bpe.eos_token_id) == len(texts) - 1
    assert small_bpe.decode(stream, skip_special_tokens=True) == "".join(texts)


# --------------------------------------------------------------------------- loading


def test_load_local_formats(tmp_path):
    (tmp_path / "one.txt").write_text("First line.\n\nSecond paragraph.\n", encoding="utf-8")
    rows = {"text": ["row one", "row two", None], "other": [1, 2, 3]}
    with open(tmp_path / "rows.jsonl", "w") as fh:
        for text, other in zip(rows["text"], rows["other"], strict=True):
            fh.write(json.dumps({"text": text, "other": other}) + "\n")
    table = datasets.Dataset.from_dict({"body": ["csv a", "csv, b"], "n": [1, 2]})
    table.to_csv(tmp_path / "rows.csv", index=False)
    table.to_parquet(tmp_path / "rows.parquet")

    assert load_texts(str(tmp_path / "one.txt")) == ["First line.\n\nSecond paragraph.\n"]
    assert load_texts(str(tmp_path / "rows.jsonl")) == ["row one", "row two"]  # None skipped
    assert load_texts(str(tmp_path / "rows.csv"), text_column="body") == ["csv a", "csv, b"]
    assert load_texts(str(tmp_path / "rows.parquet"), text_column="body") == ["csv a", "csv, b"]


def test_load_folder_sorted_recursive(tmp_path):
    (tmp_path / "b.txt").write_text("bee", encoding="utf-8")
    (tmp_path / "a.txt").write_text("ay", encoding="utf-8")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.jsonl").write_text('{"text": "sea"}\n{"text": "see"}\n', encoding="utf-8")
    (tmp_path / "z.txt").write_text("zed", encoding="utf-8")
    (tmp_path / "notes.md").write_text("ignored", encoding="utf-8")
    (tmp_path / ".hidden.txt").write_text("ignored", encoding="utf-8")
    assert load_texts(str(tmp_path)) == ["ay", "bee", "sea", "see", "zed"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(KdError, match="holds no"):
        load_texts(str(tmp_path / "empty"))


def test_missing_file_and_bad_column(tmp_path):
    with pytest.raises(KdError) as info:
        load_texts("x.txt")
    assert str(info.value) == (
        "dataset 'x.txt' not found; pass a local .txt/.jsonl/.csv/.parquet file or folder, 'demo', "
        "or a hub dataset name like wikitext:wikitext-2-raw-v1:train"
    )
    (tmp_path / "rows.jsonl").write_text('{"body": "a", "id": 1}\n', encoding="utf-8")
    with pytest.raises(KdError) as info:
        load_texts(str(tmp_path / "rows.jsonl"), text_column="text")
    assert "no column 'text'" in str(info.value)
    assert "available: body, id" in str(info.value)
    (tmp_path / "notes.md").write_text("x", encoding="utf-8")
    with pytest.raises(KdError, match=r"unsupported file type '\.md'"):
        load_texts(str(tmp_path / "notes.md"))


def test_hub_source_is_parsed_and_wrapped(monkeypatch):
    calls = []

    def fake_load_dataset(name, config=None, split=None, **kwargs):
        calls.append((name, config, split))
        if name == "broken":
            raise FileNotFoundError("Couldn't find dataset 'broken' on the Hub\nmore detail")
        return datasets.Dataset.from_dict({"text": ["a", "b"], "label": [0, 1]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert load_texts("wikitext:wikitext-2-raw-v1:validation") == ["a", "b"]
    assert load_texts("someone/corpus") == ["a", "b"]
    assert calls == [("wikitext", "wikitext-2-raw-v1", "validation"), ("someone/corpus", None, "train")]
    with pytest.raises(KdError, match="no column 'body'"):
        load_texts("wikitext::test", text_column="body")
    assert calls[-1] == ("wikitext", None, "test")
    with pytest.raises(KdError) as info:
        load_texts("broken")
    assert "Couldn't find dataset 'broken' on the Hub" in str(info.value)
    assert "more detail" not in str(info.value)
    with pytest.raises(KdError, match="name\\[:config\\[:split\\]\\]"):
        load_texts("a:b:c:d")


# --------------------------------------------------------------------------- splits


def test_split_tail_by_characters():
    train, held = split_tail(["aaaa", "bbbb", "cc"], 0.3)  # 10 chars, last 3 held out
    assert (train, held) == (["aaaa", "bbb"], ["b", "cc"])
    train, held = split_tail(["aaaaaaa", "bbb"], 0.3)  # cut exactly at a document boundary
    assert (train, held) == (["aaaaaaa"], ["bbb"])
    with pytest.raises(KdError, match="cannot hold out"):
        split_tail(["ab"], 0.1)


def test_shakespeare_holds_out_last_tenth(byte_tok, shakespeare):
    corpus = load_corpus(DataConfig(dataset=str(SHAKESPEARE), max_eval_samples=None), seed=0)
    cut = len(shakespeare) - round(0.1 * len(shakespeare))
    assert corpus.train_texts == [shakespeare[:cut]]
    assert corpus.eval_texts == [shakespeare[cut:]]
    assert not corpus.per_document and corpus.train_levels is None

    cfg = DataConfig(dataset=str(SHAKESPEARE), seq_len=64, max_eval_samples=100)
    train, held = load_splits(cfg, byte_tok, seed=0)
    assert train.input_ids.shape[1] == held.input_ids.shape[1] == 64
    assert len(held) == 100
    eval_bytes = shakespeare[cut:].encode()
    assert held.input_ids[0].tolist() == [b + 3 for b in eval_bytes[:64]]  # the first eval samples
    assert int(train.lengths().sum()) == len(shakespeare[:cut].encode())


def test_eval_dataset_and_cap(tmp_path, byte_tok):
    (tmp_path / "train.txt").write_text("t" * 1000, encoding="utf-8")
    (tmp_path / "eval.txt").write_text("e" * 700, encoding="utf-8")
    cfg = DataConfig(
        dataset=str(tmp_path / "train.txt"),
        eval_dataset=str(tmp_path / "eval.txt"),
        seq_len=100,
        max_eval_samples=3,
    )
    corpus = load_corpus(cfg, seed=0)
    assert corpus.train_texts == ["t" * 1000] and corpus.eval_texts == ["e" * 700]
    train, held = corpus.pack(byte_tok, cfg.seq_len)
    assert len(train) == 10 and len(held) == 3
    assert held.fingerprint == pack(["e" * 300], byte_tok, 100).fingerprint


def test_demo_splits(byte_tok):
    cfg = DataConfig(dataset="demo", demo_samples=500, max_eval_samples=150, train_share=1)
    corpus = load_corpus(cfg, seed=4)
    assert corpus.per_document
    assert len(corpus.train_texts) == 500 and len(corpus.eval_texts) == 200  # max(200, 10%)
    assert list(zip(corpus.train_texts, corpus.train_levels, strict=True)) == generate_demo_corpus(500, 4)
    assert list(zip(corpus.eval_texts, corpus.eval_levels, strict=True)) == generate_demo_corpus(
        200, 4 + 1_000_003
    )
    train, held = corpus.pack(byte_tok, cfg.seq_len)
    assert train.input_ids.shape == (500, 128) and held.input_ids.shape == (150, 128)
    assert train.levels.tolist() == corpus.train_levels
    assert held.levels.tolist() == corpus.eval_levels[:150]
    assert train.lengths().float().mean() > 110
    big = load_corpus(DataConfig(dataset="demo", demo_samples=3000, train_share=1), seed=0)
    assert len(big.eval_texts) == 300
    again, _ = load_splits(cfg, byte_tok, seed=4)
    assert again.fingerprint == train.fingerprint
    other, _ = load_splits(cfg, byte_tok, seed=5)
    assert other.fingerprint != train.fingerprint


def test_corpus_fingerprint():
    base = Corpus(["ab", "c"], ["d"])
    assert base.fingerprint == Corpus(["ab", "c"], ["d"]).fingerprint
    assert len(base.fingerprint) == 16
    for other in (
        Corpus(["a", "bc"], ["d"]),
        Corpus(["ab", "c"], ["e"]),
        Corpus(["ab", "c"], ["d"], max_eval_samples=1),
        Corpus(["ab", "c"], ["d"], [0, 1], [2], per_document=True),
    ):
        assert other.fingerprint != base.fingerprint
    demo = DataConfig(dataset="demo", demo_samples=100)
    assert load_corpus(demo, seed=0).fingerprint == load_corpus(demo, seed=0).fingerprint
    assert load_corpus(demo, seed=0).fingerprint != load_corpus(demo, seed=1).fingerprint


def test_demo_cannot_mix_with_eval_dataset(tmp_path):
    with pytest.raises(KdError, match="demo"):
        load_corpus(DataConfig(dataset="demo", eval_dataset="x.txt"), seed=0)


def test_corpus_errors_name_the_split(byte_tok):
    corpus = Corpus(train_texts=["a" * 500], eval_texts=["b"])
    with pytest.raises(KdError, match=r"^eval split: "):
        corpus.pack(byte_tok, 64)


def test_encode_texts_matches_batch_for_bpe(small_bpe):
    texts = ["alpha beta", "", "gamma\n"]
    out = encode_texts(texts, small_bpe)
    assert [o.dtype for o in out] == [np.int64] * 3
    assert out[1].size == 0
    assert out[0].tolist() == small_bpe("alpha beta", add_special_tokens=False)["input_ids"]


# --------------------------------------------------------------------------- data.train_share


def varied_text(n: int) -> str:
    """n characters that are not periodic in the sequence length (so every packed row differs)."""
    words = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "\n"]
    out, i = [], 0
    while sum(len(w) + 1 for w in out) < n:
        out.append(words[(i * i + 3 * i) % len(words)])
        i += 1
    return " ".join(out)[:n]


def test_train_share_keeps_the_first_characters_after_the_eval_split(tmp_path, byte_tok):
    text = varied_text(10_007)
    (tmp_path / "train.txt").write_text(text, encoding="utf-8")
    cfg = DataConfig(dataset=str(tmp_path / "train.txt"), seq_len=64, max_eval_samples=None, train_share=0.05)
    corpus = load_corpus(cfg, seed=0)
    cut = 10_007 - round(0.1 * 10_007)  # the held-out tail comes off first: 9,006 training characters
    keep = round(0.05 * cut)  # then the first 5 % of those: 450
    assert (cut, keep) == (9006, 450)
    assert corpus.train_texts == [text[:keep]]
    assert corpus.eval_texts == [text[cut:]]  # the eval set does not change
    assert corpus.for_teacher().train_texts == [text[:cut]]  # a from-scratch teacher sees all of it

    train, held = corpus.pack(byte_tok, 64)
    ids = np.frombuffer(text[:keep].encode(), dtype=np.uint8).astype(np.int64) + 3  # bytes + 3
    rows = -(-len(ids) // 64)  # 450 = 7 × 64 + 2: 8 rows, the last with 2 tokens and 62 pads
    expected = np.zeros((rows, 64), dtype=np.int64)
    expected.reshape(-1)[: len(ids)] = ids
    assert train.input_ids.numpy().tolist() == expected.tolist()
    assert train.lengths().tolist() == [64] * 7 + [2]
    whole = load_corpus(DataConfig(dataset=str(tmp_path / "train.txt"), seq_len=64, max_eval_samples=None), 0)
    assert held.fingerprint == whole.pack(byte_tok, 64)[1].fingerprint


def test_train_share_cuts_across_documents_and_keeps_their_levels():
    from kdcore.inputs.corpus import head_share

    assert head_share(["aaaa", "bbbb", "cc"], 0.5) == ["aaaa", "b"]  # 10 characters, the first 5
    assert head_share(["aaaa", "bbbb", "cc"], 0.4) == ["aaaa"]  # a cut at a document boundary
    assert head_share(["aaaa", "bbbb", "cc"], 1.0) == ["aaaa", "bbbb", "cc"]
    with pytest.raises(KdError, match=r"data.train_share 0.01 keeps none of the 10 training characters"):
        head_share(["aaaa", "bbbb", "cc"], 0.01)

    demo = DataConfig(dataset="demo", demo_samples=100, train_share=0.25)
    corpus, whole = (
        load_corpus(demo, seed=3),
        load_corpus(DataConfig(dataset="demo", demo_samples=100, train_share=1), seed=3),
    )
    total = sum(len(t) for t in whole.train_texts)
    lengths = np.cumsum([len(t) for t in whole.train_texts])
    n_docs = int(np.searchsorted(lengths, round(0.25 * total))) + 1  # the document the cut falls in
    assert len(corpus.train_texts) == len(corpus.train_levels) == n_docs
    assert corpus.train_levels == whole.train_levels[:n_docs]
    assert sum(len(t) for t in corpus.train_texts) == round(0.25 * total)
    assert corpus.eval_texts == whole.eval_texts


def test_train_share_changes_the_fingerprint_but_not_the_teachers(tmp_path):
    (tmp_path / "train.txt").write_text(varied_text(5000), encoding="utf-8")
    whole = load_corpus(DataConfig(dataset=str(tmp_path / "train.txt")), seed=0)
    half = load_corpus(DataConfig(dataset=str(tmp_path / "train.txt"), train_share=0.5), seed=0)
    assert half.fingerprint != whole.fingerprint
    assert (
        half.fingerprint
        == load_corpus(DataConfig(dataset=str(tmp_path / "train.txt"), train_share=0.5), 0).fingerprint
    )
    assert half.for_teacher().fingerprint == whole.fingerprint == whole.for_teacher().fingerprint
    from kdcore.config import ModelConfig, TrainingConfig
    from kdcore.teachers.resolve import locate_teacher

    model = ModelConfig(teacher="gpt2:n_layer=1,n_embd=16,n_head=2", tokenizer="bpe:vocab_size=300")
    a, b = (locate_teacher(model, c, 64, TrainingConfig()) for c in (half, whole))
    assert a.directory == b.directory  # one spec teacher, trained on all the training text
    assert a.tokenizer(half).get_vocab() == b.tokenizer(whole).get_vocab()  # its BPE too
    with pytest.raises(ValueError, match="train_share"):
        DataConfig(train_share=0)
    with pytest.raises(ValueError, match="train_share"):
        DataConfig(train_share=1.5)


def test_the_demo_corpus_defaults_to_a_data_limited_student_and_a_dataset_to_all_of_it(tmp_path):
    from kdcore.config import DEMO_STUDENT_TEXTS

    (tmp_path / "train.txt").write_text("abcdefghij" * 100)
    text = DataConfig(dataset=str(tmp_path / "train.txt"))
    assert text.train_share is None and text.student_share == 1.0
    assert DataConfig(dataset="demo", train_share=0.5).student_share == 0.5
    demo = DataConfig(dataset="demo")
    assert demo.student_share == DEMO_STUDENT_TEXTS / 2000 == 0.02
    assert DataConfig(dataset="demo", demo_samples=400).student_share == 0.1
    assert (
        DataConfig(dataset="demo", demo_samples=30).student_share == 1.0
    )  # fewer texts than 40: all of them
    corpus = load_corpus(demo, seed=0)
    whole = load_corpus(DataConfig(dataset="demo", train_share=1), seed=0)
    assert len(whole.train_texts) == 2000 and corpus.for_teacher().train_texts == whole.train_texts
    total = sum(len(t) for t in whole.train_texts)
    assert sum(len(t) for t in corpus.train_texts) == round(0.02 * total)
    n = len(corpus.train_texts)
    assert corpus.train_texts == [
        *whole.train_texts[: n - 1],
        whole.train_texts[n - 1][: len(corpus.train_texts[-1])],
    ]
    assert 35 <= len(corpus.train_texts) <= 45  # about 40 of the 2000 texts (120–160 characters each)
