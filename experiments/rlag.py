"""Knowledge internalisation experiment: `python -m experiments.rlag --config configs/rlag.py
[--config.<key>=<value> ...]`.

Runs the shared warm start and every arm of `config.train.arms` (continued pre-training, SFT,
RLAG; `experiments/rlag_study.py`) for `config.num_seeds` seeds at once (`jax.vmap` over seed
keys), then

* writes `<workdir>/<arm>/metrics.jsonl` (`mtrl_jax.metrics.MetricsWriter`: closed-book accuracy
  by question type every `train.eval_every` steps, training metrics, per seed as `key/seed<i>`;
  `warm_start/` holds the warm start's loss and its evaluation) and `<workdir>/results.json`
  (final accuracies per arm and seed, the table, wall time);
* prints the table (mean ± 95% t-interval over seeds) and saves the plot, by default
  `docs/results_rlag.png` (`--plot=` to change, empty for none).

`--report_only [--step=S]` trains nothing and rebuilds the table and plot from the metrics of
an earlier run in the workdir (at its arms' evaluation step S).

Unknown `--config.*` keys are errors naming the key (`experiments.cli.parse_flags`).
"""

from __future__ import annotations

import json
import os
import time

import jax
import numpy as np
from absl import app, flags

from experiments import cli
from experiments.report import mean_ci
from mtrl_jax import metrics as metrics_lib
from experiments import rlag_study as rlag
from mtrl_jax.envs import facts as facts_lib

_PLOT = flags.DEFINE_string("plot", "docs/results_rlag.png", "Where the bar plot goes ('' = none).")
_REPORT_ONLY = flags.DEFINE_bool("report_only", False, "Train nothing: rebuild the table and plot "
                                 "from <workdir>/<arm>/metrics.jsonl.")
_STEP = flags.DEFINE_integer("step", -1, "With --report_only: the arms' evaluation step to report "
                             "(-1: the last step every arm reached).")
flags.mark_flags_as_required(["config"])

COLUMNS = ("direct", "paraphrased", "two_hop", "open_book_direct")
LABELS = {"warm_start": "warm start only", "cpt": "continued pre-training",
          "sft": "SFT (QA pairs)", "rlag": "RLAG"}


def _per_seed(metrics) -> dict[str, list[float]]:
  return {k: [float(x) for x in np.asarray(v).reshape(-1)] for k, v in metrics.items()}


def _record(metrics: dict[str, list[float]]) -> dict[str, float]:
  out = {}
  for k, vals in metrics.items():
    out[k] = float(np.mean(vals))
    out.update({f"{k}/seed{i}": v for i, v in enumerate(vals)})
  return out


