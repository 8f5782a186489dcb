"""Built-in difficulty scorers, driven through the registry with a hand-made ScorerContext."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from kdcore import ScorerContext
from kdcore.errors import PluginError
from kdcore.plugins import get_registry

N = 6
SEQ_LEN = 8
NAN = float("nan")

TEACHER = {
    "ce": torch.tensor([0.5, 1.0, 1.5, 2.0, 2.5, 3.0]),
    "confidence": torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5, 0.4]),
    "entropy": torch.tensor([0.1, 0.3, 0.2, 0.6, 0.5, 0.4]),
}
STUDENT = {
    "ce": torch.tensor([3.0, 2.0, 4.0, 1.0, 5.0, 6.0]),
    "confidence": torch.tensor([0.25, 0.5, 0.125, 0.75, 0.0625, 0.03125]),
    "entropy": torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 1.0]),
}


class Counter:
    """A fake memoised stats pass that counts how often it is called."""

    def __init__(self, stats: dict[str, torch.Tensor]) -> None:
        self.stats = stats
        self.calls = 0

    def __call__(self) -> dict[str, torch.Tensor]:
        self.calls += 1
        return {k: v.clone() for k, v in self.stats.items()}


def make_ctx(run_dir: Path | None = None, seed: int = 0, n: int = N):
    teacher = Counter({k: v[:n] for k, v in TEACHER.items()})
    student = Counter({k: v[:n] for k, v in STUDENT.items()})
    ctx = ScorerContext(
        num_samples=n,
        lengths=torch.tensor([8, 4, 2, 6, 1, 8][:n]),
        seq_len=SEQ_LEN,
        seed=seed,
        teacher_stats=teacher,
        student_stats=student,
        run_dir=run_dir,
    )
    return ctx, teacher, student


def create(name: str, **params):
    return get_registry().create("scorer", name, params)


def batch(values, key="ce", **more):
    """A stats dict as the training step passes it (all keys present, as float tensors)."""
    v = torch.tensor(values, dtype=torch.float32)
    stats = {k: torch.zeros_like(v) for k in ("ce", "kd", "confidence", "tokens")}
    stats[key] = v
    for k, other in more.items():
        stats[k] = torch.tensor(other, dtype=torch.float32)
    return stats


def ids(*xs):
    return torch.tensor(xs, dtype=torch.long)


def assert_same(a: torch.Tensor, b: torch.Tensor) -> None:
    """Equal element by element, NaN where the other is NaN."""
    assert a.shape == b.shape
    assert torch.equal(torch.isnan(a), torch.isnan(b))
    assert torch.equal(torch.nan_to_num(a, nan=-1.0), torch.nan_to_num(b, nan=-1.0))


def expect(actual: torch.Tensor, expected: list[float]) -> None:
    exp = torch.tensor(expected, dtype=torch.float32)
    assert actual.dtype == torch.float32
    assert torch.allclose(actual, exp, atol=1e-6, equal_nan=True), (actual, exp)


# ---------------------------------------------------------------------------------------------
# registration
# ---------------------------------------------------------------------------------------------


def test_all_builtins_registered_with_descriptions():
    reg = get_registry()
    for name in ("none", "student-snapshot", "teacher-confidence", "teacher-student-gap", "length", "random"):
        entry = reg.entry("scorer", name)
        assert entry.status == "ok"
        assert entry.description and "\n" not in entry.description
    assert create("none").scores() is None


# ---------------------------------------------------------------------------------------------
# student-snapshot
# ---------------------------------------------------------------------------------------------


def test_snapshot_unknown_until_observed_and_last_value():
    ctx, teacher, student = make_ctx()
    s = create("student-snapshot")
    assert s.needs == frozenset()
    s.prepare(ctx)
    assert torch.isnan(s.scores()).all()
    s.observe(ids(1, 3), batch([2.0, 4.0]))
    expect(s.scores(), [NAN, 2.0, NAN, 4.0, NAN, NAN])
    s.observe(ids(3, 0), batch([1.5, 7.0]))
    expect(s.scores(), [7.0, 2.0, NAN, 1.5, NAN, NAN])
    assert s.seen_count.tolist() == [1, 1, 0, 2, 0, 0]
    assert teacher.calls == 0 and student.calls == 0  # warmup=random: no pass at all


def test_snapshot_ema_arithmetic():
    ctx, *_ = make_ctx()
    s = create("student-snapshot", ema=0.75)
    s.prepare(ctx)
    s.observe(ids(2), batch([4.0]))  # first observation taken as is
    expect(s.scores()[2:3], [4.0])
    s.observe(ids(2), batch([8.0]))  # 0.75*4 + 0.25*8 = 5
    expect(s.scores()[2:3], [5.0])
    s.observe(ids(2, 5), batch([1.0, 3.0]))  # 0.75*5 + 0.25*1 = 4.0; sample 5 first: 3
    expect(s.scores(), [NAN, NAN, 4.0, NAN, NAN, 3.0])
    assert s.seen_count.tolist() == [0, 0, 3, 0, 0, 1]


def test_snapshot_duplicates_in_one_call_match_sequential_updates():
    ctx, *_ = make_ctx()
    # last value: the last occurrence in batch order wins
    s = create("student-snapshot")
    s.prepare(ctx)
    s.observe(ids(4, 1, 4, 4, 1), batch([1.0, 2.0, 3.0, 9.0, 5.0]))
    expect(s.scores(), [NAN, 5.0, NAN, NAN, 9.0, NAN])
    assert s.seen_count.tolist() == [0, 2, 0, 0, 3, 0]

    # ema: same as three separate calls, new sample (first value taken as is) ...
    beta = 0.5
    one, seq = create("student-snapshot", ema=beta), create("student-snapshot", ema=beta)
    one.prepare(ctx)
    seq.prepare(ctx)
    one.observe(ids(0, 0, 0), batch([2.0, 4.0, 8.0]))
    for v in (2.0, 4.0, 8.0):
        seq.observe(ids(0), batch([v]))
    # hand: 2 -> 0.5*2+0.5*4 = 3 -> 0.5*3+0.5*8 = 5.5
    expect(one.scores()[:1], [5.5])
    assert torch.allclose(one.scores(), seq.scores(), equal_nan=True)
    # ... and for a sample that already has a value, interleaved with others
    one.observe(ids(0, 3, 0), batch([1.0, 6.0, 3.0]))  # 0.5*(0.5*5.5+0.5*1)+0.5*3 = 3.125
    expect(one.scores(), [3.125, NAN, NAN, 6.0, NAN, NAN])
    assert one.seen_count.tolist() == [5, 0, 0, 1, 0, 0]


def test_snapshot_ignores_non_finite_observations():
    ctx, *_ = make_ctx()
    s = create("student-snapshot")
    s.prepare(ctx)
    s.observe(ids(0, 1), batch([3.0, 2.0]))
    s.observe(ids(0, 1), batch([NAN, float("inf")]))
    expect(s.scores(), [3.0, 2.0, NAN, NAN, NAN, NAN])
    assert s.seen_count.tolist() == [1, 1, 0, 0, 0, 0]


def test_snapshot_confidence_signal_is_one_minus_confidence():
    ctx, *_ = make_ctx()
    s = create("student-snapshot", signal="confidence")
    s.prepare(ctx)
    s.observe(ids(0, 5), batch([0.25, 0.875], key="confidence", ce=[9.0, 9.0]))
    expect(s.scores(), [0.75, NAN, NAN, NAN, NAN, 0.125])


def test_snapshot_warmup_scan_calls_student_once():
    ctx, teacher, student = make_ctx()
    s = create("student-snapshot", warmup="scan")
    s.prepare(ctx)
    assert student.calls == 1 and teacher.calls == 0
    expect(s.scores(), STUDENT["ce"].tolist())
    assert s.seen_count.tolist() == [0] * N  # the scan is not a training sighting
    s.observe(ids(2), batch([0.5]))
    expect(s.scores(), [3.0, 2.0, 0.5, 1.0, 5.0, 6.0])

    c = create("student-snapshot", warmup="scan", signal="confidence", ema=0.5)
    c.prepare(ctx)
    assert student.calls == 2  # one per scorer; the context's memoisation makes it free
    expect(c.scores(), (1 - STUDENT["confidence"]).tolist())
    c.observe(ids(0), batch([0.75], key="confidence"))  # 0.5*0.75 + 0.5*0.25: blends with the scan
    expect(c.scores()[:1], [0.5])


def test_snapshot_observe_is_vectorised_over_a_large_batch():
    n = 50_000
    ctx = ScorerContext(n, torch.full((n,), SEQ_LEN), SEQ_LEN, 0, dict, dict)
    s = create("student-snapshot", ema=0.9)
    s.prepare(ctx)
    g = torch.Generator().manual_seed(0)
    sid = torch.randint(0, n, (200_000,), generator=g)
    s.observe(sid, {"ce": torch.rand(200_000, generator=g)})
    assert int(s.seen_count.sum()) == 200_000
    assert int((~torch.isnan(s.scores())).sum()) == int(torch.unique(sid).numel())


# ---------------------------------------------------------------------------------------------
# teacher-confidence
# ---------------------------------------------------------------------------------------------


def test_teacher_confidence_scores_saves_and_reuses(tmp_path):
    ctx, teacher, student = make_ctx(run_dir=tmp_path)
    s = create("teacher-confidence")
    s.prepare(ctx)
    assert teacher.calls == 1 and student.calls == 0
    expect(s.scores(), (1 - TEACHER["confidence"]).tolist())
    path = tmp_path / "teacher_scores.safetensors"
    assert path.is_file()
    assert not [p for p in tmp_path.iterdir() if p.name != path.name]  # temp file replaced

    from safetensors.torch import load_file

    assert torch.equal(load_file(str(path))["scores"], s.scores())

    # a resumed run on the same directory reads the file instead of running the teacher
    ctx2, teacher2, _ = make_ctx(run_dir=tmp_path)
    again = create("teacher-confidence")
    again.prepare(ctx2)
    assert teacher2.calls == 0
    assert torch.equal(again.scores(), s.scores())


def test_teacher_confidence_file_of_wrong_length_or_signal_is_recomputed(tmp_path):
    ctx, *_ = make_ctx(run_dir=tmp_path)
    create("teacher-confidence").prepare(ctx)

    ctx_short, teacher_short, _ = make_ctx(run_dir=tmp_path, n=4)
    short = create("teacher-confidence")
    short.prepare(ctx_short)  # the saved file has 6 scores: not reused
    assert teacher_short.calls == 1
    expect(short.scores(), (1 - TEACHER["confidence"][:4]).tolist())

    ctx_e, teacher_e, _ = make_ctx(run_dir=tmp_path)
    e = create("teacher-confidence", signal="entropy")
    e.prepare(ctx_e)
    assert teacher_e.calls == 1
    expect(e.scores(), TEACHER["entropy"].tolist())


def test_teacher_confidence_rejects_stats_of_wrong_length():
    ctx, *_ = make_ctx()
    ctx.num_samples = 4
    with pytest.raises(Exception, match="4 samples"):
        create("teacher-confidence").prepare(ctx)


def test_teacher_signals_without_run_dir():
    ctx, teacher, _ = make_ctx()
    e = create("teacher-confidence", signal="entropy")
    e.prepare(ctx)
    expect(e.scores(), TEACHER["entropy"].tolist())
    loss = create("teacher-confidence", signal="loss")
    loss.prepare(ctx)
    expect(loss.scores(), TEACHER["ce"].tolist())
    assert teacher.calls == 2


def test_teacher_resume_from_state_needs_no_teacher_pass(tmp_path):
    ctx, *_ = make_ctx(run_dir=tmp_path)
    s = create("teacher-confidence")
    s.prepare(ctx)
    (tmp_path / "teacher_scores.safetensors").unlink()  # even without the file
    restored = create("teacher-confidence")
    restored.load_state_dict(s.state_dict())
    ctx2, teacher2, _ = make_ctx(run_dir=tmp_path)
    restored.prepare(ctx2)
    assert teacher2.calls == 0
    assert torch.equal(restored.scores(), s.scores())
    assert (tmp_path / "teacher_scores.safetensors").is_file()  # rewritten for the next resume


# ---------------------------------------------------------------------------------------------
# teacher-student-gap, length, random
# ---------------------------------------------------------------------------------------------


def test_gap_uses_kd_and_declares_it():
    ctx, teacher, student = make_ctx()
    g = create("teacher-student-gap", ema=0.5)
    assert g.needs == frozenset({"kd"})
    g.prepare(ctx)
    assert torch.isnan(g.scores()).all()
    g.observe(ids(1, 2), batch([0.4, 0.2], key="kd", ce=[9.0, 9.0]))
    g.observe(ids(1), batch([0.8], key="kd", ce=[9.0]))  # 0.5*0.4 + 0.5*0.8
    expect(g.scores(), [NAN, 0.6, 0.2, NAN, NAN, NAN])
    assert g.seen_count.tolist() == [0, 2, 1, 0, 0, 0]
    assert teacher.calls == 0 and student.calls == 0


def test_length_and_invert():
    ctx, *_ = make_ctx()
    s = create("length")
    s.prepare(ctx)
    expect(s.scores(), [1.0, 0.5, 0.25, 0.75, 0.125, 1.0])
    inv = create("length", invert=True)
    inv.prepare(ctx)
    expect(inv.scores(), [0.0, 0.5, 0.75, 0.25, 0.875, 0.0])


def test_random_deterministic_by_seed():
    def run(seed, param_seed):
        ctx, *_ = make_ctx(seed=seed)
        s = create("random", seed=param_seed)
        s.prepare(ctx)
        return s.scores()

    a = run(1, 0)
    assert a.shape == (N,) and ((a >= 0) & (a < 1)).all()
    assert torch.equal(a, run(1, 0))
    assert not torch.equal(a, run(2, 0))  # run seed matters
    assert not torch.equal(a, run(1, 1))  # scorer seed matters
    assert not torch.equal(run(0, 1), run(1, 0))  # combined, not summed


# ---------------------------------------------------------------------------------------------
# resume
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("student-snapshot", {}),
        ("student-snapshot", {"ema": 0.3, "signal": "confidence"}),
        ("student-snapshot", {"warmup": "scan", "ema": 0.5}),
        ("teacher-student-gap", {"ema": 0.9}),
        ("teacher-confidence", {}),
        ("length", {"invert": True}),
        ("random", {"seed": 3}),
    ],
)
@pytest.mark.parametrize("load_first", [False, True])
def test_state_dict_round_trip(name, params, load_first):
    ctx, *_ = make_ctx(seed=7)
    s = create(name, **params)
    s.prepare(ctx)
    stats = batch([0.3, 0.1, 0.9], ce=[1.0, 2.0, 3.0], kd=[0.5, 0.25, 0.125])
    s.observe(ids(0, 4, 0), stats)
    state = s.state_dict()
    for value in state.values():
        assert isinstance(value, (torch.Tensor, list, int, float, str))

    ctx2, teacher2, student2 = make_ctx(seed=7)
    restored = create(name, **params)
    if load_first:  # resume order 1: state, then prepare (which must not recompute)
        restored.load_state_dict(state)
        restored.prepare(ctx2)
        assert teacher2.calls == 0 and student2.calls == 0
    else:  # resume order 2: prepare, then state
        restored.prepare(ctx2)
        restored.load_state_dict(state)
    assert_same(restored.scores(), s.scores())
    if hasattr(s, "seen_count"):
        assert torch.equal(restored.seen_count, s.seen_count)

    # both continue identically
    more = batch([0.7, 0.2], ce=[4.0, 0.5], kd=[0.0625, 1.0])
    s.observe(ids(4, 5), more)
    restored.observe(ids(4, 5), more)
    assert_same(restored.scores(), s.scores())


def test_state_of_another_dataset_is_rejected():
    ctx, *_ = make_ctx()
    s = create("student-snapshot")
    s.prepare(ctx)
    other = create("student-snapshot")
    other.load_state_dict(s.state_dict())
    ctx4, *_ = make_ctx(n=4)
    with pytest.raises(Exception, match="4 samples"):
        other.prepare(ctx4)


# ---------------------------------------------------------------------------------------------
# parameters
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "params", "field"),
    [
        ("student-snapshot", {"ema": 1.0}, "ema"),
        ("student-snapshot", {"ema": -0.1}, "ema"),
        ("student-snapshot", {"signal": "entropy"}, "signal"),
        ("student-snapshot", {"warmup": "full"}, "warmup"),
        ("student-snapshot", {"emma": 0.5}, "emma"),
        ("teacher-student-gap", {"ema": 2}, "ema"),
        ("teacher-student-gap", {"signal": "loss"}, "signal"),
        ("teacher-confidence", {"signal": "margin"}, "signal"),
        ("length", {"invert": "sideways"}, "invert"),
        ("random", {"seed": -1}, "seed"),
        ("none", {"x": 1}, "x"),
    ],
)
def test_bad_params_name_the_field(name, params, field):
    with pytest.raises(PluginError, match=rf"\b{field}\b") as info:
        create(name, **params)
    assert name in str(info.value)


def test_params_are_documented_and_bounded():
    reg = get_registry()
    for name in ("student-snapshot", "teacher-confidence", "teacher-student-gap", "length", "random"):
        cls = reg.entry("scorer", name).cls
        assert cls.Params.model_config.get("extra") == "forbid"
        for fname, f in cls.Params.model_fields.items():
            assert f.description, (name, fname)
    ema = reg.entry("scorer", "student-snapshot").cls.Params.model_fields["ema"]
    assert not math.isnan(ema.default) and ema.default == 0.0
