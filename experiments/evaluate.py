"""Evaluate a trained run with repeated sampling: `python -m experiments.evaluate
--config configs/<name>.py --run DIR [--instances 64] [--samples 10] [--out FILE]
[--config.<key>=<value> ...]`.

Loads the params of the latest checkpoint in `DIR` (every seed of a `num_seeds` run; without
`--run`, the config's initial params, e.g. a loaded Hugging Face checkpoint, and `--out`), plays
`--instances` environment instances `--samples` times each at the config's sampling temperature
(fixed keys: the same instances for every run and every environment variant that draws them
the same way), and reports per seed, after "LLMs Get Lost in Multi-Turn Conversation" (Laban et
al., 2025), with each episode scored 100 * success:

* `P`      average score over all episodes (performance),
* `A90`    per instance the 90th percentile of its samples' scores, averaged (aptitude),
* `U90_10` per instance 90th minus 10th percentile, averaged (unreliability),

plus the mean of every numeric `info` entry of the environment (`num_asks`, `first_turn_ask`,
`num_tool_calls`, `hops_found`, ...), `turns`, `out_of_context` (the rollout truncated the
episode for lack of context, not at the turn limit) and `think_tokens` (agent tokens inside a
`<think>` block per turn; 0 when the vocabulary has none). Environment overrides evaluate the
same policy on a variant, e.g. the fully specified clarify task:
`--config.env.fully_specified=True`. Prints one JSON object and
writes it to `--out` (default `DIR/eval.json`).
"""

from __future__ import annotations

import dataclasses
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from experiments import cli
from mtrl_jax import rollout as rollout_lib
from mtrl_jax import vocab as V

_RUN = flags.DEFINE_string("run", None, "Work directory of the trained run to evaluate (none: "
                           "the config's initial params, e.g. a loaded Hugging Face checkpoint; "
                           "then --out is required).")
_INSTANCES = flags.DEFINE_integer("instances", 64, "Environment instances.")
_SAMPLES = flags.DEFINE_integer("samples", 10, "Samples per instance.")
_OUT = flags.DEFINE_string("out", None,
                           "Output JSON (default RUN/eval.json; required without --run).")
flags.mark_flags_as_required(["config"])


def reliability(scores: np.ndarray) -> dict[str, float]:
  """scores: [instances, samples] in [0, 100] -> {'P', 'A90', 'U90_10'} (module doc)."""
  scores = np.asarray(scores, np.float64)
  if scores.ndim != 2 or scores.shape[1] < 2:
    raise ValueError(f"scores must be [instances, samples >= 2], got shape {scores.shape}")
  p90 = np.percentile(scores, 90, axis=1)
  p10 = np.percentile(scores, 10, axis=1)
  return {"P": float(scores.mean()), "A90": float(p90.mean()),
          "U90_10": float((p90 - p10).mean())}


def think_tokens(traj, vocab) -> jax.Array:
  """[B] float32: agent-turn tokens strictly inside a `<think> ... </think>` block (a block
  left open ends with its turn). 0 when the vocabulary has no `<think>`."""
  if V.THINK_OPEN not in vocab:
    return jnp.zeros(traj.tokens.shape[:1], jnp.float32)
  tok, agent = traj.tokens, traj.turn >= 0
  idx = jnp.broadcast_to(jnp.arange(tok.shape[1]), tok.shape)
  is_open = agent & (tok == vocab.id(V.THINK_OPEN))
  is_close = agent & (tok == vocab.id(V.THINK_CLOSE))
  last_open = jax.lax.cummax(jnp.where(is_open, idx, -1), axis=1)
  last_open = jnp.pad(last_open, ((0, 0), (1, 0)), constant_values=-1)[:, :-1]   # before t
  last_end = jax.lax.cummax(jnp.where(is_close | ~agent, idx, -1), axis=1)        # up to t
  return jnp.sum(agent & (last_open > last_end), axis=1).astype(jnp.float32)


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  config = cli.CONFIG.value
  path = cli.output_path(_OUT.value, _RUN.value, "eval.json")
  n, g = int(_INSTANCES.value), int(_SAMPLES.value)
  if n < 1 or g < 2:
    sys.exit(f"error: --instances must be >= 1 and --samples >= 2, got {n} and {g}")
  trainer, state, vmap = cli.trained_run(config, _RUN.value)
  seeds = int(config.train.num_seeds)
  try:
    play = rollout_lib.make_rollout(trainer.env, trainer.model_config, dataclasses.replace(
        trainer.rollout_config, num_envs=n, group_size=g, greedy=False))
  except ValueError as e:
    sys.exit(f"error: {e}")

  def episodes(params):
    traj = play(params["policy"], jax.random.key(config.seed + 3), trainer.env_params)
    info = {k: v.astype(jnp.float32) for k, v in traj.info.items() if v.ndim == 1}
    info["turns"] = jnp.sum(traj.turn_valid, axis=1).astype(jnp.float32)
    info["out_of_context"] = (traj.truncated & ~traj.info["truncated"]).astype(jnp.float32)
    info["think_tokens"] = think_tokens(traj, trainer.env.vocab) / jnp.maximum(info["turns"], 1)
    return info

  info = jax.device_get(jax.jit(vmap(episodes))(state.params))
  if seeds == 1:
    info = {k: v[None] for k, v in info.items()}
  per_seed = []
  for s in range(seeds):
    row = reliability(100.0 * info["success"][s].reshape(n, g))
    row.update({k: float(np.mean(v[s])) for k, v in info.items()})
    per_seed.append(row)
  out = {"run": _RUN.value, "env": config.env.to_dict(), "instances": n, "samples": g,
         "temperature": float(trainer.rollout_config.temperature), "per_seed": per_seed,
         "mean": {k: float(np.mean([r[k] for r in per_seed])) for k in per_seed[0]}}
  with open(path, "w") as f:
    json.dump(out, f, indent=1)
  print(json.dumps(out["mean"]))
  print(f"wrote {path}")


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
