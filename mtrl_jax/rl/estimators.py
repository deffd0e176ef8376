"""Advantage estimators placed on tokens: one function and one table entry each.

The third stage of the train step (collect -> score -> **advantages** -> update). Every
estimator has the same signature,

    estimator(traj, scored, values, *, algo, group_size) -> TokenTargets

(`algo` an `rl.config.AlgoConfig`) and is looked up by name in `ESTIMATORS`
(`config.algo.advantage`); adding one is one function
and one `ESTIMATORS` entry, never an edit of the train step. The math lives in
`mtrl_jax.rl.advantages`; this module decides *where* per-turn and per-token quantities sit on
the token stream, which is where an off-by-one would hide:

* a critic's value at position t (`values[:, t]`, computed from `tokens[:, :t+1]`) is the value
  of the state *after* token t, i.e. of the state in which token t+1 is chosen;
* `turn_gae`: turn k is one decision, taken in the state before its first token, so its value
  is read at `turn_start[k] - 1` and its value target is written there (`v_mask`); every
  trained token of turn k gets the turn's advantage (a reply token, with `mask_replies=False`,
  gets the advantage of the turn it answers);
* `token_gae`: each sampled token is a decision whose value sits at `t - 1`; the turn's reward
  arrives at its last token `turn_end[k]`;
* `grpo` / `rloo`: one scalar per row, on every token; no critic (`v_mask` all False).

Shapes: B rows, T tokens, K agent turns, G rollouts per group.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp

from mtrl_jax.rl import advantages
from mtrl_jax.rl.scoring import Scored, turn_spans
from mtrl_jax.types import Trajectory


@flax.struct.dataclass
class TokenTargets:
  """adv: [B, T] float32 per-token advantage (0 where no token is trained is not required:
  the caller masks); v_target: [B, T] float32 value regression targets; v_mask: [B, T] bool,
  where the value loss applies."""

  adv: jax.Array
  v_target: jax.Array
  v_mask: jax.Array


def _after_last_turn(traj: Trajectory) -> jax.Array:
  """[B] the value after a row's last turn: 0, whether the episode terminated or was truncated.

  A truncated episode ended at the environment's turn limit (or the rollout's context budget):
  it cannot go on, so nothing more can be earned after its last turn. Bootstrapping there from
  the critic, as before, used a value at a position no target ever trains (the token after a
  row's last one), i.e. an untrained critic output, as the return of every truncated episode.
  """
  return jnp.zeros(traj.done.shape, jnp.float32)


def turn_gae_targets(traj: Trajectory, scored: Scored, values: jax.Array, *, algo: Any,
                     group_size: int) -> TokenTargets:
  """Turn-level GAE (the trajectory-level critic): one decision per agent turn.

  Args:
    traj: the batch; scored: its `Scored` (mask, per-turn rewards, gamma_turn).
    values: [B, T] critic values of the rollout params (no gradient).
    algo: `lam` is read; group_size: unused.
  """
  del group_size
  B, T = traj.tokens.shape
  K = traj.turn_end.shape[1]
  turn_start, _ = turn_spans(traj)
  v_pos = turn_start - 1  # the token before a turn: the state the agent acts from
  turn_values = jnp.take_along_axis(values, v_pos, axis=1)
  adv_turn, ret_turn = advantages.turn_gae(scored.rewards, turn_values, traj.turn_valid,
                                           traj.done, _after_last_turn(traj),
                                           scored.gamma_turn, algo.lam)
  # Each trained token takes the advantage of its turn; with mask_replies=False a reply token
  # takes the advantage of the turn it answers (the last turn before it).
  owner = jnp.where(scored.mask, jax.lax.cummax(traj.turn, axis=1), -1)
  adv = advantages.broadcast_to_tokens(adv_turn, owner)
  rows = jnp.broadcast_to(jnp.arange(B)[:, None], (B, K))
  v_pos_w = jnp.where(traj.turn_valid, v_pos, T)  # T: out of range, the write is dropped
  v_mask = jnp.zeros((B, T), bool).at[rows, v_pos_w].set(True, mode="drop")
  v_target = jnp.zeros((B, T)).at[rows, v_pos_w].set(ret_turn, mode="drop")
  return TokenTargets(adv=adv, v_target=v_target, v_mask=v_mask)


def token_gae_targets(traj: Trajectory, scored: Scored, values: jax.Array, *, algo: Any,
                      group_size: int) -> TokenTargets:
  """Token-level GAE over the trained tokens, carried across masked (reply) tokens.

  The reward of turn k sits on its last token `turn_end[k]`; the value predicting token t's
  return is the critic's output at t - 1, so the value targets are shifted one to the left.
  """
  del group_size
  B, T = traj.tokens.shape
  K = traj.turn_end.shape[1]
  mask = scored.mask
  tok_rewards = jnp.zeros((B, T)).at[
      jnp.broadcast_to(jnp.arange(B)[:, None], (B, K)),
      jnp.where(traj.turn_valid, traj.turn_end, T)].add(scored.rewards, mode="drop")
  prev_values = jnp.concatenate([jnp.zeros((B, 1)), values[:, :-1]], axis=1)
  adv, ret = advantages.token_gae(tok_rewards, prev_values, mask, scored.gamma_turn, algo.lam,
                                  traj.done, _after_last_turn(traj))
  v_mask = jnp.concatenate([mask[:, 1:], jnp.zeros((B, 1), bool)], axis=1)
  v_target = jnp.concatenate([ret[:, 1:], jnp.zeros((B, 1))], axis=1)
  return TokenTargets(adv=adv, v_target=v_target, v_mask=v_mask)


def _sequence_targets(seq_adv: jax.Array, T: int) -> TokenTargets:
  B = seq_adv.shape[0]
  return TokenTargets(adv=jnp.broadcast_to(seq_adv[:, None], (B, T)),
                      v_target=jnp.zeros((B, T)), v_mask=jnp.zeros((B, T), bool))


def grpo_targets(traj: Trajectory, scored: Scored, values: jax.Array, *, algo: Any,
                 group_size: int) -> TokenTargets:
  """GRPO (Dr.GRPO with `algo.scale_by_std=False`): the group-normalised return of the row on
  every token; no critic."""
  del values
  seq_adv = advantages.group_advantages(scored.returns, group_size,
                                        scale_by_std=algo.scale_by_std)
  return _sequence_targets(seq_adv, traj.tokens.shape[1])


def rloo_targets(traj: Trajectory, scored: Scored, values: jax.Array, *, algo: Any,
                 group_size: int) -> TokenTargets:
  """RLOO: the row's return minus the mean of the other rows of its group, on every token."""
  del values, algo
  return _sequence_targets(advantages.rloo_advantages(scored.returns, group_size),
                           traj.tokens.shape[1])


@dataclasses.dataclass(frozen=True)
class Estimator:
  """An entry of `ESTIMATORS`.

  fn: the estimator (signature in the module docstring).
  uses_critic: it reads the critic's values (then `algo.normalize_adv` batch-normalises its
    advantages; group estimators are normalised within their groups already).
  min_group_size: the smallest `rollout.group_size` it works with.
  """

  fn: Callable[..., TokenTargets]
  uses_critic: bool
  min_group_size: int = 1


ESTIMATORS: dict[str, Estimator] = {
    "turn_gae": Estimator(turn_gae_targets, uses_critic=True),
    "token_gae": Estimator(token_gae_targets, uses_critic=True),
    "grpo": Estimator(grpo_targets, uses_critic=False, min_group_size=2),
    "rloo": Estimator(rloo_targets, uses_critic=False, min_group_size=2),
}


def normalize(adv: jax.Array, mask: jax.Array, reduce: Callable = lambda x: x) -> jax.Array:
  """Batch-normalise `adv` [B, T] over `mask` [B, T]: mean 0, std 1 over the *global* batch
  (`reduce` sums a device's partial sums over the data axis; identity on one device)."""
  n = jnp.maximum(reduce(jnp.sum(mask)), 1)
  mean = reduce(jnp.sum(jnp.where(mask, adv, 0.0))) / n
  std = jnp.sqrt(reduce(jnp.sum(jnp.where(mask, (adv - mean) ** 2, 0.0))) / n)
  return (adv - mean) / (std + 1e-6)


def group_weights(returns: jax.Array, group_size: int, *, dynamic_sampling: bool,
                  reduce: Callable = lambda x: x,
                  global_rows: int | None = None) -> tuple[jax.Array, jax.Array]:
  """Row weights of DAPO dynamic sampling, and the fraction of groups with any signal.

  Groups whose returns are all equal carry no GRPO/RLOO signal (DAPO's motivation): their
  fraction is reported always; `dynamic_sampling` also weights them out
  (`advantages.dynamic_sampling_weights`). Sharded (`global_rows` = rows of the global batch),
  the kept rows are renormalised over the global batch, not this device's.

  Returns:
    (weights [B] float32, 1 without dynamic sampling; frac_kept [] float32, this device's).
  """
  B = returns.shape[0]
  weights, frac_kept = jnp.ones((B,)), jnp.float32(1.0)
  if group_size > 1:
    ds_weights, frac_kept = advantages.dynamic_sampling_weights(returns, group_size)
    if dynamic_sampling:
      weights = ds_weights
      if global_rows is not None:
        kept = weights > 0
        num_kept = reduce(jnp.sum(kept))
        weights = jnp.where(kept, global_rows / jnp.maximum(num_kept, 1).astype(jnp.float32),
                            0.0)
  return weights, frac_kept
