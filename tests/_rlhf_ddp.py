"""One RPO update (common.rl.train_on_pairs) and one reward-model update (common.reward_model.
train_reward_model_step) on five fixed pairs, run by test_rlhf.py: in one process on all of them, or under torchrun
with the ranks holding 3 and 2 pairs (different numbers of micro-batches). Rank 0 writes the updated weights' sums."""

import json
import sys

import torch

sys.path.insert(0, sys.argv[2])
from conftest import tiny_model  # noqa: E402

from common.dist import compute_cleanup, compute_init  # noqa: E402
from common.reward_model import RewardModel, train_reward_model_step  # noqa: E402
from common.rl import Pairs, PreferenceConfig, train_on_pairs  # noqa: E402

ddp, rank, _, world, device = compute_init()
g = torch.Generator().manual_seed(7)
n = 5
prompts = [torch.randint(3, 512, (int(k),), generator=g).tolist() for k in (5, 3, 6, 4, 2)]
chosen = [torch.randint(3, 512, (int(torch.randint(2, 7, (1,), generator=g)),), generator=g).tolist() for _ in range(n)]
rejected = [torch.randint(3, 512, (int(torch.randint(2, 7, (1,), generator=g)),), generator=g).tolist() for _ in range(n)]
rc, rr = torch.rand(n, generator=g), torch.rand(n, generator=g)
mine = [i for i in range(n) if not ddp or i % world == rank]
pairs = Pairs([prompts[i] for i in mine], [chosen[i] for i in mine], [rejected[i] for i in mine], rc[mine], rr[mine])
policy, ref = tiny_model(), tiny_model()
with torch.no_grad():  # a reference that differs from the policy: delta_pi != 0
    for p in policy.parameters():
        p.add_(0.01 * torch.randn(p.shape, generator=g))
start = {f"policy.{k}": v.detach().double().sum().item() for k, v in policy.named_parameters()}
train_on_pairs(policy, torch.optim.SGD(policy.parameters(), lr=0.5), pairs,
               PreferenceConfig("rpo_bwd_kl", beta=0.5, micro_batch=2, grad_clip=1e9, dtype=torch.float32), device, 2, ref)
rm = RewardModel(tiny_model(seed=3))
train_reward_model_step(rm, torch.optim.SGD(rm.parameters(), lr=0.5), pairs.prompt_ids, pairs.chosen_ids,
                        pairs.rejected_ids, 2, micro_batch=2, grad_clip=1e9, dtype=torch.float32)
if rank == 0:
    out = {f"policy.{k}": v.detach().double().sum().item() for k, v in policy.named_parameters()}
    out |= {f"rm.{k}": v.detach().double().sum().item() for k, v in rm.named_parameters()}
    json.dump({"after": out, "start": start}, open(sys.argv[1], "w"))
compute_cleanup()
