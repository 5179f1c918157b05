"""Puzzle's block library, shared by 01_bld.py (builds and scores it) and 02_mip_select.py (searches it).

A variant is one way to fill one subblock of one layer (Puzzle §3): attention {parent GQA, fewer KV heads, windows of
the parent attention, linear, no_op} and FFN {parent width, narrower widths (multiples of 256), linear, no_op}; each
kind is one entry of common/variants.py (its module, init, parameters, KV bytes, vLLM support). On disk:

    library/library.json                          parent, variants (config, params, BLD loss curve), BLD stats
    library/variants/L003-ffn-w1024.safetensors   the trained subblock (its norm + module, DecoderLayer key names)
    library/variants/init/L003-ffn-w1024...       the same variant as initialized from the parent (no BLD)
    library/scores.json                           replace-one-block KL / LM loss / top-1 agreement per block: every
                                                  (attention, FFN) pair of every layer ("pairs"), each replacing
                                                  its whole layer of the parent, as Puzzle scores and picks blocks

replace_one_block_scores() computes them (01), and, with another model as the base, the same scores in the context of
a child (02's --rescore-rounds).

load_library() reads it back and checks every file first, so a damaged library stops with one line naming the file.

Parent variants are not stored: they are the parent checkpoint's own weights.
"""

import copy
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file

from common.dist import progress
from common.model import DeciRMSNorm
from common.variants import (SUBBLOCKS, build_subblock, config_from_dict, search_space,  # noqa: F401  (re-exported)
                             stock_vllm_serves, subblock_params)

# DecoderLayer attribute names (NVIDIA's weight names) per subblock: (module, its norm)
MODULE_NAMES = {"attention": ("self_attn", "input_layernorm"), "ffn": ("mlp", "post_attention_layernorm")}

# ----------------------------------------------------------------------------
# Variant specs: the kinds live in common/variants.py (one entry each); these are 01's search-space helpers


def attention_variants(config, kv_heads, linear=True, no_op=True, window_sizes=(), window_sinks=0) -> list:
    """[{name, config, parent}] for the attention subblock: parent GQA, each fewer-KV-head count, each window of the
    parent attention (window_sizes W, window_sinks S), linear, no_op."""
    return search_space(config, "attention", kv_heads=kv_heads, window_sizes=window_sizes, window_sinks=window_sinks,
                        linear=linear, no_op=no_op)


def ffn_variants(config, widths, linear=True, no_op=True) -> list:
    """[{name, config, parent}] for the FFN subblock: parent width, narrower widths (ffn_mult-expressible), linear, no_op."""
    return search_space(config, "ffn", ffn_widths=widths, linear=linear, no_op=no_op)


def variant_key(layer: int, subblock: str, name: str) -> str:
    return f"L{layer:03d}-{subblock}-{name}"


def pair_key(layer: int, attention: str, ffn: str) -> str:
    """A block: one attention and one FFN variant in one layer (what the search picks per layer)."""
    return f"L{layer:03d}-attention-{attention}+ffn-{ffn}"


# ----------------------------------------------------------------------------
# A subblock as a standalone module (what BLD trains) and swapping it into a model


class Subblock(nn.Module):
    """One subblock variant with its norm, under DecoderLayer's attribute names so state dicts are interchangeable.

    forward(x, rope) is the residual contribution: attn(norm(x)) or ffn(norm(x)); a no_op contributes zero.
    """

    def __init__(self, config, layer_idx: int, subblock: str, cfg):
        super().__init__()
        self.subblock, self.cfg = subblock, cfg
        mod_name, norm_name = MODULE_NAMES[subblock]
        module = build_subblock(config, layer_idx, subblock, cfg)
        if module is not None:
            setattr(self, norm_name, DeciRMSNorm(config.hidden_size, config.rms_norm_eps))
            setattr(self, mod_name, module)

    def forward(self, x, rope=None):
        mod_name, norm_name = MODULE_NAMES[self.subblock]
        if not hasattr(self, mod_name):
            return torch.zeros_like(x)
        y = getattr(self, norm_name)(x)
        return getattr(self, mod_name)(y, rope) if self.subblock == "attention" else getattr(self, mod_name)(y)


def parent_subblock_state(layer_module, subblock: str) -> dict:
    """The parent layer's state dict restricted to one subblock (module + norm), DecoderLayer key names."""
    names = MODULE_NAMES[subblock]
    return {k: v for k, v in layer_module.state_dict().items() if k.split(".")[0] in names}


