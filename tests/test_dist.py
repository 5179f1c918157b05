"""torchrun plumbing: a two-process gloo DDP step averages gradients exactly like one process on all the data."""

import json
import os
import subprocess
import sys

from conftest import ROOT

from common.dist import shard_list

SCRIPT = os.path.join(ROOT, "tests", "_ddp_step.py")


def run(cmd, out):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    subprocess.run(cmd + [SCRIPT, str(out), os.path.join(ROOT, "tests")], check=True, env=env, timeout=240,
                   capture_output=True)
    return json.load(open(out))


def test_two_process_gloo_ddp_gradients_match_single_process(tmp_path):
    single = run([sys.executable], tmp_path / "one.json")
    double = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"],
                 tmp_path / "two.json")
    assert single.keys() == double.keys()
    # each rank's loss is a mean over its (equal-sized) shard, so the DDP average equals the full-batch mean
    worst = max(abs(a - b) for k in single for a, b in zip(single[k], double[k]))
    assert worst < 1e-6


def test_shard_list_covers_every_item_exactly_once():
    items = list(range(11))
    shards = [shard_list(items, r, 3) for r in range(3)]
    assert sorted(sum(shards, [])) == items and all(shards)
