"""`check_env(env, params=None)`: the environment contract of `envs.base` as a public function.

Run it on an environment you wrote (outside this package or in it) before training on it::

    from mtrl_jax.envs import check_env
    report = check_env(MyEnv())          # raises EnvContractError naming what is broken
    print(report)                        # {'expert_success': 1.0, 'garbage_error_rate': ...}

It plays `batch` episodes three ways - the expert at noise 0, random garbage actions (random
ids in and outside the vocabulary, negative and oversized lengths, control tokens) and a
finished batch stepped again - through `reset` / `step` / `expert` jitted and vmapped once,
and checks, on the host, that

* the declaration is complete (`check_class`, `check_instance`: the capabilities and sizes of
  `base.Environment`, a `flax.struct.dataclass` `Params` with `EnvParams`' fields, constructor
  arguments with defaults that do not collide with `Params` fields);
* prompts and replies have their declared static shapes, int32 ids inside the vocabulary,
  lengths within `prompt_len` / `reply_len` (a size one too small, where `make_prompt` or
  `make_reply` would cut the content, is reported with the size to raise) and the chat framing
  `<bos> ... <eot> <assistant>` / `<tool|user> ... <eot> <assistant>` with padding after it;
* a reply is an error reply (holds `<error>`) if and only if the turn counted a format error,
  also on the last turn, where the reply `step_env` wrote is then emptied by the turn limit
  (the reply to a turn that ends the episode is never shown, and not checked);
* garbage actions never produce NaN or infinite rewards or `info` values, and counters move by
  at most one per turn; a finished episode does not move (state, zero reward, empty reply);
* episodes end within `max_turns`; the expert's turns fit `action_len`; at noise 0 it solves at
  least `expert_success` of the episodes without a format error;
* demonstrations (`envs.demos.demonstrations`, noise 0 and 0.5) pass `types.check_trajectory`;
* `step` compiles once: the state it returns has the tree structure, shapes and dtypes (weak
  types included) of the state it was given - what `jax.jit` keys its compiled programs on,
  and what the rollout's `lax.while_loop` needs to carry it.

`check_class` is the cheap static part that `registry.register` runs on a class, and
`check_instance` the part that `registry.make` runs on what it built. The harness the checks
use (`EnvHarness`: jitted, vmapped reset / step / test policies and batches of hand-written
actions) is public too, for environment tests.

Scope: symbol-vocabulary environments (`vocab.Vocab`, every pure-JAX environment and the
wrappers around one); a real tokenizer's environments (`envs.json_tool`) are tested on their
own (tests/test_hf_chat.py).
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mtrl_jax import types
from mtrl_jax import vocab as V
from mtrl_jax.envs import base, demos
from mtrl_jax.envs import tools as T


class EnvContractError(ValueError):
  """An environment breaks the contract; the message names the environment, the attribute or
  property, and an offending row where there is one."""


# What an environment must have: the abstract static description and hooks of
# `base.Environment`, its declared capabilities, and the shared public methods.
REQUIRED = ("symbols", "default_params", "prompt_len", "reply_len", "action_len", "max_turns",
            "reset_env", "step_env", "expert", "extra_info")
CAPABILITIES = ("name", "Params", "empty_idle_actions", "reflection_len", "names_actions")
SHARED = ("reset", "step", "info")
BASE_INFO = ("success", "num_tool_calls", "format_errors", "num_turns", "truncated")
# Policy modes of `EnvHarness`; a subclass's `extra_policies` are modes FIRST_EXTRA, ...
EXPERT, RANDOM, FIRST_EXTRA = 0, 1, 2


# --- the static part ---------------------------------------------------------------------------

def check_class(cls: type) -> None:
  """The cheap static part of the contract, on a class: raise `EnvContractError` naming the
  missing attribute, the unimplemented method or the bad declaration. Run by
  `registry.register` and `registry.make`."""
  if not isinstance(cls, type):
    raise EnvContractError(f"an environment is a class, got {cls!r} ({type(cls).__name__})")
  who = cls.__name__
  missing = [a for a in REQUIRED + CAPABILITIES + SHARED if not hasattr(cls, a)]
  if not issubclass(cls, base.Environment):
    have = f"; it lacks {', '.join(missing)}" if missing else ""
    raise EnvContractError(
        f"{who} is not a subclass of mtrl_jax.envs.base.Environment{have} (subclass it: it "
        "declares Params, name, empty_idle_actions, reflection_len and the shared reset/step)")
  abstract = sorted(getattr(cls, "__abstractmethods__", ()))
  if abstract:
    raise EnvContractError(f"{who} does not implement {', '.join(abstract)} "
                           "(abstract in mtrl_jax.envs.base.Environment)")
  params_cls = inspect.getattr_static(cls, "Params", None)
  if not isinstance(params_cls, property):  # a Wrapper forwards it: checked on the instance
    _check_params_class(who, cls.Params)
  sig = inspect.signature(cls.__init__)
  ctor = [p for p in sig.parameters.values() if p.name != "self"]
  for p in ctor:
    if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
      raise EnvContractError(f"{who}.__init__ takes *{p.name}: registry.make routes overrides "
                             "by the constructor's named arguments, declare each one")
    if p.default is p.empty:
      raise EnvContractError(f"{who}.__init__ argument {p.name!r} has no default: "
                             "registry.make(name) builds an environment from its defaults alone")
  if not isinstance(params_cls, property):
    fields = {f.name for f in dataclasses.fields(cls.Params)}
    both = sorted(fields & {p.name for p in ctor})
    if both:
      raise EnvContractError(f"{who}: {both} are both constructor arguments and fields of "
                             f"{cls.Params.__name__}; registry.make could not tell where an "
                             "override goes (rename one)")


def _check_params_class(who: str, params_cls: Any) -> None:
  if not (isinstance(params_cls, type) and dataclasses.is_dataclass(params_cls)
          and hasattr(params_cls, "replace")):
    raise EnvContractError(f"{who}.Params must be a flax.struct.dataclass (subclass "
                           f"mtrl_jax.envs.base.EnvParams), got {params_cls!r}")
  fields = {f.name for f in dataclasses.fields(params_cls)}
  lacking = [f for f in ("noise", "format_penalty", "habit_p") if f not in fields]
  if lacking:
    raise EnvContractError(f"{who}.Params ({params_cls.__name__}) lacks the EnvParams "
                           f"field(s) {lacking}: subclass mtrl_jax.envs.base.EnvParams")


def check_instance(env: base.Environment) -> None:
  """The cheap static part on a built environment: positive integer sizes, a name, and
  `default_params` of the declared `Params` type. Raises `EnvContractError`."""
  who = type(env).__name__
  if not isinstance(env, base.Environment):
    raise EnvContractError(f"{who} is not a mtrl_jax.envs.base.Environment")
  if not isinstance(env.name, str) or not env.name:
    raise EnvContractError(f"{who}.name must be a non-empty string, got {env.name!r}")
  smallest = {"prompt_len": 4, "reply_len": 3, "action_len": 1, "max_turns": 1}
  for attr, low in smallest.items():
    value = getattr(env, attr)
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low:
      why = {"prompt_len": " (<bos> <user> ... <eot> <assistant>)",
             "reply_len": " (<tool> ... <eot> <assistant>)"}.get(attr, "")
      raise EnvContractError(f"{who}.{attr} must be a static integer >= {low}{why}, got "
                             f"{value!r}")
  _check_params_class(who, env.Params)
  if not isinstance(env.default_params, env.Params):
    raise EnvContractError(f"{who}.default_params is a {type(env.default_params).__name__}, "
                           f"not its declared Params {env.Params.__name__}")
  if not isinstance(env.reflection_len, (int, np.integer)) or env.reflection_len < 0:
    raise EnvContractError(f"{who}.reflection_len must be an integer >= 0, got "
                           f"{env.reflection_len!r}")
  if not isinstance(env.names_actions, (bool, np.bool_)):
    raise EnvContractError(f"{who}.names_actions must be a bool, got {env.names_actions!r}")
  if env.names_actions and not env.reflection_len:
    raise EnvContractError(f"{who}.names_actions is True but reflection_len is 0 (the action "
                           f"reflection extends the templated one: implement `reflection`)")


# --- the harness -------------------------------------------------------------------------------

class EnvHarness:
  """`env` with `reset`, `step` and test policies jitted and vmapped over a batch of `batch`
  rows (compiled once per harness); actions are `width` tokens wide (a rollout's turn budget
  may exceed the expert's `action_len`).

  Policies (`policy(mode)(keys [B], state, params) -> Action` batch): mode `EXPERT` plays
  `env.expert`, `RANDOM` uniform random vocabulary ids of random length in [0, width], and
  modes `FIRST_EXTRA`, ... the actions of `extra_policies(key, state, params)` in order
  (override it). `garbage(seed)` is a batch of worse actions (ids outside the vocabulary,
  extreme values, negative and oversized lengths), `checked_step` a step that also returns
  what `step_env` answered before `step`'s bookkeeping.
  """

  def __init__(self, env: base.Environment, params=None, *, width: int, batch: int):
    self.env, self.W, self.B = env, int(width), int(batch)
    self.params = env.default_params if params is None else params
    self.K = env.max_turns
    self.reset = jax.jit(jax.vmap(env.reset, in_axes=(0, None)))
    self.step = jax.jit(jax.vmap(env.step, in_axes=(0, 0, 0, None)))
    self._policy = jax.jit(jax.vmap(self._policy_action, in_axes=(0, 0, None, None)))
    error_id = env.vocab.id(V.ERROR) if V.ERROR in env.vocab else -1
    self._error_id = error_id

  def checked_step(self, keys, state, action, params):
    """`step` and, of the same turn, what `step_env` answered before `step`'s bookkeeping (a
    reply the turn limit then empties): (state, reply, reward, done, info, raw_error [B] bool
    "the raw reply holds `<error>` within its length", raw_length [B] int32). One program."""
    if not hasattr(self, "_checked"):
      def checked(key, state, action, params):
        _, obs, _, _ = self.env.step_env(key, state, action, params)
        inside = jnp.arange(obs.tokens.shape[-1]) < obs.length
        raw_error = jnp.any(inside & (obs.tokens == self._error_id))
        return (*self.env.step(key, state, action, params), raw_error,
                obs.length.astype(jnp.int32))
      self._checked = jax.jit(jax.vmap(checked, in_axes=(0, 0, 0, None)))
    return self._checked(keys, state, action, params)

  def pad(self, action: base.Action) -> base.Action:
    toks = action.tokens
    if toks.shape[-1] > self.W:
      raise EnvContractError(
          f"{self.env.name}: the expert's action tokens are {toks.shape[-1]} wide, more than "
          f"the harness width {self.W}; env.expert must return [action_len]="
          f"[{self.env.action_len}] tokens")
    return action.replace(tokens=jnp.pad(toks, (0, self.W - toks.shape[-1])))

  def extra_policies(self, key, state, params) -> list[base.Action]:
    return []

  def garbage(self, seed: int) -> base.Action:
    """A batch of garbage actions, made on the host (numpy, nothing to compile): tokens [B, W]
    int32 mixing vocabulary ids, control tokens, ids just outside the vocabulary and extreme
    int32 values; lengths [B] int32 in [-2, W + 2]."""
    rng = np.random.default_rng(seed)
    B, W, size = self.B, self.W, self.env.vocab.size
    control = np.asarray([self.env.vocab.id(s) for s in V.SPECIAL_TOKENS], np.int64)
    kind = rng.integers(0, 8, (B, W))
    extreme = np.where(rng.integers(0, 2, (B, W)) == 0, np.iinfo(np.int32).min,
                       np.iinfo(np.int32).max)
    tokens = np.select([kind < 4, kind < 6, kind < 7],
                       [rng.integers(0, size, (B, W)), control[rng.integers(0, len(control),
                                                                             (B, W))],
                        rng.integers(-4, size + 4, (B, W))], extreme)
    lengths = rng.integers(-2, W + 3, (B,))
    return base.Action(jnp.asarray(tokens, jnp.int32), jnp.asarray(lengths, jnp.int32))

  def _policy_action(self, key, state, params, mode):
    k_tok, k_len = jax.random.split(key)
    random = base.Action(jax.random.randint(k_tok, (self.W,), 0, self.env.vocab.size),
                         jax.random.randint(k_len, (), 0, self.W + 1))
    options = [self.pad(self.env.expert(key, state, params)), random]
    options += [self.pad(a) for a in self.extra_policies(key, state, params)]
    return T.choose_action(mode, options)

  def policy(self, mode: int) -> Callable:
    return lambda keys, state, params: self._policy(keys, state, params, mode)

  def keys(self, key):
    """[1 + 2K, B] keys: reset, then (policy, step) per turn."""
    return jax.random.split(key, (1 + 2 * self.K, self.B))

  def actions(self, rows: Sequence) -> base.Action:
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

  def decode(self, reply, i) -> str:
    return self.env.vocab.decode(np.asarray(reply.tokens[i]))

  BASE_INFO = BASE_INFO

  def check_step_contract(self, keys, state, info_keys=()):
    """One expert step from `state` obeys the environment API's shapes and dtypes: actions
    within `action_len`, the state's structure kept, [B, reply_len] replies, [B] float32
    rewards, and [B] info entries (the base ones plus `info_keys`). Returns the step's output."""
    env = self.env
    action = self._policy(keys[1], state, self.params, EXPERT)
    assert action.tokens.shape == (self.B, self.W), action.tokens.shape
    assert np.all(np.asarray(action.length) <= env.action_len)
    new, reply, reward, done, info = self.step(keys[2], state, action, self.params)
    differs = structure_differences(new, state)
    assert not differs, differs
    assert reply.tokens.shape == (self.B, env.reply_len), reply.tokens.shape
    for x in (reward, done, reply.length, reply.role):
      assert x.shape == (self.B,), x.shape
    assert reward.dtype == jnp.float32, reward.dtype
    for k in self.BASE_INFO + tuple(info_keys):
      assert info[k].shape == (self.B,), (k, info[k].shape)
    return action, (new, reply, reward, done, info)


