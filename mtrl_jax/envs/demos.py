"""Expert demonstrations as `Trajectory` rows, for supervised warm starts (SFT / BC).

`demonstrations(env, params, key, num_episodes, max_len)` plays `env.expert` for
`num_episodes` episodes in one jitted call (`vmap` over episodes, `lax.scan` over the
`env.max_turns` turns; no Python per step) and lays each episode out as the exact token row
the policy would have seen::

    [prompt][expert turn 0][reply 0][expert turn 1][reply 1] ... [final turn][pad ...]

`loss_mask` is True exactly on the expert's turn tokens (prompt, replies and padding are
context only), `turn` is the agent-turn index there and -1 elsewhere, `sampler_logprob` is all
zeros (the expert is treated as a deterministic sampler; 0 <= 0 on trained tokens as the data
contract requires). `turn_end`, `turn_reward`, `turn_valid` are per turn [B, K]; `done` marks
an episode that terminated, `truncated` one that hit `max_turns`; `info` holds the final
`env.info` of each episode ([B] leaves).

Keys (documented so a test or a replay can reproduce an episode): `episode_keys =
jax.random.split(key, num_episodes)`; for each, `keys = jax.random.split(ep, 1 + 2 * K)`:
`keys[0]` resets, turn k uses `keys[1 + 2 * k]` for the expert and `keys[2 + 2 * k]` for
`env.step`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from mtrl_jax import vocab as V
from mtrl_jax.envs import base
from mtrl_jax.types import Trajectory


def required_len(env: base.Environment) -> int:
  """Tokens a row needs for any episode: prompt_len + max_turns * (action_len + reply_len)."""
  return env.prompt_len + env.max_turns * (env.action_len + env.reply_len)


def demonstrations(env: base.Environment, params, key: jax.Array, num_episodes: int,
                   max_len: int) -> Trajectory:
  """`num_episodes` expert episodes as a `Trajectory` with B = num_episodes, T = max_len,
  K = env.max_turns. Raises ValueError if `max_len < required_len(env)`."""
  need = required_len(env)
  if max_len < need:
    raise ValueError(
        f"max_len={max_len} cannot hold a {type(env).__name__} episode: needs prompt_len "
        f"{env.prompt_len} + max_turns {env.max_turns} * (action_len {env.action_len} + "
        f"reply_len {env.reply_len}) = {need}")
  if num_episodes < 1:
    raise ValueError(f"num_episodes must be >= 1, got {num_episodes}")
  params = env.default_params if params is None else params
  return _demos(env, int(num_episodes), int(max_len), params, key)


def _write(row: jax.Array, pos: jax.Array, ids: jax.Array, n: jax.Array) -> jax.Array:
  """row [T] with ids[:n] written at pos (static shapes; positions past T are dropped)."""
  rel = jnp.arange(row.shape[0]) - pos
  src = ids[jnp.clip(rel, 0, ids.shape[0] - 1)].astype(row.dtype)
  return jnp.where((rel >= 0) & (rel < n), src, row)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _demos(env: base.Environment, num_episodes: int, max_len: int, params, key) -> Trajectory:
  K = env.max_turns

  def episode(ep_key):
    keys = jax.random.split(ep_key, 1 + 2 * K)
    state, prompt = env.reset(keys[0], params)
    tokens = _write(jnp.full((max_len,), V.PAD_ID, jnp.int32), 0, prompt.tokens, prompt.length)
    mask = jnp.zeros((max_len,), bool)
    turn = jnp.full((max_len,), -1, jnp.int32)

    def body(carry, xs):
      state, tokens, mask, turn, pos = carry
      k, k_expert, k_step = xs
      active = ~state.done
      action = env.expert(k_expert, state, params)
      new_state, reply, reward, _, _ = env.step(k_step, state, action, params)
      n = jnp.where(active, action.length, 0)
      tokens = _write(tokens, pos, action.tokens, n)
      mask = _write(mask, pos, jnp.ones_like(action.tokens, bool), n)
      turn = _write(turn, pos, jnp.full_like(action.tokens, k), n)
      end = pos + n - 1
      pos = pos + n
      m = jnp.where(active, reply.length, 0)
      tokens = _write(tokens, pos, reply.tokens, m)
      pos = pos + m
      out = (jnp.where(active, end, 0).astype(jnp.int32),
             jnp.where(active, reward, 0.0).astype(jnp.float32), active)
      return (new_state, tokens, mask, turn, pos), out

    init = (state, tokens, mask, turn, prompt.length.astype(jnp.int32))
    (state, tokens, mask, turn, _), (ends, rewards, valid) = jax.lax.scan(
        body, init, (jnp.arange(K, dtype=jnp.int32), keys[1::2], keys[2::2]))
    return Trajectory(
        tokens=tokens, loss_mask=mask, turn=turn,
        sampler_logprob=jnp.zeros((max_len,), jnp.float32),
        turn_end=ends, turn_reward=rewards, turn_valid=valid,
        done=state.done & ~state.truncated, truncated=state.truncated,
        info=env.info(state))

  return jax.vmap(episode)(jax.random.split(key, num_episodes))
