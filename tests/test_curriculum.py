"""The curriculum sampler: ordering, ranks, open share, epochs, determinism and resume."""

from __future__ import annotations

import io
import math

import pytest
import torch

from kdcore import PacingFunction
from kdcore.errors import KdError
from kdcore.plugins import get_registry
from kdcore.training.curriculum import CurriculumSampler, difficulty_ranks

NAN = math.nan


def pacing(name: str = "linear", **params) -> PacingFunction:
    return get_registry().create("pacing", name, params)


def sampler(n=100, b=8, pace=None, total=200, seed=0, reverse=False) -> CurriculumSampler:
    return CurriculumSampler(n, b, pace or pacing(), total, seed, reverse=reverse)


def distinct_scores(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).double() / n


def batches(s: CurriculumSampler, steps) -> list[list[int]]:
    return [s.batch(step).tolist() for step in steps]


# --- ordering and ranks -----------------------------------------------------------------------


def test_ranks_hand_computed_with_ties_and_nan():
    scores = torch.tensor([3.0, 1.0, NAN, 1.0, 5.0, 3.0])
    # known sorted: 1, 1, 3, 3, 5 -> 0-based ranks 0.5, 0.5, 2.5, 2.5, 4 -> divided by 4
    expected = [0.625, 0.125, NAN, 0.125, 1.0, 0.625]
    got = difficulty_ranks(scores).tolist()
    assert got[2] != got[2]
    assert [g for i, g in enumerate(got) if i != 2] == pytest.approx(
        [e for i, e in enumerate(expected) if i != 2]
    )

    s = sampler(n=6, b=2)
    s.refresh(scores, 0)
    assert s.ranks.dtype == torch.float32
    assert torch.equal(torch.isnan(s.ranks), torch.isnan(scores))
    assert s.ranks[~torch.isnan(scores)].tolist() == pytest.approx([0.625, 0.125, 0.125, 1.0, 0.625])
    assert torch.allclose(s.scores, scores, equal_nan=True)


def test_ranks_edge_cases():
    assert difficulty_ranks(torch.tensor([NAN, 2.0, NAN])).tolist()[1] == 0.5  # single known
    assert difficulty_ranks(torch.tensor([4.0, 4.0, 4.0])).tolist() == [0.5, 0.5, 0.5]
    assert difficulty_ranks(torch.tensor([-math.inf, 0.0, math.inf])).tolist() == [0.0, 0.5, 1.0]
    s = sampler(n=5, b=2)
    s.refresh(None, 0)
    assert torch.isnan(s.ranks).all() and torch.isnan(s.scores).all()


def test_known_scores_sort_easy_to_hard_and_reverse_flips():
    scores = distinct_scores(50)
    forward, backward = sampler(n=50), sampler(n=50, reverse=True)
    forward.refresh(scores, 0)
    backward.refresh(scores, 0)
    assert torch.equal(forward.ordering, torch.argsort(scores))
    assert torch.equal(backward.ordering, forward.ordering.flip(0))
    assert torch.equal(forward.ranks, backward.ranks)  # ranks are difficulty, not presentation


def test_reverse_flips_ties_too():
    scores = torch.tensor([1.0, 0.0, 1.0, 0.0, 2.0, 1.0, 0.0, 2.0])
    forward, backward = sampler(n=8, b=2), sampler(n=8, b=2, reverse=True)
    forward.refresh(scores, 0)
    backward.refresh(scores, 0)
    assert torch.equal(backward.ordering, forward.ordering.flip(0))
    assert scores[forward.ordering].tolist() == sorted(scores.tolist())


def test_ties_are_broken_randomly_not_by_id():
    s = sampler(n=1000)
    s.refresh(torch.zeros(1000), 0)
    assert sorted(s.ordering.tolist()) == list(range(1000))
    # low ids are not favoured: the first tenth of the ordering is a random-looking tenth of the ids
    head = s.ordering[:100].double()
    assert 350 < head.mean().item() < 650
    other = sampler(n=1000, seed=1)
    other.refresh(torch.zeros(1000), 0)
    assert not torch.equal(s.ordering, other.ordering)


