"""`envs.wrappers.Wrapper` and the declared capabilities of `base.Environment`: a wrapper
forwards everything (bitwise: the same episodes as the wrapped environment), a subclass changes
only what it overrides, and capabilities are plain attributes with documented defaults."""

from __future__ import annotations

import ast
import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtrl_jax import reflexion as RX
from mtrl_jax.envs import base, python_tool, registry, wrappers

B = 8
ROOT = pathlib.Path(__file__).resolve().parents[1]
CAPABILITIES = ("name", "Params", "empty_idle_actions", "reflection_len")


@functools.lru_cache(maxsize=None)
def make(name):
  return registry.make(name, **({"hops": 2} if name == "search" else {}))


def play(env, params, seed=0):
  """Episodes of B rows, turn by turn: the expert's turns, with random tokens in every third
  row on even turns (so that errors and early ends happen). Returns every (state, obs[, reward,
  done, info]) as numpy."""
  reset = jax.jit(jax.vmap(env.reset, in_axes=(0, None)))
  step = jax.jit(jax.vmap(env.step, in_axes=(0, 0, 0, None)))
  expert = jax.jit(jax.vmap(env.expert, in_axes=(0, 0, None)))
  state, obs = reset(jax.random.split(jax.random.key(seed), B), params)
  out = [(state, obs)]
  width = env.action_len + 3
  for t in range(env.max_turns + 1):
    keys = jax.random.split(jax.random.key(100 + t), B)
    action = expert(keys, state, params)
    tokens = jnp.pad(action.tokens, ((0, 0), (0, width - action.tokens.shape[1])))
    noise = jax.random.randint(jax.random.key(7 + t), tokens.shape, 0, env.vocab.size)
    tokens = jnp.where((jnp.arange(B)[:, None] % 3 == 2) & (t % 2 == 0), noise, tokens)
    state, obs, reward, done, info = step(keys, state, base.Action(tokens, action.length), params)
    out.append((state, obs, reward, done, info))
  return jax.tree.map(np.asarray, out)


def assert_same(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_array_equal(x, y)


# --- declared capabilities ----------------------------------------------------------------------

def test_capabilities_are_declared_with_defaults():
  assert base.Environment.name == "env"
  assert base.Environment.Params is base.EnvParams
  assert base.Environment.empty_idle_actions is False
  assert base.Environment.reflection_len == 0
  calc, _ = make("calculator")
  assert (calc.name, calc.empty_idle_actions, calc.reflection_len) == ("calculator", False, 0)
  with pytest.raises(NotImplementedError, match="no templated reflection"):
    calc.reflection(calc.reset(jax.random.key(0))[0])
  search, _ = make("search")
  fix, _ = make("fix")
  assert search.reflection_len > 0 and fix.reflection_len == 8
  assert isinstance(fix.default_params, fix.Params)


def test_no_getattr_lookups_of_capabilities():
  """Capabilities are read as attributes: no `getattr(x, "<capability>", default)` or
  `hasattr(x, "<capability>")` in the package or the experiments."""
  found = []
  for path in sorted([*(ROOT / "mtrl_jax").rglob("*.py"), *(ROOT / "experiments").rglob("*.py")]):
    rel = path.relative_to(ROOT).as_posix()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
      if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
          and node.func.id in ("getattr", "hasattr") and len(node.args) >= 2
          and isinstance(node.args[1], ast.Constant) and node.args[1].value in CAPABILITIES):
        found.append(f"{rel}:{node.lineno}")
  assert not found, found


# --- the base wrapper ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["calculator", "search", "fix"])
def test_wrapper_forwards_everything(name):
  env, params = make(name)
  w = wrappers.Wrapper(env)
  assert w.vocab is env.vocab and tuple(w.symbols()) == tuple(env.symbols())
  for attr in (*CAPABILITIES, "prompt_len", "reply_len", "action_len", "max_turns"):
    assert getattr(w, attr) == getattr(env, attr), attr
  assert_same(w.default_params, env.default_params)
  # The same episodes, bit for bit, through reset / step / expert / info.
  assert_same(play(w, params), play(env, params))
  # The environment's own attributes are read through; private ones are not.
  assert w.max_turns == env.max_turns
  if name == "search":
    assert w.hops == env.hops == 2
  with pytest.raises(AttributeError):
    w._no_such_attribute  # noqa: B018
  with pytest.raises(AttributeError):
    w.no_such_attribute  # noqa: B018


