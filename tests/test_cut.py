"""Students cut from the teacher: the spec grammar, copied tensors, and a head start over a random init."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from kdcore.errors import KdError
from kdcore.inputs.cut import (
    SCALES,
    CutSpec,
    calibrate_head,
    cut_config,
    cut_student,
    decoder_layout,
    parse_cut_spec,
)


def small(model_type: str, layers: int = 4, vocab: int = 97, **extra):
    sizes = (
        {"n_embd": 32, "n_layer": layers, "n_head": 2}
        if model_type == "gpt2"
        else {
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": layers,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
        }
    )
    config = AutoConfig.for_model(
        model_type, vocab_size=vocab, bos_token_id=0, eos_token_id=1, **sizes, **extra
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config)


# --------------------------------------------------------------------------- the spec


@pytest.mark.parametrize(
    ("spec", "total", "expected"),
    [
        ("from-teacher:layers=0,10,20,29", 30, [0, 10, 20, 29]),
        ("from-teacher:layers= 3", 30, [3]),
        ("from-teacher:every=3", 30, list(range(0, 30, 3))),
        ("from-teacher:every=1", 4, [0, 1, 2, 3]),
        ("from-teacher:num_layers=4", 30, [0, 10, 19, 29]),  # 0, 9.67, 19.33, 29 rounded
        ("from-teacher:num_layers=3", 30, [0, 15, 29]),  # 14.5 rounds half up
        ("from-teacher:num_layers=2", 12, [0, 11]),
        ("from-teacher:num_layers=12", 12, list(range(12))),
        ("from-teacher:num_layers=1", 12, [0]),
    ],
)
def test_select(spec, total, expected):
    assert parse_cut_spec(spec).select(total) == expected


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("from-teacher:layers=0,30", "layer 30 is out of range; the teacher has 30 layers, numbered 0 to 29"),
        ("from-teacher:layers=-1,3", "layer -1 is out of range"),
        ("from-teacher:layers=0,4,4", "layer 4 is listed twice; list each layer once"),
        ("from-teacher:layers=4,0", r"list the layers in increasing order, e\.g\. \[0, 4\]"),
        ("from-teacher:every=0", "every must be between 1 and the teacher's 30 layers"),
        ("from-teacher:num_layers=31", "num_layers must be between 1 and the teacher's 30 layers"),
    ],
)
def test_select_errors(spec, message):
    with pytest.raises(KdError, match=message):
        parse_cut_spec(spec).select(30)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("from-teacher:num_layer=4", "unknown key 'num_layer'; did you mean 'num_layers'\\?"),
        ("from-teacher:layer=1,2", "unknown key 'layer'; did you mean 'layers'\\?"),
        ("from-teacher:depth=4", "unknown key 'depth'; write from-teacher:layers="),
        ("from-teacher", "needs one key=value"),
        ("from-teacher:every=", "needs one key=value"),
        ("from-teacher:every=2,3", "takes one key"),
        ("from-teacher:every=2,num_layers=3", "takes one key"),
        ("from-teacher:layers=a,b", "layers takes whole numbers"),
    ],
)
def test_parse_errors(spec, message):
    with pytest.raises(KdError, match=message):
        parse_cut_spec(spec)


def test_not_a_cut_spec():
    for source in ("gpt2:n_layer=2", "org/model", "from-teachers:every=2", "demo"):
        assert parse_cut_spec(source) is None
    assert parse_cut_spec("from-teacher:every=2") == CutSpec("every", value=2, source="from-teacher:every=2")


# --------------------------------------------------------------------------- the builder


@pytest.mark.parametrize(("model_type", "prefix"), [("llama", "model.layers."), ("gpt2", "transformer.h.")])
@pytest.mark.parametrize("tie", [True, False])
def test_copied_tensors_equal_the_teachers(model_type, prefix, tie, tmp_path):
    teacher = small(model_type, layers=5, tie_word_embeddings=tie)
    chosen = [0, 2, 4]
    student = cut_student(teacher, chosen)
    assert type(student) is type(teacher) and student.training
    assert student.config.num_hidden_layers == 3 and teacher.config.num_hidden_layers == 5
    t_state, s_state = teacher.state_dict(), student.state_dict()
    assert len(decoder_layout(student)[1]) == 3
    for key, tensor in s_state.items():
        if key.startswith(prefix):
            index, _, rest = key[len(prefix) :].partition(".")
            source = f"{prefix}{chosen[int(index)]}.{rest}"
        else:
            source = key
        assert torch.equal(tensor, t_state[source]), key
        assert tensor.data_ptr() != t_state[source].data_ptr(), (
            key
        )  # a copy: training the student spares the teacher
    head, embed = student.get_output_embeddings().weight, student.get_input_embeddings().weight
    assert (head.data_ptr() == embed.data_ptr()) == tie
    # Same function: the cut student equals the teacher with the other layers skipped.
    ids = torch.randint(0, 97, (2, 9))
    layers = decoder_layout(teacher)[1]
    kept = type(layers)([layers[i] for i in chosen])
    owner = teacher.model if model_type == "llama" else teacher.transformer
    name = "layers" if model_type == "llama" else "h"
    full = getattr(owner, name)
    try:
        setattr(owner, name, kept)
        teacher.config.num_hidden_layers = 3
        with torch.no_grad():
            expected = teacher.eval()(ids, use_cache=False).logits  # kept layers keep their old layer_idx
    finally:
        setattr(owner, name, full)
        teacher.config.num_hidden_layers = 5
    with torch.no_grad():
        torch.testing.assert_close(student.eval()(ids).logits, expected, rtol=0, atol=1e-6)
    student.save_pretrained(tmp_path / "student")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "student")
    for key, tensor in s_state.items():
        assert torch.equal(reloaded.state_dict()[key], tensor), key


def test_per_layer_config_is_cut():
    teacher = small(
        "qwen2", layers=4, layer_types=["sliding_attention", "full_attention"] * 2, sliding_window=8
    )
    student = cut_student(teacher, parse_cut_spec("from-teacher:layers=1,2"))
    assert student.config.layer_types == ["full_attention", "sliding_attention"]
    assert teacher.config.layer_types == ["sliding_attention", "full_attention"] * 2
    # The same config from the teacher's config alone (what a dry run has).
    from_config = cut_config(teacher.config, [1, 2]).to_dict()
    built = student.config.to_dict()
    assert built.pop("dtype") == "float32"  # set when the student was built
    assert {k: v for k, v in from_config.items() if k != "dtype"} == built


def test_unknown_layout_is_refused():
    config = AutoConfig.for_model(
        "gpt_neox",
        vocab_size=50,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
    )
    teacher = AutoModelForCausalLM.from_config(config)
    with pytest.raises(
        KdError, match="cannot cut a student from a 'gpt_neox' teacher: kdcore finds decoder layers at"
    ):
        cut_student(teacher, [0])


def test_out_of_range_against_the_teacher():
    with pytest.raises(KdError, match="layer 4 is out of range; the teacher has 4 layers"):
        cut_student(small("llama", layers=4), parse_cut_spec("from-teacher:layers=0,4"))


# --------------------------------------------------------------------------- a head start


def _eval_ppl(model, data) -> float:
    from kdcore.inputs.packing import shift_labels
    from kdcore.training.losses import token_nll_sum

    model.eval()
    with torch.no_grad():
        logits = model(input_ids=data.input_ids, attention_mask=data.attention_mask).logits
        total, count = token_nll_sum(logits, shift_labels(data.input_ids, data.attention_mask))
    return float(torch.exp(total / count))


def test_cut_student_starts_far_below_a_random_init(one_thread):
    """A 4-layer teacher trained briefly on the demo corpus; its 2-layer cut vs a fresh 2-layer model."""
    from kdcore.inputs.demo import generate_demo_corpus
    from kdcore.inputs.packing import pack
    from kdcore.inputs.tokenization import build_tokenizer

    tokenizer = build_tokenizer("byte")
    texts = [t for t, _ in generate_demo_corpus(300, seed=0)]
    train = pack(texts[:240], tokenizer, 64)
    held = pack(texts[240:], tokenizer, 64)
    config = AutoConfig.for_model(
        "llama",
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        bos_token_id=1,
        eos_token_id=1,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    teacher = AutoModelForCausalLM.from_config(config)
    optimizer = torch.optim.AdamW(teacher.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    from kdcore.inputs.packing import shift_labels
    from kdcore.training.losses import per_sample_terms

    teacher.train()
    for _ in range(40):
        rows = torch.randint(0, len(train), (12,), generator=g)
        ids, mask = train.input_ids[rows], train.attention_mask[rows]
        logits = teacher(input_ids=ids, attention_mask=mask).logits
        per_sample_terms(logits, shift_labels(ids, mask)).ce.mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    student = cut_student(teacher, parse_cut_spec("from-teacher:num_layers=2"))  # layers 0 and 3
    torch.manual_seed(1)
    fresh = AutoModelForCausalLM.from_config(student.config)
    teacher_ppl, cut_ppl, fresh_ppl = (_eval_ppl(m, held) for m in (teacher, student, fresh))
    # A random init sits near the vocabulary size (259); the trained teacher far below. The margin
    # (a factor 3) is wide on purpose: the cut keeps embeddings, head and two trained layers.
    assert fresh_ppl > 150, fresh_ppl
    assert teacher_ppl < cut_ppl, (teacher_ppl, cut_ppl)
    assert cut_ppl * 3 < fresh_ppl, (cut_ppl, fresh_ppl)


@pytest.mark.parametrize(("model_type", "norm"), [("llama", "model.norm"), ("gpt2", "transformer.ln_f")])
def test_calibration_scales_an_overconfident_head_and_never_makes_it_worse(one_thread, model_type, norm):
    """A cut's head reads a residual stream from another depth than it was trained on and can be confidently
    wrong (SmolLM2 cuts: perplexity in the millions). The final norm is scaled by the factor that gives the
    lowest cross-entropy on training samples, which scales the logits exactly; 1 when nothing is better."""
    from kdcore.inputs.packing import shift_labels
    from kdcore.training.losses import per_sample_terms

    teacher = small(model_type, layers=4, tie_word_embeddings=True)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, 97, (4, 16), generator=g)
    mask = torch.ones_like(ids)
    student = cut_student(teacher, [0, 3])
    with torch.no_grad():  # an overconfident head: logits 40x what they were
        for p in student.get_submodule(norm).parameters(recurse=False):
            p.mul_(40.0)
    student.eval()

    def ce(model):
        with torch.no_grad():
            return float(per_sample_terms(model(input_ids=ids).logits, shift_labels(ids, mask)).ce.mean())

    before, logits = ce(student), student(input_ids=ids).logits.detach()
    embedding = student.get_input_embeddings().weight.detach().clone()
    scale = calibrate_head(student, ids, mask)
    assert scale < 1 and scale in SCALES
    assert torch.allclose(student(input_ids=ids).logits, scale * logits, rtol=1e-4, atol=1e-5)
    assert ce(student) < before and ce(student) < 1.05 * math.log(97)  # no worse than uniform, about
    assert torch.equal(student.get_input_embeddings().weight, embedding)  # tied head untouched
    assert student.lm_head.weight.data_ptr() == student.get_input_embeddings().weight.data_ptr()
    assert calibrate_head(student, ids, mask) == 1.0  # calibrated already: left as it is


# --------------------------------------------------------------------------- through kd run


def test_cut_student_from_a_teacher_cache_through_a_run(cached_tiny_teacher, tmp_path, one_thread):
    """--teacher-cache with a cut student: the teacher's weights are still loaded to copy its layers; the
    run starts from exactly the cut's perplexity, and the saved student and its card say what it is."""
    from conftest import tiny_overrides
    from rich.console import Console

    from kdcore.config import resolve_config
    from kdcore.inputs.corpus import load_corpus
    from kdcore.inputs.models import load_pretrained
    from kdcore.runs.runner import run
    from kdcore.teachers.cache import build_cache
    from kdcore.teachers.resolve import resolve_teacher
    from kdcore.training.evaluation import perplexity

    cache_cfg = resolve_config(None, tiny_overrides(tmp_path / "unused"))
    build_cache(cache_cfg, tmp_path / "cache", top_k=16, console=Console(quiet=True))
    extra = {"model.teacher_cache": str(tmp_path / "cache"), "model.student": "from-teacher:layers=1"}
    cfg = resolve_config(None, tiny_overrides(tmp_path / "run", **extra))
    result = run(cfg, console=Console(quiet=True), show_progress=False)

    corpus = load_corpus(cfg.data, 0)
    source, tokenizer = resolve_teacher(
        cfg.model, corpus, cfg.data.seq_len, cfg.training, Console(quiet=True)
    )
    teacher = load_pretrained(source)
    train, eval_set = corpus.pack(tokenizer, cfg.data.seq_len)
    cut = cut_student(teacher, [1])
    calibrate_head(cut, train.input_ids, train.attention_mask)
    assert result.summary.student_initial_eval_ppl == pytest.approx(perplexity(cut, eval_set), rel=1e-6)
    saved = load_pretrained(str(tmp_path / "run" / "student"))
    assert saved.config.n_layer == 1 and saved.config.n_embd == teacher.config.n_embd
    card = (tmp_path / "run" / "student" / "README.md").read_text()
    assert (
        "`from-teacher:layers=1`: decoder layers, embeddings, final norm and head copied from the teacher "
        "(the final norm scaled down when the copied head was overconfident)" in card
    )


