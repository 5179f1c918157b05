"""One training step on a tiny model, run by test_dist.py: plain (one process) or under torchrun, where it takes
the step twice, with DDP and with FSDP2. Rank 0 writes the full-precision gradients as JSON."""

import json
import sys

import torch

sys.path.insert(0, sys.argv[2])
from conftest import tiny_model  # noqa: E402

from common.dist import all_reduce_mean, compute_cleanup, compute_init, shard_list, wrap_ddp, wrap_fsdp  # noqa: E402

ddp, rank, _, world, device = compute_init()
torch.manual_seed(123)
data = torch.randint(3, 512, (4, 12))
rows = torch.stack(shard_list(list(data), rank, world)) if ddp else data


def step_grads(wrap):
    model = tiny_model()
    wrapped = wrap(model)  # keep a reference: a DDP wrapper freed before backward never all-reduces
    wrapped(input_ids=rows, labels=rows, use_cache=False).loss.backward()
    # FSDP2 leaves each rank a shard of every gradient (a DTensor): gather the whole one
    return {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).flatten().tolist()
            for n, p in model.named_parameters()}


if ddp:
    out = {"ddp": step_grads(lambda m: wrap_ddp(m, device)), "fsdp": step_grads(wrap_fsdp),
           "mean_rank": all_reduce_mean(float(rank))}
else:
    out = {"single": step_grads(lambda m: m)}
if rank == 0:
    json.dump(out, open(sys.argv[1], "w"))
compute_cleanup()
