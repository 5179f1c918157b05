"""RL experience and the policy update, shared by 06_grpo.py, 07_rlhf.py and benchmarks/bench_grpo.py.

    rollout = sample_rollout(generator, tokenizer, prompts, group_size=16, max_new_tokens=256)  # G per prompt
    rewards = torch.tensor([...one reward per completion, group by group...])
    stats = train_on_rollout(model, optimizer, rollout, rewards, PolicyLossConfig(loss_type="grpo"), device)
    stats = train_on_rollout(..., advantages=rloo_advantages(rewards, k))            # RLOO (07)
    stats = train_on_pairs(model, optimizer, Pairs(...), PreferenceConfig("rpo_sq"), device, pad_id, ref)  # RPO (07)

A rollout holds the exact token ids the sampler chose (never re-tokenized text). The log-probabilities the loss
needs are always recomputed with the training forward, for the current policy and, once per rollout, for the
"old" (sampling) policy: the sampler's own numbers come from another program (vLLM, possibly FP8; or HF's
incremental decoding with a KV cache, in another dtype) and differ from the training forward by rounding. Using
them as pi_old would make the ratio rho != 1 before any update and the clipping would act on noise; recomputed,
rho is exactly 1 on the first minibatch and moves only as the weights do. The sampler's own distribution still
differs from pi_old by that rounding (more with FP8): with a vLLM sampler, whose log-probs come with the rollout,
each sequence is re-weighted by pi_old / mu (`sampler_is_weights`, TRL's correction: sequence_mask, cap 3).

`steps_per_rollout` K (LN-Ultra: 2) splits the rollout's prompt groups into K minibatches, one optimizer step
each (72 prompts x 16 samples = 2 x 576, the paper's global batch), so from the second step on the policy has
moved and rho / the clipping really act. Groups whose rewards are all equal have zero advantage everywhere: they
are counted and dropped before the forward (DAPO's filter), which also drops their share of the KL term.

Data parallel: every rank samples and scores its own prompts (a group never spans ranks) and runs a different
number of backward passes (its informative rows), which DDP's per-backward bucketed all-reduce cannot follow; so
the update sums gradients across ranks once per optimizer step (common.dist.all_reduce_grads), with the loss
normalized by the global token / sequence totals (the same objective as one big batch).
"""

import contextlib
import time
from dataclasses import dataclass

import torch

from common.dist import all_reduce_grads, all_reduce_sum, autocast_ctx
from common.generate import generate
from common.losses import (clipped_surrogate, group_advantages, kl_k3, normalize_token_loss, preference_loss,
                           zero_signal_groups)


@dataclass
class Rollout:
    """group_size completions per prompt, laid out prompt by prompt (row i belongs to prompt i // group_size)."""
    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    texts: list[str]
    group_size: int
    gen_seconds: float = 0.0
    sampler_logprobs: list[list[float]] | None = None  # the sampler's own log-probs (vLLM), for the IS correction

    @property
    def num_tokens(self) -> int:
        return sum(len(c) for c in self.completion_ids)


@dataclass
class PolicyLossConfig:
    loss_type: str = "grpo"          # grpo | dr_grpo | dapo (common.losses.normalize_token_loss)
    eps_low: float = 0.2
    eps_high: float = 0.2            # DAPO clip-higher: 0.28
    beta: float = 0.0                # k3 KL to the reference; 0 = no reference model
    steps_per_rollout: int = 1       # optimizer steps (minibatches) per rollout
    micro_batch: int = 8             # completions per forward/backward
    grad_clip: float = 1.0
    max_new_tokens: int = 256        # Dr. GRPO's constant L_max
    adv_eps: float = 1e-4
    dtype: torch.dtype | None = None  # autocast compute dtype (None: common.dist's default for the device)
    is_mode: str = "sequence_mask"   # sampler/learner importance-sampling correction: sequence_mask | token_truncate
    is_cap: float = 3.0              # | off; applied only when the rollout carries the sampler's log-probs (vLLM)


# ----------------------------------------------------------------------------
# Sampling


