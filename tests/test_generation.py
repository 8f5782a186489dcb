"""Sampling continuations with the KV cache: determinism, EOS, prompts, modes, RNG, greedy, top-p."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
from transformers.generation.logits_process import TopPLogitsWarper

from kdcore.inputs.packing import IGNORE_INDEX
from kdcore.training.generation import generate, prompts_of, row_seeds, sample_next

pytestmark = pytest.mark.usefixtures("one_thread")

V, PAD, EOS = 37, 0, 1


def gpt2(dropout: float = 0.0) -> torch.nn.Module:
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=V, n_layer=2, n_embd=32, n_head=2, n_positions=64, bos_token_id=EOS, eos_token_id=EOS,
        pad_token_id=PAD, resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
        tie_word_embeddings=False, initializer_range=0.2,  # untied and larger: no copy-the-last-token model
    )  # fmt: skip
    # float64: batched, padded, cached logits then agree with the unpadded reference to ~1e-13, far below
    # any gap between two candidate tokens, so greedy and inverse-CDF picks are comparable exactly.
    return GPT2LMHeadModel(config).double().eval()


def llama() -> torch.nn.Module:
    torch.manual_seed(1)
    config = LlamaConfig(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=64, bos_token_id=EOS, eos_token_id=EOS, pad_token_id=PAD,
    )  # fmt: skip
    return LlamaForCausalLM(config).double().eval()


# right-padded prompts of different lengths, junk (not PAD) beyond each length to prove it is ignored
LENGTHS = torch.tensor([6, 2, 4, 1])
PROMPTS = torch.randint(2, V, (4, 6), generator=torch.Generator().manual_seed(3))


def run(model, n=8, seeds=None, prompts=PROMPTS, lengths=LENGTHS, **kw):
    seeds = row_seeds(0, 5, range(len(lengths))) if seeds is None else seeds
    return generate(model, prompts, lengths, max_new_tokens=n, pad_id=PAD, seeds=seeds, **kw)


def continuation(out, i) -> list[int]:
    return out.input_ids[i][out.generated_mask[i]].tolist()


def reference_greedy(model, prompt: torch.Tensor, n: int, eos: int | None = None) -> list[int]:
    """Argmax stepping over the whole unpadded prefix, one prompt at a time, without the cache."""
    ids = prompt.clone()
    with torch.no_grad():
        for _ in range(n):
            token = model(input_ids=ids[None]).logits[0, -1].argmax()
            ids = torch.cat([ids, token[None]])
            if token.item() == eos:
                break
    return ids[len(prompt) :].tolist()


@pytest.mark.parametrize("make", [gpt2, llama])
def test_greedy_equals_argmax_stepping_without_cache(make):
    model = make()
    out = run(model, n=10, temperature=0)
    for i, n in enumerate(LENGTHS.tolist()):
        assert continuation(out, i) == reference_greedy(model, PROMPTS[i, :n], 10)


def test_sampling_is_deterministic_per_seed_and_row_not_batch():
    model = gpt2()
    a, b = run(model, top_p=0.9), run(model, top_p=0.9)
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.generated_mask, b.generated_mask)
    other_step = run(model, seeds=row_seeds(0, 6, range(4)), top_p=0.9)
    assert not torch.equal(a.input_ids, other_step.input_ids)
    # row 2 alone, with its own seed, writes what it wrote inside the batch: draws follow the row
    alone = run(model, seeds=row_seeds(0, 5, [2]), prompts=PROMPTS[2:3], lengths=LENGTHS[2:3], top_p=0.9)
    assert continuation(alone, 0) == continuation(a, 2)


def test_cache_and_no_cache_sample_the_same_tokens():
    model = gpt2()
    with_cache, without = run(model, temperature=1.3), run(model, temperature=1.3, use_cache=False)
    assert torch.equal(with_cache.input_ids, without.input_ids)


def test_prompt_kept_and_rows_left_justified():
    out = run(gpt2())
    for i, n in enumerate(LENGTHS.tolist()):
        assert out.input_ids[i, :n].tolist() == PROMPTS[i, :n].tolist()
        assert not out.generated_mask[i, :n].any() and out.attention_mask[i, :n].all()
        assert int(out.generated_mask[i].sum()) == 8  # no EOS given: all max_new_tokens count
        assert out.generated_mask[i, n : n + 8].all()
    assert out.input_ids.shape[1] == int(LENGTHS.max()) + 8
    junk = PROMPTS.clone()
    junk[1, 2:] = 5  # beyond row 1's length: must not matter
    assert torch.equal(run(gpt2(), prompts=junk).input_ids, out.input_ids)


def test_eos_stops_a_row_and_what_follows_counts_nowhere():
    model = gpt2()
    free = run(model, n=10)
    eos = free.input_ids[0, LENGTHS[0] + 3].item()  # row 0's 4th sampled token becomes the EOS
    stopped = run(model, n=10, eos_ids=[eos])
    for i, n in enumerate(LENGTHS.tolist()):
        tokens = continuation(free, i)
        cut = tokens.index(eos) + 1 if eos in tokens else len(tokens)  # up to and including the first EOS
        assert continuation(stopped, i) == tokens[:cut]  # same draws, so the same prefix
        assert stopped.attention_mask[i].sum() == n + cut
        assert (stopped.input_ids[i, n + cut :] == PAD).all()
        assert not stopped.attention_mask[i, n + cut :].any()
    assert len(continuation(stopped, 0)) == continuation(free, 0).index(eos) + 1 <= 4
    labels = stopped.labels()
    # labels: the counted generated tokens only, each at the position that predicts it
    for i, n in enumerate(LENGTHS.tolist()):
        valid = (labels[i] != IGNORE_INDEX).nonzero().squeeze(1)
        assert valid.tolist() == list(range(n - 1, n - 1 + len(continuation(stopped, i))))
        assert labels[i, valid].tolist() == continuation(stopped, i)


@pytest.mark.parametrize("was_training", [True, False])
def test_eval_mode_inside_previous_mode_after(was_training):
    model = gpt2(dropout=0.5).train(was_training)
    seen = []
    model.register_forward_pre_hook(lambda module, args: seen.append(module.training))
    out = run(model, n=3)
    assert seen and not any(seen)  # no dropout while generating
    assert model.training is was_training
    assert torch.equal(out.input_ids, run(gpt2(dropout=0.5).eval(), n=3).input_ids)


def test_global_rng_untouched():
    model = gpt2()
    torch.manual_seed(123)
    state = torch.get_rng_state()
    out = run(model, n=6, temperature=1.0, top_p=0.8)
    assert torch.equal(torch.get_rng_state(), state)
    assert out.generated_mask.sum() == 4 * 6


def test_top_p_keeps_the_transformers_nucleus():
    logits = torch.randn(64, V, generator=torch.Generator().manual_seed(0)) * 3
    for top_p in (0.3, 0.75, 0.95):
        kept_hf = torch.isfinite(TopPLogitsWarper(top_p)(None, logits.clone()))
        # u sweeps [0, 1): every token the sampler can return must be in the nucleus, and each is reached
        picks = torch.stack(
            [sample_next(logits, torch.full((64,), u), 1.0, top_p) for u in torch.arange(0, 1, 1e-3)]
        )
        reached = torch.zeros_like(kept_hf).scatter_(1, picks.T, True)
        assert torch.equal(reached, kept_hf)


def test_inverse_cdf_matches_the_probabilities_and_greedy_is_argmax():
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.125, 0.125]]))
    grid = torch.arange(1000) / 1000  # a uniform grid: each token's share of it is its probability
    picks = torch.stack([sample_next(logits, u.reshape(1), 1.0, 1.0) for u in grid]).squeeze(1)
    assert torch.bincount(picks, minlength=4).tolist() == [500, 250, 125, 125]
    # top_p 0.6: the nucleus is {0, 1} (0.5 < 0.6 ≤ 0.75), renormalised to 2/3, 1/3
    picks = torch.stack([sample_next(logits, u.reshape(1), 1.0, 0.6) for u in grid]).squeeze(1)
    assert torch.bincount(picks, minlength=4).tolist() == [667, 333, 0, 0]
    assert sample_next(torch.tensor([[0.1, 2.0, 1.9]]), torch.tensor([0.99]), 0.0, 1.0).item() == 1


def test_prompts_are_the_first_tokens_of_each_row():
    ids = torch.tensor([[5, 6, 7, 8, 9], [5, 6, PAD, PAD, PAD], [4, PAD, PAD, PAD, PAD]])
    prompts, lengths = prompts_of(ids, (ids != PAD).long(), prompt_tokens=3)
    assert lengths.tolist() == [3, 2, 1]  # row 2 is too short to be a prompt: callers keep it as text
    assert prompts.tolist() == [[5, 6, 7], [5, 6, PAD], [4, PAD, PAD]]
    out = run(gpt2(), n=2, prompts=prompts[:2], lengths=lengths[:2])
    assert out.input_ids[:, :2].tolist() == [[5, 6], [5, 6]] and out.input_ids[0, 2] == 7


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="prompt lengths must lie in"):
        run(gpt2(), lengths=torch.tensor([6, 0, 4, 1]))
    with pytest.raises(ValueError, match="4 seeds"):
        run(gpt2(), seeds=[1, 2])
    with pytest.raises(ValueError, match="top_p"):
        run(gpt2(), top_p=0.0)