def structure_differences(a, b) -> list[str]:
  """How pytree `a` differs from `b` in structure, shapes, dtypes or weak types ([] if not)."""
  if jax.tree.structure(a) != jax.tree.structure(b):
    return [f"tree structure {jax.tree.structure(a)} vs {jax.tree.structure(b)}"]
  out = []
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
    if (np.shape(x), jnp.result_type(x)) != (np.shape(y), jnp.result_type(y)) or \
        getattr(x, "weak_type", False) != getattr(y, "weak_type", False):
      out.append(f"{jax.tree_util.keystr(path)}: {jnp.result_type(x)}{list(np.shape(x))}"
                 f"{' weak' if getattr(x, 'weak_type', False) else ''} vs "
                 f"{jnp.result_type(y)}{list(np.shape(y))}"
                 f"{' weak' if getattr(y, 'weak_type', False) else ''}")
  return out


# --- the dynamic checks -------------------------------------------------------------------------

class _Checker:
  """Host-side checks of one harness's outputs; `fail` raises with the environment's name."""

  def __init__(self, h: EnvHarness):
    self.h, self.env = h, h.env
    self.who = f"{type(h.env).__name__} ({h.env.name!r})"
    voc = h.env.vocab
    self.size = voc.size
    self.ids = {s: voc.id(s) for s in (V.BOS, V.USER, V.TOOL, V.EOT, V.ASSISTANT, V.SYSTEM)}

  def fail(self, what: str, row: int | None = None, tokens=None):
    example = ""
    if row is not None:
      example = f" (row {row}"
      if tokens is not None:
        example += f": {self.env.vocab.decode(np.asarray(tokens))!r}"
      example += ")"
    raise EnvContractError(f"{self.who}: {what}{example}")

  def first(self, bad) -> int:
    return int(np.flatnonzero(np.asarray(bad))[0])

  def tokens(self, obs, size: int, what: str, attr: str):
    """Shapes, dtypes, id range, lengths within `size` and padding after the length."""
    B = self.h.B
    for name, x, shape in (("tokens", obs.tokens, (B, size)), ("length", obs.length, (B,)),
                           ("role", obs.role, (B,))):
      if tuple(x.shape) != shape or x.dtype != jnp.int32:
        self.fail(f"{what}.{name} must be int32 {list(shape)} ({attr}={size}), got "
                  f"{x.dtype} {list(x.shape)}")
    toks, n = np.asarray(obs.tokens), np.asarray(obs.length)
    if np.any(n > size):
      b = self.first(n > size)
      self.fail(f"{what} length {int(n[b])} exceeds env.{attr}={size}: the content was cut "
                f"(make_prompt / make_reply keep at most {attr} tokens); raise {attr} to at "
                f"least {int(n.max())}", b, toks[b])
    if np.any(n < 0):
      self.fail(f"{what} has a negative length", self.first(n < 0))
    bad = np.any((toks < 0) | (toks >= self.size), axis=1)
    if np.any(bad):
      b = self.first(bad)
      self.fail(f"{what} holds ids outside the vocabulary [0, {self.size}): "
                f"{toks[b].tolist()}", b)
    after = np.arange(size)[None, :] >= n[:, None]
    pad = np.any(after & (toks != V.PAD_ID), axis=1)
    if np.any(pad):
      b = self.first(pad)
      self.fail(f"{what} has tokens after its length {int(n[b])} (must be <pad>)", b, toks[b])
    return toks, n

  def framed(self, toks, n, rows, head: Sequence[Sequence[int]], what: str):
    """Rows `rows` read `<head> ... <eot> <assistant>` (head: allowed first tokens, per
    position)."""
    rows = np.asarray(rows)
    short = rows & (n < len(head) + 2)
    if np.any(short):
      b = self.first(short)
      self.fail(f"{what} of length {int(n[b])} cannot hold its framing", b, toks[b])
    idx = np.arange(toks.shape[0])
    ok = np.ones_like(rows)
    for i, allowed in enumerate(head):
      ok &= np.isin(toks[:, i], allowed)
    ok &= toks[idx, np.maximum(n - 2, 0)] == self.ids[V.EOT]
    ok &= toks[idx, np.maximum(n - 1, 0)] == self.ids[V.ASSISTANT]
    if np.any(rows & ~ok):
      b = self.first(rows & ~ok)
      names = " ".join("|".join(self.env.vocab.symbols[t] for t in a) for a in head)
      self.fail(f"{what} is not framed as {names} ... <eot> <assistant> (use "
                "env.make_prompt / env.make_reply)", b, toks[b, :n[b]])


