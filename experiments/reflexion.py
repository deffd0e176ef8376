"""Reflexion evaluation of a trained run: `python -m experiments.reflexion --config
configs/<name>.py --run DIR [--trials 5] [--memory 0,1,3] [--instances 128]
[--reflection template|policy] [--out FILE] [--config.<key>=<value> ...]`.

Loads the params of the latest checkpoint in `DIR` (every seed of a `num_seeds` run; without
`--run`, the config's initial params: a loaded Hugging Face checkpoint, e.g.
`--config configs/hf_calculator_grpo.py --config.model.checkpoint=/ckpt/Qwen2.5-0.5B-Instruct
--reflection policy --out reflexion.json`) and plays
`--instances` tasks for `--trials` trials with episodic memory of the last Omega reflections,
for each Omega in `--memory` (`mtrl_jax.reflexion`; no weight update). Trials sample at the
config's rollout temperature (fixed keys: the same tasks for every run and every Omega).
Reports per seed and Omega:

* `solved[n]`   fraction of tasks solved in some trial <= n (Reflexion's success curve;
                with Omega = 0 this is pass@n of independent retries, the baseline),
* `success[n]`  the success rate of trial n itself.

Prints one line per Omega and writes JSON to `--out` (default `DIR/reflexion.json`).
"""

from __future__ import annotations

import dataclasses
import json
import sys

import jax
import numpy as np
from absl import app, flags, logging

from experiments import cli
from mtrl_jax import reflexion as reflexion_lib
from mtrl_jax import rollout as rollout_lib

_RUN = flags.DEFINE_string("run", None, "Work directory of the trained run to evaluate (none: "
                           "the config's initial params, e.g. a loaded Hugging Face checkpoint; "
                           "then --out is required).")
_TRIALS = flags.DEFINE_integer("trials", 5, "Trials per task.")
_MEMORY = flags.DEFINE_list("memory", ["0", "1", "3"], "Omega values: reflections kept.")
_INSTANCES = flags.DEFINE_integer("instances", 128, "Tasks.")
_REFLECTION = flags.DEFINE_enum("reflection", "template", list(reflexion_lib.REFLECTIONS),
                                "Who writes the reflections.")
_OUT = flags.DEFINE_string("out", None,
                           "Output JSON (default RUN/reflexion.json; required without --run).")
flags.mark_flags_as_required(["config"])


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  config = cli.CONFIG.value
  path = cli.output_path(_OUT.value, _RUN.value, "reflexion.json")
  try:
    memories = [int(m) for m in _MEMORY.value]
  except ValueError:
    sys.exit(f"error: --memory must be a comma-separated list of integers, got {_MEMORY.value}")
  n, trials = int(_INSTANCES.value), int(_TRIALS.value)
  if n < 1 or trials < 1 or any(m < 0 for m in memories):
    sys.exit(f"error: --instances and --trials must be >= 1 and --memory >= 0, got {n}, "
             f"{trials}, {memories}")
  trainer, state, vmap = cli.trained_run(config, _RUN.value)
  seeds = int(config.train.num_seeds)
  reset_keys, sample_keys = rollout_lib.rollout_keys(jax.random.key(config.seed + 5), n, 1)
  rc = dataclasses.replace(trainer.rollout_config, num_envs=n, group_size=1, greedy=False)
  out = {"run": _RUN.value, "env": config.env.to_dict(), "instances": n, "trials": trials,
         "reflection": _REFLECTION.value, "temperature": float(rc.temperature), "memory": {}}
  for m in memories:
    try:
      run = reflexion_lib.make_reflexion(trainer.env, trainer.model_config, rc, trials=trials,
                                         memory=m, reflection=_REFLECTION.value)
    except ValueError as e:
      sys.exit(f"error: {e}")

    def curves(params, run=run):
      r = run(params["policy"], reset_keys, sample_keys, trainer.env_params)
      return r.solved.mean(axis=1), r.success.mean(axis=1)  # [trials] each

    solved, success = jax.device_get(jax.jit(vmap(curves))(state.params))
    if seeds == 1:
      solved, success = solved[None], success[None]
    out["memory"][str(m)] = {"solved": np.asarray(solved).tolist(),
                             "success": np.asarray(success).tolist()}
    print(f"memory={m}: solved by trial " + " ".join(
        f"{x:.3f}" for x in np.mean(solved, axis=0)) + "  (mean over seeds)", flush=True)
  with open(path, "w") as f:
    json.dump(out, f, indent=1)
  print(f"wrote {path}")


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
