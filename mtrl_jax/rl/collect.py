"""Collection strategies: how the train step gets its batch of episodes.

The first stage of the train step (**collect** -> score -> advantages -> update). A strategy is
chosen once, when the trainer is built (`make_collector(config, ...)`), and the train step
calls it without branching on which one it is:

    collected = collect(policy_params, reset_keys [B], sample_keys [B], env_params)
    # collected.traj: the Trajectory batch to train on
    # collected.turn_reward: [B', K] per-turn reward override, or None
    # collected.metrics: extra `train/*` metrics of the strategy

* `PlainRollout`: one episode per row, `rollout.rows` (the default).
* `ReflexionTrials` (`config.reflexion.train_trials = N > 1`): N Reflexion trials of the same
  tasks with episodic memory of the failed trials' reflections in the prompt
  (`mtrl_jax.reflexion`); the update trains on all N*B episodes (meta-training a policy to use
  its memory). Metrics: success of the first and last trial, solved in any trial.
* `MultiturnAwareReward` (`config.algo.mr_window = w > 0`, CollabLLM): the plain rollout, then
  every turn k of every row is continued `mr_samples` times by the current policy and the
  environment for w more turns (w >= K: to the end), from the replayed conversation through
  turn k, in one more batched rollout of B*K*S rows inside the same jitted step
  (`rollout.multiturn_aware_reward`). MR[b, k] = mean over the continuations of their rewards
  of turns k .. k+w replaces the environment's per-turn reward (`rl.scoring.score`: shaping
  terms still add, `gamma_turn = 0` semantics), against the turn-level critic
  (`advantage='turn_gae'`, required). Metric: `train/mr_mean`, the mean MR over valid turns.
  Cost: ~K*S extra rollouts per step.

The batch is the global one. On a device mesh (`mtrl_jax.sharding`) each strategy plays its
episodes with `partitioning.local_rows`: every device rolls out its own rows (a `shard_map` over
the mesh, the params gathered once on entry), and the metrics are computed afterwards from the
global rows.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp

from jax.sharding import PartitionSpec as P

from mtrl_jax import reflexion as reflexion_lib
from mtrl_jax import rollout as rollout_lib
from mtrl_jax.models.partitioning import AXES, local_rows
from mtrl_jax.rl.config import section_dict
from mtrl_jax.types import Trajectory

REFLEXION_KEYS = ("train_trials", "memory", "reflection", "reflection_len")


@flax.struct.dataclass
class Collected:
  """traj: the batch to train on; turn_reward: [B, K] float32 per-turn reward that replaces the
  environment's (None: keep it); metrics: {name: [] float32} extra metrics."""

  traj: Trajectory
  turn_reward: jax.Array | None
  metrics: dict[str, jax.Array]


class PlainRollout:
  """One episode per row with the current policy."""

  def __init__(self, rollout: rollout_lib.Rollout):
    self.rollout = rollout

  def __call__(self, params, reset_keys, sample_keys, env_params) -> Collected:
    rows = lambda p, r, s: self.rollout.rows(p, r, s, env_params)
    traj = local_rows(rows, (False, True, True))(params, reset_keys, sample_keys)
    return Collected(traj=traj, turn_reward=None, metrics={})


class ReflexionTrials:
  """N Reflexion trials per task; all N*B episodes are trained on (module docstring).

  `play` is `mtrl_jax.reflexion.make_reflexion(..., keep_trajectories=True)`."""

  def __init__(self, play: Callable[..., reflexion_lib.ReflexionResult]):
    self.play = play

  def __call__(self, params, reset_keys, sample_keys, env_params) -> Collected:
    play = lambda p, r, s: self.play(p, r, s, env_params)
    # leaves [N trials, B rows, ...]: flattened below, over the global rows (trial-major)
    trials = local_rows(play, (False, True, True), P(None, AXES))(params, reset_keys,
                                                                  sample_keys)
    n_rows = trials.success.shape[1]
    metrics = {
        "train/success_first_trial": jnp.sum(trials.success[0]) / n_rows,
        "train/success_last_trial": jnp.sum(trials.success[-1]) / n_rows,
        "train/solved_any_trial": jnp.sum(trials.solved[-1]) / n_rows,
    }
    return Collected(traj=reflexion_lib.flatten_trials(trials.trajs), turn_reward=None,
                     metrics=metrics)


