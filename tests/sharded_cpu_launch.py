"""Test helper (not shipped): ``kd`` with accelerate's FSDP2 or DeepSpeed path switched on for CPU processes.

accelerate enables FSDP and DeepSpeed only for GPU-like process groups; on CPU (gloo) it drops the plugin
and trains with DDP, which kdcore refuses. On a GPU, accelerate's state says ``FSDP`` (or ``DEEPSPEED``)
and every call (prepare, backward, no_sync, clip_grad_norm_, get_state_dict, save_state) takes that
backend's branch. This launcher makes the state say so on CPU: it sets the type in accelerate's shared
``PartialState`` before kdcore starts (kdcore checks it before anything is written); around each
``Accelerator`` kdcore builds, it lets accelerate set up the CPU process group as usual, then sets the
type in both shared states (every ``AcceleratorState`` built later copies ``PartialState``'s) and gives
it the plugin the launcher's environment describes, as accelerate does on a GPU. Everything else is
kdcore.

    accelerate launch --config_file examples/accelerate/fsdp2.yaml tests/sharded_cpu_launch.py run ...
"""

from __future__ import annotations

import os

from accelerate import PartialState
from accelerate.utils import DistributedType


def switch_state() -> str | None:
    """Flip accelerate's shared state to the backend the launcher asked for; its name, or None."""
    asked = (
        "fsdp"
        if os.environ.get("ACCELERATE_USE_FSDP") == "true"
        else "deepspeed"
        if os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true"
        else None
    )
    state = PartialState(cpu=True)
    if asked is None or state.distributed_type != DistributedType.MULTI_CPU:
        return None  # nothing asked, or a launch accelerate already handles
    kind = DistributedType.FSDP if asked == "fsdp" else DistributedType.DEEPSPEED
    PartialState._shared_state["distributed_type"] = kind

    import kdcore.training.engine as engine

    build = engine.make_accelerator

    def make_accelerator(*args, **kwargs):
        PartialState._shared_state["distributed_type"] = DistributedType.MULTI_CPU
        accelerator = build(*args, **kwargs)
        accelerator.state.distributed_type = kind
        PartialState._shared_state["distributed_type"] = kind
        if asked == "fsdp":
            from accelerate.utils import FullyShardedDataParallelPlugin

            accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin()
        else:
            import deepspeed
            from accelerate.utils import DeepSpeedPlugin

            plugin = DeepSpeedPlugin()  # from the launcher's ACCELERATE_DEEPSPEED_* environment
            plugin.set_mixed_precision("no")
            plugin.select(_from_accelerator_state=True)
            accelerator.state.deepspeed_plugins = plugin
            deepspeed.init_distributed(dist_backend="gloo")  # adopts the existing process group
        return accelerator

    engine.make_accelerator = make_accelerator
    return asked


if __name__ == "__main__":
    switch_state()
    from kdcore.cli import main

    main()
