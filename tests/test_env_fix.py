"""Tests for the `fix` environment: API and shapes, the interpreter and `run` against plain
Python, stateful edits, the turn penalty, loops, malformed actions, the expert, a rollout.

Compile budget (as in tests/test_envs.py): reset, step and the test policies are jitted once,
vmapped over B = 64 at one action width, and cached in `harness()`; episodes are stepped from
Python through those compiled functions.
"""

from __future__ import annotations

import functools
import hashlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from mtrl_jax import rollout as R
from mtrl_jax import vocab as V
from mtrl_jax.envs import base, demos, registry
from mtrl_jax.envs import fix as F
from mtrl_jax.models import transformer as tf
from mtrl_jax.types import check_trajectory

from mtrl_jax.envs import check

B = 64
EXPERT, RANDOM = check.EXPERT, check.RANDOM


class Harness(check.EnvHarness):

  def __init__(self, **overrides):
    env, params = registry.make("fix", **overrides)
    super().__init__(env, params, width=env.action_len + 3, batch=B)

  def expert(self, keys, state, params):
    return self._policy(keys, state, params, EXPERT)

  def random(self, keys, state, params):
    return self._policy(keys, state, params, RANDOM)

  def play(self, policy, params, key, batches=4):
    """Play batches x B episodes to the end: (final info, summed rewards), numpy."""
    infos, returns = [], []
    for i in range(batches):
      keys = self.keys(jax.random.fold_in(key, i))
      state, _ = self.reset(keys[0], params)
      total = np.zeros((B,), np.float32)
      for t in range(self.K):
        state, _, reward, _, info = self.step(keys[2 + 2 * t], state,
                                              policy(keys[1 + 2 * t], state, params), params)
        total += np.asarray(reward)
      assert np.asarray(state.done).all()
      infos.append(jax.tree.map(np.asarray, info))
      returns.append(total)
    return jax.tree.map(lambda *x: np.concatenate(x), *infos), np.concatenate(returns)


@functools.lru_cache(maxsize=None)
def harness() -> Harness:
  return Harness()


@functools.lru_cache(maxsize=None)
def expert_play(noise: float, turn_penalty: float = 0.0):
  h = harness()
  return h.play(h.expert, h.params.replace(noise=noise, turn_penalty=turn_penalty),
                jax.random.PRNGKey(1))


def np_state(state, i):
  return jax.tree.map(lambda x: np.asarray(x[i]), state)


# --- plain-Python references -------------------------------------------------------------------

def py_execute(ops, args, x):
  """Accumulator after every line, the interpreter's semantics in plain Python."""
  acc, trace = int(x), []
  for op, d in zip(ops, args):
    acc = {F.OP_ADD: acc + d, F.OP_SUB: acc - d, F.OP_MUL: acc * d}[int(op)] % 10
    trace.append(acc)
  return trace


def py_run_reply(s, report_line=True):
  """What `run` must answer for a state (numpy leaves)."""
  cur = [py_execute(s.ops, s.args, x) for x in s.inputs]
  ref = [py_execute(s.ref_ops, s.ref_args, x) for x in s.inputs]
  failing = [t for t in range(len(s.inputs)) if cur[t][-1] != ref[t][-1]]
  if not failing:
    return "<tool> pass <eot> <assistant>"
  t = failing[0]
  if report_line:
    line = next(i for i in range(len(cur[t])) if cur[t][i] != ref[t][i])
    body = f"fail {len(failing)} line {line + 1} got {cur[t][line]} want {ref[t][line]}"
  else:
    body = f"fail {len(failing)} in {s.inputs[t]} got {cur[t][-1]} want {ref[t][-1]}"
  return f"<tool> {body} <eot> <assistant>"


def py_listing(s):
  return " ".join(f"{i + 1} {F.OPS[o]} {a}" for i, (o, a) in enumerate(zip(s.ops, s.args)))


def py_turn_penalty(turns, start, limit):
  if turns <= start:
    return 0.0
  return -min(1.0, (turns - start) / max(limit - start, 1))


# --- API, shapes, determinism ------------------------------------------------------------------

def test_check_env_passes():
  """The public contract check (`mtrl_jax.envs.check_env`) on `fix`, reusing its harness."""
  h = harness()
  report = check.check_env(h.env, h.params, harness=h)
  assert report["expert_success"] == 1.0 and report["turns"] > 1
  assert report["garbage_success"] < 0.05 and report["garbage_error_rate"] > 0.9, report