def sample_rollout(generator, tokenizer, prompts: list[str], group_size: int, max_new_tokens: int,
                   temperature: float = 1.0, top_p: float = 1.0, batch_size: int = 64, dtype=None) -> Rollout:
    """group_size samples per prompt (LN-Ultra: temperature 1, top_p 1) through common.generate."""
    t0 = time.perf_counter()
    is_module = isinstance(generator, torch.nn.Module)
    if is_module:
        was_training = generator.training
        generator.eval()
    device = next(generator.parameters()).device if is_module else "cuda"
    with autocast_ctx(device, dtype) if is_module else contextlib.nullcontext():
        outs = generate(generator, tokenizer, prompts, n=group_size, temperature=temperature, top_p=top_p,
                        max_new_tokens=max_new_tokens, batch_size=batch_size, return_ids=True)
    if is_module and was_training:
        generator.train()
    encoded = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    rows = [(encoded[i], *out) for i, group in enumerate(outs) for out in group]  # (prompt, text, ids[, logprobs])
    return Rollout(prompt_ids=[r[0] for r in rows], completion_ids=[r[2] for r in rows], texts=[r[1] for r in rows],
                   group_size=group_size, gen_seconds=time.perf_counter() - t0,
                   sampler_logprobs=[r[3] for r in rows] if rows and len(rows[0]) == 4 else None)


def sample_by_mode(generator, tokenizer, prompts: list[str], reasoning: list[bool], group_size: int,
                   max_new_tokens: int, max_new_tokens_off: int, temperature: float = 1.0, top_p: float = 1.0,
                   batch_size: int = 64, dtype=None) -> tuple[list[int], Rollout]:
    """sample_rollout with the reasoning toggle's two completion budgets: one generate call per mode (a thinking-
    off answer needs fewer tokens). Returns (order, rollout): rollout group g belongs to prompts[order[g]]
    (thinking-on prompts first, then off)."""
    order, parts = [], []
    for on, budget in ((True, max_new_tokens), (False, max_new_tokens_off)):
        idx = [i for i, r in enumerate(reasoning) if r == on]
        if idx:
            order += idx
            parts.append(sample_rollout(generator, tokenizer, [prompts[i] for i in idx], group_size, budget,
                                        temperature, top_p, batch_size, dtype))
    lps = [x.sampler_logprobs for x in parts]
    return order, Rollout(*[sum((getattr(x, f) for x in parts), []) for f in ("prompt_ids", "completion_ids", "texts")],
                          group_size=group_size, gen_seconds=sum(x.gen_seconds for x in parts),
                          sampler_logprobs=sum(lps, []) if lps and all(lp is not None for lp in lps) else None)


# ----------------------------------------------------------------------------
# Log-probabilities with the training forward


def pad_rows(prompt_ids: list[list[int]], completion_ids: list[list[int]], pad_id: int) -> dict:
    """Prompts left-padded to a common end column P, completions right-padded after it: the completion tokens of
    every row sit in columns P..P+C-1, so their predicting logits are one slice. Position ids count real tokens."""
    P = max(len(p) for p in prompt_ids)
    C = max(1, max(len(c) for c in completion_ids))
    B = len(prompt_ids)
    ids = torch.full((B, P + C), pad_id, dtype=torch.long)
    attn = torch.zeros((B, P + C), dtype=torch.long)
    for r, (p, c) in enumerate(zip(prompt_ids, completion_ids)):
        ids[r, P - len(p):P] = torch.tensor(p, dtype=torch.long)
        attn[r, P - len(p):P] = 1
        if c:
            ids[r, P:P + len(c)] = torch.tensor(c, dtype=torch.long)
            attn[r, P:P + len(c)] = 1
    pos = (attn.cumsum(-1) - 1).clamp_min(0)
    return {"input_ids": ids, "attention_mask": attn, "position_ids": pos, "completion_mask": attn[:, P:].bool(),
            "prompt_len": P}


