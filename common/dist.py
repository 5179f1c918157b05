"""torchrun plumbing (nanochat style): one init for every stage, nccl on CUDA, gloo on CPU.

    ddp, rank, local_rank, world_size, device = compute_init()
"""

import contextlib
import os

import torch
import torch.distributed as dist


_OWN_GROUP: list = []  # non-empty once compute_init has made the default process group


def compute_init(seed: int = 0):
    """Read torchrun's env vars, init the process group, seed per rank; returns (ddp, rank, local_rank, world, device)."""
    ddp = int(os.environ.get("RANK", -1)) != -1
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if ddp and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        _OWN_GROUP.append(True)
    torch.manual_seed(seed + rank)
    return ddp, rank, local_rank, world_size, device


def compute_cleanup():
    """Destroy the process group compute_init made; one a colocated vLLM engine made (single process) is the
    engine's to destroy at its own shutdown (destroying it here fails there: "Invalid process group specified")."""
    if _OWN_GROUP and dist.is_initialized():
        dist.destroy_process_group()
        _OWN_GROUP.clear()


def is_master() -> bool:
    """Rank 0; before init, torchrun's RANK env var decides (so print0 is quiet on other ranks from the start)."""
    return dist.get_rank() == 0 if dist.is_initialized() else int(os.environ.get("RANK", 0)) == 0


def print0(*args, **kwargs):
    if is_master():
        from tqdm import tqdm
        with tqdm.external_write_mode():  # a live progress bar steps aside and is redrawn under the line
            print(*args, **kwargs, flush=True)


def barrier():
    if dist.is_initialized():
        dist.barrier()


def all_reduce_mean(x):
    """Mean over ranks of a tensor or a float (returns the same kind)."""
    if not dist.is_initialized():
        return x
    if isinstance(x, torch.Tensor):
        t = x.detach().clone()
    else:  # nccl reduces only CUDA tensors
        t = torch.tensor(float(x), dtype=torch.float64, device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    t /= dist.get_world_size()
    return t if isinstance(x, torch.Tensor) else t.item()


def all_reduce_sum(x: float) -> float:
    """Sum of a float over ranks (the float itself without torchrun)."""
    if not dist.is_initialized():
        return x
    t = torch.tensor(float(x), dtype=torch.float64, device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.item()


def all_reduce_grads(model) -> None:
    """Sum every parameter's gradient over ranks in one flat buffer (a rank without a gradient adds zeros).
    For updates whose ranks run different numbers of backward passes (RL after dropping zero-signal groups),
    which DDP's per-backward hooks cannot follow; the loss is normalized by global totals beforehand."""
    if not dist.is_initialized():
        return
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    i = 0
    for p in params:
        n = p.numel()
        p.grad.copy_(flat[i:i + n].view_as(p.grad))
        i += n


def wrap_ddp(model, device, find_unused_parameters: bool = False):
    from torch.nn.parallel import DistributedDataParallel as DDP
    ids = [device.index] if device.type == "cuda" else None
    return DDP(model, device_ids=ids, find_unused_parameters=find_unused_parameters)


def wrap_fsdp(model, device=None):
    """FSDP2: shard each decoder layer, then the root (for models too big for DDP)."""
    from torch.distributed.fsdp import fully_shard
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def shard_indices(n: int, rank: int | None = None, world_size: int | None = None) -> range:
    """This rank's indices into n items, strided (rank, rank + world, ...): shares differ by at most one."""
    if rank is None:
        rank = dist.get_rank() if dist.is_initialized() else 0
    if world_size is None:
        world_size = dist.get_world_size() if dist.is_initialized() else 1
    return range(rank, n, world_size)


def shard_list(items, rank: int | None = None, world_size: int | None = None):
    """This rank's items, strided (items[rank::world]) so every item lands on exactly one rank."""
    idx = shard_indices(len(items), rank, world_size)
    return items[idx.start::idx.step]  # a slice keeps the container type (list, tensor)


def sync() -> None:
    """Wait for queued CUDA work (a no-op on CPU): call before reading a timer."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def cpu_has_fast_bf16() -> bool:
    """avx512_bf16 / AMX: without them torch runs bf16 matmuls ~7x slower than float32 (AVX2: 16 vs 120 GFLOP/s)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((ln for ln in f if ln.startswith("flags")), "")
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def default_compute_dtype(device) -> torch.dtype:
    """bf16 where bf16 matmuls are fast (CUDA with bf16, CPUs with avx512_bf16 / AMX), float32 elsewhere."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32


def resolve_dtype(name: str, device) -> torch.dtype:
    """A --dtype flag: 'auto' picks default_compute_dtype(device), otherwise torch.<name>."""
    return default_compute_dtype(device) if name == "auto" else getattr(torch, name)


def autocast_ctx(device, dtype: torch.dtype | None = None):
    """Mixed precision over float32 master weights; a no-op when the compute dtype is float32."""
    device = torch.device(device)
    dtype = dtype or default_compute_dtype(device)
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def progress(iterable=None, disable: bool = False, **kwargs):
    """A tqdm bar with its ETA (stderr) on the master rank; a silent one elsewhere or with disable=True, with the
    same methods (update, set_postfix, close), so callers need no rank check."""
    from tqdm import tqdm
    return tqdm(iterable, disable=disable or not is_master(), **kwargs)
