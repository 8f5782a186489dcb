"""Sources: the rows a request writes (prompts, labels, padding, seeds), the built-in sources, an on-policy step
against an independent computation, chat prompts, refusals, and the dataset run kept bit for bit."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch
import yaml
from conftest import run_kd, tiny_overrides
from safetensors.torch import load_file
from transformers import GPT2Config, GPT2LMHeadModel

from kdcore.config import StrategyConfig, TrainingConfig, resolve_config
from kdcore.errors import KdError
from kdcore.inputs.packing import IGNORE_INDEX, PackedDataset
from kdcore.plugins import get_registry
from kdcore.runs.runner import run
from kdcore.strategies import Source, SourceContext, SourceRows
from kdcore.training.engine import Trainer, make_strategies
from kdcore.training.generation import generate, row_seeds
from kdcore.training.sources import BatchRequest, check_source, dataset_rows

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB, PAD, EOS = 8, 0, 1
SEED, STEP = 7, 3


def tiny_lm(seed: int, layers: int = 1) -> GPT2LMHeadModel:
    """A GPT-2 without dropout, so that a training forward can be recomputed exactly."""
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=VOCAB, n_positions=64, n_embd=16, n_layer=layers, n_head=2, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, bos_token_id=EOS, eos_token_id=EOS, pad_token_id=PAD,
    )  # fmt: skip
    return GPT2LMHeadModel(config)


def samples(n: int = 6, length: int = 12, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ids in 2..VOCAB-1 (no EOS, no pad), rows shortened at the end to test padding."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (n, length), generator=g)
    mask = torch.ones(n, length, dtype=torch.long)
    mask[1, 7:] = 0  # 7 valid tokens
    mask[2, 3:] = 0  # 3 valid tokens: a prompt shorter than prompt_tokens
    return ids.masked_fill(mask == 0, PAD), mask


def request(student, teacher=None, ids=None, mask=None, sample_ids=None, prompt_lengths=None, step=STEP):
    ids, mask = samples() if ids is None else (ids, mask)
    sample_ids = torch.arange(10, 10 + len(ids)) if sample_ids is None else sample_ids
    return BatchRequest(
        sample_ids, dataset_rows(ids, mask), prompt_lengths, step, SEED, 0.5, student, teacher, PAD, (EOS,)
    )


def source(name: str, **params):
    return get_registry().create("source", name, params)


def check_generated_row(rows, i: int, dataset_ids: torch.Tensor, prompt: int) -> int:
    """Row ``i`` holds the first ``prompt`` dataset tokens, then a continuation labelled token by token;
    returns the number of generated tokens."""
    ids, mask, labels = rows.input_ids[i], rows.attention_mask[i], rows.labels[i]
    assert torch.equal(ids[:prompt], dataset_ids[:prompt])
    valid = int(mask.sum())
    assert mask[:valid].all() and not mask[valid:].any()  # left-justified, right-padded
    n_generated = valid - prompt
    assert n_generated >= 1
    expected = torch.full_like(labels, IGNORE_INDEX)
    expected[prompt - 1 : valid - 1] = ids[prompt:valid]  # position t predicts the generated token t + 1
    assert torch.equal(labels, expected)
    gold = torch.full_like(labels, IGNORE_INDEX)
    gold[: prompt - 1] = dataset_ids[1:prompt]  # the scorer's statistics: the prompt's gold next tokens
    assert torch.equal(rows.prompt_labels[i], gold)
    stops = (ids[prompt:valid] == EOS).nonzero()
    assert len(stops) == 0 or int(stops[0]) == n_generated - 1  # nothing is generated after an EOS
    return n_generated


def test_on_policy_rows_continue_each_prompt_and_label_only_the_continuation():
    student = tiny_lm(0)
    req = request(student)
    rows = source("on-policy", prompt_tokens=4, max_new_tokens=6).rows(req)
    ids = req.dataset.input_ids
    assert rows.generated.all() and not rows.labelled.any()
    lengths = [4, 4, 3, 4, 4, 4]  # the 3-token sample is a prompt as a whole
    generated = [check_generated_row(rows, i, ids[i], p) for i, p in enumerate(lengths)]
    assert max(generated) == 6 and min(generated) < 6  # some row stopped at its EOS
    # the continuation is the sampler's, seeded by (seed, step, sample id) row by row: alone, the same
    alone = generate(
        student, ids[3:4, :4], torch.tensor([4]), max_new_tokens=6, pad_id=PAD,
        seeds=row_seeds(SEED, STEP, [13]), eos_ids=(EOS,),
    )  # fmt: skip
    assert torch.equal(rows.input_ids[3, : alone.input_ids.shape[1]], alone.input_ids[0])
    # another step draws other continuations; the same step the same ones
    assert torch.equal(
        source("on-policy", prompt_tokens=4, max_new_tokens=6).rows(request(student)).input_ids,
        rows.input_ids,
    )
    other = source("on-policy", prompt_tokens=4, max_new_tokens=6).rows(request(student, step=STEP + 1))
    assert not torch.equal(other.input_ids, rows.input_ids)
    assert student.training is True  # generation put the student back in its mode


def test_mixed_draws_one_seeded_coin_per_sample_and_keeps_the_other_rows_as_dataset_text():
    student = tiny_lm(0)
    ids, mask = samples(n=16, seed=1)
    req = request(student, ids=ids, mask=mask)
    coins = req.coin("mixed")
    # a sample's coin depends on (seed, step, sample id) only, not on the batch it is in
    reordered = request(student, ids=ids.flip(0), mask=mask.flip(0), sample_ids=req.sample_ids.flip(0))
    assert torch.equal(reordered.coin("mixed"), coins.flip(0))
    rows = source("mixed", fraction=0.5, prompt_tokens=4, max_new_tokens=6).rows(req)
    picked = coins < 0.5
    assert 0 < int(picked.sum()) < 16
    assert torch.equal(rows.generated, picked & (mask.sum(1) >= 2))
    assert torch.equal(rows.labelled, ~rows.generated)
    width = rows.input_ids.shape[1]
    assert width == ids.shape[1]  # 4 + 6 tokens fit in the dataset rows' 12
    for i in range(16):
        if rows.generated[i]:
            check_generated_row(rows, i, ids[i], min(4, int(mask[i].sum())))
        else:  # the dataset row, its gold labels and no prompt statistics
            assert torch.equal(rows.input_ids[i], ids[i]) and torch.equal(
                rows.labels[i], req.dataset.labels[i]
            )
            assert (rows.prompt_labels[i] == IGNORE_INDEX).all()
    assert source("mixed", fraction=0.0).rows(req) is req.dataset  # nothing drawn, nothing generated
    assert source("mixed", fraction=1.0, prompt_tokens=4, max_new_tokens=6).rows(req).generated.all()


def test_teacher_generated_rows_are_the_teachers_greedy_text_and_labelled():
    student, teacher = tiny_lm(0), tiny_lm(1, layers=2)
    req = request(student, teacher)
    rows = source("teacher-generated", prompt_tokens=4, max_new_tokens=5).rows(req)
    assert rows.generated.all() and rows.labelled.all()
    greedy = generate(
        teacher, req.dataset.input_ids, torch.tensor([4, 4, 3, 4, 4, 4]), max_new_tokens=5, pad_id=PAD,
        seeds=[0] * 6, eos_ids=(EOS,), temperature=0.0,
    )  # fmt: skip
    assert torch.equal(rows.input_ids, greedy.input_ids)


def test_chat_samples_bring_their_own_prompts(tmp_path):
    """A dataset with prompt_lengths (chat samples): those tokens are the prompt, whatever prompt_tokens says."""
    ids, mask = samples(n=4, length=16, seed=2)
    train = PackedDataset(ids, mask, prompt_lengths=torch.tensor([9, 5, 1, 2]))
    strategies, _ = make_strategies(
        StrategyConfig(source={"name": "on-policy", "params": {"max_new_tokens": 4}})
    )
    training = TrainingConfig(max_steps=1, batch_size=4, checkpoint_every=None)
    trainer = Trainer(
        tiny_lm(0), tiny_lm(1), train, train, strategies, training, 1.0, pad_id=PAD, eos_ids=(EOS,)
    )
    rows = trainer.source_rows(torch.arange(4), 0, 0.0)
    assert rows.generated.tolist() == [True, True, False, True]  # a 1-token prompt stays a dataset row
    for i, prompt in ((0, 9), (1, 5), (3, 2)):
        check_generated_row(rows, i, ids[i], prompt)
    assert torch.equal(rows.input_ids[2, :16], ids[2]) and torch.equal(
        rows.labels[2, :16], dataset_rows(ids, mask).labels[2]
    )


def test_an_on_policy_step_trains_on_the_teacher_divergence_of_the_students_own_tokens():
    """The step's loss, recomputed independently: the student's continuations (seeded per sample id), both
    models on exactly those ids, λ·τ²·mean reverse KL over the generated tokens through the first EOS."""
    ids, mask = samples(n=8, length=12, seed=3)
    train = PackedDataset(ids, mask)
    tau, lam = 2.0, 0.7
    strategies, _ = make_strategies(
        StrategyConfig(
            source={"name": "on-policy", "params": {"prompt_tokens": 4, "max_new_tokens": 6}},
            reliance={"name": "fixed", "params": {"value": lam}},
            divergence="reverse-kl",
        )
    )
    training = TrainingConfig(max_steps=2, batch_size=8, checkpoint_every=None, seed=SEED)
    student, teacher = tiny_lm(0), tiny_lm(1, layers=2)
    trainer = Trainer(student, teacher, train, train, strategies, training, tau, pad_id=PAD, eos_ids=(EOS,))
    before = copy.deepcopy(trainer.unwrapped_student())
    trainer.refresh(0)
    batch = trainer.sampler.batch(0)
    metrics = trainer.train_step(0)

    losses, generated_rows = [], 0
    for sample in batch.tolist():
        gen = generate(
            before, ids[sample : sample + 1], mask[sample : sample + 1].sum(1).clamp(max=4), max_new_tokens=6, pad_id=PAD,
            seeds=row_seeds(SEED, 0, [sample]), eos_ids=(EOS,),
        )  # fmt: skip
        positions = gen.generated_mask[0, 1:].nonzero().flatten()  # position t predicts generated token t + 1
        with torch.no_grad():
            s = before(gen.input_ids, attention_mask=gen.attention_mask).logits[0].double() / tau
            t = teacher(gen.input_ids, attention_mask=gen.attention_mask).logits[0].double() / tau
        kl = [
            sum(
                torch.softmax(s[p], -1)[v] * (torch.log_softmax(s[p], -1)[v] - torch.log_softmax(t[p], -1)[v])
                for v in range(VOCAB)
            )
            for p in positions.tolist()
        ]
        losses.append(lam * tau * tau * sum(kl) / len(kl))
        generated_rows += 1
    # The step computes in float32: each log-probability carries ~1e-7 absolute error, and the KL adds up
    # differences of them, so the error is absolute (~1e-7 per token), not relative to the small KL itself.
    assert float(metrics["loss"]) == pytest.approx(float(sum(losses) / len(losses)), abs=5e-7)
    assert float(metrics["generated"]) == 1.0 and generated_rows == 8
    assert float(metrics["ce"]) > 0  # the scorer's ce: the student on the prompts' gold tokens
    changed = any(
        not torch.equal(a, b)
        for a, b in zip(before.parameters(), trainer.unwrapped_student().parameters(), strict=True)
    )
    assert changed


def test_the_default_source_and_mixed_fraction_zero_give_the_dataset_run_bit_for_bit(
    tmp_path, cached_tiny_teacher
):
    curriculum = {
        "strategy.scorer": "student-snapshot",
        "strategy.pacing": "root",
        "strategy.reliance": "threshold",
        "training.threads": 1,
    }
    dataset = run(
        resolve_config(None, tiny_overrides(tmp_path / "dataset", **curriculum)), show_progress=False
    )
    mixed0 = run(
        resolve_config(
            None,
            tiny_overrides(
                tmp_path / "mixed0",
                **curriculum,
                **{"strategy.source": {"name": "mixed", "params": {"fraction": 0}}},
            ),
        ),
        show_progress=False,
    )
    a, b = dataset.summary, mixed0.summary
    for key in ("student_eval_ppl", "student_initial_eval_ppl", "mean_lambda", "train_tokens", "onpolicy_kl"):
        assert a[key] == b[key], key
    assert a.eval_curve == b.eval_curve and b.generation_share == 0.0

    def records(run_dir):
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(x).items() if k != "tokens_per_second"} for x in lines]

    assert records(dataset.run_dir) == records(mixed0.run_dir)
    wa = load_file(dataset.run_dir / "student" / "model.safetensors")
    wb = load_file(mixed0.run_dir / "student" / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_a_mixed_run_from_yaml_trains_on_generated_rows(tmp_path, cached_tiny_teacher):
    tree: dict = {}
    for dotted, value in tiny_overrides(tmp_path / "run", **{"training.threads": 1}).items():
        section, _, key = dotted.partition(".")
        tree.setdefault(section, {})[key] = value
    tree["strategy"] = {
        "source": {"name": "mixed", "params": {"fraction": 0.5, "prompt_tokens": 8, "max_new_tokens": 8}},
        "divergence": "reverse-kl",
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(tree))
    result = run(resolve_config(path), show_progress=False)
    summary = result.summary
    assert summary.strategy["source"] == "mixed" and summary.strategy_params["source"]["fraction"] == 0.5
    assert 0 < summary.generation_share < 1
    shares = [
        json.loads(x)["generated"]
        for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()
        if "loss" in x
    ]
    assert all(0 < share < 1 for share in shares)  # about half of each window's rows are on-policy
    assert summary.onpolicy_kl > 0 and result.run_dir.name == "run"


def test_a_teacher_cache_and_a_generating_source_are_refused_in_one_sentence(tmp_path):
    result = run_kd("run", "--teacher-cache", str(tmp_path / "cache"), "--source", "on-policy")
    assert result.returncode == 2
    message = result.stderr.strip()
    assert message == (
        "error: a teacher cache holds the teacher's outputs on the dataset's text only, and source 'on-policy' "
        "trains on text written during training; drop --teacher-cache or use --source dataset"
    )


def test_refusals_before_anything_loads():
    registry = get_registry()
    none, fixed = registry.create("reliance", "none"), registry.create("reliance", "fixed")
    with pytest.raises(
        KdError, match=r"^source 'on-policy' trains on the teacher term alone and reliance 'none'"
    ):
        check_source(source("on-policy"), "on-policy", none, "none", cache=False)
    check_source(source("on-policy"), "on-policy", fixed, "fixed", cache=False)
    check_source(source("mixed", fraction=0.5), "mixed", none, "none", cache=False)  # dataset rows keep CE
    check_source(source("mixed", fraction=0.0), "mixed", fixed, "fixed", cache=True)  # generates nothing
    check_source(source("dataset"), "dataset", none, "none", cache=True)
    with pytest.raises(KdError, match="exceed the models' 64 positions; lower max_new_tokens"):
        source("on-policy", max_new_tokens=40).check(SourceContext(seq_len=48, max_positions=64))
    source("on-policy", max_new_tokens=32).check(SourceContext(seq_len=48, max_positions=64))
    with pytest.raises(
        KdError, match="a prompt of 60 tokens"
    ):  # a chat prompt is as long as the dataset says
        source("on-policy", max_new_tokens=8).check(
            SourceContext(seq_len=64, max_positions=64, longest_prompt=60)
        )
    with pytest.raises(KdError, match="bad parameters for source 'mixed': fraction"):
        source("mixed", fraction=1.5)


@pytest.mark.parametrize(
    "env, name", [("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed")]
)
def test_a_generating_source_is_refused_under_fsdp_and_deepspeed(monkeypatch, env, name):
    """Generation may make a different number of forward calls per process: a sharded model would hang."""
    fixed = get_registry().create("reliance", "fixed")
    monkeypatch.setenv(env, "true")
    with pytest.raises(KdError, match=rf"^source 'mixed' writes text during training, .* under {name} "):
        check_source(source("mixed", fraction=0.5), "mixed", fixed, "fixed", cache=False)
    check_source(source("dataset"), "dataset", fixed, "fixed", cache=False)  # dataset rows: no generation
    monkeypatch.setenv(env, "false")
    check_source(source("mixed", fraction=0.5), "mixed", fixed, "fixed", cache=False)  # DDP: allowed


# -- a plugin source continuing prompts of its own ------------------------------------------------------
class OwnPrompts(Source):
    """A plugin source as docs/plugins.md describes one: it continues a prompt it writes itself (each
    sample's tokens reversed), through ``with_rows`` or, as a plugin might, a copy of the request."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how

    def rows(self, request):
        flipped = request.dataset.input_ids.flip(1)
        mine = SourceRows(flipped, torch.ones_like(flipped), request.dataset.labels, *dataset_flags(flipped))
        copy_ = (
            request.with_rows(mine) if self.how == "with_rows" else dataclasses.replace(request, dataset=mine)
        )
        return copy_.generate(request.student, torch.full((len(flipped),), 4), max_new_tokens=3)


def dataset_flags(ids):
    n = len(ids)
    return torch.zeros(n, dtype=torch.bool), torch.ones(n, dtype=torch.bool)


@pytest.mark.parametrize("how", ["with_rows", "replace"])
def test_a_source_continues_its_own_prompts_and_its_generation_time_counts(how):
    """Copying the request to hand generate() other prompts silently zeroed generation_share: the time
    was kept on the copy. It is now kept by the engine, whichever copy generates."""
    ids, mask = samples(n=4, length=12, seed=5)
    mask = torch.ones_like(mask)
    train = PackedDataset(ids, mask)
    strategies, _ = make_strategies(StrategyConfig(reliance={"name": "fixed", "params": {"value": 0.5}}))
    strategies.source = OwnPrompts(how)
    training = TrainingConfig(max_steps=1, batch_size=4, checkpoint_every=None, seed=SEED)
    trainer = Trainer(
        tiny_lm(0), tiny_lm(1), train, train, strategies, training, 1.0, pad_id=PAD, eos_ids=(EOS,)
    )
    rows = trainer.source_rows(torch.arange(4), 0, 0.0)
    assert torch.equal(rows.input_ids[:, :4], ids.flip(1)[:, :4])  # the source's own prompts, continued
    assert rows.generated.all()
    assert trainer.history.generation_seconds > 0


def test_the_testing_request_is_kdcores_own():
    from kdcore.testing import source_request

    ids, mask = samples()
    student = tiny_lm(0)
    request = source_request(ids, mask, student=student, sample_ids=torch.arange(10, 16), step=STEP, seed=SEED,
                             pad_id=PAD, eos_ids=[EOS])  # fmt: skip
    ours = request.generate(student, request.prompts(4), max_new_tokens=5)
    engine = globals()["request"](student).generate(student, request.prompts(4), max_new_tokens=5)
    for name in ("input_ids", "attention_mask", "labels", "generated", "labelled", "prompt_labels"):
        assert torch.equal(getattr(ours, name), getattr(engine, name)), name
    assert torch.equal(request.coin("x"), globals()["request"](student).coin("x"))
    with pytest.raises(ValueError, match="one row per sample: 6, not 2"):
        request.with_rows(dataset_rows(ids[:2], mask[:2]))