def table(final: dict[str, dict[str, list[float]]]) -> str:
  """Markdown table: one row per arm, mean ± 95% CI of each accuracy (in %)."""
  head = "| arm | " + " | ".join(c.replace("_", " ") for c in COLUMNS) + " |"
  lines = [head, "|" + "---|" * (len(COLUMNS) + 1)]
  for arm, m in final.items():
    cells = []
    for c in COLUMNS:
      mu, h = mean_ci(m[f"eval/{c}"])
      cells.append(f"{100 * mu:.1f} ± {100 * h:.1f}")
    lines.append(f"| {LABELS.get(arm, arm)} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def plot(final: dict[str, dict[str, list[float]]], path: str, title: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  kinds = COLUMNS[:3]
  arms = list(final)
  fig, ax = plt.subplots(figsize=(7, 3.8))
  width = 0.8 / len(arms)
  for i, arm in enumerate(arms):
    stats = [mean_ci(final[arm][f"eval/{k}"]) for k in kinds]
    x = np.arange(len(kinds)) + (i - (len(arms) - 1) / 2) * width
    ax.bar(x, [100 * m for m, _ in stats], width, yerr=[100 * h for _, h in stats], capsize=3,
           label=LABELS.get(arm, arm))
  ax.set_xticks(np.arange(len(kinds)))
  ax.set_xticklabels(["direct", "paraphrased", "two-hop"])
  ax.set_ylabel("closed-book exact match (%)")
  ax.set_ylim(0, 100)
  ax.set_title(title, fontsize=9)
  ax.grid(axis="y", alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)


def from_runs(workdir: str, arms, step: int = -1) -> tuple[dict[str, dict[str, list[float]]], int]:
  """Per-seed final accuracies read back from `<workdir>/<arm>/metrics.jsonl`, at `step` (-1:
  the last evaluation step every arm reached). Returns ({arm: {'eval/<x>': [seeds]}}, step)."""
  from experiments.report import per_seed
  records = {a: metrics_lib.read_metrics(os.path.join(workdir, a, "metrics.jsonl"))
             for a in ("warm_start", *arms)}
  evals = {a: {r["step"]: r for r in rs if r.get("eval/direct") is not None}
           for a, rs in records.items()}
  if step < 0:
    step = min(max(evals[a]) for a in arms)
  missing = [a for a in arms if step not in evals[a]]
  if missing:
    raise app.UsageError(f"--step={step}: arms {missing} have no evaluation at that step")
  keys = [f"eval/{c}" for c in COLUMNS]
  final = {"warm_start": {k: per_seed(evals["warm_start"][max(evals["warm_start"])], k)
                          for k in keys}}
  final.update({a: {k: per_seed(evals[a][step], k) for k in keys} for a in arms})
  return final, step


def main(argv):
  del argv
  config = cli.CONFIG.value
  if _REPORT_ONLY.value:
    final, step = from_runs(config.workdir, rlag.parse_arms(config.train.arms), _STEP.value)
    print(f"closed-book accuracy (%) after {step} steps per arm, "
          f"{len(final['warm_start']['eval/direct'])} seeds, mean ± 95% CI")
    print(table(final))
    if _PLOT.value:
      plot(final, _PLOT.value,
           f"Closed-book accuracy after {step} steps per arm, "
           f"{len(final['warm_start']['eval/direct'])} seeds, 95% CI "
           f"({config.env.num_entities} entities x {len(facts_lib.PROPERTIES)} facts)")
      print(f"plot: {_PLOT.value}")
    return
  try:
    runner = rlag.make_train(config)
  except ValueError as e:  # one line, exit 2, like the other programs
    cli.config_error(e)
  workdir = config.workdir
  os.makedirs(workdir, exist_ok=True)
  n = int(config.num_seeds)
  J = runner.jitted()
  t0 = time.time()
  keys = jax.random.split(jax.random.PRNGKey(int(config.seed)), n)
  k_init, k_warm, k_arm = (jax.vmap(lambda k, i=i: jax.random.fold_in(k, i))(keys)
                           for i in range(3))
  params, kbs = J["init"](k_init)
  params, warm_metrics = J["warm_start"](params, k_warm)
  warm_eval = _per_seed(J["evaluate"](params, kbs))
  with metrics_lib.MetricsWriter(os.path.join(workdir, "warm_start"), tensorboard=False) as w:
    losses = np.asarray(warm_metrics["loss"])  # [seeds, steps]
    for s in range(0, losses.shape[1], 20):
      w.write(s, _record({"warm/loss": list(losses[:, s])}))
    w.write(losses.shape[1], _record(warm_eval))
  print(f"warm start: {config.warm.steps} steps, {time.time() - t0:.0f} s; "
        + ", ".join(f"{k} {np.mean(v):.3f}" for k, v in warm_eval.items()), flush=True)

  final = {"warm_start": warm_eval}
  steps, every = int(config.train.steps), int(config.train.eval_every)
  for arm in runner.arms:
    t_arm = time.time()
    state = J["start_arm"](params, kbs, k_arm)
    with metrics_lib.MetricsWriter(os.path.join(workdir, arm), tensorboard=False) as w:
      w.write(0, _record(warm_eval))
      ev = warm_eval
      for step in range(every, steps + 1, every):
        state, m = J["arm_steps"][arm](state)
        ev = _per_seed(J["evaluate"](state.params, kbs))
        train = {f"train/{k}": list(np.asarray(v).mean(axis=1)) for k, v in m.items()}
        w.write(step, _record({**ev, **train}))
        print(f"{arm} step {step}: " + ", ".join(f"{k} {np.mean(v):.3f}"
                                                for k, v in {**ev, **train}.items()), flush=True)
    final[arm] = ev
    print(f"{arm}: {time.time() - t_arm:.0f} s", flush=True)

  wall = time.time() - t0
  text = table(final)
  print(text)
  print(f"wall time {wall:.0f} s for {n} seeds (vmapped)")
  with open(os.path.join(workdir, "results.json"), "w", encoding="utf-8") as f:
    json.dump({"final": final, "table": text, "wall_s": wall, "num_seeds": n,
               "config": config.to_dict()}, f, indent=1)
  if _PLOT.value:
    plot(final, _PLOT.value,
         f"Closed-book accuracy after {steps} steps per arm, {n} seeds, 95% CI "
         f"({config.env.num_entities} entities x {len(facts_lib.PROPERTIES)} facts)")
    print(f"plot: {_PLOT.value}")


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
