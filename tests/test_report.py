"""The results tables (common.tables) each stage stores in its metrics file, and the report that joins them in run
order: it knows no stage (a file without tables is listed as metric | value)."""

import json
import os

import pytest

from common import tables
from common.report import main, render


# what each stage renders into its metrics (the stage calls its own; a test names it)
STAGE_TABLES = {"mip": tables.mip_tables, "sft": tables.sft_tables, "kd_ablation": tables.kd_ablation_tables,
                "grpo": tables.grpo_tables, "parent": tables.evaluation_tables, "ffn_fusion": tables.fusion_tables,
                "rlhf_reward_model": tables.reward_model_tables, "distill": tables.distill_tables,
                "distill_unfused": tables.distill_tables}


def _write(run_dir, name, obj):
    """metrics/<name>.json as the stage writes it: with its tables under "report" (rlhf_* through rlhf_tables);
    a name no stage has is written as given. Each file a little later than the last: run order is file time."""
    os.makedirs(os.path.join(run_dir, "metrics"), exist_ok=True)
    render_fn = STAGE_TABLES.get(name) or (tables.rlhf_tables if name.startswith("rlhf_rpo") or name == "rlhf_rloo"
                                           else None)
    if render_fn is not None:
        obj = dict(obj, report=render_fn(obj, name))
    path = os.path.join(run_dir, "metrics", name + ".json")
    with open(path, "w") as f:
        json.dump(obj, f)
    _write.t = getattr(_write, "t", 1_000_000_000) + 10
    os.utime(path, (_write.t, _write.t))


def test_report_tables(tmp_path):
    r = str(tmp_path)
    row = {"method": "MIP (KL score)", "measured_speedup": 1.52, "predicted_speedup": 1.6, "params": 90_000_000,
           "kl": 0.31, "next_token_acc": 0.40, "top1_agreement": 0.7}
    _write(r, "timings", {"bld": 300, "mip_1.5x": 120})
    _write(r, "mip", {"predicted_speedup": 1.6, "measured_speedup": 1.52, "next_token_acc_retention": 0.9,
                      "baselines": [row, dict(row, method="greedy per-layer", kl=0.5)], "sweep": [row]})
    _write(r, "sft", {"init": "c", "train_tokens": 1000, "eval_problems": 32, "parent_on_accuracy": 0.0,
                      "after_on_accuracy": 0.25,
                      "after_on_format_compliance": 1.0, "after_off_accuracy": 0.2})
    _write(r, "kd_ablation", {"student": "c", "tokens_per_trial": 4096, "parent": {"next_token_acc": 0.5},
                              "table": [{"loss": "cosine,fkl", "kl_parent": 0.2, "next_token_acc": 0.45,
                                         "top1_agreement": 0.8, "lm_loss": 3.1}]})
    _write(r, "grpo", {"policy": "p", "rollout_steps": 12, "filter": True, "curriculum": True, "candidates": 64,
                       "dropped_by_filter": 10, "pass_rate_zero": 20, "kept_prompts": 54, "eval_problems": 100,
                       "before_on_accuracy": 0.3, "before_on_accuracy_se": 0.0458, "after_on_accuracy": 0.4,
                       "after_on_accuracy_se": 0.049, "gain_on": 0.1, "gain_on_se": 0.03,
                       "before_on_format_compliance": 1.0, "after_on_format_compliance": 0.98,
                       "after_on_mean_response_tokens": 120.5})
    _write(r, "zzz_custom", {"a": {"b": 1.5}})
    _write(r, "zzz_list", [{"a": 1}])  # a JSON file that is no stage's metrics: named, not a crash
    text = render(r)
    assert "| total | 420 | 7 |" in text
    assert "| greedy per-layer | 1.52 | 1.6 | - | - | 90,000,000 | 0.5 | 0.4 | 0.7 |" in text
    assert "| thinking on | SFT | 0.25 (n=32) | - | 1 | - |" in text
    assert "| cosine,fkl | 0.2 | 0.45 | 0.9 | 0.8 | 3.1 |" in text
    assert "| a.b | 1.5 |" in text
    assert "## zzz_list\n\n(not a stage's metrics file: a JSON list; skipped)" in text
    assert "10 dropped by the filter, 20 with pass rate 0, 54 kept" in text
    assert "| thinking on | 0.30 ± 0.05 (n=100) | 0.40 ± 0.05 (n=100) | +0.10 ± 0.03 | 1 | 0.98 | 120 |" in text
    main(["--run-dir", r])
    assert open(os.path.join(r, "REPORT.md")).read().startswith("# Results:")