def completion_logprobs(model, batch: dict, device, dtype=None) -> torch.Tensor:
    """(B, C) float32 log pi(token) of each completion token (padding positions hold garbage; use the mask).
    The LM head runs only on the C positions that predict completion tokens (logits_to_keep)."""
    P, C = batch["prompt_len"], batch["completion_mask"].shape[1]
    ids = batch["input_ids"].to(device)
    with autocast_ctx(device, dtype):
        logits = model(input_ids=ids, attention_mask=batch["attention_mask"].to(device),
                       position_ids=batch["position_ids"].to(device), use_cache=False, logits_to_keep=C + 1).logits
    logits = logits[:, :-1].float()
    target = ids[:, P:]
    return logits.gather(-1, target[..., None]).squeeze(-1) - logits.logsumexp(-1)


@torch.no_grad()
def rollout_logprobs(model, rollout: Rollout, rows: list[int], pad_id: int, device, micro_batch: int,
                     dtype=None) -> dict[int, torch.Tensor]:
    """{row: (len,) log-probs} for the given rows, no gradient: pi_old before the first update, or the reference."""
    out = {}
    for chunk in _micro_batches(rollout, rows, micro_batch):
        b = pad_rows([rollout.prompt_ids[r] for r in chunk], [rollout.completion_ids[r] for r in chunk], pad_id)
        lp = completion_logprobs(model, b, device, dtype).cpu()
        for k, r in enumerate(chunk):
            out[r] = lp[k, :len(rollout.completion_ids[r])]
    return out


def sequence_kl(logprobs: dict[int, torch.Tensor], ref_logprobs: dict[int, torch.Tensor], rows: list[int]) -> torch.Tensor:
    """(len(rows),) sum_t (log pi - log pi_ref) over each sampled completion: the sequence-level KL estimate that
    RLOO (TRL) subtracts from the reward, r_i - beta * KL_i."""
    return torch.tensor([float((logprobs[r] - ref_logprobs[r]).sum()) for r in rows])


def _micro_batches(rollout: Rollout, rows: list[int], size: int) -> list[list[int]]:
    """Rows sorted by completion length, then cut into micro-batches: little padding per forward."""
    rows = sorted(rows, key=lambda r: len(rollout.completion_ids[r]))
    return [rows[i:i + size] for i in range(0, len(rows), size)]


