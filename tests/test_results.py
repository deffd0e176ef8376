"""The results pipeline: experiment definitions, statistics, the report, the LiC metrics."""

import importlib
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from experiments import evaluate
from experiments import report
from experiments import results as R
from mtrl_jax import metrics as metrics_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_mean_ci_is_the_student_t_interval():
  m, h = report.mean_ci([1.0, 2.0, 3.0])
  assert m == 2.0
  np.testing.assert_allclose(h, 4.303 * 1.0 / math.sqrt(3), rtol=1e-6)
  assert report.mean_ci([0.5]) == (0.5, 0.0)
  assert all(math.isnan(x) for x in report.mean_ci([]))
  assert report.mean_ci([1.0, None, 3.0])[0] == 2.0


def test_reliability_metrics_by_hand():
  # Instance 0: all 10 samples succeed; instance 1: 3 of 10.
  scores = np.array([[100.0] * 10, [100.0] * 3 + [0.0] * 7])
  out = evaluate.reliability(scores)
  assert out["P"] == pytest.approx(65.0)
  # numpy's linear percentile over 10 sorted samples: p90 of instance 1 sits at index 8.1
  # (both neighbours are 100), p10 at index 0.9 (both 0).
  assert out["A90"] == pytest.approx((100.0 + 100.0) / 2)
  assert out["U90_10"] == pytest.approx((0.0 + 100.0) / 2)
  with pytest.raises(ValueError, match="samples >= 2"):
    evaluate.reliability(np.ones((3, 1)))


@pytest.mark.parametrize("experiment", sorted(R.EXPERIMENTS))
def test_every_arm_names_real_configs_keys_and_warm_starts(experiment):
  for arm in R.EXPERIMENTS[experiment]:
    config = importlib.import_module(arm.config[:-3].replace("/", ".")).get_config()
    for o in arm.overrides:
      key = o.split("=")[0][len("--config."):]
      section = config
      for part in key.split("."):
        assert part in section, f"{experiment}/{arm.name}: unknown key {key}"
        section = section[part]
    if arm.init_from:
      exp, name = arm.init_from.split("/") if "/" in arm.init_from else (experiment,
                                                                          arm.init_from)
      assert name in [a.name for a in R.EXPERIMENTS[exp]], (experiment, arm.name)
    cmd, done = R.command("runs/results", experiment, arm, seeds=5, sft_steps=300,
                          rl_steps=80)
    assert cmd[2] == f"experiments.{arm.program}" and done


def _fake_run(path, seeds, success_by_step):
  w = metrics_lib.MetricsWriter(str(path))
  for step, succ in success_by_step:
    rec = {f"eval/success_rate/seed{i}": s for i, s in enumerate(succ)}
    rec["eval/success_rate"] = float(np.mean(succ))
    rec.update({f"train/entropy/seed{i}": 1.0 for i in range(seeds)}, **{"train/entropy": 1.0})
    w.write(step, rec)
  w.close()


def test_report_writes_tables_plots_and_markdown(tmp_path):
  root, docs = tmp_path / "runs", tmp_path / "docs"
  _fake_run(root / "tool_use" / "calculator_sft", 2, [(300, [0.5, 0.7])])
  _fake_run(root / "tool_use" / "calculator_ppo", 2, [(0, [0.5, 0.7]), (10, [0.8, 1.0])])
  (root / "timing.jsonl").write_text(json.dumps({"experiment": "tool_use", "arm": "x",
                                                 "wall_s": 120.0}) + "\n")
  docs.mkdir()
  (docs / "RESULTS.md").write_text("intro\n<!-- report:tool_use -->\nold\n"
                                   "<!-- /report:tool_use -->\n<!-- report:compute -->\n"
                                   "<!-- /report:compute -->\nend\n")  # an empty section too
  report.write_report(str(root), str(docs))
  text = (docs / "RESULTS.md").read_text()
  assert "old" not in text and text.startswith("intro") and text.endswith("end\n")
  m, h = report.mean_ci([0.8, 1.0])
  assert f"| calculator: SFT + PPO (turn critic) | 2 | {m:.2f} ± {h:.2f} |" in text
  assert "| 0.30 ± 0.00 |" in text  # RL - warm start, paired by seed: +0.3 in both seeds
  assert "| calculator: SFT only | 2 | 0.60 ±" in text
  assert "calculator: SFT + GRPO | not run" in text
  assert "<!-- report:compute -->\nWall time on this machine: 2 min in all" in text
  assert (docs / "results_tool_use.png").stat().st_size > 1000


def test_sampled_gain_is_last_minus_first_window_per_seed():
  recs = [{"step": i, "train/success_rate": (i + 1.0) / 2, "train/success_rate/seed0": float(i),
           "train/success_rate/seed1": 1.0} for i in range(30)]
  gain = report.sampled_gain(recs, n=10)
  np.testing.assert_allclose(gain, [np.mean(range(20, 30)) - np.mean(range(10)), 0.0])
  assert report.sampled_gain(recs[:15], n=10) == []  # too short for two windows


