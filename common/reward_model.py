"""The Bradley-Terry reward model: a scalar head on the last token of one of our checkpoints.

    rm, tokenizer = load_reward_model("runs/smol/reward_model")     # the one loader; refuses a plain checkpoint
    scores = reward_scores(rm, prompt_ids, completion_ids, pad_id)  # (N,) one scalar per (prompt, completion)
    stats = train_reward_model_step(rm, optimizer, prompt_ids, chosen_ids, rejected_ids, pad_id)  # -log sigmoid(rc - rr)
    save_reward_model(rm, tokenizer, out, stage="reward_model", args=..., meta=...)

On disk a reward model is a checkpoint of ours (the backbone, LM head included and unused, so the directory also
loads as a policy) plus reward_head.safetensors (weight (1, hidden), bias (1,)), named in meta.json's
"reward_head". The score reads the final hidden state (after the last norm) at the last real token of
prompt + completion: the end-of-turn token when the completion ended. Inputs are token ids laid out as the RL
code lays out rollouts (common.rl.pad_rows), so a sampled completion is scored on exactly the tokens sampled.
"""

import os

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from common.checkpoint import CheckpointError, check_checkpoint, check_safetensors, load_checkpoint, read_json, save_checkpoint
from common.dist import all_reduce_grads, all_reduce_sum, autocast_ctx
from common.losses import bradley_terry_loss
from common.rl import pad_rows

HEAD_FILE = "reward_head.safetensors"


class RewardModel(nn.Module):
    """backbone (our DeciLMForCausalLM) -> final hidden state at the last real token -> Linear(hidden, 1)."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.config.hidden_size, 1)
        nn.init.normal_(self.head.weight, std=backbone.config.hidden_size ** -0.5)  # scores O(1) at the start
        nn.init.zeros_(self.head.bias)

    @property
    def device(self) -> torch.device:
        return self.head.weight.device

    def forward(self, batch: dict) -> torch.Tensor:
        """(B,) float32 scores of a pad_rows batch (prompts left-padded, completions right-padded)."""
        d = self.device
        h = self.backbone.model(input_ids=batch["input_ids"].to(d), attention_mask=batch["attention_mask"].to(d),
                                position_ids=batch["position_ids"].to(d), use_cache=False)[0]
        last = batch["prompt_len"] + batch["completion_mask"].sum(1) - 1  # the last real token of each row
        with torch.autocast(device_type=d.type, enabled=False):  # the scalar in float32 (rewards are compared)
            return self.head(h[torch.arange(h.shape[0], device=d), last.to(d)].float()).squeeze(-1)


def _chunks(n: int, size: int) -> list[range]:
    return [range(s, min(n, s + size)) for s in range(0, n, size)]


@torch.no_grad()
def reward_scores(rm: RewardModel, prompt_ids: list[list[int]], completion_ids: list[list[int]], pad_id: int,
                  micro_batch: int = 16, dtype=None) -> torch.Tensor:
    """(N,) float32 scores on the CPU, no gradient; the model's train/eval mode is restored."""
    was_training = rm.training
    rm.eval()
    out = []
    with autocast_ctx(rm.device, dtype):
        for idx in _chunks(len(prompt_ids), micro_batch):
            out.append(rm(pad_rows([prompt_ids[i] for i in idx], [completion_ids[i] for i in idx], pad_id)).cpu())
    rm.train(was_training)
    return torch.cat(out) if out else torch.zeros(0)


def pairwise_accuracy(rm: RewardModel, prompt_ids, chosen_ids, rejected_ids, pad_id: int, micro_batch: int = 16,
                      dtype=None) -> list[float]:
    """Per pair: 1 when the chosen answer scores higher, 0 when lower, 0.5 on a tie."""
    c = reward_scores(rm, prompt_ids, chosen_ids, pad_id, micro_batch, dtype)
    r = reward_scores(rm, prompt_ids, rejected_ids, pad_id, micro_batch, dtype)
    return [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(c.tolist(), r.tolist())]


