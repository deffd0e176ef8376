"""Scoring a trajectory batch: which tokens are trained on, and the shaped per-turn rewards.

The second stage of the train step (collect -> **score** -> advantages -> update), pure
functions of a `Trajectory` (`mtrl_jax.types`). Shapes: B rows, T tokens, K agent turns.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from mtrl_jax import vocab as V
from mtrl_jax.rl import advantages
from mtrl_jax.types import Trajectory


def written_mask(tokens: jax.Array) -> jax.Array:
  """[B, T] bool: positions up to each row's last non-pad token (padding only follows it).

  Searched from the end, so that a real token that has the pad id inside the stream (id 0 of a
  real tokenizer) is not taken for padding.
  """
  not_pad = tokens != V.PAD_ID
  return jnp.flip(jnp.cumsum(jnp.flip(not_pad, axis=1), axis=1), axis=1) > 0


def loss_mask(traj: Trajectory, *, mask_replies: bool = True,
              keep_truncated: bool = True) -> tuple[jax.Array, jax.Array]:
  """The tokens the policy loss (and KL, entropy, token metrics) is computed on.

  Args:
    traj: the batch.
    mask_replies: True (the default, the data contract): only the policy's sampled tokens
      (`traj.loss_mask`). False, the Search-R1 ablation: tool/user replies after the first
      agent turn enter the loss too (the prompt and padding never do).
    keep_truncated: False drops every token of truncated (overlong) episodes. The default keeps
      them: in RL for SWE agents, filtering them hid looping failures.

  Returns:
    (mask [B, T] bool, kept_rows [B] bool: rows that are trained on at all; the value mask is
     gated by it too).
  """
  B = traj.tokens.shape[0]
  mask = traj.loss_mask
  if not mask_replies:
    written = written_mask(traj.tokens)
    started = jnp.cumsum(traj.turn >= 0, axis=1) > 0
    mask = mask | (started & (traj.turn < 0) & written)
  kept_rows = ~traj.truncated if not keep_truncated else jnp.ones((B,), bool)
  return mask & kept_rows[:, None], kept_rows


def turn_spans(traj: Trajectory) -> tuple[jax.Array, jax.Array]:
  """(turn_start [B, K] int32: position of the first token of turn k (>= 1); last_turn [B]:
  index of each row's last valid turn, 0 for a row with none)."""
  K = traj.turn_end.shape[1]
  turn_len = jnp.sum(traj.turn[:, :, None] == jnp.arange(K), axis=1)  # [B, K]
  turn_start = jnp.maximum(traj.turn_end - turn_len + 1, 1)
  last_turn = jnp.maximum(jnp.sum(traj.turn_valid, axis=1) - 1, 0)
  return turn_start, last_turn


@flax.struct.dataclass
class Scored:
  """The scored batch.

  mask: [B, T] bool, the loss mask (`loss_mask`).
  kept_rows: [B] bool, rows trained on.
  rewards: [B, K] float32 per-turn rewards the advantages are computed from (environment
    reward + shaping, or the collector's override).
  returns: [B] float32 episode return: the sum of the valid turns' shaped environment rewards
    (before any override; what `train/return` reports and GRPO/RLOO/dynamic sampling use).
  gamma_turn: reward horizon for the turn-level estimator (static; 0 with an override).
  """

  mask: jax.Array
  kept_rows: jax.Array
  rewards: jax.Array
  returns: jax.Array
  gamma_turn: float = flax.struct.field(pytree_node=False)


def shaped_rewards(traj: Trajectory, mask: jax.Array, *, overlong_len: int = 0,
                   overlong_cache: int = 0, kl_tok: jax.Array | None = None,
                   kl_coef: float = 0.0) -> tuple[jax.Array, jax.Array]:
  """Per-turn rewards with shaping, and episode returns.

  * DAPO overlong shaping (`overlong_len > 0`): `advantages.overlong_penalty` of the row's
    sampled-token count, added to its last valid turn's reward.
  * KL in the reward (`kl_tok` given): `kl_coef` x the sum of turn k's per-token KL estimates
    over `mask` is subtracted from turn k's reward.

  Args:
    traj: the batch; mask: [B, T] bool (`loss_mask`); kl_tok: [B, T] per-token KL or None.

  Returns:
    (rewards [B, K] float32, returns [B] float32: the sum over valid turns).
  """
  K = traj.turn_valid.shape[1]
  rewards = traj.turn_reward
  _, last_turn = turn_spans(traj)
  last_onehot = jax.nn.one_hot(last_turn, K) * traj.turn_valid
  if overlong_len:
    penalty = advantages.overlong_penalty(jnp.sum(traj.loss_mask, axis=1), overlong_len,
                                          overlong_cache)
    rewards = rewards + penalty[:, None] * last_onehot
  if kl_tok is not None:
    kl_turn = jnp.sum(jnp.where(mask[:, :, None] & (traj.turn[:, :, None] == jnp.arange(K)),
                                kl_tok[:, :, None], 0.0), axis=1)
    rewards = rewards - kl_coef * kl_turn
  return rewards, jnp.sum(rewards * traj.turn_valid, axis=1)


def score(traj: Trajectory, algo, *, kl_tok: jax.Array | None = None,
          turn_reward_override: jax.Array | None = None) -> Scored:
  """The score stage: loss mask and shaped rewards of a batch, as `algo` configures them.

  Args:
    traj: the batch.
    algo: the `rl.config.AlgoConfig`; `mask_replies`, `keep_truncated`, `overlong_*`, `kl_coef` / `kl_in_reward`,
      `gamma_turn` are read.
    kl_tok: [B, T] per-token KL of the rollout policy to the reference (needed when
      `kl_coef > 0` and `kl_in_reward`).
    turn_reward_override: [B, K] or None, e.g. the multiturn-aware reward
      (`mtrl_jax.rl.collect.MultiturnAwareReward`): replaces the environment's reward of each
      turn (the shaping terms still add) with `gamma_turn = 0` semantics: each turn is credited
      with its own reward only. `returns` stays the environment's.
  """
  mask, kept_rows = loss_mask(traj, mask_replies=algo.mask_replies,
                              keep_truncated=algo.keep_truncated)
  in_reward = kl_tok if (algo.kl_coef and algo.kl_in_reward) else None
  rewards, returns = shaped_rewards(traj, mask, overlong_len=algo.overlong_len,
                                    overlong_cache=algo.overlong_cache, kl_tok=in_reward,
                                    kl_coef=algo.kl_coef)
  gamma_turn = algo.gamma_turn
  if turn_reward_override is not None:
    rewards = rewards - traj.turn_reward + turn_reward_override
    gamma_turn = 0.0
  return Scored(mask=mask, kept_rows=kept_rows, rewards=rewards, returns=returns,
                gamma_turn=gamma_turn)
