"""Demonstrators with habits (`EnvParams.habit_p`): in a habit episode the expert follows its
environment's systematic suboptimal strategy. The habit rate in generated demonstrations is
`habit_p`, habit episodes succeed as often as the environment's docstring says (and show the
habit's signature), the others are the expert's; `habit_p` needs no recompilation."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from mtrl_jax.envs import base, demos, registry

N = 512  # demonstrations per check: the habit rate's standard error at p = 0.6 is 0.022


def _calculator_signature(info, habit):
  """Habit episodes never call the tool; expert episodes call it once."""
  assert (info["num_tool_calls"][habit] == 0).all()
  assert (info["num_tool_calls"][~habit] == 1).all()


def _search_signature(info, habit, hops=2):
  """Habit episodes stop one hop short (hops - 1 searches, all on the chain); expert episodes
  search the whole chain. (`hops` is the default Search's.)"""
  for key in ("num_tool_calls", "hops_found"):
    assert (info[key][habit] == hops - 1).all(), key
    assert (info[key][~habit] == hops).all(), key
  assert info["answered"].all()


def _clarify_signature(info, habit, k=3):
  """Habit episodes answer at once (no ask, premature, one constraint known); expert episodes
  ask the k - 1 others first. (`k` is the default Clarify's.)"""
  assert (info["num_asks"][habit] == 0).all() and info["premature"][habit].all()
  assert (info["constraints_known"][habit] == 1).all()
  assert (info["num_asks"][~habit] == k - 1).all() and not info["premature"][~habit].any()


def _fix_signature(info, habit):
  """Habit episodes never run the tests: view, one edit (a no-op exactly when the guessed line
  was not the bug), submit; expert episodes run twice (before and after the fix)."""
  success = info["success"].astype(bool)
  assert (info["runs"][habit] == 0).all() and (info["views"][habit] == 1).all()
  assert (info["edits"][habit] == 1).all() and info["submitted"][habit].all()
  assert (info["noop_edits"][habit] == ~success[habit]).all()
  assert (info["runs"][~habit] == 2).all() and (info["noop_edits"][~habit] == 0).all()


def _retrieval_signature(info, habit, need=2):
  """Habit episodes answer the user's raw text: their metrics are the raw query's, with all
  `need` words (the default Retrieval's); expert episodes do better on average."""
  np.testing.assert_array_equal(info["ndcg"][habit], info["raw_ndcg"][habit])
  np.testing.assert_array_equal(info["recall"][habit], info["raw_recall"][habit])
  assert (info["query_terms"][habit] == need).all() and info["answered"].all()
  if (~habit).any():
    assert info["ndcg"][~habit].mean() > info["raw_ndcg"][~habit].mean() + 0.3


# name: (registry overrides, (low, high) success of habit episodes, signature check)
HABITS = {
    # the no-tool guess: right ~1% of the time
    "calculator": ({}, (0.0, 0.03), _calculator_signature),
    # one hop short, answering the last searched entity's attribute: ~1/num_values = 1/8
    "search": ({}, (0.05, 0.2), _search_signature),
    # answer at once, guessing the 2 untold attributes: num_values ** -2 = 1/16
    "clarify": ({}, (0.01, 0.12), _clarify_signature),
    # never run the tests, edit a guessed line: right 1/num_lines = 1/4 of the time
    "fix": ({}, (0.15, 0.35), _fix_signature),
    # the raw user text as the query: perfect ranking ~0.11 of the time
    "retrieval": ({}, (0.04, 0.19), _retrieval_signature),
}


def habit_flags(env, params, key, n):
  """[n] bool: which of `demos.demonstrations(env, params, key, n, ...)` are habit episodes,
  recomputed from the documented key layout (reset key = split(split(key, n)[i])[0])."""
  resets = jax.vmap(lambda k: jax.random.split(k, 1 + 2 * env.max_turns)[0])(
      jax.random.split(key, n))
  return np.asarray(jax.vmap(base.draw_habit, in_axes=(0, None))(resets, params))


@pytest.mark.parametrize("name", sorted(HABITS))
def test_habit_rate_success_and_signature(name):
  overrides, (low, high), signature = HABITS[name]
  env, params = registry.make(name, **overrides)
  key = jax.random.key(3)
  length = demos.required_len(env)
  compiled = []
  for p in (0.0, 0.6, 1.0):  # one compiled function: habit_p is dynamic
    pp = params.replace(habit_p=p)
    traj = demos.demonstrations(env, pp, key, N, length)
    compiled.append(demos._demos._cache_size())
    info = jax.tree.map(np.asarray, traj.info)
    habit = habit_flags(env, pp, key, N)
    rate = habit.mean()
    assert abs(rate - p) <= 4 * np.sqrt(p * (1 - p) / N) + 1e-9, (p, rate)
    success = info["success"].astype(bool)
    assert success[~habit].all(), f"{name}: expert episodes must succeed without noise"
    if habit.any():
      assert low <= success[habit].mean() <= high, (name, success[habit].mean())
      signature(info, habit)
  assert compiled[0] == compiled[-1], "habit_p must not recompile the demonstrations"


@pytest.mark.parametrize("name", sorted(HABITS))
def test_habit_is_independent_of_the_episode(name):
  """Same keys, habit on or off: the prompts are the same (the draw does not consume the
  reset key), so a habit warm start and an expert one see the same questions."""
  env, params = registry.make(name, **HABITS[name][0])
  key = jax.random.key(5)
  _, obs0 = env.reset(key, params)
  state1, obs1 = env.reset(key, params.replace(habit_p=1.0))
  np.testing.assert_array_equal(np.asarray(obs0.tokens), np.asarray(obs1.tokens))
  assert bool(state1.habit)
