"""Data parallelism under torchrun: the same script on one device or many, with PyTorch's own distributed package.

    torchrun --nproc_per_node 2 train_sft.py <the same flags>

Without torchrun (WORLD_SIZE unset or 1) every function here is the identity and nothing changes. Under it each
process (rank) holds the whole frozen base (4-bit included: QLoRA + data parallelism is the usual recipe) and its
adapters, reads its own shard of every batch, and after backward the ranks sum their gradients. Each rank scales
its loss by the *global* count (tokens, pairs, responses of the whole step), so the summed gradient is exactly one
process's on the global batch. NCCL with one GPU per rank (LOCAL_RANK) on CUDA, gloo on the CPU (and for CPU
tensors beside NCCL).

Why an explicit all-reduce of the trainable gradients and not DistributedDataParallel: DDP's hooks assume one
forward per backward and every parameter used in it. Here PPO runs two adapters on one base, gradient
checkpointing replays adapters in backward, and a step accumulates micro-batches; DDP's unused-parameter search
and bucket hooks would have to be told about each. Adapters are a few million parameters: one flat all-reduce
per optimizer step, before clipping, is exact whatever ran, and costs one buffer of their size.
"""
import os

import torch
import torch.distributed as dist


def world():
    return dist.get_world_size() if dist.is_initialized() else 1


def rank():
    return dist.get_rank() if dist.is_initialized() else 0


def is_main():
    return rank() == 0


def init(device="auto"):
    """Join the process group torchrun describes in the environment; returns the world size."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return world()
    cuda = torch.cuda.is_available() and device != "cpu"
    if cuda:  # one GPU per rank; "cuda" means this rank's own from here on
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend(cuda))
    return world()


def backend(cuda):
    """The group's backend for each device. NCCL serves CUDA tensors only, and every stage also sums Python numbers
    (token and pair counts, the KL, early stopping) as CPU tensors in `all_sum`: gloo serves those beside it."""
    return "cpu:gloo,cuda:nccl" if cuda else "gloo"


def barrier():
    if dist.is_initialized():
        dist.barrier()


def all_sum(x):
    """Σ over ranks of a number or tensor (a tensor comes back on its own device; a number as a float)."""
    if not dist.is_initialized():
        return x
    t = x.detach().clone() if torch.is_tensor(x) else torch.tensor(float(x), dtype=torch.float64)
    dist.all_reduce(t)
    return t if torch.is_tensor(x) else t.item()


def all_sum_grads(params):
    """Sum every rank's gradients of `params` in place (a rank that did not touch a parameter adds zeros)."""
    if not dist.is_initialized():
        return
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float() for p in params])
    dist.all_reduce(flat)
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset:offset + n].view_as(p).to(p.dtype)
        offset += n


def gather(obj):
    """[obj of rank 0, obj of rank 1, ...] on every rank (any picklable object)."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * world()
    dist.all_gather_object(out, obj)
    return out


def sum_dicts(sums):
    """Every rank's dict of numbers summed key by key; a key a rank lacks counts 0 there (a rank that held no
    evaluation rows has no totals). One gather, so ranks need not agree on the keys."""
    if not dist.is_initialized():
        return sums
    out = {}
    for m in gather(sums):
        for k, v in m.items():
            out[k] = out.get(k, 0.0) + v
    return out


def mean_metrics(metrics):
    """Every rank's metrics dict averaged key by key over the ranks that have the key (shards are of equal size,
    so a mean of rank means is the global mean); `tokens` is summed."""
    if not dist.is_initialized():
        return metrics
    out = {}
    for m in gather({k: float(v) for k, v in metrics.items()}):
        for k, v in m.items():
            out.setdefault(k, []).append(v)
    return {k: sum(v) if k == "tokens" else sum(v) / len(v) for k, v in out.items()}


def shard(items):
    """This rank's contiguous share of a list whose length is a multiple of the world size."""
    n = len(items) // world()
    return items[rank() * n:(rank() + 1) * n]


def close():
    if dist.is_initialized():
        dist.destroy_process_group()
