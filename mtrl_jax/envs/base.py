"""The environment API: gymnax-style pure functions over static-shape pytrees.

    env.reset(key, params)                 -> (state, obs)     # obs: the prompt
    env.step(key, state, action, params)   -> (state, obs, reward, done, info)
    env.expert(key, state, params)         -> action           # scripted demonstration

* `env` is a plain Python object holding *static* configuration (the vocabulary, sizes that
  fix array shapes). `params` (`EnvParams`, a `flax.struct.dataclass`) holds values that may
  change without recompiling (expert noise, reward shaping). Everything is jittable and
  vmappable with params broadcast: `jax.vmap(env.step, in_axes=(0, 0, 0, None))`.
* `action` is one agent turn: `Action(tokens [A], length [])`, the turn's sampled tokens
  (right-padded with `<pad>`; A is whatever the caller uses, e.g. the rollout's turn budget,
  and `env.action_len` is the longest turn the expert needs).
* `obs` is `Observation(tokens [N], length [], role [])`: N = `env.prompt_len` from `reset`,
  `env.reply_len` from `step`. A reply is written as the exact chat-template pieces
  `<tool|user> content <eot> <assistant>`, so the rollout appends it verbatim and the next
  agent turn starts right after. When the episode ends, the reply is empty (length 0).
* Malformed actions are answered, not raised: the environment replies with an error message
  as tokens and counts it in `info['format_errors']`. Nothing in `step` may raise or produce
  NaN for any token sequence.
* `info` is a dict of scalar arrays with the episode totals so far; every environment reports
  `success`, `num_tool_calls`, `format_errors`, `num_turns`, `truncated`, plus its own keys.

Subclasses implement `reset_env`, `step_env` and `expert`; `Environment.step` adds what every
environment shares: stepping a finished episode is a no-op, the turn limit truncates, the
reply of a finished episode is empty, and `info` is assembled from the state.

What an environment can do beyond the contract is declared, as class attributes of
`Environment` with their defaults (override them in a subclass, as a class attribute or a
property): `name`, `Params`, `empty_idle_actions`, `reflection_len`, `names_actions`. Code
reads them as plain attributes (`env.reflection_len`), never with `getattr(env, ..., default)`.
An environment that changes another one (a tool answered in Python, a memory in the prompt,
a real tokenizer's ids) subclasses `mtrl_jax.envs.wrappers.Wrapper`, which forwards all of
this.

`mtrl_jax.envs.check_env(env)` checks an environment against this contract (`envs.check`).
"""

from __future__ import annotations

import abc
from typing import Any, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from mtrl_jax import vocab as V

ROLE_NONE, ROLE_USER, ROLE_TOOL = 0, 1, 2


@flax.struct.dataclass
class Action:
  """One agent turn. tokens: [A] int32 (right-padded); length: [] int32 number of real tokens."""

  tokens: jax.Array
  length: jax.Array


@flax.struct.dataclass
class Observation:
  """A prompt or reply. tokens: [N] int32 (right-padded); length: [] int32; role: [] int32
  (`ROLE_USER` or `ROLE_TOOL`; `ROLE_NONE` for an empty reply)."""

  tokens: jax.Array
  length: jax.Array
  role: jax.Array


@flax.struct.dataclass
class EnvParams:
  """Dynamic parameters every environment has (subclass to add more).

  noise: [] probability per expert turn of a realistic mistake. format_penalty: reward
  subtracted per error reply. habit_p: [] probability per episode that the expert follows its
  environment's *habit* instead, a systematic suboptimal strategy (the environment's docstring
  says which, and how often it succeeds); drawn at `reset` into `EnvState.habit`. With
  `habit_p` > 0.5 the habit is the mode of the demonstrations, and of a policy fitted to them.
  """

  noise: float = 0.0
  format_penalty: float = 0.0
  habit_p: float = 0.0