class MultiturnAwareReward:
  """The plain rollout plus CollabLLM's multiturn-aware reward per turn (module docstring)."""

  def __init__(self, rollout: rollout_lib.Rollout, *, window: int, samples: int):
    self.rollout, self.window, self.samples = rollout, int(window), int(samples)

  def __call__(self, params, reset_keys, sample_keys, env_params) -> Collected:

    def play(p, r, s):
      traj = self.rollout.rows(p, r, s, env_params)
      mr, _ = rollout_lib.multiturn_aware_reward(
          self.rollout, p, traj, r, s, window=self.window, samples=self.samples,
          env_params=env_params)
      return traj, mr

    traj, mr = local_rows(play, (False, True, True))(params, reset_keys, sample_keys)
    mr = jax.lax.stop_gradient(mr)
    metrics = {"train/mr_mean": (jnp.sum(jnp.where(traj.turn_valid, mr, 0.0))
                                 / jnp.maximum(jnp.sum(traj.turn_valid), 1))}
    return Collected(traj=traj, turn_reward=mr, metrics=metrics)


def reflexion_settings(config) -> dict[str, Any] | None:
  """`config.reflexion` (optional) -> `make_reflexion` kwargs, or None when off.

  train_trials: trials per RL episode (1 = off: ordinary episodes); memory: Omega reflections
  kept; reflection: 'template' | 'action' | 'policy' (`mtrl_jax.reflexion`); reflection_len:
  tokens per reflection (0 = the environment's length for 'template' / 'action', 8 for
  'policy')."""
  section = config.get("reflexion", None)
  if section is None:
    return None
  kwargs = section_dict(section)
  unknown = sorted(set(kwargs) - set(REFLEXION_KEYS))
  if unknown:
    raise ValueError(f"config.reflexion: unknown keys {unknown}; valid keys: "
                     f"{list(REFLEXION_KEYS)}")
  trials = kwargs.get("train_trials", 1)
  if not isinstance(trials, int) or trials < 1:
    raise ValueError(f"config.reflexion.train_trials must be an integer >= 1, got {trials!r}")
  if trials == 1:
    return None
  return dict(trials=trials, memory=kwargs.get("memory", 1),
              reflection=kwargs.get("reflection", "template"),
              reflection_len=kwargs.get("reflection_len", 0) or None)


def make_collector(config, env, model_config, rollout_config: rollout_lib.RolloutConfig,
                   rollout: rollout_lib.Rollout, algo):
  """The collection strategy `config` asks for (errors name the setting).

  Args:
    config: the whole config (`config.reflexion` is read).
    env, model_config: the environment and the policy's model.
    rollout_config: the rollout settings; rollout: the rollout built from them.
    algo: the `AlgoConfig` (`mr_window`, `mr_samples`).
  """
  meta = reflexion_settings(config)
  if meta:  # meta-training on multi-trial episodes with episodic memory (mtrl_jax.reflexion)
    if algo.mr_window:
      raise ValueError("config.reflexion.train_trials > 1 cannot be combined with "
                       "config.algo.mr_window (multiturn-aware reward)")
    try:
      play = reflexion_lib.make_reflexion(env, model_config, rollout_config,
                                          keep_trajectories=True, **meta)
    except ValueError as e:
      raise ValueError(f"config.reflexion: {e}") from None
    return ReflexionTrials(play)
  if algo.mr_window:
    return MultiturnAwareReward(rollout, window=algo.mr_window, samples=algo.mr_samples)
  return PlainRollout(rollout)
