"""kdcore.training.parallel: backend refusals, dropout detection, even shards, the sharded teacher."""

from __future__ import annotations

import pytest
import torch
from accelerate.utils import DistributedType
from conftest import run_kd, tiny_overrides

from kdcore.errors import KdError
from kdcore.inputs.packing import PackedDataset
from kdcore.training import parallel
from kdcore.training.evaluation import nll_totals, sample_stats


def tiny_gpt2(**config):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    defaults = {"vocab_size": 40, "n_positions": 16, "n_embd": 16, "n_layer": 2, "n_head": 2}
    return GPT2LMHeadModel(GPT2Config(**{**defaults, "bos_token_id": 0, "eos_token_id": 0, **config}))


def packed(rows: int, seq: int = 12, seed: int = 0) -> PackedDataset:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 40, (rows, seq), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # a padded sample, so valid-token counts differ
    return PackedDataset(ids, mask)


# -- refusals -------------------------------------------------------------------------------------
FSDP_ENV = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}


@pytest.mark.parametrize("cpu_type", [DistributedType.MULTI_CPU, DistributedType.NO])
def test_an_fsdp_config_on_cpu_is_refused(monkeypatch, cpu_type):
    for key, value in FSDP_ENV.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(KdError) as info:
        parallel.check_backend(cpu_type)
    message = str(info.value)
    assert message.startswith(
        "ACCELERATE_USE_FSDP=true (from an accelerate config or the environment) asks for FSDP, but accelerate "
    )
    assert "silently train with plain DDP" in message and "\n" not in message
    parallel.check_backend(DistributedType.FSDP)  # what accelerate decides on GPUs: accepted