def check_env(env: base.Environment, params=None, *, batch: int = 32, width: int | None = None,
              key: jax.Array | None = None, expert_success: float = 1.0,
              harness: EnvHarness | None = None) -> dict[str, float]:
  """Check `env` against the environment contract (see the module docstring).

  Args:
    env: the environment (a symbol-vocabulary one).
    params: its EnvParams for the garbage and expert episodes (default `env.default_params`;
      the expert plays them with `noise=0`).
    batch: episodes per check, B (every function is compiled once for this batch).
    width: action width W, the rollout's turn budget (default `env.action_len + 3`; at least
      `action_len`).
    key: PRNG key (default `jax.random.key(0)`).
    expert_success: the least fraction of episodes the noise-0 expert must solve.
    harness: an `EnvHarness` of `env` whose compiled functions to reuse (its batch and width
      replace `batch` and `width`; a test suite's shared harness).

  Returns:
    What was measured: `expert_success`, `garbage_success`, `garbage_error_rate` (format
    errors per garbage turn), `demo_success_noisy` (demonstrations at noise 0.5), `turns`
    (mean turns of an expert episode).

  Raises:
    EnvContractError: the first broken property, naming it and an offending row.
    TypeError: `env` does not speak a `vocab.Vocab`.
  """
  check_class(type(env))
  check_instance(env)
  if not isinstance(env.vocab, V.Vocab):
    raise TypeError(f"check_env checks symbol-vocabulary environments (vocab.Vocab); "
                    f"{type(env).__name__} speaks a {type(env.vocab).__name__}")
  params = env.default_params if params is None else params
  if not isinstance(params, env.Params):
    raise EnvContractError(f"{type(env).__name__}: params is a {type(params).__name__}, not "
                           f"its Params {env.Params.__name__}")
  if harness is not None and harness.env is not env:
    raise ValueError("check_env: the harness was built for another environment")
  width = harness.W if harness is not None else (
      env.action_len + 3 if width is None else int(width))
  if width < env.action_len:
    raise ValueError(f"check_env: width={width} is below env.action_len={env.action_len}")
  key = jax.random.key(0) if key is None else key
  h = harness if harness is not None else EnvHarness(env, params, width=width, batch=batch)
  c = _Checker(h)
  k_expert, k_garbage, k_done, k_demo = jax.random.split(key, 4)

  play_expert = h.policy(EXPERT)
  expert = _play(h, c, lambda t, keys, state, params: play_expert(keys, state, params),
                 params.replace(noise=0.0), k_expert, "expert")
  info = expert["info"]
  solved = float(np.mean(info["success"]))
  if solved < expert_success:
    c.fail(f"the expert at noise 0 solves {solved:.3f} of {h.B} episodes, below "
           f"expert_success={expert_success}", c.first(~info["success"].astype(bool)))
  if np.any(info["format_errors"] != 0):
    b = c.first(info["format_errors"] != 0)
    c.fail(f"the expert at noise 0 makes format errors ({int(info['format_errors'][b])})", b)
  if np.any(info["truncated"]):
    c.fail("the expert at noise 0 hits the turn limit", c.first(info["truncated"]))
  if np.any(expert["max_action_len"] > env.action_len):
    b = c.first(expert["max_action_len"] > env.action_len)
    c.fail(f"the expert plays a turn of {int(expert['max_action_len'][b])} tokens, more than "
           f"env.action_len={env.action_len}", b)

  seed = int(jax.random.randint(k_garbage, (), 0, 2**30))
  garbage = _play(h, c, lambda t, keys, state, params: h.garbage(seed + t), params, k_garbage,
                  "garbage")
  # Finished episodes do not move: step the garbage batch (all done) once more.
  state = garbage["state"]
  again = h.checked_step(jax.random.split(k_done, h.B), state, h.garbage(seed - 1), params)
  new, reply, reward, done = jax.tree.map(np.asarray, again[:4])
  before = jax.tree.map(np.asarray, state)
  moved = _moved(new, before)
  if moved:
    c.fail(f"a finished episode moved: state fields {moved} changed when it was stepped again")
  if np.any(reward != 0) or np.any(reply.length != 0) or np.any(reply.tokens != 0) \
      or not np.all(done):
    c.fail("a finished episode stepped again must give reward 0, an empty reply and done")

  # Demonstrations follow the data contract (a clean and a noisy expert).
  max_len, noisy = demos.required_len(env), 0.0
  for noise in (0.0, 0.5):
    traj = demos.demonstrations(env, params.replace(noise=noise), k_demo, h.B, max_len)
    try:
      types.check_trajectory(traj)
    except types.TrajectoryError as e:
      c.fail(f"expert demonstrations at noise {noise} break the data contract: {e}")
    if noise == 0.5:
      noisy = float(np.mean(np.asarray(traj.info["success"])))

  return {"expert_success": solved, "turns": float(np.mean(info["num_turns"])),
          "garbage_success": float(np.mean(garbage["info"]["success"])),
          "garbage_error_rate": garbage["errors"] / max(garbage["turns"], 1),
          "demo_success_noisy": noisy}