def test_reset_step_expert_shapes_jit_vmap():
  h = harness()
  env = h.env
  keys = h.keys(jax.random.PRNGKey(0))
  state, obs = h.reset(keys[0], h.params)
  chex.assert_shape(obs.tokens, (B, env.prompt_len))
  chex.assert_type([obs.tokens, obs.length, state.ops, state.args], jnp.int32)
  chex.assert_shape([state.ops, state.args, state.ref_ops, state.ref_args, state.viewed],
                    (B, env.num_lines))
  chex.assert_shape(state.inputs, (B, env.num_tests))
  assert env.vocab.decode(np.asarray(obs.tokens[0])) == \
      "<bos> <user> fix program 4 lines <eot> <assistant>"
  action, (new, reply, reward, done, info) = h.check_step_contract(keys, state, (
      "tests_passed", "bugs_left", "runs", "views", "edits", "noop_edits", "loops",
      "submitted"))
  # Deterministic per key; different keys give different programs.
  chex.assert_trees_all_equal((state, obs), h.reset(keys[0], h.params))
  chex.assert_trees_all_equal(reply, h.step(keys[2], state, action, h.params)[1])
  assert not np.array_equal(np.asarray(state.ops), np.asarray(h.reset(keys[1], h.params)[0].ops))
  # Unbatched jit agrees with the vmapped functions.
  s0, o0 = jax.jit(env.reset)(keys[0, 0], h.params)
  chex.assert_trees_all_equal((s0, o0), jax.tree.map(lambda x: x[0], (state, obs)))
  a0 = jax.jit(env.expert)(keys[1, 0], s0, h.params)
  r0 = jax.jit(env.step)(keys[2, 0], s0, a0, h.params)[1]
  chex.assert_trees_all_equal(r0, jax.tree.map(lambda x: x[0], reply))


def test_episode_draws_programs_with_bugs():
  h = harness()
  state, _ = h.reset(h.keys(jax.random.PRNGKey(2))[0], h.params)
  s = jax.tree.map(np.asarray, state)
  diff = (s.ops != s.ref_ops) | (s.args != s.ref_args)
  assert (diff.sum(1) == h.env.num_bugs).all()
  # Sign bugs: add <-> sub with the same operand; the reference's operands are bijective.
  assert (s.args == s.ref_args).all() and set(s.ref_ops[diff]) <= {F.OP_ADD, F.OP_SUB}
  assert (s.ops[diff] == 1 - s.ref_ops[diff]).all()
  add = s.ref_ops != F.OP_MUL
  assert set(s.ref_args[add]) <= set(F.ADD_OPERANDS)
  assert set(s.ref_args[~add]) <= set(F.MUL_OPERANDS)
  assert all(len(set(x)) == h.env.num_tests for x in s.inputs)
  # Every fresh program fails a hidden test.
  for b in range(B):
    sb = np_state(state, b)
    assert any(py_execute(sb.ops, sb.args, x)[-1] != py_execute(sb.ref_ops, sb.ref_args, x)[-1]
               for x in sb.inputs)


@pytest.mark.parametrize("kind", [pytest.param("operand", marks=pytest.mark.slow), "mixed"])
def test_other_bug_kinds_and_sizes(kind):
  env, params = registry.make("fix", bug_kind=kind, num_lines=6, num_bugs=2)
  traj = jax.tree.map(np.asarray, demos.demonstrations(env, params, jax.random.PRNGKey(3), 32,
                                                       demos.required_len(env)))
  check_trajectory(traj)
  assert traj.info["success"].all() and (traj.info["num_turns"] == 8).all()
  assert (traj.info["edits"] == 2).all() and (traj.info["bugs_left"] == 0).all()


# --- the interpreter, `run`, `view`, `edit`: stateful ------------------------------------------

@settings(max_examples=30, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, 2), st.integers(0, 9)), min_size=2, max_size=9),
       st.lists(st.integers(0, 9), min_size=1, max_size=5))
def test_execute_matches_python(program, inputs):
  ops = np.asarray([o for o, _ in program], np.int32)
  args = np.asarray([a for _, a in program], np.int32)
  got = np.asarray(_execute(jnp.asarray(ops), jnp.asarray(args), jnp.asarray(inputs, jnp.int32)))
  assert got.tolist() == [py_execute(ops, args, x) for x in inputs]


