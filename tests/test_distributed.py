"""Two processes (torchrun, gloo on CPU; DDP, and FSDP2 through accelerate launch) train like one process
on the same global batch.

What must be *identical*: the curriculum (per-sample ranks at every re-sort), λ, the batches, the
token counts; every process's scorer sees the whole global batch through an all-gather. What may
differ by float rounding: the gradient (DDP's all-reduce sums the two half-batch gradients, a single
process sums per-sample terms in one reduction) and the eval perplexity (each process scores half
the eval set, the NLL sums meet in an all-reduce). Each reordering changes a float32 sum by ~1e-7
relative; over 40 Adam steps on this tiny model that stays ~1e-6 in the weights and ~1e-7 in
perplexity (measured), so 1e-4 relative on perplexity leaves a wide margin while still catching a
wrong normalisation (a factor 2 in the loss scale moves perplexity by percents).

Weights: atol 1e-5. A single process that only reverses the order of its per-sample sums moves the
weights by 2.5e-6 after 20 steps and 4.4e-6 after 40 (measured on a model like this one): Adam
normalises each update, so a few-ulp gradient perturbation of a near-zero element becomes a full-size
difference, and trajectories drift about linearly. DDP and FSDP2 stay inside that yardstick; 1e-5 is
twice it. Adam and clipping also hide a wrong loss scale in the weights (dropping the x processes factor
moved them by only 1e-5 to 3e-4), so the gradient norm before clipping, logged at every record, is
compared too: rel 1e-5 (measured 1e-7 to 1e-6; a wrong loss scale halves it).

FSDP runs on CPU here through tests/sharded_cpu_launch.py, which switches accelerate's state to FSDP as
accelerate does on GPUs (it refuses to on CPU); kdcore itself runs unchanged.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from conftest import tiny_overrides
from safetensors.torch import load_file

from kdcore.config import set_path

NO_DROPOUT = "gpt2:n_layer=1,n_embd=16,n_head=2,attn_pdrop=0,resid_pdrop=0,embd_pdrop=0"
SETTINGS = {
    # dropout masks are drawn per process, so a 2-process run with dropout is another random draw
    "model.student": NO_DROPOUT,
    "strategy.scorer": "student-snapshot",
    "strategy.pacing": "root",
    "strategy.reliance": "threshold",
    "training.max_steps": 40,
    "training.eval_every": 10,
    "training.checkpoint_every": 10,
    "training.threads": 1,
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def config_file(tmp_path, name: str) -> str:
    tree: dict = {}
    for dotted, value in {**tiny_overrides(tmp_path / name), **SETTINGS}.items():
        set_path(tree, dotted, value)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return str(path)


def launch(command: list[str], log) -> subprocess.Popen:
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ))


def torchrun(*args: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        "-m",
        "kdcore",
        *args,
    ]


REPO = Path(__file__).resolve().parents[1]
FSDP_CONFIG = REPO / "examples" / "accelerate" / "fsdp2.yaml"


def accelerate_launch(*args: str, processes: int = 2, config: Path = FSDP_CONFIG) -> list[str]:
    """``accelerate launch`` with a shipped config (FSDP2 by default), through the CPU test launcher."""
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(config),
        "--num_processes",
        str(processes),
        "--main_process_port",
        str(free_port()),
        str(REPO / "tests" / "sharded_cpu_launch.py"),
        *args,
    ]


def start_all(tmp: Path, commands: dict[str, list[str]]) -> None:
    """Start ``commands`` together (logs in ``tmp/NAME.log``); each must exit 0."""
    logs = {name: (tmp / f"{name}.log").open("w") for name in commands}
    started = {name: launch(command, logs[name]) for name, command in commands.items()}
    for name, proc in started.items():
        assert proc.wait(timeout=600) == 0, (tmp / f"{name}.log").read_text()[-3000:]
        logs[name].close()


@pytest.fixture(scope="module")
def runs(cached_tiny_teacher, tmp_path_factory):
    """One process and two processes (torchrun: DDP), started together."""
    tmp = tmp_path_factory.mktemp("distributed")
    start_all(
        tmp,
        {
            "one": [sys.executable, "-m", "kdcore", "run", "-c", config_file(tmp, "one")],
            "two": torchrun("run", "-c", config_file(tmp, "two")),
        },
    )
    return tmp / "one", tmp / "two"


@pytest.fixture(scope="module")
def fsdp(cached_tiny_teacher, tmp_path_factory):
    """Two FSDP2 processes, the student and the teacher sharded (only for the slow tests)."""
    tmp = tmp_path_factory.mktemp("fsdp")
    start_all(
        tmp,
        {"fsdp": accelerate_launch("run", "-c", config_file(tmp, "fsdp"), "--teacher-placement", "sharded")},
    )
    return tmp / "fsdp"


def assert_trains_like(one: Path, other: Path) -> None:
    """``other`` took the same decisions as ``one`` and reached the same numbers up to float order."""
    a, b = (json.loads((run / "summary.json").read_text()) for run in (one, other))
    # identical: what the curriculum and the reliance policy decided, and the data seen
    for key in ("steps", "train_tokens", "mean_lambda", "final_open_share", "strategy"):
        assert a[key] == b[key], key
    ta, tb = (pq.read_table(run / "difficulty.parquet") for run in (one, other))
    for column in ("sample_id", "step", "rank", "lambda"):
        assert np.array_equal(ta[column].to_numpy(), tb[column].to_numpy(), equal_nan=True), column
    np.testing.assert_allclose(ta["score"].to_numpy(), tb["score"].to_numpy(), rtol=1e-5, atol=1e-6)
    # equal up to float summation order
    assert [s for s, _ in a["eval_curve"]] == [s for s, _ in b["eval_curve"]]
    for (_, pa), (_, pb) in zip(a["eval_curve"], b["eval_curve"], strict=True):
        assert pb == pytest.approx(pa, rel=1e-4)
    wa, wb = (load_file(run / "student" / "model.safetensors") for run in (one, other))
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wb[key], wa[key], rtol=1e-4, atol=1e-5)
    ra, rb = (
        [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        for run in (one, other)
    )
    norms_a = [(r["step"], r["grad_norm"]) for r in ra if "grad_norm" in r]
    norms_b = [(r["step"], r["grad_norm"]) for r in rb if "grad_norm" in r]
    assert [s for s, _ in norms_a] == [s for s, _ in norms_b] == list(range(4, 41, 4))
    for (_, na), (_, nb) in zip(norms_a, norms_b, strict=True):
        assert nb == pytest.approx(na, rel=1e-5)


def test_two_processes_train_like_one_on_the_same_global_batch(runs):
    one, two = runs
    assert_trains_like(one, two)


@pytest.mark.slow
def test_fsdp_with_a_sharded_teacher_trains_like_one_process(runs, fsdp):
    one, _ = runs
    assert_trains_like(one, fsdp)
    # the checkpoint is FSDP's sharded state, one file per process, each checksummed
    meta = json.loads((fsdp / "checkpoints" / "step-40" / "checkpoint.json").read_text())
    assert meta["backend"] == {"type": "fsdp", "state_dict_type": "SHARDED_STATE_DICT"}
    assert meta["world_size"] == 2 and meta["dropout"] is None
    for name in (
        "pytorch_model_fsdp_0/__0_0.distcp",
        "pytorch_model_fsdp_0/__1_0.distcp",
        "optimizer_0/.metadata",
    ):
        assert meta["files"][name]["bytes"] == (fsdp / "checkpoints" / "step-40" / name).stat().st_size
    # the saved student is whole: it loads as an ordinary model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(fsdp / "student")
    assert sum(p.numel() for p in model.parameters()) == sum(
        p.numel() for p in AutoModelForCausalLM.from_pretrained(one / "student").parameters()
    )


def test_only_the_main_process_writes(runs):
    one, two = runs

    def tree(run):
        return sorted(str(p.relative_to(run)) for p in run.rglob("*") if "random_states" not in p.name)

    assert tree(two) == tree(one)  # nothing extra, nothing twice
    lines = [json.loads(x) for x in (two / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == len((one / "metrics.jsonl").read_text().splitlines())
    # a checkpoint holds every process's RNG state, and knows it was written by two processes
    checkpoint = two / "checkpoints" / "step-40"
    assert (checkpoint / "random_states_0.pkl").is_file() and (checkpoint / "random_states_1.pkl").is_file()
    assert json.loads((checkpoint / "checkpoint.json").read_text())["world_size"] == 2


@pytest.mark.slow
def test_two_processes_resume_bit_for_bit(runs, tmp_path):
    import shutil

    _, two = runs
    copy = tmp_path / "two"
    shutil.copytree(two, copy)
    (copy / "summary.json").unlink()
    shutil.rmtree(copy / "student")
    shutil.rmtree(copy / "checkpoints" / "step-40")
    with (tmp_path / "log").open("w") as log:
        assert launch(torchrun("run", "--resume", str(copy)), log).wait(timeout=300) == 0
    assert "from " + str(copy / "checkpoints" / "step-30") in (tmp_path / "log").read_text()
    wa, wb = (load_file(run / "student" / "model.safetensors") for run in (two, copy))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    a, b = (json.loads((run / "summary.json").read_text()) for run in (two, copy))
    assert a["eval_curve"] == b["eval_curve"] and a["mean_lambda"] == b["mean_lambda"]


def unfinished(run: Path, copy: Path) -> Path:
    """``run`` as if killed after its step-30 checkpoint."""
    import shutil

    shutil.copytree(run, copy)
    (copy / "summary.json").unlink()
    shutil.rmtree(copy / "student")
    shutil.rmtree(copy / "checkpoints" / "step-40")
    return copy


@pytest.mark.slow
def test_resume_on_another_process_count_equals_the_uninterrupted_runs(runs, fsdp, tmp_path):
    """2 → 1 and 1 → 2 (DDP), 2 → 1 (FSDP2, its sharded checkpoint resharded on load), from step 30 of 40.

    No dropout, so the continued run may differ from either uninterrupted run only by float summation
    order: the same tolerances as 2 processes against 1.
    """
    one, two = runs
    jobs = {
        "two-on-one": ([sys.executable, "-m", "kdcore", "run", "--resume"], two, 2, 1),
        "one-on-two": (torchrun("run", "--resume"), one, 1, 2),
        "fsdp-on-one": (accelerate_launch("run", "--resume", processes=1), fsdp, 2, 1),
    }
    started = {}
    for name, (command, run, _, _) in jobs.items():
        copy = unfinished(run, tmp_path / name)
        with (tmp_path / f"{name}.log").open("w") as log:
            started[name] = (launch([*command, str(copy)], log), copy)
    for name, (proc, copy) in started.items():
        assert proc.wait(timeout=600) == 0, (tmp_path / f"{name}.log").read_text()[-3000:]
        _, written_by, before, after = jobs[name]
        log = (tmp_path / f"{name}.log").read_text()
        note = f"was written by {before} process{'es' * (before > 1)} and this run has {after}: continuing"
        assert note in log and "checkpoints/step-30 (step 30)" in log
        assert_trains_like(one, copy)
        assert_trains_like(written_by, copy)


@pytest.mark.slow
def test_deepspeed_zero3_trains_like_one_process(runs, tmp_path):
    """ZeRO-3 (parameters, gradients and optimizer state partitioned) when deepspeed is installed."""
    pytest.importorskip("deepspeed", reason="deepspeed is not installed (pip install deepspeed)")
    one, _ = runs
    config = REPO / "examples" / "accelerate" / "deepspeed_zero3.yaml"
    command = accelerate_launch("run", "-c", config_file(tmp_path, "zero3"), config=config)
    with (tmp_path / "zero3.log").open("w") as log:
        proc = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "DS_ACCELERATOR": "cpu"}
        )
        assert proc.wait(timeout=600) == 0, (tmp_path / "zero3.log").read_text()[-3000:]
    zero3 = tmp_path / "zero3"
    assert_trains_like(one, zero3)
    meta = json.loads((zero3 / "checkpoints" / "step-40" / "checkpoint.json").read_text())
    assert meta["backend"] == {"type": "deepspeed", "zero_stage": 3}
    assert "pytorch_model/zero_pp_rank_1_mp_rank_00_optim_states.pt" in meta["files"]  # one file per process