def _moved(new, before) -> list[str]:
  """Paths of the state leaves that differ."""
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(new)]
  return [p for p, a, b in zip(paths, jax.tree.leaves(new), jax.tree.leaves(before))
          if not np.array_equal(a, b)]


def _play(h: EnvHarness, c: _Checker, policy, params, key, who: str) -> dict[str, Any]:
  """Play B episodes for K turns, turn t's actions `policy(t, keys [B], state, params)`,
  checking every reset and step."""
  env, B = h.env, h.B
  keys = h.keys(key)
  state, obs = h.reset(keys[0], params)
  toks, n = c.tokens(obs, env.prompt_len, f"{who}: reset's prompt", "prompt_len")
  c.framed(toks, n, np.ones(B, bool),
           [[c.ids[V.BOS]], [c.ids[V.USER], c.ids[V.SYSTEM]]], f"{who}: reset's prompt")
  again, _ = h.reset(keys[0], params)
  if _moved(jax.tree.map(np.asarray, again), jax.tree.map(np.asarray, state)):
    c.fail(f"{who}: reset is not deterministic in its key")
  s0 = jax.tree.map(np.asarray, state)
  if np.any(s0.turn != 0) or np.any(s0.done) or np.any(s0.format_errors != 0) \
      or np.any(s0.num_tool_calls != 0) or np.any(s0.success):
    c.fail(f"{who}: reset must start counters at 0 and done/success False "
           "(use base.initial_counters())")
  errors, turns = 0, 0
  max_action = np.zeros((B,), np.int64)
  for t in range(h.K):
    action = policy(t, keys[1 + 2 * t], state, params)
    prev = jax.tree.map(np.asarray, state)
    live = ~prev.done
    if who == "expert":
      max_action = np.maximum(max_action, np.where(live, np.asarray(action.length), 0))
    out = h.checked_step(keys[2 + 2 * t], state, action, params)
    raw_error, raw_len = np.asarray(out[5]), np.asarray(out[6])
    out = out[:5]
    new, reply, reward, done, info = out
    where = f"{who}: turn {t}"
    differs = structure_differences(new, state)
    if differs:  # the rollout's while_loop could not carry it; jit would compile step again
      c.fail(f"{where}: step returned a state of other shapes, dtypes or weak types than it "
             f"was given, so it would compile again ({'; '.join(differs[:3])}); build state "
             "fields with explicit dtypes (jnp.int32(0), not 0)")
    for k in BASE_INFO:
      if k not in info:
        c.fail(f"{where}: info lacks {k!r} (Environment.info reports it)")
    for k, v in info.items():
      if tuple(np.shape(v)) != (B,):
        c.fail(f"{where}: info[{k!r}] must be [B]=[{B}], got {list(np.shape(v))}")
    if tuple(reward.shape) != (B,) or reward.dtype != jnp.float32:
      c.fail(f"{where}: reward must be float32 [B], got {reward.dtype} {list(reward.shape)}")
    new, reply, reward, done, info = jax.tree.map(np.asarray, out)
    if not np.all(np.isfinite(reward)):
      b = c.first(~np.isfinite(reward))
      c.fail(f"{where}: reward {reward[b]} is not finite", b, np.asarray(action.tokens)[b])
    for k, v in info.items():
      if np.issubdtype(v.dtype, np.floating) and not np.all(np.isfinite(v)):
        c.fail(f"{where}: info[{k!r}] is not finite", c.first(~np.isfinite(v)))
    rt, rn = c.tokens(reply, env.reply_len, f"{where}: step's reply", "reply_len")
    if np.any(raw_len > env.reply_len):
      b = c.first(raw_len > env.reply_len)
      c.fail(f"{where}: step_env wrote a reply of length {int(raw_len[b])} > "
             f"env.reply_len={env.reply_len}: the content was cut (make_reply keeps at most "
             f"reply_len tokens); raise reply_len to at least {int(raw_len.max())}", b)
    ended = new.done
    if np.any(ended & (rn != 0)):
      c.fail(f"{where}: a finished episode's reply must be empty", c.first(ended & (rn != 0)))
    shown = live & ~ended
    head = [[c.ids[V.TOOL], c.ids[V.USER]]]
    c.framed(rt, rn, shown, head, f"{where}: step's reply")
    role_ok = np.where(rt[:, 0] == c.ids[V.TOOL], reply.role == base.ROLE_TOOL,
                       reply.role == base.ROLE_USER)
    if np.any(shown & ~role_ok):
      b = c.first(shown & ~role_ok)
      c.fail(f"{where}: the reply's role {int(reply.role[b])} does not match its head", b, rt[b])
    delta = info["format_errors"] - prev.format_errors
    if np.any(live & ((delta < 0) | (delta > 1))) or np.any(~live & (delta != 0)):
      b = c.first((live & ((delta < 0) | (delta > 1))) | (~live & (delta != 0)))
      c.fail(f"{where}: format_errors moved by {int(delta[b])} in one turn", b)
    counted = delta == 1
    # Every reply that is shown, or would be but for the turn limit (a terminal reply never is).
    answered = live & (~ended | new.truncated)
    mismatch = answered & (raw_error != counted)
    if np.any(mismatch):
      b = c.first(mismatch)
      last = " (the last turn: step_env's reply before the turn limit emptied it)" \
          if t == h.K - 1 else ""
      c.fail(f"{where}: a turn {'counted' if counted[b] else 'did not count'} a format error "
             f"but its reply {'has no' if counted[b] else 'holds an'} <error>{last}; an error "
             "reply if and only if format_errors += 1", b, np.asarray(action.tokens)[b][
                 :max(0, min(int(np.asarray(action.length)[b]), h.W))])
    turn_step = np.where(live, prev.turn + 1, prev.turn)
    if not np.array_equal(info["num_turns"], turn_step):
      c.fail(f"{where}: num_turns must count the agent's turns", c.first(
          info["num_turns"] != turn_step))
    errors += int(np.sum(np.where(live, delta, 0)))
    turns += int(np.sum(live))
    state = out[0]
  final = jax.tree.map(np.asarray, state)
  if not np.all(final.done):
    c.fail(f"{who}: episodes must end within max_turns={env.max_turns}",
           c.first(~final.done))
  return {"state": state, "info": jax.tree.map(np.asarray, info), "errors": errors,
          "turns": turns, "max_action_len": max_action}