@functools.partial(jax.jit)
def _execute(ops, args, inputs):
  return F.execute(ops, args, inputs)


def test_edits_change_what_view_and_run_show():
  h = harness()
  keys = h.keys(jax.random.PRNGKey(4))
  state, _ = h.reset(keys[0], h.params)
  s = [np_state(state, b) for b in range(B)]
  # view (all), view 2 and run on the fresh program: exactly the Python rendering.
  tool = lambda text: f"<tool> {text} <eot> <assistant>"
  for row, want in (("<call> view </call> <eot>", lambda sb: tool(py_listing(sb))),
                    ("<call> view 2 </call> <eot>",
                     lambda sb: tool(" ".join(py_listing(sb).split()[3:6]))),
                    ("<call> run </call> <eot>", py_run_reply)):
    _, reply, reward, done, info = h.step(keys[2], state, h.actions([row]), h.params)
    for b in range(B):
      assert h.decode(reply, b) == want(s[b]), (row, b)
    assert not np.asarray(done).any() and (np.asarray(info["format_errors"]) == 0).all()
  # Edit line 1 of every program to `mul 9`: the reply echoes it, the state holds it, and the
  # next view / run show the edited program.
  state2, reply, _, _, info = h.step(keys[2], state, h.actions(["<call> edit 1 mul 9 </call>"]),
                                     h.params)
  assert all(h.decode(reply, b) == "<tool> ok 1 mul 9 <eot> <assistant>" for b in range(B))
  assert (np.asarray(state2.ops)[:, 0] == F.OP_MUL).all()
  assert (np.asarray(state2.args)[:, 0] == 9).all()
  assert (np.asarray(info["edits"]) == 1).all() and np.asarray(state2.stale).all()
  # Writing the same instruction again is a no-op edit (a looping symptom).
  noop = np.asarray(h.step(keys[3], state2, h.actions(["<call> edit 1 mul 9 </call>"]),
                           h.params)[4]["noop_edits"])
  first = (np.asarray(state.ops)[:, 0] == F.OP_MUL) & (np.asarray(state.args)[:, 0] == 9)
  np.testing.assert_array_equal(np.asarray(info["noop_edits"]), first)
  np.testing.assert_array_equal(noop, first + 1)
  _, reply, _, _, _ = h.step(keys[4], state2, h.actions(["<call> view 1 </call>"]), h.params)
  assert all(h.decode(reply, b) == "<tool> 1 mul 9 <eot> <assistant>" for b in range(B))
  state3, reply, _, _, info = h.step(keys[4], state2, h.actions(["<call> run </call>"]), h.params)
  s2 = [np_state(state2, b) for b in range(B)]
  assert all(h.decode(reply, b) == py_run_reply(s2[b]) for b in range(B))
  assert not np.asarray(state3.stale).any() and (np.asarray(info["runs"]) == 1).all()
  # Without report_line, run reports the first failing test's input and final outputs.
  no_line = h.params.replace(report_line=False)
  _, reply, _, _, _ = h.step(keys[4], state2, h.actions(["<call> run </call>"]), no_line)
  assert all(h.decode(reply, b) == py_run_reply(s2[b], report_line=False) for b in range(B))
  # Fixing every line to the reference makes run pass and submit succeed.
  fixed = state.replace(ops=state.ref_ops, args=state.ref_args)
  _, reply, _, _, info = h.step(keys[2], fixed, h.actions(["<call> run </call>"]), h.params)
  assert all(h.decode(reply, b) == "<tool> pass <eot> <assistant>" for b in range(B))
  assert (np.asarray(info["tests_passed"]) == h.env.num_tests).all()
  _, reply, reward, done, info = h.step(keys[2], fixed, h.actions(["<call> submit </call>"]),
                                        h.params)
  assert np.asarray(done).all() and (np.asarray(reward) == 1).all()
  assert np.asarray(info["success"]).all() and (np.asarray(reply.length) == 0).all()
  # Submitting the buggy program ends the episode with reward 0.
  _, _, reward, done, info = h.step(keys[2], state, h.actions(["<call> submit </call>"]), h.params)
  assert np.asarray(done).all() and (np.asarray(reward) == 0).all()
  assert not np.asarray(info["success"]).any() and np.asarray(info["submitted"]).all()