@flax.struct.dataclass
class EnvState:
  """Fields every environment state has; subclasses add their own after these.

  turn: [] int32 agent turns taken. done: [] bool episode over. truncated: [] bool ended by the
  turn limit. success: [] bool task solved. num_tool_calls, format_errors: [] int32 counters.
  habit: [] bool this episode's expert follows the habit (`EnvParams.habit_p`; only `expert`
  reads it: the policy never sees it).
  """

  turn: jax.Array
  done: jax.Array
  truncated: jax.Array
  success: jax.Array
  num_tool_calls: jax.Array
  format_errors: jax.Array
  habit: jax.Array


def initial_counters() -> dict[str, jax.Array]:
  """Keyword arguments for the `EnvState` base fields of a fresh episode."""
  return dict(turn=jnp.int32(0), done=jnp.bool_(False), truncated=jnp.bool_(False),
              success=jnp.bool_(False), num_tool_calls=jnp.int32(0),
              format_errors=jnp.int32(0), habit=jnp.bool_(False))


# `reset` draws the episode's habit from its key folded with this (the subclass's `reset_env`
# uses the key itself, so episodes are unchanged by the draw).
_HABIT_SALT = 0x4AB17


def draw_habit(key: jax.Array, params) -> jax.Array:
  """[] bool: whether the episode reset with `key` is a habit episode (`params.habit_p`)."""
  return jax.random.uniform(jax.random.fold_in(key, _HABIT_SALT)) < params.habit_p