def set_subblock(model, layer_idx: int, subblock: str, cfg, state: dict | None):
    """Put variant `cfg` (weights `state`) into layer `layer_idx` of `model` in place; returns an undo function.

    Updates model.config.block_configs too, so save_pretrained writes the child's config.
    """
    layer = model.model.layers[layer_idx]
    mod_name, norm_name = MODULE_NAMES[subblock]
    block = model.config.block_configs[layer_idx]
    old = (getattr(layer, mod_name), layer._modules.get(norm_name), copy.deepcopy(getattr(block, subblock)))

    def put(module, norm, c):
        setattr(layer, mod_name, module)  # None for a no_op: DecoderLayer skips it
        if norm is None:
            layer._modules.pop(norm_name, None)
        else:
            setattr(layer, norm_name, norm)
        setattr(block, subblock, c)

    if cfg.no_op:
        put(None, None, cfg)
    else:
        sb = Subblock(model.config, layer_idx, subblock, cfg)
        ref = next(model.parameters())
        sb = sb.to(dtype=ref.dtype, device=ref.device)
        if state is not None:
            sb.load_state_dict(state)
        put(getattr(sb, mod_name), getattr(sb, norm_name), cfg)
    return lambda: put(*old)


# ----------------------------------------------------------------------------
# Replace-one-block scoring (Puzzle §scoring): each block (attention, FFN pair) alone in a base model


def embed(model, ids):
    x = model.model.embed_tokens(ids)
    pos = torch.arange(ids.shape[1], device=ids.device)[None].expand(ids.shape[0], -1)
    return x, model.model.rotary_emb(x, pos)


@torch.no_grad()
def replace_one_block_scores(model, held, pairs, states, batch_size, autocast, reference=None, base=None,
                             chunk_rows=32):
    """{pair_key: {kl, lm_loss, next_token_acc, top1_agreement}} for every block in `pairs` [(layer, attention
    entry, FFN entry)]: the pair replaces its whole layer of `model`, alone; "__base__": `model` itself.
    KL is to `reference`'s next-token distribution (default: `model`'s own, i.e. the parent scoring itself).
    `base` {(layer, subblock): variant name} says what `model` holds where it is not the parent (01: nothing; 02's
    rescoring: a child), so a pair's entry is swapped in only where it differs; `states` {entry key: weights}.
    Subblock scores do not add up (on SmolLM2, layer 2's attention-removal KL + FFN-removal KL is 1.50, removing the
    layer costs 1.06), so Puzzle scores the block. The model's activations up to each layer are computed once: a
    block at layer l runs layers l..L-1 only (on average half a forward). `chunk_rows`: tokens per vocabulary pass."""
    L, base = model.config.num_hidden_layers, base or {}
    cache = []  # per batch: ids, layer inputs [L+1], rope, the reference's probabilities, sum p log p, its top-1
    with autocast():
        for i in range(0, len(held), batch_size):
            ids = held[i:i + batch_size]
            x, rope = embed(model, ids)
            hs = [x]
            for layer in model.model.layers:
                hs.append(layer(hs[-1], rope))
            if reference is None:
                z = model.lm_head(model.model.norm(hs[-1]))
            else:
                z = reference(input_ids=ids).logits
            plogp = F.log_softmax(z.float(), -1)
            p = plogp.exp()
            cache.append((ids, hs, rope, p, (p * plogp).sum(-1), plogp.argmax(-1)))

    def metrics_from(l):
        """KL(p||q) = sum p log p - (sum p z - logsumexp z) for the child's logits z. The vocabulary-wide passes
        run over `chunk_rows` tokens at a time, in float32 from the bf16/f32 logits, so a chunk stays in cache
        (135M parent, 8 x 128 tokens: ~0.05 s per block, against 0.15-0.5 s over the whole batch's logits)."""
        tot = {"kl": 0.0, "lm_loss": 0.0, "next_token_acc": 0.0, "top1_agreement": 0.0}
        n = 0
        for ids, hs, rope, p, neg_ent, ptop in cache:
            with autocast():
                x = hs[l]
                for layer in model.model.layers[l:]:
                    x = layer(x, rope)
                logits = model.lm_head(model.model.norm(x))
            B, T, V = logits.shape
            nxt = torch.cat([ids[:, 1:], ids.new_full((B, 1), -1)], 1).reshape(-1)  # -1: the last position has none
            zs, ps, ents, ptops = logits.reshape(-1, V), p.reshape(-1, V), neg_ent.reshape(-1), ptop.reshape(-1)
            for c in range(0, B * T, chunk_rows):
                rows = slice(c, c + chunk_rows)
                z = zs[rows].float()
                lse, top = torch.logsumexp(z, -1), z.argmax(-1)
                tot["kl"] += (ents[rows] - torch.linalg.vecdot(ps[rows], z) + lse).sum().item()
                tot["top1_agreement"] += (top == ptops[rows]).sum().item()
                t, has = nxt[rows], nxt[rows] >= 0
                nll = lse[has] - z[has].gather(-1, t[has][:, None])[:, 0]
                tot["lm_loss"] += nll.sum().item() * T / (T - 1)
                tot["next_token_acc"] += (top[has] == t[has]).sum().item() * T / (T - 1)
            n += B * T
        return {k: v / n for k, v in tot.items()}

    def holds(l, e):  # does the model already have this entry at its layer?
        current = base.get((l, e["subblock"]))
        return e["parent"] if current is None else e["name"] == current

    out = {"__base__": metrics_from(L)}
    for l, a, f in progress(pairs, desc="replace-one-block scores", unit="block"):
        undo = [set_subblock(model, l, e["subblock"], config_from_dict(e["subblock"], e["config"]),
                             states[e["key"]]) for e in (a, f) if not holds(l, e)]
        out[pair_key(l, a["name"], f["name"])] = metrics_from(l)
        for u in reversed(undo):
            u()
    return out


