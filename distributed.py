"""torch.distributed for `torchrun`: ranks, gathers and rank-0 work.

    torchrun --nproc_per_node 8 visplay.py --config ...                     # one node, 8 GPUs
    torchrun --nnodes 2 --node_rank R --master_addr HOST --master_port 29500 \\
             --nproc_per_node 8 visplay.py --config ...                     # two nodes

Without torchrun (WORLD_SIZE unset or 1) nothing is initialised and every function here is the
single-process identity, so the same code runs on a laptop. Backend: NCCL on CUDA, gloo on CPU.
"""

import os

import torch
import torch.distributed as dist


def init(device_type):
    """Join the process group torchrun describes; returns this process's device."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    if device_type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


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
    """Sums over ranks, in one collective: a float in, a float out; a list of floats in, a list out."""
    single = not isinstance(values, (list, tuple))
    values = [float(v) for v in ([values] if single else values)]
    if active():
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        tensor = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(tensor)
        values = tensor.tolist()
    return values[0] if single else values


def my_share(count):
    """The slice of range(count) this rank works on: contiguous blocks, as equal as possible."""
    size, extra = divmod(count, world_size())
    start = rank() * size + min(rank(), extra)
    return range(start, start + size + (1 if rank() < extra else 0))
