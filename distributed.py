"""torch.distributed for `torchrun`: ranks, collectives, each rank's share, and FSDP2 sharding.

    torchrun --nproc_per_node 8 visplay.py --config ...                     # one node, 8 GPUs
    torchrun --nnodes 2 --node_rank R --master_addr HOST --master_port 29500 \\
             --nproc_per_node 8 visplay.py --config ...                     # two nodes

Without torchrun (WORLD_SIZE unset or 1) nothing is initialised and every function here is the
single-process identity, so the same code runs on a laptop. Backend: NCCL on CUDA, gloo on CPU.

- ranks and collectives: `init`, `close`, `rank`, `world_size`, `barrier`,
  `all_gather_list`, `all_reduce_sum`;
- work split over ranks: `my_share` (a range of indices), `my_part` (a GRPO step's batch);
- FSDP2 by hand: `shard_model`, `load_into_shards` (weights read once, by rank 0), `is_sharded`,
  `gathered` (whole weights for a rollout).
"""

import datetime
import os
import types
from contextlib import contextmanager

import torch
import torch.distributed as dist

from models.families import vision_blocks


def init(device_type, timeout_minutes=60):
    """Join the process group torchrun describes; returns this process's device.

    timeout_minutes: how long a collective waits for the slowest rank before the run fails (NCCL's
    default, 10 minutes, is shorter than rank 0 writing a 7B export while the others wait).
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo",
                                timeout=datetime.timedelta(minutes=timeout_minutes))
    if device_type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def close():
    """Leave the process group at the end of a run that finished: every rank waits for the others
    first, so none tears down its connections while another still talks to it, and none leaves
    the backend's threads to the interpreter's shutdown (gloo then aborts the process). Not
    called after an error: a rank that failed would wait here forever for the ones in a
    collective."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def active():
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank():
    return dist.get_rank() if active() else 0


def world_size():
    return dist.get_world_size() if active() else 1


def is_main():
    return rank() == 0


def barrier():
    if active():
        dist.barrier()


def all_gather_list(local):
    """Concatenate every rank's list, in rank order (the same list on every rank)."""
    if not active():
        return list(local)
    parts = [None] * world_size()
    dist.all_gather_object(parts, list(local))
    return [x for part in parts for x in part]


def all_reduce_sum(values):
    """Sums over ranks, in one collective: a float in, a float out; a list of floats in, a list
    out."""
    single = not isinstance(values, (list, tuple))
    values = [float(v) for v in ([values] if single else values)]
    if active():
        device = "cpu"
        if dist.get_backend() == "nccl":
            device = torch.device("cuda", torch.cuda.current_device())
        tensor = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(tensor)
        values = tensor.tolist()
    return values[0] if single else values


def my_share(count):
    """The slice of range(count) this rank works on: contiguous blocks, as equal as possible."""
    size, extra = divmod(count, world_size())
    start = rank() * size + min(rank(), extra)
    return range(start, start + size + (1 if rank() < extra else 0))


def my_part(items, blocks=1):
    """This rank's share of a batch (all of it in a single-process run).

    The batch is cut into `blocks` consecutive blocks (a GRPO step's mini-batches, one per optimizer
    update) and the rank takes its contiguous share of each, so every update sees the same global
    mini-batch whatever the number of processes.
    """
    size = len(items) // blocks
    return [items[b * size + i] for b in range(blocks) for i in my_share(size)]


# ----------------------------------------------------------------------------
# FSDP2 by hand (torchtitan style)