# ----------------------------------------------------------------------------
# Library on disk


def variant_path(library_dir: str, key: str, init: bool = False) -> str:
    return os.path.join(library_dir, "variants", "init" if init else "", f"{key}.safetensors")


def load_variant_state(library_dir: str, entry: dict, parent_model=None, init: bool = False) -> dict | None:
    """Weights of one library entry; parent variants come from the parent model itself, no_op has none."""
    if entry["config"].get("no_op"):
        return None
    if entry["parent"]:
        return parent_subblock_state(parent_model.model.layers[entry["layer"]], entry["subblock"])
    path = variant_path(library_dir, entry["key"], init)
    if not os.path.exists(path):
        raise FileNotFoundError(f"library variant {path} is missing; rerun 01_bld.py into a fresh --out")
    return load_file(path)


def assemble_child(parent, library_dir: str, entries: dict, choice: dict, init: bool = False):
    """A copy of the parent with choice {(layer, subblock): variant name} set from the library (entries:
    {(layer, subblock, name): library.json entry}); init=True takes the variants' weights before BLD."""
    child = copy.deepcopy(parent)
    for (l, sub), name in sorted(choice.items()):
        e = entries[(l, sub, name)]
        state = load_variant_state(library_dir, e, parent, init=init and not e["parent"])
        set_subblock(child, l, sub, config_from_dict(sub, e["config"]), state)
    return child.eval()


def load_library(library_dir: str) -> tuple[dict, dict]:
    """(library.json, scores.json's per-block scores {pair_key: scores}) of a finished block library. Raises
    CheckpointError (one line, naming the file) if the library is missing or unfinished, or any of its files is
    damaged, or it holds no pair scores (a library of an older 01 that scored subblocks alone)."""
    from common.checkpoint import CheckpointError, check_safetensors, read_json

    lib_json, scores_json = (os.path.join(library_dir, f) for f in ("library.json", "scores.json"))
    if not os.path.isdir(library_dir):
        raise CheckpointError(f"block library {library_dir} does not exist; build it with 01_bld.py --out {library_dir}")
    if not (os.path.isfile(lib_json) and os.path.isfile(scores_json)):
        raise CheckpointError(f"{library_dir} is not a finished block library (no library.json/scores.json); run "
                              f"01_bld.py --out {library_dir} (with --resume if it was cut off)")
    library, scores = read_json(lib_json), read_json(scores_json)
    need = ("parent", "num_layers", "space", "variants")
    missing = [k for k in need if k not in library] if isinstance(library, dict) else list(need)
    if missing or not isinstance(scores, dict) or not isinstance(scores.get("pairs"), dict):
        where = f"{lib_json} has no {missing}" if missing else f"{scores_json} has no block ('pairs') scores"
        raise CheckpointError(f"{where}; rebuild the library with 01_bld.py")
    for e in library["variants"]:
        if e.get("parent") or e.get("config", {}).get("no_op"):
            continue
        for init in (False, True):
            path = variant_path(library_dir, e["key"], init)
            if not os.path.isfile(path):
                raise CheckpointError(f"library variant {path} is missing; restore it or rebuild the library")
            check_safetensors(path)
    names = {sub: [v["name"] for v in library["space"][sub]] for sub in SUBBLOCKS}
    for l in range(library["num_layers"]):
        for a in names["attention"]:
            for f in names["ffn"]:
                if pair_key(l, a, f) not in scores["pairs"]:
                    raise CheckpointError(f"{scores_json} has no score for block {pair_key(l, a, f)}; rebuild the "
                                          f"library with 01_bld.py")
    return library, scores["pairs"]
