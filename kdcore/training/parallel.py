"""How the student and the teacher are spread over processes: DDP, FSDP2 or DeepSpeed, through accelerate.

accelerate's launcher (``accelerate launch --config_file F``) announces the backend in the environment
(``ACCELERATE_USE_FSDP``, ``ACCELERATE_USE_DEEPSPEED``, ``FSDP_*``); the ``Accelerator`` then wraps the
student. Three things are kdcore's own:

- **refusing a backend accelerate would drop**: accelerate 1.x enables FSDP and DeepSpeed only for
  accelerator process groups (GPUs and the like); on CPU it trains with plain DDP and says nothing;
- **the teacher**: accelerate prepares one model under FSDP2, so a sharded teacher is wrapped with torch's
  ``fully_shard`` directly, frozen and in eval mode, with no optimizer state;
- **equal work on every process**: each FSDP forward all-gathers parameters, so every process must run
  the same number of forwards; :func:`even_shard` pads a process's share of an eval or scoring pass.

``backend()`` describes the layout a checkpoint is written in; resuming compares it (checkpoint.py).
"""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING, Any

import torch

from kdcore.errors import KdError
from kdcore.inputs.packing import PackedDataset

if TYPE_CHECKING:
    from kdcore.config import TrainingConfig

FSDP_EXAMPLE = "examples/accelerate/fsdp2.yaml"


def _flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() == "true"


def requested() -> str:
    """The backend accelerate's launcher asked for: ``fsdp``, ``deepspeed`` or ``ddp`` (plain data parallel)."""
    if _flag("ACCELERATE_USE_FSDP"):
        return "fsdp"
    if _flag("ACCELERATE_USE_DEEPSPEED"):
        return "deepspeed"
    return "ddp"


def check_backend(distributed_type: Any) -> None:
    """Refuse an FSDP or DeepSpeed config that accelerate would silently run as DDP (or not at all).

    ``distributed_type`` is what accelerate's state decided (``PartialState`` or ``AcceleratorState``).
    """
    from accelerate.utils import DistributedType

    asked = requested()
    # accelerate launch passes its config on as environment variables, which a user may also set by hand
    variable = {"fsdp": "ACCELERATE_USE_FSDP", "deepspeed": "ACCELERATE_USE_DEEPSPEED"}.get(asked)
    origin = f"{variable}={os.environ.get(variable or '', '')} (from an accelerate config or the environment)"
    if asked == "fsdp" and os.environ.get("FSDP_VERSION", "1") != "2":
        version = (
            f"FSDP_VERSION={os.environ['FSDP_VERSION']}"
            if "FSDP_VERSION" in os.environ
            else "no FSDP_VERSION"
        )
        raise KdError(
            f"{origin} with {version} asks for FSDP version {os.environ.get('FSDP_VERSION', '1')}; kdcore "
            f"shards with FSDP2: set fsdp_version: 2 in the config (FSDP_VERSION=2; see {FSDP_EXAMPLE})"
        )
    if asked != "ddp" and distributed_type in (DistributedType.NO, DistributedType.MULTI_CPU):
        import accelerate

        name = {"fsdp": "FSDP", "deepspeed": "DeepSpeed"}[asked]
        raise KdError(
            f"{origin} asks for {name}, but accelerate {accelerate.__version__} enables "
            f"{name} only on GPUs (or other accelerators) and on this CPU machine would silently train "
            f"with plain DDP; run it on GPUs, or unset {variable} (drop the config) and use torchrun for DDP "
            "(docs/scaling.md)"
        )


def shards_models(placement: str) -> bool:
    """Whether the run splits a model over its processes: FSDP or DeepSpeed, or a sharded teacher."""
    return requested() != "ddp" or placement == "sharded"


def check_placement(placement: str) -> None:
    """A sharded teacher needs FSDP (the teacher is wrapped with FSDP2 over the run's processes)."""
    if placement == "sharded" and requested() != "fsdp":
        raise KdError(
            "training.teacher_placement: sharded splits the teacher with FSDP2, and this run is not "
            f"launched with FSDP; launch it with an FSDP config (accelerate launch --config_file "
            f"{FSDP_EXAMPLE} -m kdcore run ...) or use replicated"
        )