def test_report_rounds_long_floats_to_what_a_reader_can_use(tmp_path):
    r = str(tmp_path)
    _write(r, "timings", {"bld": 298})
    _write(r, "parent", {"model": "p", "dtype": "float32", "speed": {},
                         "text": {"lm_loss": 3.14159265, "next_token_acc": 0.41234567, "kl_parent": 0.0123456,
                                  "top1_agreement": 1.0, "tokens": 8192},
                         "gen_on": {"n": 30, "accuracy": 0.3333333333, "mean_response_tokens": 187.345}})
    _write(r, "zzz_custom", {"wall_s": 212.63, "speedup": 1.98765, "big": 12345.678})
    text = render(r)
    assert "| bld | 298 | 4.97 |" in text  # minutes, not 4.967
    assert "| 3.14 | 0.412 | 0.0123 | 1 | 8,192 |" in text
    assert "| thinking on | 0.33 (n=30) | - | - | 187 | - |" in text
    assert "| wall_s | 213 |" in text and "| speedup | 1.99 |" in text and "| big | 12,346 |" in text


def test_report_shows_se_and_marks_gaps_beyond_2_paired_se(tmp_path):
    r = str(tmp_path)
    row = {"method": "MIP (KL score)", "measured_speedup": 1.52, "predicted_speedup": 1.6, "params": 90_000_000,
           "kl": 0.31, "kl_se": 0.0123, "next_token_acc": 0.40, "next_token_acc_se": 0.011, "top1_agreement": 0.7}
    _write(r, "mip", {"predicted_speedup": 1.6, "measured_speedup": 1.52, "next_token_acc_retention": 0.9,
                      "baselines": [row, dict(row, method="greedy per-layer", kl=0.5)], "sweep": [row]})
    def gaps(dk, sk, da, sa):  # common.stats.paired_gaps' fields
        return {"kl_parent": dk, "kl_parent_se": sk, "kl_parent_beyond_2se": abs(dk) > 2 * sk,
                "next_token_acc": da, "next_token_acc_se": sa, "next_token_acc_beyond_2se": abs(da) > 2 * sa}
    ev = lambda kl, acc: {"kl_parent": kl, "kl_parent_se": 0.051, "next_token_acc": acc,  # noqa: E731
                          "next_token_acc_se": 0.0123, "top1_agreement": 0.8, "lm_loss": 3.1}
    _write(r, "kd_ablation", {"student": "c", "tokens_per_trial": 8192, "parent": {"next_token_acc": 0.5},
                              "best": "fkl",
                              "table": [dict(ev(2.367, 0.45), loss="lm", vs_best=gaps(0.048, 0.03, -0.01, 0.004)),
                                        dict(ev(2.319, 0.46), loss="fkl", vs_best=gaps(0.0, 0.0, 0.0, 0.0)),
                                        dict(ev(2.331, 0.455), loss="cosine,fkl",
                                             vs_best=gaps(0.012, 0.01, -0.005, 0.004))]})
    _write(r, "ffn_fusion", {"child": "c", "depth_before": 8, "depth_after": 6, "levels": [
        dict(ev(0.2, 0.45), merges=0, fused_blocks=0, num_layers=6, depth=8, max_dependency=0.0,
             vs_unfused=gaps(0.0, 0.0, 0.0, 0.0)),
        dict(ev(0.3, 0.43), merges=2, fused_blocks=3, num_layers=4, depth=6, max_dependency=0.2,
             vs_unfused=gaps(0.1, 0.01, -0.02, 0.015))]})
    text = render(r)
    assert "| greedy per-layer | 1.52 | 1.6 | - | - | 90,000,000 | 0.5 ± 0.012 | 0.4 ± 0.011 | 0.7 |" in text
    assert "| lm | 2.37 ± 0.051 | 0.45 ± 0.012 | 0.9 | 0.8 | 3.1 | +0.048 ± 0.03 | -0.01 ± 0.004 | acc |" in text
    assert "| fkl | 2.32 ± 0.051 | 0.46 ± 0.012 | 0.92 | 0.8 | 3.1 | - | - | best |" in text
    assert ("| cosine,fkl | 2.33 ± 0.051 | 0.455 ± 0.012 | 0.91 | 0.8 | 3.1 | +0.012 ± 0.01 | -0.005 ± 0.004 | no |"
            in text)  # inside the noise: no finding
    assert "| 0 | 0 | 6 | 8 | 0 | 0.2 ± 0.051 | 0.45 ± 0.012 | - | - | unfused |" in text
    assert "| 2 | 3 | 4 | 6 | 0.2 | 0.3 ± 0.051 | 0.43 ± 0.012 | +0.1 ± 0.01 | -0.02 ± 0.015 | KL |" in text