def test_paired_gain_is_last_minus_first_eval_per_seed():
  recs = [{"step": 0, "eval/success_rate/seed0": 0.25, "eval/success_rate/seed1": 0.5},
          {"step": 5, "train/loss": 1.0},  # a record without an evaluation is skipped
          {"step": 10, "eval/success_rate/seed0": 0.5, "eval/success_rate/seed1": 0.25},
          {"step": 20, "eval/success_rate/seed0": 1.0, "eval/success_rate/seed1": 0.75}]
  for r in recs:
    if "eval/success_rate/seed0" in r:
      r["eval/success_rate"] = (r["eval/success_rate/seed0"] + r["eval/success_rate/seed1"]) / 2
  np.testing.assert_allclose(report.paired_gain(recs), [0.75, 0.25])
  # Paired by seed: the interval is that of the differences, not of two independent means.
  m, h = report.mean_ci(report.paired_gain(recs))
  np.testing.assert_allclose((m, h), (0.5, 12.706 * np.std([0.75, 0.25], ddof=1) / np.sqrt(2)))
  assert report.paired_gain(recs[:1]) == []  # one evaluation (an SFT run): no gain
  assert report.paired_gain([{"step": 0, "eval/ndcg": 0.1}, {"step": 1, "eval/ndcg": 0.4}],
                            "eval/ndcg") == pytest.approx([0.3])


def test_reflexion_report_table_and_plot(tmp_path):
  root, docs = tmp_path / "runs", tmp_path / "docs"
  run = root / "tool_use" / "search2_sft"
  run.mkdir(parents=True)
  solved0 = [[0.2, 0.3, 0.4, 0.5, 0.5], [0.4, 0.5, 0.6, 0.7, 0.7]]
  solved1 = [[0.2, 0.4, 0.6, 0.7, 0.8], [0.4, 0.6, 0.7, 0.8, 0.9]]
  (run / "reflexion.json").write_text(json.dumps({"memory": {
      "0": {"solved": solved0, "success": solved0}, "1": {"solved": solved1,
                                                          "success": solved1}}}))
  table, _ = report.report_reflexion(str(root))
  rows = [r for r in table.split("\n") if r.startswith("| search | SFT | template |")]
  assert len(rows) == 2
  assert rows[0].startswith(f"| search | SFT | template | 0 | 2 | {report.fmt([0.2, 0.4])} | "
                            f"{report.fmt([0.4, 0.6])} | {report.fmt([0.5, 0.7])} | - |")
  assert rows[1].endswith(f"| {report.fmt([0.8, 0.9])} | {report.fmt([0.3, 0.2])} |")
  assert "| fix | SFT | template | - | not run |" in table
  assert "| search | SFT | template + action to change | - | not run |" in table
  # The same policy with the reflection naming the action: its own file, its own rows.
  (run / "reflexion_action.json").write_text(json.dumps({"memory": {
      "0": {"solved": solved0, "success": solved0}, "3": {"solved": solved0,
                                                          "success": solved0}}}))
  table, _ = report.report_reflexion(str(root))
  label = "template + action to change"
  own = [r for r in table.split("\n") if r.startswith(f"| search | SFT | {label} |")]
  assert len(own) == 2 and own[1].startswith(f"| search | SFT | {label} | 3 | 2 |")
  assert own[1].endswith(f"| {report.fmt([0.0, 0.0])} |")
  arms = {a.name: a for a in R.EXPERIMENTS["reflexion"]}
  arm = arms["eval_search_sft_action"]
  assert arm.init_from == "tool_use/search2_sft" and arm.out == "reflexion_action.json"
  cmd, done = R.command(str(root), "reflexion", arm, seeds=5, sft_steps=200, rl_steps=60)
  assert "--reflection=action" in cmd and done == str(run / "reflexion_action.json")
  assert "--instances=256" in cmd and "--memory=0,3" in cmd
  assert not any(c.startswith("--reflection=") for c in R.command(
      str(root), "reflexion", arms["eval_search_sft"], seeds=5, sft_steps=200, rl_steps=60)[0])
  # Every reflexion JSON the report reads is written by some arm.
  written = {(a.init_from, a.out) for a in R.EXPERIMENTS["reflexion"] if a.program == "reflexion"}
  for _, _, (exp, name), kind in report.REFLEXION_POLICIES:
    run_name = name if exp == "reflexion" else f"{exp}/{name}"
    file = "reflexion.json" if kind == "template" else f"reflexion_{kind}.json"
    assert (run_name, file) in written, (run_name, file)
  docs.mkdir()
  assert report.plot_reflexion(str(root), str(docs / "r.png"), "title")
  assert (docs / "r.png").stat().st_size > 1000


def test_an_arm_never_starts_from_an_unfinished_run(tmp_path):
  arm = R.EXPERIMENTS["masking"][0]  # starts from tool_use/search2_sft
  assert R._source_done(str(tmp_path), "masking", arm).endswith("search2_sft")
  sft = tmp_path / "tool_use" / "search2_sft"
  sft.mkdir(parents=True)
  (sft / "checkpoints").mkdir()  # a checkpoint alone is not a finished run
  assert R._source_done(str(tmp_path), "masking", arm) is not None
  (sft / "samples.txt").write_text("done")
  assert R._source_done(str(tmp_path), "masking", arm) is None
  assert R._source_done(str(tmp_path), "tool_use", R.EXPERIMENTS["tool_use"][0]) is None


def test_arms_flag_runs_only_the_named_arms(tmp_path):
  """`--arms` restricts `run` to some arms (dry run: the commands it would start); an arm that
  is not in the named experiments is an error that says so."""
  base = [sys.executable, "-m", "experiments.results", "run", "tool_use", "--dry_run",
          f"--root={tmp_path}"]
  cwd = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = subprocess.run(base + ["--arms=search2_sft,search2_ppo"], capture_output=True,
                       text=True, cwd=cwd)
  assert out.returncode == 0, out.stderr
  started = [line.split("]")[0][1:] for line in out.stdout.splitlines() if line.startswith("[")]
  assert started == ["tool_use/search2_sft", "tool_use/search2_ppo"]
  bad = subprocess.run(base + ["--arms=search2_sft,nope"], capture_output=True, text=True,
                       cwd=cwd)
  assert bad.returncode != 0 and "--arms ['nope'] are not arms of ['tool_use']" in bad.stderr
