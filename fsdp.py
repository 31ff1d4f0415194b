"""FSDP2 through accelerate (configs/accelerate_fsdp2.yaml): what the kit adds to `accelerate launch` so that the
same sft.py and rft.py run sharded, on GPUs and, for the tests, on CPUs. The kit writes no distributed code of its
own: accelerate prepares, clips, saves and restores."""
from __future__ import annotations

from common import fail


def enable_on_cpu(accelerator, mixed_precision: str) -> None:
    """`accelerate launch` with FSDP (--use_fsdp, or configs/accelerate_fsdp2.yaml) but no GPU: accelerate 1.16 turns
    FSDP on only for accelerator devices (AcceleratorState checks MULTI_GPU, MULTI_XPU, ...), so on CPUs it sets up
    MULTI_CPU and wraps the model in DDP without a word: a CPU "FSDP" run would be DDP. torch's fully_shard itself
    works on CPU with gloo, so the kit hands accelerate the FSDP state it would have set up on GPUs (its own
    plugin, read from the same environment) and every FSDP path of accelerate runs: prepare (fully_shard per
    layer), clip_grad_norm_, get_state_dict, save_state/load_state. This is how the CPU tests run sft.py and
    rft.py sharded. Any other case where FSDP was asked for and is not on stops (a silent DDP run would need a
    full copy of the optimizer states per GPU, and fail for 7B hours later)."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
    state = accelerator.state
    if state.distributed_type == DistributedType.MULTI_CPU:
        plugin = FullyShardedDataParallelPlugin()   # from the FSDP_* variables accelerate launch set
        if mixed_precision != "no":
            plugin.set_mixed_precision(mixed_precision)
        state.fsdp_plugin = plugin
        state.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    if state.distributed_type != DistributedType.FSDP and state.num_processes > 1:
        fail(f"accelerate launch asked for FSDP, but accelerate set up {state.distributed_type} on {state.device}; "
             "check the launch config (configs/accelerate_fsdp2.yaml) and that every process sees its GPU.")


def is_sharded(accelerator) -> bool:
    """Whether the prepared model's parameters are FSDP shards (DTensors): what decides the optimizer
    (common.make_optimizer; the memory plan reads --plan_processes instead)."""
    from accelerate.utils import DistributedType
    return accelerator.distributed_type == DistributedType.FSDP


def sharding_note(accelerator, model) -> str:
    """'' unless sharded; else what this process holds, for the stage's start line, e.g. '; FSDP over 2 processes:
    7 units, 56/56 parameters sharded, this process holds 50.0% of the 207,072 parameter elements' (the tiny model)."""
    if not is_sharded(accelerator):
        return ""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor
    params = list(model.parameters())
    local = sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in params)
    total = sum(p.numel() for p in params)
    units = sum(isinstance(m, FSDPModule) for m in model.modules())
    return (f"; FSDP over {accelerator.num_processes} processes: {units} units, "
            f"{sum(isinstance(p, DTensor) for p in params)}/{len(params)} parameters sharded, this process holds "
            f"{local / max(1, total):.1%} of the {total:,} parameter elements")