def sampler_is_weights(old_logp: torch.Tensor, sampler_logp: torch.Tensor, mask: torch.Tensor, mode: str,
                       cap: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Importance weights for the sampler/learner mismatch (TRL's vLLM correction): the rollout was drawn by another
    program (vLLM: other kernels, maybe another dtype or FP8) whose distribution mu differs from the learner's own
    pi_old by rounding, so the surrogate's expectation under pi_old is re-weighted by pi_old / mu.
      sequence_mask:  w_i = exp(sum_t (log pi_old - log mu)) for every token of sequence i, and 0 where w_i > cap
      token_truncate: w_it = min(exp(log pi_old - log mu)_t, cap)
    Returns (weights (B, C), detached; masked (B,) bool: sequences a sequence mask dropped)."""
    diff = ((old_logp - sampler_logp) * mask).float()
    if mode == "sequence_mask":
        w = diff.sum(-1, keepdim=True).exp()
        masked = (w > cap).squeeze(-1)
        return w.masked_fill(w > cap, 0.0).expand_as(diff).detach(), masked
    if mode == "token_truncate":
        return diff.exp().clamp(max=cap).detach(), torch.zeros(diff.shape[0], dtype=torch.bool, device=diff.device)
    raise ValueError(f"importance-sampling mode {mode!r}; use sequence_mask, token_truncate or off")


def _stack(values: dict[int, torch.Tensor], rows: list[int], width: int) -> torch.Tensor:
    out = torch.zeros(len(rows), width)
    for k, r in enumerate(rows):
        out[k, :len(values[r])] = values[r]
    return out


# ----------------------------------------------------------------------------
# The update


def train_on_rollout(model, optimizer, rollout: Rollout, rewards: torch.Tensor, cfg: PolicyLossConfig, device,
                     pad_id: int, ref_model=None, check_finite=None, advantages: torch.Tensor | None = None,
                     old_logprobs: dict[int, torch.Tensor] | None = None) -> dict:
    """Group advantages, drop zero-signal groups, then cfg.steps_per_rollout optimizer steps over minibatches of
    the remaining groups. `model` is the raw (unwrapped) policy; gradients are summed across ranks here.
    `check_finite(loss, grad_norm, where)` runs before each optimizer.step (a NaN gradient never reaches the
    weights). Returns the step's statistics (means over this rank's trained tokens unless noted).
    `advantages` (one per completion) replaces GRPO's group advantages (RLOO: leave-one-out baseline on rewards
    with the KL penalty in them); groups whose `rewards` are all equal are still the ones dropped.
    `old_logprobs` ({row: log-probs of the sampling policy}, e.g. rollout_logprobs computed for a KL penalty)
    spares recomputing pi_old when steps_per_rollout > 1."""
    G = rollout.group_size
    scale = cfg.loss_type != "dr_grpo"  # Dr. GRPO: no division by the group std
    adv = group_advantages(rewards, G, scale_by_std=scale, eps=cfg.adv_eps) if advantages is None else advantages.float()
    dead = zero_signal_groups(rewards, G)
    groups = [g for g in range(len(dead)) if not dead[g]]
    stats = {"groups": len(dead), "zero_signal_groups": int(dead.sum()), "optimizer_steps": 0, "loss": 0.0,
             "clip_fraction": 0.0, "kl_ref": None, "grad_norm": None, "trained_tokens": 0, "old_logp_seconds": 0.0}
    is_on = rollout.sampler_logprobs is not None and cfg.is_mode != "off"
    sampler = {r: torch.tensor(lp, dtype=torch.float32) for r, lp in enumerate(rollout.sampler_logprobs)} \
        if is_on else {}
    is_log_ratio, is_masked, is_seqs = 0.0, 0, 0
    t0 = time.perf_counter()
    K = max(1, cfg.steps_per_rollout)
    minibatches = [groups[k::K] for k in range(K)]
    all_rows = [g * G + j for g in groups for j in range(G)]
    later = [g * G + j for mb in minibatches[1:] for g in mb for j in range(G)]  # rows trained after an update
    old = {}
    if old_logprobs is not None:
        old = {r: old_logprobs[r] for r in later}
    elif later:  # pi_old = the policy that sampled, before the first update; the first minibatch trains on that
        model.eval()  # policy itself, so its pi_old is its own log-probs, detached (no extra forward)
        old = rollout_logprobs(model, rollout, later, pad_id, device, cfg.micro_batch, cfg.dtype)
        stats["old_logp_seconds"] = time.perf_counter() - t0
    ref = rollout_logprobs(ref_model, rollout, all_rows, pad_id, device, cfg.micro_batch, cfg.dtype) \
        if cfg.beta > 0 and ref_model is not None and all_rows else {}
    model.train()
    clipped_tok = kl_sum = loss_sum = 0.0
    gnorms = []
    for mb in minibatches:
        rows = [g * G + j for g in mb for j in range(G)]
        n_seqs = all_reduce_sum(float(len(rows)))
        n_tok = all_reduce_sum(float(sum(len(rollout.completion_ids[r]) for r in rows)))
        if n_seqs == 0:
            continue  # every rank's minibatch is empty: no step
        step_loss = 0.0
        for chunk in _micro_batches(rollout, rows, cfg.micro_batch):
            b = pad_rows([rollout.prompt_ids[r] for r in chunk], [rollout.completion_ids[r] for r in chunk], pad_id)
            mask = b["completion_mask"].to(device)
            logp = completion_logprobs(model, b, device, cfg.dtype)
            old_lp = _stack(old, chunk, mask.shape[1]).to(device) if stats["optimizer_steps"] else logp.detach()
            per_tok, clipped = clipped_surrogate(logp, old_lp, adv[chunk].to(device), cfg.eps_low, cfg.eps_high)
            if is_on:  # the rollout came from another program (vLLM): re-weight by pi_old / mu
                mu = _stack(sampler, chunk, mask.shape[1]).to(device)
                w, masked = sampler_is_weights(old_lp, mu, mask, cfg.is_mode, cfg.is_cap)
                per_tok = per_tok * w
                is_log_ratio += float(((old_lp - mu) * mask).sum())
                is_masked, is_seqs = is_masked + int(masked.sum()), is_seqs + len(chunk)
            if ref:
                kl = kl_k3(logp, _stack(ref, chunk, mask.shape[1]).to(device))
                per_tok = per_tok + cfg.beta * kl
                kl_sum += float((kl * mask).sum())
            loss = normalize_token_loss(per_tok, mask, cfg.loss_type, n_seqs, n_tok, cfg.max_new_tokens)
            loss.backward()
            step_loss += loss.item()
            clipped_tok += float((clipped & mask).sum())
            stats["trained_tokens"] += int(mask.sum())
        all_reduce_grads(model)
        gnorm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip))
        if check_finite is not None:
            check_finite(step_loss, gnorm, f"optimizer step {stats['optimizer_steps'] + 1} of the rollout")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        gnorms.append(gnorm)
        loss_sum += step_loss
        stats["optimizer_steps"] += 1
    tok = max(1, stats["trained_tokens"])
    stats.update(loss=loss_sum, clip_fraction=clipped_tok / tok, grad_norm=max(gnorms) if gnorms else None,
                 kl_ref=kl_sum / tok if ref else None, train_seconds=time.perf_counter() - t0,
                 is_log_ratio=is_log_ratio / tok if is_on else None,  # mean log(pi_old / mu) per token
                 is_masked_fraction=is_masked / max(1, is_seqs) if is_on else None)
    return stats


# ----------------------------------------------------------------------------
# Prompt selection: LN-Ultra's pass-rate filter and easy-to-hard curriculum


def pass_rate_filter(items: list, rates: list[float], max_pass_rate: float = 0.75,
                     min_pass_rate: float = 0.0) -> tuple[list, dict]:
    """Keep the items whose pass rate (fraction of k samples a model solved) is below max_pass_rate: prompts the
    model already solves teach nothing. min_pass_rate > 0 also drops the prompts solved less often than that (at
    k = 8, 0.1 drops those never solved): a group of all-wrong answers has no signal either, and on a small compute
    budget the rollouts go to prompts that can teach (DAPO's dynamic sampling, decided once from the pass rates;
    LN-Ultra kept them). Returns (kept, counts: candidates / dropped (too easy) / zero (pass rate 0) /
    dropped_hard (below min_pass_rate) / kept)."""
    kept = [x for x, r in zip(items, rates) if min_pass_rate <= r < max_pass_rate]
    easy = sum(r >= max_pass_rate for r in rates)
    return kept, {"candidates": len(items), "dropped": easy, "zero": sum(r == 0 for r in rates),
                  "dropped_hard": len(items) - easy - len(kept), "kept": len(kept)}


def curriculum_order(items: list, rates: list[float], seed=0, curriculum: bool = True) -> list:
    """Easy to hard (pass rate descending), ties in a seeded random order; curriculum=False: a seeded shuffle.
    Deterministic given the seed, so a resumed run sees the same prompt order."""
    import random
    rng = random.Random(f"order:{seed}")
    keyed = [(x, r, rng.random()) for x, r in zip(items, rates)]
    keyed.sort(key=(lambda t: (-t[1], t[2])) if curriculum else (lambda t: t[2]))
    return [x for x, _, _ in keyed]


# ----------------------------------------------------------------------------
# Preference optimization (RPO / DPO, 07_rlhf.py): pairs of completions of one prompt


@dataclass
class Pairs:
    """Preference pairs as token ids: the rendered prompt, the chosen and the rejected completion (ending with the
    end-of-turn id when they ended), and their rewards (reward model or verifier; None: DPO only)."""
    prompt_ids: list[list[int]]
    chosen_ids: list[list[int]]
    rejected_ids: list[list[int]]
    reward_chosen: torch.Tensor | None = None
    reward_rejected: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.prompt_ids)

    def select(self, idx: list[int]) -> "Pairs":
        pick = (lambda t: None if t is None else t[list(idx)])
        return Pairs([self.prompt_ids[i] for i in idx], [self.chosen_ids[i] for i in idx],
                     [self.rejected_ids[i] for i in idx], pick(self.reward_chosen), pick(self.reward_rejected))


@dataclass
class PreferenceConfig:
    loss_type: str = "rpo_sq"        # rpo_sq | rpo_bwd_kl | rpo_fwd_kl | dpo (common.losses)
    beta: float = 0.03               # implicit reward scale (LN-Nano offline RPO 3e-2; LN-Super online 1e-5)
    eta: float = 1.0                 # reward scale: delta_r = eta * (r_chosen - r_rejected) (LN-Super 3)
    micro_batch: int = 4             # pairs per forward/backward (two rows each)
    grad_clip: float = 1.0
    dtype: torch.dtype | None = None


def _completion_logprob_sums(model, prompt_ids, completion_ids, pad_id: int, device, dtype) -> torch.Tensor:
    b = pad_rows(prompt_ids, completion_ids, pad_id)
    return (completion_logprobs(model, b, device, dtype) * b["completion_mask"].to(device)).sum(1)


def train_on_pairs(model, optimizer, pairs: Pairs, cfg: PreferenceConfig, device, pad_id: int, ref_model,
                   check_finite=None) -> dict:
    """One optimizer step of a preference loss over this rank's pairs. Per pair
    delta_pi = sum_t (logpi - logpi_ref)[chosen] - sum_t (logpi - logpi_ref)[rejected] (the frozen reference's
    log-probs without gradient, in the same micro-batch) and delta_r = eta * (r_chosen - r_rejected); the loss is
    the mean of common.losses.preference_loss over every rank's pairs, gradients summed across ranks (as
    train_on_rollout). Returns loss, delta_pi (mean, before the step), pref_accuracy (fraction with delta_pi > 0),
    reward_margin (mean r_chosen - r_rejected), grad_norm, pairs (all ranks)."""
    t0 = time.perf_counter()
    n_global = all_reduce_sum(float(len(pairs)))
    stats = {"loss": 0.0, "delta_pi": 0.0, "pref_accuracy": 0.0, "reward_margin": None, "grad_norm": None,
             "pairs": int(n_global), "optimizer_steps": 0}
    if n_global == 0:
        return stats
    has_r = pairs.reward_chosen is not None
    model.train()
    ref_model.eval()
    loss_sum = dpi_sum = correct = 0.0
    for s in range(0, len(pairs), cfg.micro_batch):
        mb = pairs.select(range(s, min(len(pairs), s + cfg.micro_batch)))
        m = len(mb)
        prompts, comps = mb.prompt_ids * 2, mb.chosen_ids + mb.rejected_ids
        with torch.no_grad():
            ref = _completion_logprob_sums(ref_model, prompts, comps, pad_id, device, cfg.dtype)
        pol = _completion_logprob_sums(model, prompts, comps, pad_id, device, cfg.dtype)
        delta_pi = (pol[:m] - ref[:m]) - (pol[m:] - ref[m:])
        delta_r = cfg.eta * (mb.reward_chosen - mb.reward_rejected).detach().to(device) if has_r else None
        per_pair = preference_loss(delta_pi, delta_r, cfg.loss_type, cfg.beta)
        (per_pair.sum() / n_global).backward()
        loss_sum += float(per_pair.detach().sum())
        dpi_sum += float(delta_pi.detach().sum())
        correct += float((delta_pi.detach() > 0).sum())
    all_reduce_grads(model)
    gnorm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip))
    loss = all_reduce_sum(loss_sum) / n_global
    if check_finite is not None:
        check_finite(loss, gnorm, "a preference step")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    margin = all_reduce_sum(float((pairs.reward_chosen - pairs.reward_rejected).detach().sum())) / n_global if has_r else None
    stats.update(loss=loss, delta_pi=all_reduce_sum(dpi_sum) / n_global, pref_accuracy=all_reduce_sum(correct) / n_global,
                 reward_margin=margin, grad_norm=gnorm, optimizer_steps=1, train_seconds=time.perf_counter() - t0)
    return stats