def train_reward_model_step(rm: RewardModel, optimizer, prompt_ids, chosen_ids, rejected_ids, pad_id: int,
                            micro_batch: int = 8, grad_clip: float = 1.0, dtype=None, check_finite=None) -> dict:
    """One optimizer step of the Bradley-Terry loss -log sigmoid(r_chosen - r_rejected), averaged over every rank's
    pairs (gradients summed across ranks, as common.rl's updates). check_finite(loss, grad_norm, where) runs before
    optimizer.step. Returns loss (mean), accuracy (fraction of pairs ranked right before the step), grad_norm."""
    n_global = all_reduce_sum(float(len(prompt_ids)))
    rm.train()
    loss_sum = correct = 0.0
    for idx in _chunks(len(prompt_ids), micro_batch):
        prompts = [prompt_ids[i] for i in idx]
        b = pad_rows(prompts + prompts, [chosen_ids[i] for i in idx] + [rejected_ids[i] for i in idx], pad_id)
        with autocast_ctx(rm.device, dtype):
            s = rm(b)
        m = len(idx)
        per_pair = bradley_terry_loss(s[:m], s[m:])
        (per_pair.sum() / n_global).backward()
        loss_sum += float(per_pair.detach().sum())
        correct += float((s[:m] > s[m:]).sum())
    all_reduce_grads(rm)
    gnorm = float(torch.nn.utils.clip_grad_norm_(rm.parameters(), grad_clip))
    loss = all_reduce_sum(loss_sum) / max(n_global, 1.0)
    if check_finite is not None:
        check_finite(loss, gnorm, "a reward-model step")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {"loss": loss, "accuracy": all_reduce_sum(correct) / max(n_global, 1.0), "grad_norm": gnorm}


# ----------------------------------------------------------------------------
# On disk


def save_reward_model(rm: RewardModel, tokenizer, out: str, stage: str = "reward_model", args: dict | None = None,
                      meta: dict | None = None, extra_files: dict | None = None) -> str:
    """Our checkpoint of the backbone plus HEAD_FILE (and extra_files, as save_checkpoint), written atomically
    (COMPLETED last, as every checkpoint)."""
    head = {"weight": rm.head.weight.detach().float().cpu().contiguous(),
            "bias": rm.head.bias.detach().float().cpu().contiguous()}
    return save_checkpoint(rm.backbone, tokenizer, out, stage=stage, args=args,
                           meta={**(meta or {}), "reward_head": HEAD_FILE},
                           extra_files={HEAD_FILE: lambda path: save_file(head, path), **(extra_files or {})})


def check_reward_model(path: str) -> None:
    """Raise CheckpointError (one line, with the fix) unless `path` is a finished reward model of ours."""
    check_checkpoint(path)
    head = os.path.join(path, HEAD_FILE)
    if not os.path.isfile(head):
        raise CheckpointError(f"{path} is a checkpoint but not a reward model (no {HEAD_FILE}); train one with "
                              f"`python 07_rlhf.py --train-reward-model --policy {path} --data DIR --out DIR2`")
    check_safetensors(head)
    hidden = read_json(os.path.join(path, "config.json")).get("hidden_size")
    shapes = {k: list(v.shape) for k, v in load_file(head).items()}
    if shapes != {"weight": [1, hidden], "bias": [1]}:
        raise CheckpointError(f"{head} holds {shapes}, not a head for hidden size {hidden} "
                              f"(weight [1, {hidden}], bias [1]); retrain the reward model")


def load_reward_model(path: str, dtype=torch.float32, device="cpu") -> tuple[RewardModel, object]:
    """(RewardModel, tokenizer) from a directory save_reward_model wrote; eval mode."""
    check_reward_model(path)
    backbone, tokenizer = load_checkpoint(path, dtype=dtype, device=device)
    rm = RewardModel(backbone)
    head = load_file(os.path.join(path, HEAD_FILE))
    with torch.no_grad():
        rm.head.weight.copy_(head["weight"])
        rm.head.bias.copy_(head["bias"])
    return rm.to(device=device, dtype=dtype).eval(), tokenizer