def test_refresh_with_new_scores_resorts():
    s = sampler(n=40)
    scores = distinct_scores(40)
    s.refresh(scores, 0)
    first = s.ordering.clone()
    s.refresh(-scores, s.steps_per_epoch)
    assert torch.equal(s.ordering, first.flip(0))
    assert torch.allclose(s.ranks, 1 - difficulty_ranks(scores).float())


def test_all_unknown_is_a_seeded_permutation_stable_across_refreshes():
    s = sampler(n=64)
    s.refresh(None, 0)
    order = s.ordering.clone()
    assert sorted(order.tolist()) == list(range(64))
    assert not torch.equal(order, torch.arange(64))
    s.refresh(torch.full((64,), NAN), s.steps_per_epoch)
    assert torch.equal(s.ordering, order)
    again = sampler(n=64)
    again.refresh(None, 0)
    assert torch.equal(again.ordering, order)
    different = sampler(n=64, seed=5)
    different.refresh(None, 0)
    assert not torch.equal(different.ordering, order)


def test_partly_unknown_samples_are_spread_at_random_positions():
    n = 200
    scores = distinct_scores(n)
    scores[::2] = NAN  # half unknown
    s = sampler(n=n)
    s.refresh(scores, 0)
    assert sorted(s.ordering.tolist()) == list(range(n))
    unknown = torch.isnan(scores[s.ordering])
    positions = torch.nonzero(unknown).flatten().double()
    assert positions.numel() == 100
    assert 70 < positions.mean().item() < 130  # not all at the end (mean would be 149.5)
    known_in_order = scores[s.ordering][~unknown]
    assert torch.equal(known_in_order, known_in_order.sort().values)  # known ones still easy→hard
    twin = sampler(n=n)
    twin.refresh(scores, 0)
    assert torch.equal(twin.ordering, s.ordering)


def test_refresh_rejects_wrong_length():
    with pytest.raises(KdError, match="10 scores but the dataset has 12"):
        sampler(n=12, b=2).refresh(torch.zeros(10), 0)


# --- open share and batches -------------------------------------------------------------------


def test_batches_come_from_the_open_share_of_the_pacing():
    n, b, total = 100, 8, 200
    pace = pacing("linear", s0=0.1, ramp=0.5)
    s = sampler(n=n, b=b, pace=pace, total=total)
    s.refresh(distinct_scores(n), 0)
    for step in range(0, total, 3):
        k = s.open_count(step)
        assert k == min(n, max(b, math.ceil(round(pace.fraction(step, total) * n, 6))))
        ids = s.batch(step)
        assert ids.dtype == torch.long and ids.shape == (b,)
        assert len(set(ids.tolist())) == b
        if k < n:
            allowed = set(s.ordering[:k].tolist())
            assert set(ids.tolist()) <= allowed, step
    assert s.open_count(0) == 10
    assert s.open_count(50) == 55  # t = 0.25, p = 0.5: 0.1 + 0.9·0.5
    assert s.open_count(100) == 100


def test_open_count_is_at_least_a_batch():
    s = sampler(n=100, b=32, pace=pacing("linear", s0=0.05))
    assert s.open_count(0) == 32
    assert sampler(n=10, b=32).open_count(0) == 10


def test_open_count_does_not_round_up_float_noise():
    s = sampler(n=10, b=1, pace=pacing("linear", s0=0.2))
    assert s.open_count(0) == 2  # 0.2·10 = 2.0000000000000004