def test_deepspeed_on_cpu_and_fsdp1_are_refused(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(KdError, match=r"asks for DeepSpeed, but accelerate .* only on GPUs"):
        parallel.check_backend(DistributedType.MULTI_CPU)
    parallel.check_backend(DistributedType.DEEPSPEED)
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(
        KdError,
        match=r"ACCELERATE_USE_FSDP=true .* with FSDP_VERSION=1 asks for FSDP version 1; kdcore shards with "
        r"FSDP2: set fsdp_version: 2",
    ):
        parallel.check_backend(DistributedType.FSDP)


def test_no_config_means_ddp_anywhere(monkeypatch):
    for key in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"):
        monkeypatch.delenv(key, raising=False)
    parallel.check_backend(DistributedType.MULTI_CPU)
    assert parallel.backend(3) == {"type": "ddp", "world_size": 3}
    for key, value in FSDP_ENV.items():
        monkeypatch.setenv(key, value)
    assert parallel.backend(2) == {"type": "fsdp", "world_size": 2, "state_dict_type": "SHARDED_STATE_DICT"}
    monkeypatch.setenv("FSDP_STATE_DICT_TYPE", "FULL_STATE_DICT")
    assert parallel.backend(2)["state_dict_type"] == "FULL_STATE_DICT"


def test_cli_refuses_an_fsdp_launch_on_cpu_and_writes_nothing(tmp_path):
    """What ``accelerate launch --config_file examples/accelerate/fsdp2.yaml`` sets, without a GPU."""
    out = tmp_path / "run"
    result = run_kd(
        "run",
        "--output-dir",
        str(out),
        "--max-steps",
        "2",
        env_extra={**FSDP_ENV, "CUDA_VISIBLE_DEVICES": ""},
    )
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ACCELERATE_USE_FSDP=true (from an"), lines
    assert "Traceback" not in result.stderr
    assert not out.exists()


def test_a_sharded_teacher_needs_an_fsdp_launch(tmp_path):
    from kdcore.config import resolve_config
    from kdcore.runs.runner import run

    cfg = resolve_config(None, tiny_overrides(tmp_path / "run", **{"training.teacher_placement": "sharded"}))
    with pytest.raises(
        KdError, match=r"teacher_placement: sharded splits the teacher with FSDP2.*fsdp2\.yaml"
    ):
        run(cfg, show_progress=False)
    assert not (tmp_path / "run").exists()


# -- dropout ----------------------------------------------------------------------------------------
def test_dropout_is_found_in_modules_and_attention_attributes():
    assert parallel.dropout_in(tiny_gpt2(attn_pdrop=0, resid_pdrop=0, embd_pdrop=0)) is None
    assert parallel.dropout_in(tiny_gpt2(attn_pdrop=0, resid_pdrop=0.1, embd_pdrop=0)) == (
        "transformer.h.0.attn.resid_dropout p=0.1"
    )
    from transformers import LlamaConfig, LlamaForCausalLM

    tiny = {"vocab_size": 40, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1}
    llama = LlamaForCausalLM(LlamaConfig(**tiny, num_attention_heads=2, attention_dropout=0.2))
    assert parallel.dropout_in(llama) == "model.layers.0.self_attn.attention_dropout=0.2"
    assert parallel.dropout_in(LlamaForCausalLM(LlamaConfig(**tiny, num_attention_heads=2))) is None


# -- even shards --------------------------------------------------------------------------------------
@pytest.mark.parametrize(("rows", "world"), [(7, 2), (7, 3), (6, 3), (2, 3)])
def test_even_shards_give_every_process_the_same_rows_and_add_up(rows, world):
    data = packed(rows)
    model = tiny_gpt2(attn_pdrop=0, resid_pdrop=0, embd_pdrop=0).eval()
    shards = [parallel.even_shard(data, r, world) for r in range(world)]
    assert len({len(s) for s in shards}) == 1  # the same number of forwards everywhere
    assert len(shards[0]) == -(-rows // world)
    for r, shard in enumerate(shards):
        real = len(data.input_ids[r::world])
        assert torch.equal(shard.input_ids[:real], data.input_ids[r::world])
        assert shard.attention_mask[real:].sum() == 0  # padding: no valid token
    # NLL sums and token counts over the shards equal the unsharded totals (padding adds nothing)
    total, count = nll_totals(model, data, batch_size=4)
    sums = [nll_totals(model, s, batch_size=4) for s in shards]
    assert sum(int(c) for _, c in sums) == int(count)
    assert sum(float(t) for t, _ in sums) == pytest.approx(float(total), rel=1e-6)  # float32 sums, reordered
    # per-sample statistics come back in sample order, padding dropped
    whole = sample_stats(model, data, batch_size=4)
    per_shard = [sample_stats(model, s, batch_size=4) for s in shards]
    for key, expected in whole.items():
        gathered = torch.cat([s[key] for s in per_shard])  # what accelerator.gather returns: process-major
        torch.testing.assert_close(parallel.in_sample_order(gathered, world, rows), expected)


# -- the sharded teacher ---------------------------------------------------------------------------------
@pytest.fixture
def process_group(tmp_path):
    """A one-process gloo group in this test process (FSDP2 needs a process group, even of one)."""
    import torch.distributed as dist

    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_a_sharded_teacher_gives_the_replicated_logits(process_group):
    from torch.distributed.fsdp import FSDPModule

    ids = packed(4).input_ids
    replicated = tiny_gpt2().eval()
    with torch.no_grad():
        expected = replicated(input_ids=ids).logits
    teacher = parallel.shard_for_inference(tiny_gpt2())
    assert isinstance(teacher, FSDPModule)
    assert all(isinstance(block, FSDPModule) for block in teacher.transformer.h)  # one unit per block
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    with torch.no_grad():
        assert torch.equal(teacher(input_ids=ids).logits, expected)


# -- FSDP2 end to end on one process ------------------------------------------------------------------------
def test_one_fsdp_process_trains_exactly_like_a_plain_run(cached_tiny_teacher, tmp_path):
    """The FSDP2 path end to end (student wrapped, teacher sharded, sharded checkpoint, student gathered
    for saving) on one process, where nothing is summed in another order: the plain run bit for bit."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    import yaml
    from safetensors.torch import load_file

    from kdcore.config import resolve_config, set_path
    from kdcore.runs.runner import run

    settings = {
        "model.student": "gpt2:n_layer=1,n_embd=16,n_head=2,attn_pdrop=0,resid_pdrop=0,embd_pdrop=0",
        "training.max_steps": 4,
        "training.checkpoint_every": 4,
        "training.eval_every": 4,
        "training.threads": 1,
    }
    run(resolve_config(None, tiny_overrides(tmp_path / "plain", **settings)), show_progress=False)
    tree: dict = {}
    for dotted, value in tiny_overrides(tmp_path / "fsdp", **settings).items():
        set_path(tree, dotted, value)
    (tmp_path / "fsdp.yaml").write_text(yaml.safe_dump(tree))
    repo = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [
            *(sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1"),
            *("--config_file", str(repo / parallel.FSDP_EXAMPLE)),
            *(str(repo / "tests" / "sharded_cpu_launch.py"), "run", "-c", str(tmp_path / "fsdp.yaml")),
            *("--teacher-placement", "sharded"),
        ],
        capture_output=True,
        text=True,
        env=dict(os.environ),
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    plain, fsdp = tmp_path / "plain", tmp_path / "fsdp"
    meta = json.loads((fsdp / "checkpoints" / "step-4" / "checkpoint.json").read_text())
    assert meta["backend"] == {"type": "fsdp", "state_dict_type": "SHARDED_STATE_DICT"}
    assert "pytorch_model_fsdp_0/__0_0.distcp" in meta["files"] and "optimizer_0/.metadata" in meta["files"]
    expected, saved = (load_file(run_dir / "student" / "model.safetensors") for run_dir in (plain, fsdp))
    assert saved.keys() == expected.keys()  # whole tensors, the tied head saved once as usual
    assert all(torch.equal(saved[key], expected[key]) for key in expected)
    a, b = (json.loads((run_dir / "summary.json").read_text()) for run_dir in (plain, fsdp))
    # Evaluation is the one place the numbers may differ: a sharded head cannot be fused, so the FSDP run
    # scores eval text from full logits and the plain run from hidden states chunk by chunk; the two
    # differ by float32 rounding of the log-softmax (3.2e-7 relative measured here), far below 1e-5.
    assert [step for step, _ in a["eval_curve"]] == [step for step, _ in b["eval_curve"]]
    for (_, x), (_, y) in zip(a["eval_curve"], b["eval_curve"], strict=True):
        assert y == pytest.approx(x, rel=1e-5)
    assert b["teacher_eval_ppl"] == pytest.approx(a["teacher_eval_ppl"], rel=1e-5)


# -- DeepSpeed's config ----------------------------------------------------------------------------------
def deepspeed_accelerator(**config):
    from types import SimpleNamespace

    plugin = SimpleNamespace(deepspeed_config={"zero_optimization": {"stage": 3}, **config})
    return SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=plugin)), plugin.deepspeed_config


def test_deepspeed_gets_the_run_configs_batch_and_clipping():
    from kdcore.config import TrainingConfig

    accelerator, config = deepspeed_accelerator(gradient_clipping="auto", gradient_accumulation_steps=1)
    parallel.configure_deepspeed(accelerator, TrainingConfig(batch_size=16, max_grad_norm=0.5), 4)
    assert config == {
        "zero_optimization": {"stage": 3},
        "gradient_clipping": 0.5,
        "gradient_accumulation_steps": 1,
        "train_micro_batch_size_per_gpu": 4,
        "train_batch_size": 16,
    }


@pytest.mark.parametrize(
    ("training", "config", "message"),
    [
        ({"grad_accum": 2}, {}, "set training.grad_accum: 1 (it is 2)"),
        ({"on_nonfinite": "skip"}, {}, "on_nonfinite: skip cannot drop an update under DeepSpeed"),
        (
            {"max_grad_norm": 0.5},
            {"gradient_clipping": 1.0},
            "clips gradients at 1.0 and training.max_grad_norm is 0.5",
        ),
        (
            {},
            {"gradient_accumulation_steps": 4},
            "accumulates 4 micro-batches; set gradient_accumulation_steps: 1",
        ),
    ],
)
def test_deepspeed_settings_kdcore_cannot_honour_are_refused(training, config, message):
    from kdcore.config import TrainingConfig

    accelerator, _ = deepspeed_accelerator(**config)
    with pytest.raises(KdError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parallel.configure_deepspeed(accelerator, TrainingConfig(batch_size=16, **training), 2)
