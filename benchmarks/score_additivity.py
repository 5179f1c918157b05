"""How additive are Puzzle's replace-one-block scores? For each child 02 chose: the MIP's model of its quality (the
sum of its blocks' replace-one-block KLs) next to the KL the child really has, for the whole child and for its
attention changes alone and its FFN changes alone (the other subblock of every layer kept the parent's).

    python benchmarks/score_additivity.py --library runs/e2e/library --child runs/e2e/child --child runs/e2e/child_lm

Quality is measured like 02 measures it (held-out text, 32 chunks of 128 tokens by default; ± the SE over chunks).
A ratio real/sum near 1 means the blocks' damage adds up; above 1, the changes compound (the MIP then underrates
children with many such changes). Prints a markdown table; --json writes the rows.
"""

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common.checkpoint import load_checkpoint, read_json  # noqa: E402
from common.evaluate import TextEval  # noqa: E402
from common.puzzle import SUBBLOCKS, assemble_child, load_library, pair_key  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--library", required=True, help="the block library the children were chosen from")
    p.add_argument("--child", action="append", required=True, help="a child of 02 (its search.json); repeatable")
    p.add_argument("--eval-seqs", type=int, default=32)
    p.add_argument("--eval-seq-len", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None, help="write the rows here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    library, scores = load_library(args.library)
    parent, tokenizer = load_checkpoint(library["parent"])
    entries = {(e["layer"], e["subblock"], e["name"]): e for e in library["variants"]}
    own = {s: next(v["name"] for v in library["space"][s] if v["parent"]) for s in SUBBLOCKS}
    tev = TextEval(parent, tokenizer, seq_len=args.eval_seq_len, num_seqs=args.eval_seqs, batch_size=4)

    rows = []
    for child_dir in args.child:
        search = read_json(os.path.join(child_dir, "search.json"))
        solution = {(b["layer"], s): b[s] for b in search["solution"] for s in SUBBLOCKS}
        for part, changed in (("whole child", SUBBLOCKS), ("attention changes only", ("attention",)),
                              ("FFN changes only", ("ffn",))):
            choice = {(l, s): (n if s in changed else own[s]) for (l, s), n in solution.items()}
            layers = sorted({l for (l, s), n in choice.items() if n != own[s]})
            kl_sum = sum(scores[pair_key(l, choice[(l, "attention")], choice[(l, "ffn")])]["kl"] for l in layers)
            with torch.no_grad():
                q = tev(assemble_child(parent, args.library, entries, choice))
            rows.append({"child": child_dir, "score": search["score"], "part": part, "layers_changed": len(layers),
                         "kl_sum": kl_sum, "kl": q["kl_parent"], "kl_se": q["kl_parent_se"],
                         "ratio": q["kl_parent"] / kl_sum if kl_sum > 0 else float("nan")})
            r = rows[-1]
            print(f"{child_dir} ({r['score']}): {part}: {r['layers_changed']} layers, sum {kl_sum:.3f}, "
                  f"real {r['kl']:.3f} ± {r['kl_se']:.3f}", flush=True)

    print(f"\n| child (score) | changes | layers changed | sum of block KLs | real KL (n = {len(tev.ids)} chunks) "
          f"| real / sum |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['child']} ({r['score']}) | {r['part']} | {r['layers_changed']} | {r['kl_sum']:.3f} | "
              f"{r['kl']:.3f} ± {r['kl_se']:.3f} | {r['ratio']:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"library": args.library, "eval_chunks": len(tev.ids), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
