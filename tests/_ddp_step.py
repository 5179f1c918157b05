"""One DDP training step on a tiny model (run under torchrun by test_dist.py); rank 0 writes the gradients."""

import json
import sys

import torch

sys.path.insert(0, sys.argv[2])
from conftest import tiny_model  # noqa: E402

from common.dist import compute_cleanup, compute_init, shard_list, wrap_ddp  # noqa: E402

ddp, rank, _, world, device = compute_init()
model = tiny_model()
torch.manual_seed(123)
data = torch.randint(3, 512, (4, 12))
rows = torch.stack(shard_list(list(data), rank, world)) if ddp else data
m = wrap_ddp(model, device) if ddp else model
m(input_ids=rows, labels=rows, use_cache=False).loss.backward()
if rank == 0:
    json.dump({n: p.grad.flatten()[:64].tolist() for n, p in model.named_parameters()}, open(sys.argv[1], "w"))
compute_cleanup()
