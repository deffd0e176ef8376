"""Shared test harness for environments: reset / step / test policies jitted and vmapped over a
batch once (compiles are the cost in these tests), and batches of hand-written actions."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np

from mtrl_jax.envs import base
from mtrl_jax.envs import tools as T

EXPERT, RANDOM = 0, 1  # policy modes; subclasses may add more options after these


class EnvHarness:
  """`env` with `reset`, `step` and `_policy(keys, state, params, mode)` jitted over a batch of
  `batch` rows; actions are `width` tokens wide (the caller's turn budget may exceed the
  expert's). Mode EXPERT plays `env.expert`, RANDOM random tokens of random length, and modes
  2, 3, ... the actions of `extra_policies(key, state, params)` in order."""

  def __init__(self, env, params, *, width: int, batch: int):
    self.env, self.params, self.W, self.B = env, params, int(width), int(batch)
    self.K = env.max_turns
    self.reset = jax.jit(jax.vmap(env.reset, in_axes=(0, None)))
    self.step = jax.jit(jax.vmap(env.step, in_axes=(0, 0, 0, None)))
    self._policy = jax.jit(jax.vmap(self._policy_action, in_axes=(0, 0, None, None)))

  def pad(self, action: base.Action) -> base.Action:
    toks = action.tokens
    return action.replace(tokens=jnp.pad(toks, (0, self.W - toks.shape[0])))

  def extra_policies(self, key, state, params) -> list[base.Action]:
    return []

  def _policy_action(self, key, state, params, mode):
    k_tok, k_len = jax.random.split(key)
    random = base.Action(jax.random.randint(k_tok, (self.W,), 0, self.env.vocab.size),
                         jax.random.randint(k_len, (), 0, self.W + 1))
    options = [self.pad(self.env.expert(key, state, params)), random]
    options += [self.pad(a) for a in self.extra_policies(key, state, params)]
    return T.choose_action(mode, options)

  def policy(self, mode):
    return lambda keys, state, params: self._policy(keys, state, params, mode)

  def keys(self, key):
    """[1 + 2K, B] keys: reset, then (policy, step) per turn."""
    return jax.random.split(key, (1 + 2 * self.K, self.B))

  def actions(self, rows):
    """Symbol rows (str, or lists of symbols / raw ids) -> a batch of B actions of width W
    (the last row repeats to fill B); ids are used verbatim (to test out-of-vocabulary ids)."""
    toks = np.zeros((self.B, self.W), np.int32)
    lengths = np.zeros((self.B,), np.int32)
    for i in range(self.B):
      row = rows[min(i, len(rows) - 1)]
      row = row.split() if isinstance(row, str) else row
      ids = [self.env.vocab.id(s) if isinstance(s, str) else int(s) for s in row]
      toks[i, :len(ids)] = ids
      lengths[i] = len(ids)
    return base.Action(jnp.asarray(toks), jnp.asarray(lengths))

  def decode(self, reply, i):
    return self.env.vocab.decode(np.asarray(reply.tokens[i]))

  BASE_INFO = ("success", "num_tool_calls", "format_errors", "num_turns", "truncated")

  def check_step_contract(self, keys, state, info_keys=()):
    """One expert step from `state` obeys the environment API's shapes and dtypes: actions
    within `action_len`, the state's structure kept, [B, reply_len] replies, [B] float32
    rewards, and [B] info entries (the base ones plus `info_keys`). Returns the step's output."""
    env = self.env
    action = self._policy(keys[1], state, self.params, EXPERT)
    chex.assert_shape(action.tokens, (self.B, self.W))
    assert np.all(np.asarray(action.length) <= env.action_len)
    new, reply, reward, done, info = self.step(keys[2], state, action, self.params)
    chex.assert_trees_all_equal_shapes_and_dtypes(new, state)
    chex.assert_shape(reply.tokens, (self.B, env.reply_len))
    chex.assert_shape([reward, done, reply.length, reply.role], (self.B,))
    chex.assert_type(reward, jnp.float32)
    for k in self.BASE_INFO + tuple(info_keys):
      chex.assert_shape(info[k], (self.B,))
    return action, (new, reply, reward, done, info)
