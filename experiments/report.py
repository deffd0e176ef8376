"""Tables and plots of docs/RESULTS.md from the runs of `python -m experiments.results`:

    python -m experiments.report [--root runs/results] [--docs docs] [--only think_budget,...]

For every experiment whose runs exist it computes, per arm, the mean and 95% confidence
interval over seeds (Student t, n - 1 degrees of freedom) of the final evaluation metrics, writes
a learning-curve plot `docs/results_<experiment>.png` (greedy eval success vs RL step, mean over
seeds with the 95% band), and replaces the text between `<!-- report:<experiment> -->` and
`<!-- /report:<experiment> -->` in `docs/RESULTS.md` with the table. Arms with no runs yet are
listed as "not run". Nothing is trained here. `--only` limits the update to the named
experiments (and leaves the compute statement alone): a checkout that holds only some of the
runs then refreshes its own sections without blanking the others'.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import sys

import numpy as np
from absl import app, flags

from experiments import results as R
from mtrl_jax import metrics as metrics_lib

_DOCS = flags.DEFINE_string("docs", "docs", "Where RESULTS.md and the plots are.")
_ONLY = flags.DEFINE_list("only", [], "Update only these experiments' sections (default: all).")

# Two-sided 95% Student t quantiles by degrees of freedom (1..30); 1.96 beyond.
_T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
        2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
        2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def mean_ci(values) -> tuple[float, float]:
  """(mean, half-width of the 95% t interval) over seeds; half-width 0 for one value."""
  x = np.asarray([v for v in values if v is not None and np.isfinite(v)], np.float64)
  if x.size == 0:
    return math.nan, math.nan
  if x.size == 1:
    return float(x[0]), 0.0
  t = _T95[x.size - 2] if x.size - 1 <= len(_T95) else 1.96
  return float(x.mean()), float(t * x.std(ddof=1) / math.sqrt(x.size))


def per_seed(record: dict, key: str) -> list[float]:
  """The per-seed values of `key` in one metrics record (`key/seed<i>`, or `key` alone)."""
  seeds = sorted((int(k.rsplit("seed", 1)[1]), v) for k, v in record.items()
                 if k.startswith(key + "/seed"))
  if seeds:
    return [v for _, v in seeds]
  return [record[key]] if key in record else []


def last_eval(records: list[dict]) -> dict:
  evals = [r for r in records if r.get("eval/success_rate") is not None]
  return evals[-1] if evals else {}


def window(records: list[dict], key: str, last: int = 10) -> list[float]:
  """Per-seed mean of `key` over the last `last` records that have it."""
  rows = [per_seed(r, key) for r in records if r.get(key) is not None][-last:]
  return list(np.mean(np.asarray(rows, np.float64), axis=0)) if rows else []


def fmt(values, scale: float = 1.0, digits: int = 2) -> str:
  m, h = mean_ci(values)
  if math.isnan(m):
    return "-"
  return f"{m * scale:.{digits}f} ± {h * scale:.{digits}f}"


def _records(root, experiment, name):
  path = os.path.join(R.arm_dir(root, experiment, name), "metrics.jsonl")
  return metrics_lib.read_metrics(path) if os.path.exists(path) else None


def _seeds(records) -> int:
  return len(per_seed(last_eval(records), "eval/success_rate"))


def _table(header: list[str], rows: list[list[str]]) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def eval_table(root, experiment, arms, columns, extra=()) -> tuple[str, dict]:
  """Rows of final greedy-eval metrics per arm; columns: [(title, key, scale)]; extra:
  [(title, fn(records) -> per-seed values)]."""
  rows, curves = [], {}
  for label, (exp, name) in arms:
    recs = _records(root, exp, name)
    if not recs:
      rows.append([label, "not run"] + [""] * (len(columns) + len(extra)))
      continue
    final = last_eval(recs)
    rows.append([label, str(_seeds(recs))] +
                [fmt(per_seed(final, key), scale) for _, key, scale in columns] +
                [fmt(fn(recs)) for _, fn in extra])
    curves[label] = recs
  return _table(["arm", "seeds"] + [c[0] for c in columns] + [t for t, _ in extra],
                rows), curves


def sampled_gain(recs, key: str = "train/success_rate", n: int = 10) -> list[float]:
  """Per seed: mean of `key` over the last n RL steps minus the first n (the sampled policy;
  greedy evaluation can start near its ceiling)."""
  rows = [per_seed(r, key) for r in recs if r.get(key) is not None]
  if len(rows) < 2 * n:
    return []
  return list(np.mean(rows[-n:], axis=0) - np.mean(rows[:n], axis=0))


def paired_gain(recs, key: str = "eval/success_rate") -> list[float]:
  """Per seed: `key` at the run's last evaluation minus its first (an RL run's first
  evaluation is step 0, its warm start: the difference is paired by seed, so the seed-to-seed
  spread of the warm starts cancels). [] for a run with fewer than two evaluations."""
  rows = [per_seed(r, key) for r in recs if r.get(key) is not None]
  if len(rows) < 2 or len(rows[0]) != len(rows[-1]):
    return []
  return list(np.asarray(rows[-1], np.float64) - np.asarray(rows[0], np.float64))


PAIRED = ("RL - warm start (paired by seed)", paired_gain)


def plot(curves: dict, path: str, title: str, key: str = "eval/success_rate") -> str | None:
  """Mean over seeds with a 95% band of `key` against RL step, one line per arm."""
  curves = {k: v for k, v in curves.items() if any(r.get(key) is not None for r in v)}
  if not curves:
    return None
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6, 3.6))
  for label, recs in curves.items():
    pts = [(r["step"], mean_ci(per_seed(r, key))) for r in recs if r.get(key) is not None]
    first = pts[0][0]
    steps = np.asarray([s - first for s, _ in pts])
    m = np.asarray([c[0] for _, c in pts])
    h = np.asarray([c[1] for _, c in pts])
    ax.plot(steps, m, label=label)
    lo, hi = m - h, m + h
    if key.endswith("success_rate"):  # a rate: the band stays in [0, 1]
      lo, hi = np.clip(lo, 0, 1), np.clip(hi, 0, 1)
    ax.fill_between(steps, lo, hi, alpha=0.2)
  ax.set_xlabel("RL step (0 = the SFT warm start)")
  ax.set_ylabel(key)
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def report_tool_use(root):
  out = []
  curves_all = {}
  for env, title in (("calculator", "calculator"), ("search2", "search, 2 hops"),
                     ("search3", "search, 3 hops")):
    arms = [(f"{env}: SFT only", ("tool_use", f"{env}_sft")),
            (f"{env}: SFT + PPO (turn critic)", ("tool_use", f"{env}_ppo")),
            (f"{env}: SFT + GRPO", ("tool_use", f"{env}_grpo"))]
    table, curves = eval_table(root, "tool_use", arms, [
        ("eval success", "eval/success_rate", 1), ("tool calls", "eval/tool_calls", 1),
        ("turns", "eval/turns", 1), ("format errors", "eval/format_errors", 1)],
        [PAIRED, ("sampled success, last - first 10 RL steps", sampled_gain)])
    out.append(f"**{title}**\n\n{table}")
    curves_all.update({k: v for k, v in curves.items() if "SFT only" not in k})
  return "\n\n".join(out), curves_all


def report_clarify(root):
  arms = [("SFT only", ("clarify", "sft")),
          ("PPO, trajectory-level critic (gamma_turn = 1)", ("clarify", "ppo_trajectory")),
          ("PPO, myopic (gamma_turn = 0)", ("clarify", "ppo_myopic")),
          ("GRPO on the trajectory return", ("clarify", "grpo")),
          ("PPO on the multiturn-aware reward, w = 1", ("clarify", "mr_w1")),
          ("PPO on the multiturn-aware reward, w = 2", ("clarify", "mr_w2")),
          ("PPO on the multiturn-aware reward, w = full", ("clarify", "mr_full")),
          ("PPO trajectory, half the episodes fully specified", ("clarify", "ppo_mixed"))]
  table, curves = eval_table(root, "clarify", arms, [
      ("eval success", "eval/success_rate", 1), ("asks", "eval/num_asks", 1),
      ("first turn asks", "eval/first_turn_ask", 1), ("premature answers", "eval/premature", 1),
      ("turns", "eval/turns", 1)], [PAIRED])
  return table, {k: v for k, v in curves.items() if k != "SFT only"}


def report_lic(root):
  rows = []
  for policy, label in (("sft", "SFT only"), ("ppo_trajectory", "PPO trajectory"),
                        ("ppo_myopic", "PPO myopic"), ("grpo", "GRPO"),
                        ("ppo_mixed", "PPO trajectory, trained on both variants")):
    data = {}
    for variant in ("full", "sharded"):
      path = os.path.join(R.arm_dir(root, "clarify", policy), f"lic_{variant}.json")
      if os.path.exists(path):
        with open(path) as f:
          data[variant] = json.load(f)["per_seed"]
    if len(data) < 2:
      rows.append([label, "not run"] + [""] * 6)
      continue
    get = lambda v, k: [s[k] for s in data[v]]
    drop = [(f["P"] - s["P"]) / f["P"] if f["P"] > 0 else math.nan
            for f, s in zip(data["full"], data["sharded"])]
    rows.append([label, str(len(data["full"])), fmt(get("full", "P"), digits=1),
                 fmt(get("sharded", "P"), digits=1), fmt(drop, 100, 1),
                 fmt(get("sharded", "A90"), digits=1), fmt(get("full", "U90_10"), digits=1),
                 fmt(get("sharded", "U90_10"), digits=1)])
  return _table(["policy", "seeds", "P full", "P sharded", "drop %", "A90 sharded",
                 "U90-10 full", "U90-10 sharded"], rows), {}


def _train_table(root, arms, extra):
  """Eval success plus train-time statistics (mean of the last 10 steps) per arm."""
  rows, curves = [], {}
  for label, (exp, name) in arms:
    recs = _records(root, exp, name)
    if not recs:
      rows.append([label, "not run"] + [""] * (2 + len(extra)))
      continue
    final = last_eval(recs)
    evals = [per_seed(r, "eval/success_rate") for r in recs
             if r.get("eval/success_rate") is not None]
    rows.append([label, str(_seeds(recs)), fmt(per_seed(final, "eval/success_rate")),
                 fmt(paired_gain(recs))] + [fmt(fn(recs, evals)) for _, fn in extra])
    curves[label] = recs
  return _table(["arm", "seeds", "eval success", PAIRED[0]] + [t for t, _ in extra],
                rows), curves


def report_masking(root):
  arms = [("tool replies masked (default)", ("tool_use", "search2_ppo")),
          ("tool replies in the loss", ("masking", "unmasked"))]
  return _train_table(root, arms, [
      ("worst eval success after step 0",
       lambda recs, evals: list(np.min(np.asarray(evals[1:] or evals), axis=0))),
      ("grad norm", lambda recs, evals: window(recs, "train/grad_norm")),
      ("skipped updates", lambda recs, evals: window(recs, "train/nan_skipped", 10 ** 9)),
  ])


def report_dapo(root):
  arms = [("GRPO (seq-mean loss, eps 0.2)", ("dapo_ladder", "1_grpo")),
          ("+ clip-higher (eps_high 0.28)", ("dapo_ladder", "2_clip_higher")),
          ("+ token-level loss", ("dapo_ladder", "3_token_loss")),
          ("+ overlong shaping", ("dapo_ladder", "4_overlong")),
          ("+ dynamic sampling (= DAPO)", ("dapo_ladder", "5_dynamic_sampling"))]
  return _train_table(root, arms, [
      ("entropy", lambda recs, evals: window(recs, "train/entropy")),
      ("zero-advantage groups",
       lambda recs, evals: [1 - x for x in window(recs, "train/frac_groups_kept")]),
      ("truncated", lambda recs, evals: window(recs, "train/truncated")),
  ])


def report_fix(root):
  arms = [("SFT only", ("fix", "sft")),
          ("DAPO + turn penalty (the SWE-style recipe)", ("fix", "dapo")),
          ("GRPO", ("fix", "grpo")),
          ("PPO, turn-level critic", ("fix", "ppo")),
          ("DAPO without the turn penalty", ("fix", "dapo_no_penalty")),
          ("DAPO, truncated episodes filtered out", ("fix", "dapo_filter_truncated"))]
  return _train_table(root, arms, [
      ("turns", lambda recs, evals: per_seed(last_eval(recs), "eval/turns")),
      ("test runs", lambda recs, evals: per_seed(last_eval(recs), "eval/runs")),
      ("loops", lambda recs, evals: per_seed(last_eval(recs), "eval/loops")),
      ("truncated", lambda recs, evals: per_seed(last_eval(recs), "eval/truncated")),
      ("grad norm", lambda recs, evals: window(recs, "train/grad_norm")),
      ("max grad norm", lambda recs, evals: [
          max(x) for x in zip(*[per_seed(r, "train/grad_norm") for r in recs
                                if r.get("train/grad_norm") is not None])]),
  ])


def report_retrieval(root):
  columns = [("NDCG@10", "eval/ndcg", 1), ("Recall@10", "eval/recall", 1),
             ("refinements", "eval/refinements", 1)]
  table, curves = eval_table(root, "retrieval", [
      ("SFT (single query)", ("retrieval", "sft")),
      ("GRPO on NDCG@10", ("retrieval", "grpo_ndcg")),
      ("GRPO on Recall@10", ("retrieval", "grpo_recall")),
      ("multi-turn refinement: SFT", ("retrieval", "multiturn_sft")),
      ("multi-turn refinement: GRPO on NDCG@10", ("retrieval", "multiturn_grpo"))], columns,
      [("NDCG@10, RL - warm start (paired by seed)", lambda r: paired_gain(r, "eval/ndcg"))])
  recs = _records(root, "retrieval", "sft")
  if recs:  # the user's own text as the query, scored on the same evaluation episodes
    final = last_eval(recs)
    raw = ["raw user text as the query", str(_seeds(recs)), fmt(per_seed(final, "eval/raw_ndcg")),
           fmt(per_seed(final, "eval/raw_recall")), "-", "-"]
    lines = table.split("\n")
    table = "\n".join(lines[:2] + ["| " + " | ".join(raw) + " |"] + lines[2:])
  return table, {k: v for k, v in curves.items() if "SFT" not in k}


def _eval_file(root, experiment, run, out) -> dict | None:
  """An `experiments.evaluate` output of `run` (None when not run)."""
  path = os.path.join(R.arm_dir(root, experiment, run), out)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def _eval_json(root, experiment, run, out) -> list[dict] | None:
  """Per-seed rows of an `experiments.evaluate` output of `run` (None when not run)."""
  data = _eval_file(root, experiment, run, out)
  return None if data is None else data["per_seed"]


# (column title, evaluate key, scale) of the think-budget tables.
THINK_METRICS = (("exact match", "success", 1), ("hops completed", "hops_found", 1),
                 ("out of context", "out_of_context", 1), ("think tokens / turn", "think_tokens", 1))
# The same from the GRPO runs' greedy in-training evaluations (`eval/truncated`: any budget).
THINK_GREEDY = (("exact match", "eval/success_rate"), ("hops completed", "eval/hops_found"),
                ("truncated", "eval/truncated"))
THINK_PHASES = {  # phase -> legend of the plot
    "eval": "SFT, cap at eval (sampled)",
    "train": "GRPO trained with the cap (sampled)",
    "rl_start": "SFT, cap at eval (greedy)",
    "rl_end": "GRPO trained with the cap (greedy)",
}


def _first_last_eval(recs) -> tuple[dict, dict]:
  evals = [r for r in recs if r.get("eval/success_rate") is not None]
  return (evals[0], evals[-1]) if evals else ({}, {})


def think_budget_points(root, experiment: str = "think_budget"
                        ) -> dict[str, list[tuple[str, dict[str, list[float]]]]]:
  """phase -> [(b label, {metric: per-seed values})] for every b that has data.

  Phases: "eval" (`experiments.evaluate` of the SFT policy with b, sampled), "train" (the same of
  GRPO trained with b), "rl_start" / "rl_end" (the GRPO run's first / last greedy in-training
  evaluation: the SFT policy with b, and the policy after RL with b). Metrics use the evaluate
  keys (`success`, `hops_found`, `out_of_context` or, greedy, `truncated`, `think_tokens`).
  """
  out: dict[str, list] = {}
  for name, b in R.THINK_BUDGETS:
    label = "none" if b is None else str(b)
    for phase, run, file in (("eval", "sft", f"eval_{name}.json"),
                             ("train", f"grpo_{name}", "eval.json")):
      rows = _eval_json(root, experiment, run, file)
      if rows:
        out.setdefault(phase, []).append((label, {k: [r[k] for r in rows] for k in rows[0]}))
    recs = _records(root, experiment, f"grpo_{name}")
    if recs:
      first, last = _first_last_eval(recs)
      keys = {"success": "eval/success_rate", "hops_found": "eval/hops_found",
              "truncated": "eval/truncated", "step": "step"}
      for phase, rec in (("rl_start", first), ("rl_end", last)):
        if phase == "rl_end" and rec.get("step", 0) <= first.get("step", 0):
          continue  # no evaluation after an RL step yet
        vals = {k: per_seed(rec, v) for k, v in keys.items() if k != "step"}
        vals["step"] = [rec.get("step", 0)]
        out.setdefault(phase, []).append((label, vals))
  return out


def _defined_rl_labels(experiment: str) -> list[str]:
  """b labels of the GRPO arms `experiment` defines (an experiment may run only some b)."""
  names = {a.name for a in R.EXPERIMENTS.get(experiment, [])}
  return ["none" if b is None else str(b) for name, b in R.THINK_BUDGETS
          if not names or f"grpo_{name}" in names]


def report_think_budget(root, experiment: str = "think_budget"):
  points = think_budget_points(root, experiment)
  labels = ["none" if b is None else str(b) for _, b in R.THINK_BUDGETS]
  rl_labels = _defined_rl_labels(experiment)
  get = lambda phase, label: dict(points.get(phase, [])).get(label)
  rows = []
  for phase, policy, phase_labels in (("eval", "SFT, capped at eval", labels),
                                      ("train", "GRPO, trained with the cap", rl_labels)):
    for label in phase_labels:
      data = get(phase, label)
      if data is None:
        rows.append([label, policy, "not run"] + [""] * len(THINK_METRICS))
        continue
      rows.append([label, policy, str(len(data["success"]))] +
                  [fmt(data[k], scale) for _, k, scale in THINK_METRICS])
  sampled = _table(["per-turn think budget b", "policy", "seeds"] +
                   [t for t, _, _ in THINK_METRICS], rows)
  rows = []
  uncapped = get("rl_end", "none")
  paired = lambda a, b: (fmt(np.subtract(a["success"], b["success"]))
                         if a and b and len(a["success"]) == len(b["success"]) else "-")
  for label in rl_labels:
    start, end = get("rl_start", label), get("rl_end", label)
    if start is None:
      rows.append([label, "not run"] + [""] * (2 * len(THINK_GREEDY) + 3))
      continue
    steps = int(end["step"][0] - start["step"][0]) if end else 0
    rows.append([label, str(len(start["success"])), str(steps)] +
                [fmt(d[k]) if d else "-" for d in (start, end)
                 for k in ("success", "hops_found", "truncated")] +
                [paired(end, start), paired(end, uncapped) if label != "none" else "-"])
  greedy = _table(["b", "seeds", "RL steps"] +
                  [f"{t}, {when}" for when in ("SFT", "after GRPO") for t, _ in THINK_GREEDY] +
                  ["exact match, GRPO - SFT (paired by seed)",
                   "exact match after GRPO, b - none (paired by seed)"], rows)
  size = "instances x samples per seed"  # from the first SFT evaluation that has run
  outs = [_eval_file(root, experiment, "sft", f"eval_{name}.json") for name, _ in R.THINK_BUDGETS]
  first = next((o for o in outs if o is not None), None)
  if first is not None and "instances" in first:
    size = f"{first['instances']} instances x {first['samples']} samples per seed"
  return (f"**Sampled evaluation** (`experiments.evaluate`: {size}, temperature 1)\n\n"
          f"{sampled}\n\n**Greedy evaluation during GRPO** (`train.eval_envs` fixed "
          "episodes per seed; SFT = the run's step-0 evaluation, i.e. the SFT policy with the cap; "
          "truncated = context or turn limit)\n\n" + greedy), {}


def plot_think_budget(root, path: str, title: str, experiment: str = "think_budget"
                      ) -> str | None:
  """Exact match, hops completed and truncation against b (mean, 95% CI over seeds), one line
  per phase (`think_budget_points`)."""
  points = think_budget_points(root, experiment)
  if not points:
    return None
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  labels = ["none" if b is None else str(b) for _, b in R.THINK_BUDGETS]
  fig, axes = plt.subplots(1, 3, figsize=(11, 3.6))
  panels = (("exact match", ("success",)), ("hops completed", ("hops_found",)),
            ("truncated (sampled: out of context)", ("out_of_context", "truncated")))
  for ax, (metric, keys) in zip(axes, panels):
    for i, (phase, legend) in enumerate(THINK_PHASES.items()):
      pts = [(labels.index(label), next(d[k] for k in keys if k in d))
             for label, d in points.get(phase, []) if any(k in d for k in keys)]
      if not pts:
        continue
      stats = [mean_ci(v) for _, v in pts]
      ax.errorbar([x + 0.06 * (i - 1.5) for x, _ in pts], [m for m, _ in stats],
                  yerr=[h for _, h in stats], marker="o", capsize=3, label=legend,
                  linestyle="-" if phase in ("eval", "rl_start") else "--")
    if metric == "exact match":  # an answer drawn from the asked attribute's 8 values
      ax.axhline(1 / 8, color="grey", linestyle=":", label="guessing (1/8)")
    ax.set_xticks(range(len(labels)), labels)
    ax.set_xlabel("per-turn think budget b")
    ax.set_title(metric, fontsize=9)
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=6)
  fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


# (env, policy label, (experiment, run), who writes the reflections: the run's reflexion JSON
# is reflexion.json for the template, reflexion_<kind>.json otherwise).
REFLEXION_POLICIES = tuple(
    (env, label, run, kind)
    for env, sft, rl, meta, meta_action in (
        ("search", ("tool_use", "search2_sft"), ("tool_use", "search2_ppo"),
         ("reflexion", "search_meta"), ("reflexion", "search_meta_action")),
        ("fix", ("fix", "sft"), ("fix", "ppo"), ("reflexion", "fix_meta"),
         ("reflexion", "fix_meta_action")))
    for label, run, kind in (
        ("SFT", sft, "template"), ("SFT", sft, "action"),
        ("multi-turn RL (PPO, 60 x 32 episodes)", rl, "template"),
        ("multi-turn RL (PPO, 60 x 32 episodes)", rl, "action"),
        ("meta-trained (PPO, 20 x 3 trials x 32)", meta, "template"),
        ("meta-trained with action reflections", meta_action, "action")))
REFLECTION_LABELS = {"template": "template", "action": "template + action to change",
                     "policy": "own (policy-written)"}


def _reflexion_runs(root):
  """[(env, policy label, reflection label, {Omega: {'solved': [seeds][trials], 'success':
  ...}} or None)]."""
  out = []
  for env, label, (exp, name), kind in REFLEXION_POLICIES:
    file = "reflexion.json" if kind == "template" else f"reflexion_{kind}.json"
    path = os.path.join(R.arm_dir(root, exp, name), file)
    data = None
    if os.path.exists(path):
      with open(path) as f:
        data = json.load(f)["memory"]
    out.append((env, label, REFLECTION_LABELS[kind], data))
  return out


def report_reflexion(root):
  """Success after trial 1 / 3 / 5 (solved in some trial so far) per policy and Omega."""
  rows = []
  for env, label, reflection, data in _reflexion_runs(root):
    if data is None:
      rows.append([env, label, reflection, "-", "not run"] + [""] * 4)
      continue
    for omega, d in sorted(data.items(), key=lambda kv: int(kv[0])):
      solved = np.asarray(d["solved"])  # [seeds, trials]
      at = lambda n: fmt(solved[:, min(n, solved.shape[1]) - 1])
      gain = solved[:, -1] - np.asarray(data["0"]["solved"])[:, -1] if "0" in data else []
      rows.append([env, label, reflection, omega, str(solved.shape[0]), at(1), at(3), at(5),
                   fmt(gain) if omega != "0" else "-"])
  return _table(["env", "policy", "reflection", "Omega", "seeds", "solved @1", "solved @3",
                 "solved @5", "@5 vs Omega=0 (paired)"], rows), {}


def plot_reflexion(root, path: str, title: str) -> str | None:
  """Solved-by-trial curves (mean, 95% band over seeds), one panel per policy, one row per
  env."""
  runs = [r for r in _reflexion_runs(root) if r[3] is not None]
  if not runs:
    return None
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  envs = list(dict.fromkeys(env for env, *_ in runs))
  rows = [[r for r in runs if r[0] == env] for env in envs]
  cols = max(len(r) for r in rows)
  fig, axes = plt.subplots(len(rows), cols, figsize=(3.1 * cols, 3.0 * len(rows)), sharey=True,
                           squeeze=False)
  for ax in axes.flat:
    ax.set_visible(False)
  for ax, (env, label, reflection, data) in [(axes[i][j], r) for i, row in enumerate(rows)
                                             for j, r in enumerate(row)]:
    ax.set_visible(True)
    for omega, d in sorted(data.items(), key=lambda kv: int(kv[0])):
      solved = np.asarray(d["solved"])
      stats = [mean_ci(solved[:, n]) for n in range(solved.shape[1])]
      m, h = np.asarray([s[0] for s in stats]), np.asarray([s[1] for s in stats])
      trials = np.arange(1, solved.shape[1] + 1)
      ax.plot(trials, m, marker="o", label=f"Omega={omega}")
      ax.fill_between(trials, np.clip(m - h, 0, 1), np.clip(m + h, 0, 1), alpha=0.2)
    ax.set_title(f"{env}: {label.split(' (')[0]}\n{reflection.split(' (')[0]} reflections",
                 fontsize=8)
    ax.set_xlabel("trial")
    ax.grid(alpha=0.3)
  for row in axes:
    row[0].set_ylabel("solved in some trial so far")
  axes[0][0].legend(fontsize=8)
  fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


REPORTS = {
    "tool_use": (report_tool_use, "Greedy eval success during RL"),
    "clarify": (report_clarify, "Clarify: greedy eval success"),
    "lost_in_conversation": (report_lic, None),
    "masking": (report_masking, "Search (2 hops): masking ablation"),
    "dapo_ladder": (report_dapo, "Search (3 hops): the DAPO ladder"),
    "fix": (report_fix, "Fix the program: pass rate"),
    "retrieval": (report_retrieval, "Retrieval: greedy eval success (perfect top 10)"),
    "think_budget": (report_think_budget,
                     "Search, 3 hops, 192-token context: per-turn think budget b"),
    "think_budget_2hop": (functools.partial(report_think_budget, experiment="think_budget_2hop"),
                          "Search, 2 hops, 160-token context: per-turn think budget b"),
    "reflexion": (report_reflexion, "Reflexion: solved by trial"),
}
# Experiments whose plot is not a learning curve: fn(root, path, title) -> path or None.
PLOTS = {"think_budget": plot_think_budget,
         "think_budget_2hop": functools.partial(plot_think_budget, experiment="think_budget_2hop"),
         "reflexion": plot_reflexion}


def compute_statement(root) -> str:
  path = os.path.join(root, "timing.jsonl")
  if not os.path.exists(path):
    return "No timing recorded yet."
  with open(path) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  by_exp = {}
  for r in rows:
    by_exp[r["experiment"]] = by_exp.get(r["experiment"], 0.0) + r["wall_s"]
  parts = ", ".join(f"{k} {v / 60:.0f} min" for k, v in by_exp.items())
  return f"Wall time on this machine: {sum(by_exp.values()) / 60:.0f} min in all ({parts})."


def update_markdown(text: str, name: str, body: str) -> str:
  pattern = re.compile(rf"(<!-- report:{name} -->\n)(?:.*?\n)?(<!-- /report:{name} -->)", re.S)
  if not pattern.search(text):
    return text
  return pattern.sub(lambda m: m.group(1) + body + "\n" + m.group(2), text)


def main(argv):
  del argv
  unknown = sorted(set(_ONLY.value) - set(REPORTS))
  if unknown:
    sys.exit(f"error: --only names unknown experiment(s) {unknown}; choose from {list(REPORTS)}")
  write_report(R._ROOT.value, _DOCS.value, only=_ONLY.value or None)


def write_report(root: str, docs: str, only: list[str] | None = None) -> None:
  """Print every table (or those of `only`), write the plots, update docs/RESULTS.md between
  its markers (the compute statement too, unless `only` is given)."""
  if not os.path.isdir(root):
    sys.exit(f"error: --root {root!r} does not exist; run `python -m experiments.results run "
             f"<experiment>` first")
  os.makedirs(docs, exist_ok=True)
  md_path = os.path.join(docs, "RESULTS.md")
  text = open(md_path).read() if os.path.exists(md_path) else ""
  for name, (fn, title) in REPORTS.items():
    if only is not None and name not in only:
      continue
    table, curves = fn(root)
    path = os.path.join(docs, f"results_{name}.png")
    if name in PLOTS:
      png = PLOTS[name](root, path, title)
    else:
      png = plot(curves, path, title) if title else None
    body = table + (f"\n\n![{title}](results_{name}.png)" if png else "")
    print(f"## {name}\n\n{body}\n")
    text = update_markdown(text, name, body)
  if only is None:
    compute = compute_statement(root)
    print(compute)
    text = update_markdown(text, "compute", compute)
  if text:
    with open(md_path, "w") as f:
      f.write(text)
    print(f"updated {md_path}")


if __name__ == "__main__":
  app.run(main)