def test_loops_count_repeated_actions():
  h = harness()
  keys = h.keys(jax.random.PRNGKey(5))
  state, _ = h.reset(keys[0], h.params)
  seq = ["<call> run </call>", "<call> run </call>", "<call> view 1 </call>",
         "<call> view 1 </call>", "<call> view 1 </call>", "<call> run </call>"]
  for t, row in enumerate(seq):
    state, _, _, _, info = h.step(keys[2 + t], state, h.actions([row]), h.params)
  assert (np.asarray(info["loops"]) == 3).all()
  assert (np.asarray(info["runs"]) == 3).all() and (np.asarray(info["views"]) == 3).all()


# --- reward: the turn penalty --------------------------------------------------------------------

def test_turn_penalty_formula_matches_python():
  grid = [(n, s, k) for k in (4, 7, 12) for s in range(0, k + 2) for n in range(0, k + 1)]
  n, s, k = (jnp.asarray(x) for x in zip(*grid))
  got = np.asarray(jax.jit(F.turn_penalty)(n, s, k))
  want = np.asarray([py_turn_penalty(*g) for g in grid], np.float32)
  np.testing.assert_allclose(got, want, atol=1e-6)
  assert got.min() == -1.0 and got.max() == 0.0


def test_turn_penalty_in_episodes():
  h = harness()
  K, start = h.K, h.params.penalty_start
  assert (K, start) == (7, 5)
  on = h.params.replace(turn_penalty=1.0)
  # The expert needs exactly penalty_start turns: no penalty.
  info, returns = expert_play(0.0, turn_penalty=1.0)
  assert info["success"].all() and (info["num_turns"] == start).all()
  np.testing.assert_allclose(returns, 1.0)
  # n turns then submit (a fixed program): 1 + penalty(n); the reward comes on the last turn.
  keys = h.keys(jax.random.PRNGKey(6))
  state, _ = h.reset(keys[0], on)
  state = state.replace(ops=state.ref_ops, args=state.ref_args)
  for n in range(1, 6):
    state, _, reward, done, _ = h.step(keys[n], state, h.actions(["<call> view </call>"]), on)
    np.testing.assert_allclose(np.asarray(reward), 0.0)
  state, _, reward, done, _ = h.step(keys[6], state, h.actions(["<call> submit </call>"]), on)
  np.testing.assert_allclose(np.asarray(reward), 1 + py_turn_penalty(6, start, K), atol=1e-6)
  assert np.asarray(done).all() and py_turn_penalty(6, start, K) == -0.5
  # Looping until the turn limit: the truncated episode's last turn carries penalty -1.
  state, _ = h.reset(keys[0], on)
  for n in range(1, K + 1):
    state, _, reward, done, info = h.step(keys[n], state, h.actions(["<call> run </call>"]), on)
    want = py_turn_penalty(n, start, K) if n == K else 0.0
    np.testing.assert_allclose(np.asarray(reward), want, atol=1e-6)
  assert np.asarray(info["truncated"]).all() and (np.asarray(info["loops"]) == K - 1).all()
  # Off by default.
  state, _ = h.reset(keys[0], h.params)
  for n in range(1, K + 1):
    state, _, reward, _, _ = h.step(keys[n], state, h.actions(["<call> run </call>"]), h.params)
  np.testing.assert_allclose(np.asarray(reward), 0.0)


# --- expert and baselines ------------------------------------------------------------------------

def test_expert_solves_and_noise_hurts():
  info, returns = expert_play(0.0)
  assert info["success"].all() and (info["format_errors"] == 0).all()
  assert (info["num_turns"] == 5).all() and (info["loops"] == 0).all()
  assert (info["runs"] == 2).all() and (info["views"] == 1).all() and (info["edits"] == 1).all()
  assert (info["tests_passed"] == 3).all() and (info["bugs_left"] == 0).all()
  assert (info["noop_edits"] == 0).all()
  np.testing.assert_allclose(returns, 1.0)
  noisy, _ = expert_play(0.5)
  print(f"fix: noise 0.5 success {noisy['success'].mean():.3f}")
  assert 0.1 < noisy["success"].mean() < 0.9
  assert noisy["loops"].sum() > 0 and noisy["format_errors"].sum() > 0
  h = harness()
  rand, _ = h.play(h.random, h.params, jax.random.PRNGKey(3), batches=2)
  assert rand["success"].mean() < 0.02 and rand["format_errors"].mean() > 0.5 * h.K