def test_wrapper_reflection_is_the_wrapped_one():
  env, params = make("search")
  w = wrappers.Wrapper(wrappers.Wrapper(env))
  final = jax.tree.map(jnp.asarray, play(env, params)[-1][0])
  assert_same(jax.vmap(w.reflection)(final), jax.vmap(env.reflection)(final))
  assert w.reflection_len == env.reflection_len and w.name == env.name


class DoubledReward(wrappers.Wrapper):
  """What a wrapper looks like: it overrides only what it changes."""

  @property
  def name(self):
    return f"doubled({self.env.name})"

  def step_env(self, key, state, action, params):
    state, obs, reward, done = self.env.step_env(key, state, action, params)
    return state, obs, 2.0 * reward, done


def test_a_subclass_changes_only_what_it_overrides():
  env, params = make("calculator")
  w = DoubledReward(env)
  assert w.name == "doubled(calculator)"
  got, want = play(w, params), play(env, params)
  assert_same(got[0], want[0])
  for g, e in zip(got[1:], want[1:]):
    np.testing.assert_array_equal(g[2], 2.0 * e[2])  # the reward
    # Everything else, including the shared bookkeeping (turn counter, truncation at the turn
    # limit, frozen finished episodes, empty final replies) applied once.
    assert_same((g[0], g[1], g[3], g[4]), (e[0], e[1], e[3], e[4]))
  assert int(got[-1][0].turn.max()) <= env.max_turns


class Replaced(base.Environment):
  """An environment that replaces the shared `step`: it cannot be wrapped faithfully."""

  def __init__(self, env):
    self.env, self.vocab = env, env.vocab

  symbols = lambda self: self.env.symbols()  # noqa: E731
  default_params = property(lambda self: self.env.default_params)
  prompt_len = property(lambda self: self.env.prompt_len)
  reply_len = property(lambda self: self.env.reply_len)
  action_len = property(lambda self: self.env.action_len)
  max_turns = property(lambda self: self.env.max_turns)
  reset_env = lambda self, *a: self.env.reset_env(*a)  # noqa: E731
  step_env = lambda self, *a: self.env.step_env(*a)  # noqa: E731
  expert = lambda self, *a: self.env.expert(*a)  # noqa: E731

  def step(self, key, state, action, params=None):
    return self.env.step(key, state, action, params)


def test_wrapping_checks_what_it_wraps():
  env, _ = make("calculator")
  with pytest.raises(TypeError, match=r"Replaced replaces \['step'\]"):
    wrappers.Wrapper(Replaced(env))
  with pytest.raises(TypeError, match="can only wrap an Environment"):
    wrappers.Wrapper(object())


def test_a_failing_property_is_not_masked_by_forwarding():
  class Broken(wrappers.Wrapper):
    @property
    def reflection_len(self):
      return self._missing * 2

  env, _ = make("search")
  with pytest.raises(AttributeError, match="Broken.reflection_len raised AttributeError"):
    Broken(env).reflection_len  # noqa: B018
  with pytest.raises(AttributeError):  # and assigning a forwarded capability is refused
    wrappers.Wrapper(env).name = "other"


# --- the package's wrappers ------------------------------------------------------------------------

def test_python_tool_env_is_a_wrapper():
  env, params = make("calculator")
  py = python_tool.PythonToolEnv(env, {"calc": python_tool.python_calculator()})
  assert isinstance(py, wrappers.Wrapper) and py.name == "python-tool(calculator)"
  assert py.Params is env.Params and py.vocab is env.vocab
  assert (py.empty_idle_actions, py.reflection_len) == (False, 0)
  # The Python calculator replies what the JAX one does: the same episodes, bit for bit.
  assert_same(play(py, params), play(env, params))


@pytest.mark.parametrize("name", ["calculator", "fix"])
def test_with_memory_is_a_wrapper(name):
  env, params = make(name)
  wrapped = RX.WithMemory(env, slots=2, reflection_len=5)
  assert isinstance(wrapped, wrappers.Wrapper) and wrapped.Params is RX.MemoryParams
  assert (wrapped.name, wrapped.reflection_len, wrapped.slot_len) == \
      (env.name, env.reflection_len, 5)
  assert wrapped.empty_idle_actions == env.empty_idle_actions
  # The steps are the wrapped environment's (with its params inside MemoryParams), through
  # `step_env` like any environment: after the same reset, the same episode.
  mem = RX.MemoryParams(inner=params, tokens=jnp.ones((2, 5), jnp.int32),
                        lengths=jnp.asarray([2, 5], jnp.int32))
  got, want = play(wrapped, mem), play(env, params)
  assert_same(got[0][0], want[0][0])  # the state; the prompt has the memory in it
  assert_same(got[1:], want[1:])