def test_cut_spec_typos_fail_before_anything_loads(tmp_path):
    from conftest import run_kd

    env = {"COLUMNS": "200"}
    result = run_kd("run", "--student", "from-teacher:layer=1", "--dry-run", env_extra=env)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "unknown key 'layer'; did you mean 'layers'?" in result.stderr
    result = run_kd("run", "--teacher", "from-teacher:num_layers=2", "--dry-run", env_extra=env)
    assert result.returncode == 2
    assert "describes a student cut from the teacher; pass it as --student" in result.stderr
    result = run_kd(
        "train-teacher", "--model", "from-teacher:num_layers=2", "--output-dir", str(tmp_path / "t")
    )
    assert result.returncode == 2 and "which kd run builds (--student)" in result.stderr
    assert not (tmp_path / "t").exists()


def test_dry_run_sizes_the_cut_from_the_teachers_config(cached_tiny_teacher, tmp_path):
    from conftest import tiny_overrides

    from kdcore.config import resolve_config
    from kdcore.runs.dry_run import dry_run

    cfg = resolve_config(None, tiny_overrides(tmp_path, **{"model.student": "from-teacher:every=2"}))
    report = dry_run(cfg)  # the tiny teacher has 2 layers: every=2 keeps layer 0
    assert report.student.kind == "cut from the teacher's layer 0"
    config = AutoConfig.for_model("gpt2", n_layer=1, n_embd=32, n_head=2, vocab_size=259)
    expected = AutoModelForCausalLM.from_config(config)
    assert report.student.parameters == sum(p.numel() for p in expected.parameters())
    assert not (tmp_path / "student").exists()