def test_determinism_and_seeds():
    scores = distinct_scores(100)
    runs = []
    for seed in (0, 0, 1):
        s = sampler(seed=seed)
        s.refresh(scores, 0)
        runs.append(batches(s, range(0, 200, 7)))
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_pacing_none_is_plain_epochs_each_sample_once():
    n, b = 40, 8
    s = sampler(n=n, b=b, pace=pacing("none"))
    s.refresh(distinct_scores(n), 0)
    assert s.steps_per_epoch == 5
    epochs = []
    for epoch in range(3):
        ids = torch.cat([s.batch(epoch * 5 + j) for j in range(5)])
        assert sorted(ids.tolist()) == list(range(n))
        epochs.append(ids.tolist())
    assert epochs[0] != epochs[1] != epochs[2]  # reshuffled each epoch


def test_uneven_epochs_keep_full_batches_and_cover_every_sample():
    n, b = 42, 8
    s = sampler(n=n, b=b, pace=pacing("none"))
    assert s.steps_per_epoch == 6
    for epoch in range(2):
        seen = []
        for j in range(6):
            ids = s.batch(epoch * 6 + j).tolist()
            assert len(ids) == b and len(set(ids)) == b
            seen += ids
        assert set(seen) == set(range(n))
        assert len(seen) == 48  # 6 samples of the first batch topped up the last one


def test_batch_larger_than_dataset():
    s = sampler(n=5, b=8)
    ids = s.batch(0).tolist()
    assert len(ids) == 8 and set(ids) == set(range(5))


def test_bad_pacing_value_is_reported():
    class Broken(PacingFunction):
        def fraction(self, step, total_steps):
            return 0.0

    with pytest.raises(KdError, match=r"Broken returned 0.0"):
        sampler(pace=Broken()).batch(0)


# --- refresh schedule and resume --------------------------------------------------------------


def test_needs_refresh_schedule():
    s = sampler(n=100, b=10)
    assert s.needs_refresh(0)
    assert s.needs_refresh(3)  # never refreshed
    s.refresh(None, 0)
    assert not s.needs_refresh(0)
    assert not s.needs_refresh(5)
    assert s.needs_refresh(10) and s.needs_refresh(20)
    fresh = sampler(n=100, b=10)
    fresh.load_state_dict(sampler(n=100, b=10).state_dict())  # a state that never refreshed
    assert fresh.needs_refresh(7)
    resumed = sampler(n=100, b=10)
    resumed.load_state_dict(s.state_dict())
    assert not resumed.needs_refresh(7)


def test_state_dict_round_trip_gives_identical_batches():
    scores = distinct_scores(100)
    scores[::7] = NAN
    first = sampler(pace=pacing("root", s0=0.3))
    first.refresh(scores, 0)
    state = first.state_dict()
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    second = sampler(pace=pacing("root", s0=0.3))
    second.load_state_dict(torch.load(buffer))
    assert torch.equal(second.ordering, first.ordering)
    assert torch.allclose(second.ranks, first.ranks, equal_nan=True)
    assert torch.allclose(second.scores, first.scores, equal_nan=True)
    steps = range(5, 200, 3)  # both the partial-share and the all-open phases
    assert batches(second, steps) == batches(first, steps)


def test_load_state_dict_rejects_another_dataset():
    with pytest.raises(KdError, match="50 samples but the dataset has 100"):
        sampler(n=100).load_state_dict(sampler(n=50).state_dict())


def test_constructor_validation():
    with pytest.raises(KdError):
        sampler(n=0)
    with pytest.raises(KdError):
        sampler(b=0)


def test_runs_shorter_than_an_epoch_still_resort():
    """10 re-sorts per run by default, at least one per epoch; refresh_every overrides."""
    short = CurriculumSampler(10_000, 16, pacing(), total_steps=300, seed=0)  # 625 steps per epoch
    assert short.refresh_every == 30
    short.refresh(None, 0)
    assert [step for step in range(1, 300) if short.needs_refresh(step)] == list(range(30, 300, 30))
    long = CurriculumSampler(100, 10, pacing(), total_steps=1000, seed=0)
    assert long.refresh_every == long.steps_per_epoch == 10
    assert CurriculumSampler(100, 10, pacing(), total_steps=1000, seed=0, refresh_every=7).refresh_every == 7