def test_report_rlhf_tables(tmp_path):
    r = str(tmp_path)
    base = {"policy": "g", "steps": 16, "eval_if_prompts": 100, "eval_math_problems": 100, "online_iterations": 0,
            "before_if_off_all_met": 0.2, "after_if_off_all_met": 0.3, "after_if_off_all_met_se": 0.0458,
            "gain_if_off_all_met": 0.1, "gain_if_off_all_met_se": 0.03, "before_if_off_rm_score": -1.23456,
            "after_if_off_rm_score": 0.5, "gain_if_off_rm_score": 1.73456, "gain_if_off_rm_score_se": 0.2,
            "before_math_on_accuracy": 0.3, "after_math_on_accuracy": 0.31, "gain_math_on_accuracy": 0.01,
            "after_math_on_format_compliance": 1.0}
    _write(r, "rlhf_rloo", dict(base, algo="rloo"))
    _write(r, "rlhf_rpo_rpo_sq", dict(base, algo="rpo", rpo_loss="rpo_sq"))
    _write(r, "rlhf_rpo_dpo", dict(base, algo="rpo", rpo_loss="dpo", gain_if_off_rm_score=0.5))
    _write(r, "rlhf_rpo_rpo_bwd_kl_online", dict(base, algo="rpo", rpo_loss="rpo_bwd_kl", online_iterations=2,
                                                 sampled_reward_per_iteration=[0.1234, 0.2]))
    _write(r, "rlhf_reward_model", {"algo": "reward_model", "steps": 48, "eval_pairs": 200, "unseen_kind": "truncated",
                                    "before_heldout_accuracy": 0.5, "after_heldout_accuracy": 0.9,
                                    "after_heldout_accuracy_se": 0.02, "after_accuracy_truncated": 0.4,
                                    "after_accuracy_wrong_answer": 0.95})
    text = render(r)
    runs = [json.load(open(os.path.join(r, "metrics", f))) for f in sorted(os.listdir(os.path.join(r, "metrics")))]
    text += "\n".join(tables.rpo_loss_table(runs, "g", 16))  # 07 writes it for an offline RPO run's policy, steps
    assert tables.rpo_loss_table(runs, "g", 8) == [] and tables.rpo_loss_table(runs, "other", 16) == []
    assert "| IF all constraints met (off) | 100 | 0.20 | 0.30 ± 0.05 | +0.10 ± 0.03 |" in text
    assert "| reward-model score (IF, off) | 100 | -1.23 | 0.5 | +1.73 ± 0.2 |" in text
    assert "| toggle format, on | 100 | - | 1.00 | - |" in text
    assert "mean reward of the sampled answers per iteration: 0.123 → 0.2" in text
    assert "| truncated (never trained on) | - | 0.40 |" in text and "| wrong_answer | - | 0.95 |" in text
    loss_table = text[text.index("## 07 RPO: the loss at the same budget"):]
    assert "| rpo_sq | 16 |" in loss_table and "| dpo | 16 | -1.23 | 0.5 | +0.5 ± 0.2 |" in loss_table
    assert "rpo_bwd_kl" not in loss_table  # the online run is not at the same budget


def test_report_missing_run_dir(tmp_path):
    with pytest.raises(SystemExit, match="run the stages first"):
        main(["--run-dir", str(tmp_path / "nope")])