class Environment(abc.ABC):
  """Base class of all environments. See the module docstring for the contract.

  Declared capabilities (class attributes; a subclass overrides them as class attributes or
  properties, and `wrappers.Wrapper` forwards the wrapped environment's):

  Attributes:
    name: the environment's name in messages and metrics ("env").
    Params: the `flax.struct.dataclass` of this environment's params, the type of
      `default_params` (default `EnvParams`); `registry.make` routes overrides to its fields.
    empty_idle_actions: the rollout steps the whole batch whenever some row's turn ended and
      discards the results of the rows whose turn did not. False (default): those rows are
      passed their unfinished turn; True: an empty action (`length = 0`), so that a host-side
      `step` (`jax.pure_callback`) can skip them (`envs.json_tool`).
    reflection_len: tokens of the templated reflection on a failed episode (`reflection`, used
      by `mtrl_jax.reflexion`); 0 (default): the environment has none, and `reflection`
      raises.
    names_actions: the environment also says which action a failed episode should change
      (`reflection_action`), so `action_reflection` = the templated reflection followed by
      that action (Reflexion's `reflection='action'`); False (default): it does not.
  """

  name: str = "env"
  Params: type = EnvParams
  empty_idle_actions: bool = False
  reflection_len: int = 0
  names_actions: bool = False

  def __init__(self, vocab: V.Vocab | None = None):
    symbols = tuple(self.symbols())
    if vocab is None:
      vocab = V.Vocab.build(symbols)
    missing = vocab.missing(symbols)
    if missing:
      raise ValueError(f"{type(self).__name__}: the vocabulary lacks symbols {missing[:20]}"
                       f"{' ...' if len(missing) > 20 else ''}; build it with "
                       f"Vocab.build(env.symbols(), ...)")
    self.vocab = vocab

  # --- static description ---------------------------------------------------------------
  @abc.abstractmethod
  def symbols(self) -> Sequence[str]:
    """Every symbol this environment emits or parses (special tokens are always present)."""

  @property
  @abc.abstractmethod
  def default_params(self) -> Any:
    """The default `EnvParams`."""

  @property
  @abc.abstractmethod
  def prompt_len(self) -> int:
    """Static length N of the prompt `Observation` returned by `reset`."""

  @property
  @abc.abstractmethod
  def reply_len(self) -> int:
    """Static length N of the reply `Observation` returned by `step`."""

  @property
  @abc.abstractmethod
  def action_len(self) -> int:
    """Tokens in the longest turn the expert produces (the rollout's turn budget must fit it)."""

  @property
  @abc.abstractmethod
  def max_turns(self) -> int:
    """Agent turns after which the episode is truncated."""

  # --- dynamics ---------------------------------------------------------------------------
  @abc.abstractmethod
  def reset_env(self, key: jax.Array, params) -> tuple[EnvState, Observation]:
    ...

  @abc.abstractmethod
  def step_env(self, key: jax.Array, state: EnvState, action: Action, params
               ) -> tuple[EnvState, Observation, jax.Array, jax.Array]:
    """One turn: returns (state, reply, reward [] f32, done [] bool). Counters in the state
    (`success`, `num_tool_calls`, `format_errors`) are the subclass's to update; `turn`,
    `done` and `truncated` are handled by `step`."""

  @abc.abstractmethod
  def expert(self, key: jax.Array, state: EnvState, params) -> Action:
    """The scripted demonstrator's next turn, [action_len] tokens; `params.noise` makes it err
    per turn, and in a habit episode (`state.habit`) it follows the environment's habit."""

  def extra_info(self, state: EnvState) -> dict[str, jax.Array]:
    """Environment-specific scalar metrics added to `info` (override)."""
    return {}

  def reflection(self, state: EnvState) -> tuple[jax.Array, jax.Array]:
    """A short note on a finished, failed episode, built from the environment's own feedback:
    (tokens [reflection_len] int32 padded, length []). Override it together with
    `reflection_len > 0`; with the default `reflection_len = 0` there is none, and asking for
    it is a programming error (`reflexion.make_reflexion` checks `reflection_len` first)."""
    raise NotImplementedError(f"environment {self.name!r} has no templated reflection")

  def reflection_action(self, state: EnvState) -> Action:
    """The action a finished, failed episode should have taken differently, in the agent's own
    action format ([action_len] tokens; the environment's choice, privileged like the
    template). Override it together with `names_actions = True`."""
    raise NotImplementedError(f"environment {self.name!r} names no action to change")

  @property
  def action_reflection_len(self) -> int:
    """Tokens of `action_reflection`: the template's plus the action's (an upper bound)."""
    return self.reflection_len + self.action_len

  def action_reflection(self, state: EnvState) -> tuple[jax.Array, jax.Array]:
    """The templated reflection followed by the action to change (`reflection_action`, without
    its end-of-turn): e.g. search `<error> v x0 r0 x1 <call> search x1 </call>`. (tokens
    [action_reflection_len] int32 padded, length [])."""
    toks, n = self.reflection(state)
    act = self.reflection_action(state)
    last = act.tokens[jnp.clip(act.length - 1, 0, act.tokens.shape[0] - 1)]
    m = act.length - (last == self.vocab.eot_id).astype(jnp.int32)
    return concat_segments([(toks, n), (act.tokens, m)], self.action_reflection_len)

  # --- the public, shared part ------------------------------------------------------------
  def reset(self, key: jax.Array, params=None) -> tuple[EnvState, Observation]:
    params = self.default_params if params is None else params
    state, obs = self.reset_env(key, params)
    if isinstance(params, EnvParams):  # (a wrapper's own params, e.g. Reflexion's memory: none)
      state = state.replace(habit=draw_habit(key, params))
    return state, obs

  def step(self, key: jax.Array, state: EnvState, action: Action, params=None
           ) -> tuple[EnvState, Observation, jax.Array, jax.Array, dict[str, jax.Array]]:
    params = self.default_params if params is None else params
    new, obs, reward, done = self.step_env(key, state, action, params)
    turn = state.turn + 1
    truncated = ~done & (turn >= self.max_turns)
    new = new.replace(turn=turn, done=done | truncated, truncated=truncated)
    ended = new.done
    obs = obs.replace(length=jnp.where(ended, 0, obs.length).astype(jnp.int32),
                      role=jnp.where(ended, ROLE_NONE, obs.role).astype(jnp.int32))
    obs = obs.replace(tokens=jnp.where(jnp.arange(obs.tokens.shape[-1]) < obs.length,
                                       obs.tokens, V.PAD_ID))
    # A finished episode does not move.
    new = jax.tree.map(lambda a, b: jnp.where(state.done, a, b), state, new)
    reward = jnp.where(state.done, 0.0, reward).astype(jnp.float32)
    obs = jax.tree.map(lambda x: jnp.where(state.done, jnp.zeros_like(x), x), obs)
    return new, obs, reward, new.done, self.info(new)

  def info(self, state: EnvState) -> dict[str, jax.Array]:
    return {
        "success": state.success, "num_tool_calls": state.num_tool_calls,
        "format_errors": state.format_errors, "num_turns": state.turn,
        "truncated": state.truncated, **self.extra_info(state),
    }

  # --- helpers for subclasses -------------------------------------------------------------
  def const(self, text: str | Sequence[str]) -> tuple[jax.Array, int]:
    """Encode a fixed message: (ids [n] int32, n). For building replies in jitted code."""
    ids = np.asarray(self.vocab.encode(text), np.int32)
    return jnp.asarray(ids), len(ids)

  def id(self, symbol: str) -> int:
    return self.vocab.id(symbol)

  def make_prompt(self, content: jax.Array, length: jax.Array) -> Observation:
    """`<bos> <user> content <eot> <assistant>` padded to `prompt_len`. content: [n] int32."""
    return Observation(
        tokens=frame(content, length, (self.id(V.BOS), self.id(V.USER)),
                     (self.id(V.EOT), self.id(V.ASSISTANT)), self.prompt_len),
        length=(length + 4).astype(jnp.int32), role=jnp.int32(ROLE_USER))

  def make_reply(self, role: int, content: jax.Array, length: jax.Array) -> Observation:
    """`<tool|user> content <eot> <assistant>` padded to `reply_len`. content: [n] int32."""
    head = self.id(V.TOOL if role == ROLE_TOOL else V.USER)
    return Observation(
        tokens=frame(content, length, (head,), (self.id(V.EOT), self.id(V.ASSISTANT)),
                     self.reply_len),
        length=(length + 3).astype(jnp.int32), role=jnp.int32(role))