# --- malformed actions ---------------------------------------------------------------------------

OOV = 10_000
ERRORS = [
    ([], "format"),
    ("<eot>", "format"),
    ([OOV, -5, 3], "format"),
    ("<ask> <eot>", "format"),
    ("<answer> 1 </answer> <eot>", "format"),
    ("<call> run <eot>", "unclosed"),
    ("<call> run", "unclosed"),
    ("<think> run <eot>", "unclosed"),
    ("<call> run </call> run <eot>", "format"),
    ("<call> </call> <eot>", "unknown-tool"),
    ("<call> fix </call> <eot>", "unknown-tool"),
    ("<call> add 1 </call> <eot>", "unknown-tool"),
    (["<call>", OOV, "</call>"], "unknown-tool"),
    ("<call> run 1 </call>", "bad-argument"),
    ("<call> submit ok </call>", "bad-argument"),
    ("<call> view 0 </call>", "bad-argument"),
    ("<call> view 5 </call>", "bad-argument"),
    ("<call> view 1 2 </call>", "bad-argument"),
    ("<call> view add </call>", "bad-argument"),
    ("<call> edit 1 add </call>", "bad-argument"),
    ("<call> edit 1 add 3 4 </call>", "bad-argument"),
    ("<call> edit 9 add 3 </call>", "bad-argument"),
    ("<call> edit 0 add 3 </call>", "bad-argument"),
    ("<call> edit 1 run 3 </call>", "bad-argument"),
    ("<call> edit 1 add mul </call>", "bad-argument"),
    (["<call>", "edit", "1", "add", OOV, "</call>"], "bad-argument"),
    ("<call> edit add 1 3 </call>", "bad-argument"),
]
VALID = ["<call> run </call> <eot>", "<call> view </call>", "<call> view 4 </call>",
         "<call> edit 4 sub 0 </call> <eot>", "<think> fix </think> <call> run </call>",
         "<call> submit </call> <eot> <eot> add"]


def test_malformed_actions_answered_with_errors():
  h = harness()
  keys = h.keys(jax.random.PRNGKey(9))
  state, _ = h.reset(keys[0], h.params)
  params = h.params.replace(format_penalty=0.25)
  new, reply, reward, done, info = jax.tree.map(
      np.asarray, h.step(keys[2], state, h.actions([r for r, _ in ERRORS]), params))
  for i, (row, code) in enumerate(ERRORS):
    assert h.decode(reply, i) == f"<tool> <error> {code} <eot> <assistant>", row
    assert info["format_errors"][i] == 1 and not done[i] and reward[i] == -0.25, row
  # Program untouched by failed edits.
  np.testing.assert_array_equal(new.ops[:len(ERRORS)], np.asarray(state.ops)[:len(ERRORS)])
  assert (new.edits == 0).all()
  _, reply, _, _, info = jax.tree.map(np.asarray,
                                      h.step(keys[2], state, h.actions(VALID), h.params))
  for i, row in enumerate(VALID):
    assert info["format_errors"][i] == 0 and "<error>" not in h.decode(reply, i), row
    assert info["num_tool_calls"][i] == 1, row


