"""Is every checkpoint of a run a vLLM model? vLLM's greedy tokens against ours, float32, per checkpoint of a run
directory (run in .venv-vllm: bash install_vllm.sh).

    .venv-vllm/bin/python benchmarks/vllm_equality.py --run-dir runs/smol
    .venv-vllm/bin/python benchmarks/vllm_equality.py --run-dir runs/smol --models parent,child --prompts 32

vLLM runs in a fresh `python -I tests/_vllm_generate.py` (it cannot import this repo: the checkpoint's own model code,
config.json's auto_map, is what loads), once with stock vLLM (VLLM_PLUGINS=none) and once with the repo's plugin;
a checkpoint stock vLLM refuses is reported so. Prompts: held-out math problems (06's evaluation set), "detailed
thinking on" for half, "off" for the other half, `--new-tokens` greedy tokens each. Where a sequence differs, the
table gives the first differing position and our top-1 / top-2 logit gap there: a gap within float32's error across
two implementations is a tie either side may break (tests/test_vllm.py states that bound).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from common.checkpoint import load_checkpoint  # noqa: E402
from common.data import build_messages, render_prompt  # noqa: E402
from common.evaluate import problem_text  # noqa: E402
from common.generate import generate  # noqa: E402
from data_gen.math_problems import eval_problems  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN_SH_MODELS = "parent,child,fused,distilled,distilled_unfused,sft,sft_parent,grpo,rloo,rpo"


def vllm_tokens(paths: dict, prompts: list[str], new_tokens: int, plugins: str | None, tmp: str) -> dict:
    spec = {"models": [{"name": n, "path": os.path.abspath(p)} for n, p in paths.items()], "prompts": prompts,
            "max_tokens": new_tokens, "logprobs": 0}
    spec_path, out_path = os.path.join(tmp, "spec.json"), os.path.join(tmp, "out.json")
    with open(spec_path, "w") as f:
        json.dump(spec, f)
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    env.pop("PYTHONPATH", None)
    if plugins is not None:
        env["VLLM_PLUGINS"] = plugins
    r = subprocess.run([sys.executable, "-I", os.path.join(ROOT, "tests", "_vllm_generate.py"), spec_path, out_path],
                       cwd=tmp, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        return {"error": (r.stderr or r.stdout).strip().splitlines()[-1]}
    with open(out_path) as f:
        return json.load(f)["models"]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", default="runs/smol")
    p.add_argument("--models", default=RUN_SH_MODELS, help="checkpoint directories in --run-dir (missing ones skipped)")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--out", default=None, help="JSON (default: <run-dir>/metrics/vllm_equality.json)")
    args = p.parse_args()
    paths = {n: os.path.join(args.run_dir, n) for n in args.models.split(",")
             if os.path.exists(os.path.join(args.run_dir, n, "COMPLETED"))}
    if not paths:
        sys.exit(f"error: no finished checkpoint of {args.models} in {args.run_dir}; run run.sh's stages first")
    problems = eval_problems(args.prompts, seed=0)
    tok = load_checkpoint(next(iter(paths.values())), with_tokenizer=True)[1]
    prompts = [render_prompt(tok, build_messages(problem_text(q), i % 2 == 0)) for i, q in enumerate(problems)]
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n, path in paths.items():
            model, tok = load_checkpoint(path)  # float32
            ours = [o[0][1] for o in generate(model.eval(), tok, prompts, max_new_tokens=args.new_tokens,
                                              batch_size=len(prompts), return_ids=True)]
            row = {}
            for serving, plugins in (("stock", "none"), ("plugin", None)):
                got = vllm_tokens({n: path}, prompts, args.new_tokens, plugins, tmp)
                if "error" in got:
                    row[serving] = {"error": got["error"]}
                    continue
                theirs, first = got[n]["ids"], []
                for k, (a, b) in enumerate(zip(ours, theirs)):
                    if a != b:
                        t = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
                        pid = tok(prompts[k], add_special_tokens=False)["input_ids"]
                        with torch.no_grad():
                            z = model(torch.tensor([pid + a[:t]])).logits[0, -1].float()
                        top = z.topk(2).values
                        first.append({"prompt": k, "position": t, "our_top2_gap": float(top[0] - top[1])})
                row[serving] = {"equal": len(ours) - len(first), "of": len(ours), "diverged": first,
                                "engine_start_s": got[n]["engine_start_s"]}
            rows[n] = row
            print(n, json.dumps(row), flush=True)
    print(f"\n{args.run_dir}: vLLM's greedy tokens vs ours, float32, {len(prompts)} prompts x {args.new_tokens} tokens")
    print("| checkpoint | stock vLLM | with the plugin | where a sequence differs (position, our top-2 gap) |")
    print("|---|---|---|---|")
    for n, row in rows.items():
        cells = [f"{r['equal']}/{r['of']}" if "equal" in r else "refused" for r in (row["stock"], row["plugin"])]
        div = row["plugin"].get("diverged") or row["stock"].get("diverged") or []
        where = ", ".join(f"{d['position']} ({d['our_top2_gap']:.2g})" for d in div) or "-"
        print(f"| {n} | {cells[0]} | {cells[1]} | {where} |")
    out = args.out or os.path.join(args.run_dir, "metrics", "vllm_equality.json")
    with open(out, "w") as f:
        json.dump({"prompts": len(prompts), "new_tokens": args.new_tokens, "rows": rows}, f, indent=1)
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