def shard_model(model, *, mixed_precision, cpu_offload=False, forward_methods=None):
    """Shard a vision-language model over the process group with FSDP2 (`fully_shard`).

    Units: each vision block (at the family's path, `families.vision_blocks`) and each language
    decoder layer is its own unit (it all-gathers its weights just before its forward and frees
    them after, so one layer's full weights are alive at a time), then the root, which keeps what
    is left: the embeddings, the vision patch embedding and merger (projector), the final norm
    and lm_head (tied or not).

    mixed_precision: compute in bf16 and reduce gradients in fp32, while the sharded master
        weights stay in their own dtype (fp32 as `Run.load_model` loads them), so small updates
        are not rounded away.
    cpu_offload: sharded parameters, gradients and optimizer state live in CPU memory (they move
        to the GPU unit by unit): trades speed for GPU memory on big models.
    forward_methods: {name: function(model, ...)} methods other than `forward` that compute with
        the model's weights (`logprobs.FORWARD_METHODS`, the chunked log-prob forward, which calls
        the inner model and lm_head directly). They are bound to the model and registered as
        forwards of the root, so the root's weights are gathered while they run and its gradients
        reduced.

    Gradients are summed over ranks, not averaged (divide factor 1): `grpo.grpo_update` normalises
    the loss by totals already summed over ranks. A frozen model (no parameter requires grad)
    forgets each forward's FSDP bookkeeping before the next one (`_forget_forwards`).
    """
    from torch.distributed.fsdp import (CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy,
                                        fully_shard, register_fsdp_forward_method)

    precision = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
                 if mixed_precision else MixedPrecisionPolicy())
    offload = CPUOffloadPolicy() if cpu_offload else OffloadPolicy()
    for block in list(vision_blocks(model)) + list(model.model.language_model.layers):
        fully_shard(block, mp_policy=precision, offload_policy=offload)
    fully_shard(model, mp_policy=precision, offload_policy=offload)
    for name, function in (forward_methods or {}).items():
        setattr(model, name, types.MethodType(function, model))
        register_fsdp_forward_method(model, name)
    for module in model.modules():
        if hasattr(module, "set_gradient_divide_factor"):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)  # plain SUM: gloo has no pre-scaled sum
    if not any(p.requires_grad for p in model.parameters()):
        states = [m._get_fsdp_state() for m in model.modules() if hasattr(m, "_get_fsdp_state")]
        model.model.register_forward_pre_hook(lambda *_: _forget_forwards(states))
    return model


def _forget_forwards(states):
    """FSDP2 records every forward of every unit (the order the backward prefetches in) and clears
    the record only at the end of a backward. A frozen model never runs one, so the record would
    grow by one entry per unit on each of its thousands of forwards: clear it before each."""
    for state in states:
        state._comm_ctx.post_forward_order.clear()
        if state._fsdp_param_group is not None:
            state._fsdp_param_group._post_forward_indices.clear()


def load_into_shards(model, full_model, device):
    """Fill a model built on the meta device and sharded (`shard_model`) with the weights of
    `full_model`, which only rank 0 has read (None elsewhere): rank 0 broadcasts one tensor at a
    time and every rank keeps its shard, so no other rank ever holds the whole model (a 7B model
    in fp32 is 30 GB per process). The buffers (rotary frequencies, not in a state dict) follow.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    full_state = full_model.state_dict() if is_main() else {}
    set_model_state_dict(model, full_state, options=StateDictOptions(full_state_dict=True,
                                                                     broadcast_from_rank0=True))
    buffers = [dict(full_model.named_buffers()) if is_main() else None]
    dist.broadcast_object_list(buffers, src=0)
    for name, value in buffers[0].items():
        module_name, _, buffer_name = name.rpartition(".")
        model.get_submodule(module_name)._buffers[buffer_name] = value.to(device)
    return model


def is_sharded(model):
    """True if `shard_model` sharded this model."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


@contextmanager
def gathered(model):
    """Whole (unsharded) weights on every rank for a rollout: one all-gather per unit up front,
    none during the hundreds of small decode forwards, which also lets ranks decode different
    numbers of steps. Resharded on exit. A no-op for an unsharded model."""
    if not is_sharded(model):
        yield model
        return
    units = [m for m in model.modules() if hasattr(m, "unshard")]
    model.set_reshard_after_forward(False)
    for unit in units:
        unit.unshard()
    try:
        yield model
    finally:
        for unit in units:
            unit.reshard()
        model.set_reshard_after_forward(True)
        model.set_reshard_after_forward(False, recurse=False)  # FSDP2's default for the root