def backend(num_processes: int) -> dict[str, Any]:
    """The checkpoint layout this run writes: the backend type, its state format and the process count.

    Read from the launcher's environment, as accelerate reads it, after :func:`check_backend` passed.
    """
    kind = requested()
    out: dict[str, Any] = {"type": kind, "world_size": num_processes}
    if kind == "fsdp":
        from accelerate.utils import FullyShardedDataParallelPlugin

        plugin = FullyShardedDataParallelPlugin()
        plugin.set_state_dict_type()
        out["state_dict_type"] = plugin.state_dict_type.name
    elif kind == "deepspeed":
        out["zero_stage"] = int(os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", 2))
    return out


def describe(layout: dict[str, Any]) -> str:
    """``FSDP (SHARDED_STATE_DICT)``, ``DeepSpeed ZeRO-3`` or ``DDP (or one process)``, for messages."""
    if layout.get("type") == "fsdp":
        return f"FSDP ({layout.get('state_dict_type')})"
    if layout.get("type") == "deepspeed":
        return f"DeepSpeed ZeRO-{layout.get('zero_stage')}"
    return "DDP (or one process)"


def configure_deepspeed(accelerator: Any, training: TrainingConfig, num_processes: int) -> None:
    """Fill the DeepSpeed config's batch and clipping fields from the run config, before ``prepare``.

    DeepSpeed steps its optimizer inside every backward that accelerate marks as the last of an
    accumulation, and kdcore accumulates micro-batches itself; so one micro-batch per step, and the
    gradient clipping (DeepSpeed's own) must be the run's ``max_grad_norm``.
    """
    if training.grad_accum != 1:
        raise KdError(
            f"under DeepSpeed kdcore cannot accumulate micro-batches (DeepSpeed steps its optimizer at each "
            f"backward); set training.grad_accum: 1 (it is {training.grad_accum})"
        )
    if training.on_nonfinite == "skip":
        raise KdError(
            "training.on_nonfinite: skip cannot drop an update under DeepSpeed, which applies it inside "
            "backward; use on_nonfinite: stop"
        )
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    clip, wanted = config.get("gradient_clipping", "auto"), float(training.max_grad_norm or 0.0)
    if clip != "auto" and float(clip) != wanted:
        raise KdError(
            f"the DeepSpeed config clips gradients at {clip} and training.max_grad_norm is {wanted}; drop "
            "gradient_clipping from the accelerate config (kdcore sets it) or make the two equal"
        )
    steps = config.get("gradient_accumulation_steps", "auto")
    if steps not in ("auto", 1):
        raise KdError(
            f"the DeepSpeed config accumulates {steps} micro-batches; set gradient_accumulation_steps: 1 "
            "(kdcore's training.batch_size is the whole step)"
        )
    config.update(
        gradient_clipping=wanted,
        gradient_accumulation_steps=1,
        train_micro_batch_size_per_gpu=training.batch_size // num_processes,
        train_batch_size=training.batch_size,
    )


def dropout_in(model: torch.nn.Module) -> str | None:
    """The first active dropout of ``model`` (``'transformer.h.0.attn.attn_dropout p=0.1'``), or None.

    Looks at ``nn.Dropout`` modules and at float attributes named like ``attention_dropout`` (models that
    pass the probability to the attention kernel instead).
    """
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Dropout) and module.p > 0:
            return f"{name} p={module.p}"
        for attr, value in vars(module).items():
            if "dropout" in attr and isinstance(value, float) and value > 0:
                return f"{name}.{attr}={value}"
    return None


def shard_for_inference(model: torch.nn.Module, block_names: set[str] | None = None) -> torch.nn.Module:
    """``model`` frozen, in eval mode, and sharded with FSDP2 over the default process group.

    Each block (a module whose class is named in ``block_names``, default the model's
    ``_no_split_modules``) is its own unit, so a forward holds one gathered block at a time besides the
    root's parameters; parameters are resharded after each forward. Nothing is upcast and no gradient
    buffer exists: it is never trained.
    """
    from torch.distributed.fsdp import fully_shard

    model.eval().requires_grad_(False)
    names = set(block_names or ()) | set(getattr(model, "_no_split_modules", None) or ())
    for module in model.modules():
        if module is not model and type(module).__name__ in names:
            fully_shard(module, reshard_after_forward=True)
    fully_shard(model, reshard_after_forward=True)
    return model


def even_shard(data: PackedDataset, rank: int, world: int) -> PackedDataset:
    """Rows ``rank::world`` of ``data``, padded with fully masked rows to ``ceil(N / world)``.

    Every process then runs the same number of forwards. A padded row has no valid target, so it adds
    nothing to NLL sums; :func:`in_sample_order` drops it from per-sample results.
    """
    ids, mask = data.input_ids[rank::world], data.attention_mask[rank::world]
    missing = math.ceil(len(data) / world) - len(ids)
    if missing:
        ids = torch.cat([ids, torch.zeros((missing, ids.shape[1]), dtype=ids.dtype)])
        mask = torch.cat([mask, torch.zeros((missing, mask.shape[1]), dtype=mask.dtype)])
    return PackedDataset(ids, mask, fingerprint=f"{data.fingerprint}:{rank}/{world}")


def in_sample_order(gathered: torch.Tensor, world: int, count: int | None = None) -> torch.Tensor:
    """Rows gathered process by process (process ``r`` held rows ``r::world``) back in sample order.

    ``count`` drops the padding :func:`even_shard` added.
    """
    rows = gathered.view(world, -1, *gathered.shape[1:]).transpose(0, 1).reshape(-1, *gathered.shape[1:])
    return rows if count is None else rows[:count]