def frame(content: jax.Array, length: jax.Array, head: Sequence[int], tail: Sequence[int],
          size: int) -> jax.Array:
  """[*head, *content[:length], *tail, pad...] as a [size] int32 array (static shapes).

  Content beyond `size` is cut; the tail is always written (the caller's budgets guarantee it
  fits: `len(head) + max content + len(tail) <= size`).
  """
  idx = jnp.arange(size)
  h, tl = len(head), len(tail)
  content = jnp.asarray(content, jnp.int32)
  length = jnp.minimum(jnp.asarray(length, jnp.int32), size - h - tl)
  body = content[jnp.clip(idx - h, 0, content.shape[0] - 1)]
  out = jnp.where((idx >= h) & (idx < h + length), body, V.PAD_ID)
  for i, tok in enumerate(head):
    out = jnp.where(idx == i, tok, out)
  for i, tok in enumerate(tail):
    out = jnp.where(idx == h + length + i, tok, out)
  return out.astype(jnp.int32)


def concat_segments(segments: Sequence[tuple[jax.Array, jax.Array]], size: int) -> tuple[jax.Array, jax.Array]:
  """Concatenate variable-length segments with static shapes.

  segments: [(ids [n_i] int32, length_i [] int32), ...]. Returns (tokens [size] int32 padded,
  total length [] int32, clipped to size).
  """
  idx = jnp.arange(size)
  out = jnp.full((size,), V.PAD_ID, jnp.int32)
  offset = jnp.int32(0)
  for ids, n in segments:
    ids = jnp.asarray(ids, jnp.int32)
    n = jnp.asarray(n, jnp.int32)
    rel = idx - offset
    take = (rel >= 0) & (rel < n)
    out = jnp.where(take, ids[jnp.clip(rel, 0, ids.shape[0] - 1)], out)
    offset = offset + n
  return out, jnp.minimum(offset, size)
