"""Returns and advantages for multi-turn RL: turn- and token-level GAE, GRPO, RLOO, DAPO shaping.

Small pure functions over the `Trajectory` arrays (see `mtrl_jax.types`); all are jittable, with
no Python control flow on traced values. Shapes: B episodes (rows), T tokens, K agent turns,
G rollouts per group. Rewards are in the environment's reward units; advantages and returns are
in the same units (except `group_advantages` with `scale_by_std`, which is unitless).

Two time axes:

* **Turns** ([B, K]): one decision per agent turn, `values[b, k]` the trajectory-level critic's
  value of the state at which turn k starts. `turn_gae` with `gamma = gamma_turn` is the reward
  horizon knob of the design: `gamma = 0` is the myopic next-turn baseline (advantage
  `r_k - V_k`), `gamma ~ 1` credits every turn with the rest of the trajectory. Broadcast the
  per-turn result to tokens with `broadcast_to_tokens(adv, traj.turn)`.
* **Tokens** ([B, T]): one decision per sampled token (`loss_mask`). `token_gae` skips the
  unmasked tokens (tool/user replies, prompt, padding, forced tokens): the next state of a
  sampled token is the next *sampled* token of the row, so the recursion carries across replies.

Both are the same masked reverse recursion (`_masked_gae`) along the last axis, on a mask of
decision points: `turn_gae` is it with `mask = turn_valid`.

Group baselines (GRPO, Dr.GRPO, RLOO) and DAPO dynamic sampling act on one scalar return per
row, groups being contiguous rows `g*G .. g*G+G-1` (the layout of `rollout`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _masked_gae(rewards: jax.Array, values: jax.Array, mask: jax.Array, gamma, lam,
                last_value: jax.Array) -> tuple[jax.Array, jax.Array]:
  """GAE along the last axis over the positions where `mask` is True; a reverse `lax.scan`.

  Args:
    rewards: [B, N] reward at each position. A reward on an unmasked position is credited,
      undiscounted, to the nearest masked position before it (rewards before the first masked
      position of a row are dropped).
    values: [B, N] value of the state at each masked position (ignored where unmasked).
    mask: [B, N] bool, decision points.
    gamma, lam: scalars (Python floats or traced).
    last_value: [B] value of the state after the last masked position of each row.

  Returns:
    (advantages [B, N], returns [B, N]), both 0 where `mask` is False; returns = adv + values.
  """
  rewards = jnp.asarray(rewards, jnp.float32)
  values = jnp.asarray(values, jnp.float32)
  mask = jnp.asarray(mask, bool)
  batch = rewards.shape[0]

  def step(carry, x):
    next_value, next_adv, pending = carry
    r, v, m = x
    delta = r + pending + gamma * next_value - v
    adv = delta + gamma * lam * next_adv
    carry = (jnp.where(m, v, next_value), jnp.where(m, adv, next_adv),
             jnp.where(m, 0.0, pending + r))
    return carry, jnp.where(m, adv, 0.0)

  init = (jnp.broadcast_to(jnp.asarray(last_value, jnp.float32), (batch,)),
          jnp.zeros((batch,), jnp.float32), jnp.zeros((batch,), jnp.float32))
  xs = (rewards.T, values.T, mask.T)
  _, adv = jax.lax.scan(step, init, xs, reverse=True)
  adv = adv.T
  return adv, jnp.where(mask, adv + values, 0.0)


def _terminal_value(done: jax.Array, bootstrap: jax.Array) -> jax.Array:
  """[B] value after the last decision: 0 if the episode terminated, else `bootstrap`."""
  return jnp.where(jnp.asarray(done, bool), 0.0, jnp.asarray(bootstrap, jnp.float32))


def discounted_returns(rewards: jax.Array, valid: jax.Array, gamma) -> jax.Array:
  """Monte-Carlo return-to-go over the valid turns, no bootstrap.

  `G[b, k] = r[b, k] + gamma * G[b, k']` with k' the next valid turn after k (0 after the last).

  Args:
    rewards: [B, K] reward after each turn.
    valid: [B, K] bool, turn happened (a prefix per the data contract; invalid turns in the
      middle are skipped, and their rewards ignored).
    gamma: discount per turn (scalar, may be traced).

  Returns:
    [B, K] float32 returns in reward units, 0 on invalid turns.
  """
  rewards = jnp.where(valid, rewards, 0.0)
  _, returns = _masked_gae(rewards, jnp.zeros_like(rewards), valid, gamma, 1.0,
                           jnp.zeros(rewards.shape[:1], jnp.float32))
  return returns


def turn_gae(rewards: jax.Array, values: jax.Array, valid: jax.Array, done: jax.Array,
             bootstrap: jax.Array, gamma, lam) -> tuple[jax.Array, jax.Array]:
  """Generalised advantage estimation over agent turns (the trajectory-level critic).

  With k' the next valid turn after k:
    `delta_k = r_k + gamma * V_{k'} - V_k`,  `A_k = delta_k + gamma * lam * A_{k'}`;
  after the last valid turn `V_next = 0` if `done` (terminated) else `bootstrap` (truncated:
  the critic's value of the state after the last turn) and `A_next = 0`.

  `gamma` is the reward horizon `gamma_turn`: 0 gives `A_k = r_k - V_k` (next-turn reward only),
  ~1 the whole remaining trajectory. `lam = 1` gives Monte-Carlo `A_k = G_k - V_k`.

  Args:
    rewards: [B, K] reward after each turn (`turn_reward`); ignored on invalid turns.
    values: [B, K] critic value of the state at which turn k starts.
    valid: [B, K] bool (`turn_valid`).
    done: [B] bool, the episode terminated.
    bootstrap: [B] float, value after the last valid turn, used where `done` is False.
    gamma, lam: scalars in [0, 1] (may be traced, e.g. vmapped over a sweep).

  Returns:
    (advantages [B, K], returns [B, K]) float32, reward units; `returns = advantages + values`
    (the critic's regression target); both 0 on invalid turns. A row with no valid turn is all 0.
  """
  rewards = jnp.where(valid, rewards, 0.0)
  return _masked_gae(rewards, values, valid, gamma, lam, _terminal_value(done, bootstrap))


def token_gae(rewards: jax.Array, values: jax.Array, mask: jax.Array, gamma, lam,
              done: jax.Array, bootstrap: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Token-level GAE whose decision points are the sampled tokens; it carries across replies.

  With t' the next position after t where `mask` is True (skipping tool/user replies, forced
  tokens and padding):
    `delta_t = r_t + gamma * V_{t'} - V_t`,  `A_t = delta_t + gamma * lam * A_{t'}`;
  after the row's last masked token `V_next = 0` if `done` else `bootstrap`, `A_next = 0`.

  Rewards normally sit on masked tokens (a turn's last sampled token). A reward on an unmasked
  position (e.g. `turn_end` when the turn's `<eot>` was forced, hence unmasked) is credited,
  undiscounted, to the nearest masked token before it: replies are not time steps. Rewards
  before the first masked token of a row are dropped.

  Args:
    rewards: [B, T] float reward per token.
    values: [B, T] float critic value per token (read only on masked tokens).
    mask: [B, T] bool decision points (`loss_mask`).
    gamma, lam: scalars, discount and GAE lambda per *sampled token* (may be traced).
    done: [B] bool, the episode terminated.
    bootstrap: [B] float, value after the last sampled token, used where `done` is False.

  Returns:
    (advantages [B, T], returns [B, T]) float32, reward units, 0 on unmasked positions;
    `returns = advantages + values` on masked positions. Implemented as one reverse
    `lax.scan` over T.
  """
  return _masked_gae(rewards, values, mask, gamma, lam, _terminal_value(done, bootstrap))


def broadcast_to_tokens(x: jax.Array, turn: jax.Array) -> jax.Array:
  """Per-turn values to the tokens of each turn.

  Args:
    x: [B, K] per-turn quantity (advantage, return, value ...).
    turn: [B, T] int turn id of each token (`Trajectory.turn`), -1 outside agent turns.

  Returns:
    [B, T] with `out[b, t] = x[b, turn[b, t]]` where `turn >= 0`, else 0; dtype of `x`.
  """
  x = jnp.asarray(x)
  idx = jnp.clip(turn, 0, x.shape[-1] - 1)
  out = jnp.take_along_axis(x, idx, axis=-1)
  return jnp.where(turn >= 0, out, jnp.zeros((), x.dtype))


def _groups(x: jax.Array, group_size: int) -> jax.Array:
  """[B] -> [B // G, G], checking statically that G divides B."""
  batch = x.shape[0]
  if group_size < 1 or batch % group_size:
    raise ValueError(f"group_size={group_size} must be >= 1 and divide the batch size {batch}")
  return jnp.asarray(x, jnp.float32).reshape(batch // group_size, group_size)


def group_advantages(returns: jax.Array, group_size: int, *, scale_by_std: bool = True,
                     eps: float = 1e-6) -> jax.Array:
  """GRPO group-normalised advantages (Dr.GRPO with `scale_by_std=False`).

  `A_i = (R_i - mean_g R) / (std_g R + eps)` over the group g of row i (contiguous rows of size
  G), or `A_i = R_i - mean_g R` without the std scaling.

  The std is the *population* std (divide by G, ddof=0): defined for G = 1 and equal to the
  maximum-likelihood scale. TRL and verl use the sample std (G - 1, `torch.std`), which makes
  every advantage smaller by the constant factor sqrt((G - 1) / G) -- the same as a learning
  rate change for an unclipped step. A group whose returns are all equal gets advantage 0.

  Args:
    returns: [B] scalar return per row.
    group_size: G, static; must divide B.
    scale_by_std: divide by the group std.
    eps: added to the std.

  Returns:
    [B] float32 advantages (unitless if scaled, else reward units).
  """
  g = _groups(returns, group_size)
  centred = g - jnp.mean(g, axis=-1, keepdims=True)
  if scale_by_std:
    centred = centred / (jnp.std(g, axis=-1, keepdims=True) + eps)
  return centred.reshape(-1)


def rloo_advantages(returns: jax.Array, group_size: int) -> jax.Array:
  """REINFORCE leave-one-out: `A_i = R_i - mean_{j != i in group} R_j`.

  Args:
    returns: [B] scalar return per row.
    group_size: G >= 2, static; must divide B.

  Returns:
    [B] float32 advantages in reward units (`= G / (G - 1) * (R_i - mean_g R)`).
  """
  if group_size < 2:
    raise ValueError(f"rloo_advantages needs group_size >= 2, got {group_size}")
  g = _groups(returns, group_size)
  others = (jnp.sum(g, axis=-1, keepdims=True) - g) / (group_size - 1)
  return (g - others).reshape(-1)


def dynamic_sampling_weights(returns: jax.Array, group_size: int,
                             eps: float = 1e-6) -> tuple[jax.Array, jax.Array]:
  """DAPO dynamic sampling with fixed shapes: zero-variance groups weighted out.

  A group is dropped when all its returns are equal (max - min <= eps): its group-normalised
  advantages are all 0, so it only dilutes the batch. Kept rows share the weight so that the
  weights average to 1 over the batch: `w_i = B / (number of kept rows)` on kept rows. If no
  group is kept every weight is 0 (no NaN). Multiply per-token losses (or advantages) by
  `broadcast` weights; with `aggregate(..., "token_mean")` pass the weighted token count.

  Args:
    returns: [B] scalar return per row.
    group_size: G, static; must divide B.
    eps: tolerance for "all equal", in reward units.

  Returns:
    (weights [B] float32, frac_kept [] float32 fraction of groups kept).
  """
  g = _groups(returns, group_size)
  kept = (jnp.max(g, axis=-1) - jnp.min(g, axis=-1)) > eps                   # [B // G]
  num_kept = jnp.sum(kept)
  batch = returns.shape[0]
  scale = batch / jnp.maximum(num_kept * group_size, 1).astype(jnp.float32)
  weights = jnp.repeat(jnp.where(kept, scale, 0.0), group_size)
  return weights, jnp.mean(kept.astype(jnp.float32))


def overlong_penalty(lengths: jax.Array, max_len: int, cache_len: int) -> jax.Array:
  """DAPO soft overlong punishment, added to the reward.

  With `L_exp = max_len - cache_len`: 0 if `L <= L_exp`; `(L_exp - L) / cache_len` (linear from
  0 to -1) if `L_exp < L <= max_len`; -1 if `L > max_len`.

  Args:
    lengths: [B] response length in tokens (int or float).
    max_len: L_max, tokens.
    cache_len: L_cache > 0, tokens of the soft zone.

  Returns:
    [B] float32 penalty in [-1, 0], reward units.
  """
  if cache_len <= 0:
    raise ValueError(f"overlong_penalty needs cache_len > 0, got {cache_len}")
  lengths = jnp.asarray(lengths, jnp.float32)
  expected = max_len - cache_len
  soft = (expected - lengths) / cache_len
  return jnp.where(lengths <= expected, 0.0, jnp.where(lengths <= max_len, soft, -1.0))