@settings(max_examples=25, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_random_token_sequences_never_break_step(data):
  h = harness()
  env = h.env
  control = [env.vocab.id(s) for s in V.SPECIAL_TOKENS] + [env.vocab.id(s) for s in F.TOOLS]
  token = st.one_of(st.sampled_from(control), st.integers(-3, env.vocab.size + 3),
                    st.integers(-2**31, 2**31 - 1))
  toks = data.draw(st.lists(token, max_size=h.W))
  length = data.draw(st.integers(-2, h.W + 2))
  state, keys = _mid_states()
  arr = np.zeros((h.W,), np.int32)
  arr[:len(toks)] = toks
  action = base.Action(jnp.broadcast_to(jnp.asarray(arr), (B, h.W)),
                       jnp.full((B,), length, jnp.int32))
  new, reply, reward, done, info = h.step(keys, state, action, h.params)
  assert np.all(np.isfinite(np.asarray(reward)))
  r = np.asarray(reply.tokens)
  assert r.min() >= 0 and r.max() < env.vocab.size
  assert np.all((np.asarray(reply.length) >= 0) & (np.asarray(reply.length) <= env.reply_len))
  errors = np.asarray(info["format_errors"]) - np.asarray(state.format_errors)
  assert np.array_equal(np.array([env.vocab.id(V.ERROR) in row for row in r]), errors == 1)
  ops, args = np.asarray(new.ops), np.asarray(new.args)
  assert ops.min() >= 0 and ops.max() <= 2 and args.min() >= 0 and args.max() <= 9


@functools.lru_cache(maxsize=None)
def _mid_states():
  h = harness()
  keys = h.keys(jax.random.PRNGKey(11))
  state, _ = h.reset(keys[0], h.params)
  for t in range(2):
    state = h.step(keys[2 + 2 * t], state, h.expert(keys[1 + 2 * t], state, h.params), h.params)[0]
  return state, keys[2]


# --- construction, registry, vocabularies -------------------------------------------------------

def test_constructor_checks_name_the_setting():
  for kwargs, name in [(dict(num_lines=10), "num_lines"), (dict(num_lines=1), "num_lines"),
                       (dict(num_bugs=5), "num_bugs"), (dict(num_bugs=0), "num_bugs"),
                       (dict(num_tests=2), "num_tests"), (dict(bug_kind="typo"), "bug_kind"),
                       (dict(num_bugs=2, max_turns=7), "max_turns")]:
    with pytest.raises(ValueError, match=name):
      F.Fix(**kwargs)
  env, params = registry.make("fix", num_lines=6, num_bugs=2, report_line=False,
                              turn_penalty=1.0, noise=0.1)
  assert env.num_lines == 6 and env.max_turns == 10 and env.reply_len == 21
  assert params.penalty_start == 8 and not params.report_line and params.turn_penalty == 1.0
  with pytest.raises(ValueError, match=r"lines.*num_lines"):
    registry.make("fix", lines=3)


def test_existing_vocabularies_unchanged():
  """Registering the new environments must not move any token id of the existing ones (the
  quickstart's trained results depend on them): pinned digests of their symbol lists."""
  pinned = {"calculator": (39, "ae25ea8f14cd969c"), "search": (57, "4584927d935d0bc2"),
            "clarify": (43, "6c6dbab6a5539d23")}
  for name, (size, digest) in pinned.items():
    symbols = registry.make(name)[0].vocab.symbols
    assert (len(symbols), hashlib.sha256(" ".join(symbols).encode()).hexdigest()[:16]) == \
        (size, digest), name
  assert {"fix", "retrieval"} <= set(registry.list_envs())


# --- demonstrations and the fused rollout -------------------------------------------------------

def test_demonstrations_and_rollout():
  h = harness()
  env = h.env
  need = demos.required_len(env)
  assert need == env.prompt_len + env.max_turns * (env.action_len + env.reply_len) == 162
  traj = jax.tree.map(np.asarray, demos.demonstrations(env, h.params.replace(noise=0.3),
                                                       jax.random.PRNGKey(7), 32, need))
  check_trajectory(traj)
  assert 0.1 < traj.info["success"].mean() < 1.0
  # A tiny random model through the fused rollout.
  traj = _rollout(False)
  check_trajectory(traj)
  chex.assert_shape(traj.tokens, (8, 96))
  chex.assert_shape(traj.turn_end, (8, env.max_turns))
  assert (traj.done | traj.truncated).all() and traj.loss_mask.any()


@pytest.mark.slow
def test_expert_through_fused_rollout():
  traj = _rollout(True)
  check_trajectory(traj)
  assert traj.info["success"].all() and (traj.info["num_turns"] == 5).all()
  np.testing.assert_allclose(traj.returns, 1.0)


def _rollout(force_expert: bool):
  h = harness()
  cfg = tf.ModelConfig(vocab_size=h.env.vocab.size, d_model=32, num_layers=1, num_heads=2,
                       num_kv_heads=1, mlp_dim=64)
  params = tf.init_params(cfg, jax.random.key(0))
  rc = R.RolloutConfig(num_envs=4, group_size=2, max_len=96, turn_budget=10,
                       force_expert=force_expert)
  return jax.tree.map(np.asarray, jax.jit(R.make_rollout(h.env, cfg, rc))(
      params, jax.random.key(1), h.params))
