"""One GRPO update (common.rl.train_on_rollout) on a fixed rollout, run by test_grpo.py: in one process on all
four prompt groups, or under torchrun with each rank holding two groups (ranks then run different numbers of
backward passes: one rank's groups include a zero-signal one). Rank 0 writes the updated weights' sums as JSON."""

import json
import sys

import torch

sys.path.insert(0, sys.argv[2])
from conftest import tiny_model  # noqa: E402

from common.dist import compute_cleanup, compute_init  # noqa: E402
from common.rl import PolicyLossConfig, Rollout, train_on_rollout  # noqa: E402

ddp, rank, _, world, device = compute_init()
g = torch.Generator().manual_seed(7)
G, groups = 3, 4
prompts = [torch.randint(3, 512, (int(n),), generator=g).tolist() for n in (5, 3, 6, 4)]
comps = [torch.randint(3, 512, (int(torch.randint(2, 7, (1,), generator=g)),), generator=g).tolist()
         for _ in range(G * groups)]
rewards = torch.tensor([1.0, 0.0, 0.5, 1.0, 1.0, 1.0, 0.0, 0.25, 1.0, 0.0, 0.0, 0.75])  # group 1: no signal
mine = [k for k in range(groups) if not ddp or k % world == rank]
rows = [k * G + j for k in mine for j in range(G)]
ro = Rollout([prompts[r // G] for r in rows], [comps[r] for r in rows], [""] * len(rows), G)
model = tiny_model()
cfg = PolicyLossConfig(loss_type=sys.argv[3], micro_batch=2, grad_clip=1e9, dtype=torch.float32)
st = train_on_rollout(model, torch.optim.SGD(model.parameters(), lr=0.5), ro, rewards[rows], cfg, device, pad_id=2)
if rank == 0:
    json.dump({n: p.detach().double().sum().item() for n, p in model.named_parameters()}, open(sys.argv[1], "w"))
compute_cleanup()