def test_report_mip_cost_model_gaps_to_mip_and_fusion_after_kd(tmp_path):
    r = str(tmp_path)
    row = {"method": "MIP (KL score)", "measured_speedup": 1.52, "measured_speedup_min": 1.49,
           "measured_speedup_max": 1.55, "predicted_speedup": 1.5, "prediction_error": 0.0133,
           "fraction_of_ceiling": 0.3, "params": 90_000_000, "kl": 0.31, "next_token_acc": 0.40, "top1_agreement": 0.7}
    greedy = dict(row, method="greedy per-layer", kl=0.5, vs_mip={"kl_parent": 0.19, "kl_parent_se": 0.02,
                  "kl_parent_beyond_2se": True, "next_token_acc": -0.01, "next_token_acc_se": 0.01,
                  "next_token_acc_beyond_2se": False})
    check = [dict(row, method="parent", measured_speedup=1.0, predicted_speedup=1.0, prediction_error=0.0),
             dict(row, method="random child 1", prediction_error=-0.05)]
    _write(r, "mip", {"predicted_speedup": 1.5, "measured_speedup": 1.52, "next_token_acc_retention": 0.9,
                      "ceiling_speedup": 5.1, "cost_check_max_abs_error": 0.05, "repeat_agreement": 0.012,
                      "cost_check": check, "baselines": [dict(row, kl_sum_predicted=0.2, attention_replaced=12),
                                                         dict(greedy, kl_sum_predicted=0.25, attention_replaced=9)],
                      "sweep": [row]})
    after = lambda kl, acc, d: {"kl_parent": kl, "kl_parent_se": 0.01, "next_token_acc": acc,  # noqa: E731
                                "next_token_acc_se": 0.01, "per_seq": {"kl_parent": [kl + d, kl - d, kl],
                                                                       "next_token_acc": [acc, acc + d, acc - d]}}
    for name, student, kl, acc, sp in (("distill", "fused", 0.3, 0.37, 1.7), ("distill_unfused", "child", 0.28,
                                                                                0.38, 1.5)):
        _write(r, name, {"student": student, "loss": "cosine,fkl", "tokens": 24576, "before": after(0.9, 0.3, 0.0),
                         "after": after(kl, acc, 0.01), "retention": {"after": acc / 0.4},
                         "speed": {"ratio": {"decode_tok_s_bs1": sp}},
                         **({"parent": {"per_seq": {"next_token_acc": [0.4] * 3}}} if name == "distill" else {})})
    text = render(r)
    m = {n: json.load(open(os.path.join(r, "metrics", n + ".json"))) for n in ("distill", "distill_unfused")}
    text += "\n".join(tables.fusion_after_kd(m["distill"], m["distill_unfused"]))  # 04 appends it to the second KD's
    assert "predicted within 5.0% of their measured speed" in text and "agrees within 1.2%" in text
    assert "| MIP (KL score) | 1.52 (1.49-1.55) | 1.5 | +1.3% | 0.3 |" in text
    assert "| +0.19 ± 0.02 | -0.01 ± 0.01 | KL | 0.25 | 9 |" in text  # greedy's paired gap, its KL sum, attention
    assert "| random child 1 | 1.52 (1.49-1.55) | 1.5 | -5.0% |" in text
    assert "## 03 + 04 FFN Fusion after the same KD budget" in text
    # retention with its paired SE where the parent's per-chunk accuracy is there (std(0, .01, -.01)/√3/0.4)
    assert "| fused child | fused | 24,576 | 0.3 ± 0.01 | 0.37 ± 0.01 | 0.925 ± 0.014 | 1.7 |" in text
    assert "| unfused child | child | 24,576 | 0.28 ± 0.01 | 0.38 ± 0.01 | 0.95 | 1.5 |" in text
    assert "fused − unfused KL: +0.02 ± 0 (paired over 3 chunks; beyond 2 SE)" in text


def test_report_joins_the_stored_tables_in_run_order_and_knows_no_stage(tmp_path):
    r = str(tmp_path)
    _write(r, "b_stage", {"report": ["## B's own table", "", "| x |", "|---|", "| 1 |"]})
    _write(r, "a_stage", {"report": ["## A's own table"]})
    _write(r, "timings", {"b": 60.0, "a": 30.0})  # rewritten after every stage: still first
    text = render(r)
    assert text.index("## Wall time per stage") < text.index("## B's own table") < text.index("## A's own table")
    assert "| x |\n|---|\n| 1 |" in text


def test_a_table_that_cannot_render_and_a_broken_file_never_lose_the_rest(tmp_path):
    r = str(tmp_path)
    lines = tables.sft_tables({"train_tokens": 5}, "sft")  # no "init": the listing instead of a crash
    assert lines[:2] == ["## sft", ""] and "| train_tokens | 5 |" in lines and "could not render" in lines[-2]
    _write(r, "a_stage", {"report": ["## A's own table"]})
    with open(os.path.join(r, "metrics", "half.json"), "w") as f:
        f.write('{"kl": 0.')  # cut off mid-write
    text = render(r)
    assert "## A's own table" in text and "## half\n\n(skipped: " in text and "is not valid JSON" in text
