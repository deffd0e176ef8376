"""Tests for the pure-JAX environments, their tools, the registry and expert demonstrations.

Compile budget: every environment is jitted once per function at one batch size (B = 64) and
one action width (W = action_len + 3), cached in `harness(name)`; statistics over 256
episodes run 4 batches of 64 through the same compiled functions, stepping turns from Python.
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from mtrl_jax import vocab as V
from mtrl_jax.envs import base, demos, registry
from mtrl_jax.envs import tools as T
from mtrl_jax.envs.calculator import Calculator
from mtrl_jax.envs.clarify import Clarify
from mtrl_jax.envs.search import Search
from mtrl_jax.types import check_trajectory

from mtrl_jax.envs import check

B = 64            # batch of every compiled function
EXPERT, RANDOM, SHORTCUT = check.EXPERT, check.RANDOM, check.FIRST_EXTRA  # test policies
EPISODES = 256    # episodes for success statistics (4 batches of B)
ENVS = ("calculator", "search", "clarify")
SETTINGS = dict(max_examples=50, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# --- shared, compiled-once harness -----------------------------------------------------------

class Harness(check.EnvHarness):
  """One environment with its functions jitted (vmapped over B) once; mode SHORTCUT plays the
  environment's shortcut policy below."""

  def __init__(self, name: str):
    self.name = name
    env, params = registry.make(name)
    super().__init__(env, params, width=env.action_len + 3, batch=B)
    self.expert = self.policy(EXPERT)
    self.random = self.policy(RANDOM)
    self.shortcut = self.policy(SHORTCUT)

  def extra_policies(self, key, state, params):
    return [SHORTCUTS[self.name](self.env, key, state)]

  def play(self, policy, params, key, batches=EPISODES // B):
    """Play `batches` x B episodes to the end; returns the final info (numpy, [batches * B])."""
    infos = []
    for b in range(batches):
      keys = self.keys(jax.random.fold_in(key, b))
      state, _ = self.reset(keys[0], params)
      for t in range(self.K):
        action = policy(keys[1 + 2 * t], state, params)
        state, _, _, _, info = self.step(keys[2 + 2 * t], state, action, params)
      assert bool(np.all(state.done)), "episodes must end within max_turns"
      infos.append(jax.tree.map(np.asarray, info))
    return jax.tree.map(lambda *x: np.concatenate(x), *infos)


# Policies that skip what makes the task solvable (the hidden state gives them the *rest* of the
# expert's knowledge, so they measure exactly the value of the skipped step).
def _calc_no_tool(env: Calculator, key, state):
  return env.answer_action(env.estimate(T.random_bits(key, 1)[0], state))


def _search_one_hop_short(env: Search, key, state):
  found = env.hops_found(state)
  last = state.chain[jnp.maximum(found - 1, 0)]
  guess = jnp.where(found > 0, state.attr[last, state.qattr],
                    T.below(T.random_bits(key, 1)[0], env.num_values))
  return T.choose_action(
      (found >= env.hops - 1).astype(jnp.int32),
      [env.search_action(state.chain[jnp.minimum(found, env.hops - 1)]),
       env.answer_action(state.qattr * env.num_values + guess)])


def _clarify_no_ask(env: Clarify, key, state):
  bits = T.random_bits(key, env.num_attributes)
  return env.answer_action(jnp.where(env.known(state), state.target,
                                     T.below(bits, env.num_values)))


SHORTCUTS = {"calculator": _calc_no_tool, "search": _search_one_hop_short,
             "clarify": _clarify_no_ask}


@functools.lru_cache(maxsize=None)
def harness(name: str) -> Harness:
  return Harness(name)


@functools.lru_cache(maxsize=None)
def expert_stats(name: str, noise: float):
  h = harness(name)
  return h.play(h.expert, h.params.replace(noise=noise), jax.random.PRNGKey(1))


@functools.lru_cache(maxsize=None)
def demo_batch(name: str, noise: float = 0.0):
  h = harness(name)
  return demos.demonstrations(h.env, h.params.replace(noise=noise), jax.random.PRNGKey(7), B,
                              demos.required_len(h.env) + 5)


def _leading_b(tree):
  for leaf in jax.tree.leaves(tree):
    assert leaf.shape[0] == B, leaf.shape


# --- API, shapes, determinism ----------------------------------------------------------------

@pytest.mark.parametrize("name", ENVS)
def test_reset_step_expert_jit_vmap_shapes(name):
  h = harness(name)
  env = h.env
  keys = h.keys(jax.random.PRNGKey(0))
  state, obs = h.reset(keys[0], h.params)
  _leading_b(state)
  chex.assert_shape(obs.tokens, (B, env.prompt_len))
  chex.assert_type([obs.tokens, obs.length], jnp.int32)
  assert np.all(np.asarray(obs.length) <= env.prompt_len)
  assert np.all(np.asarray(obs.tokens)[:, 0] == env.vocab.bos_id)
  chex.assert_trees_all_equal(state.turn, jnp.zeros((B,), jnp.int32))

  action, (new, reply, reward, done, info) = h.check_step_contract(keys, state)
  chex.assert_shape(action.length, (B,))
  _leading_b(info)
  chex.assert_trees_all_equal(new.turn, jnp.ones((B,), jnp.int32))

  # Deterministic for equal keys, different for different keys.
  state2, obs2 = h.reset(keys[0], h.params)
  chex.assert_trees_all_equal((state, obs), (state2, obs2))
  chex.assert_trees_all_equal(action, h.expert(keys[1], state, h.params))
  chex.assert_trees_all_equal(reply, h.step(keys[2], state, action, h.params)[1])
  assert not np.array_equal(np.asarray(obs.tokens), np.asarray(h.reset(keys[1], h.params)[1].tokens))


@pytest.mark.parametrize("name", ENVS)
def test_unbatched_jit_matches_vmapped(name):
  h = harness(name)
  env = h.env
  keys = h.keys(jax.random.PRNGKey(3))
  state, obs = jax.jit(env.reset)(keys[0, 0], h.params)
  vstate, vobs = h.reset(keys[0], h.params)
  chex.assert_trees_all_equal(obs, jax.tree.map(lambda x: x[0], vobs))
  action = jax.jit(env.expert)(keys[1, 0], state, h.params)
  chex.assert_shape(action.tokens, (env.action_len,))
  _, reply, reward, done, info = jax.jit(env.step)(keys[2, 0], state, action, h.params)
  vreply = h.step(keys[2], vstate, h.expert(keys[1], vstate, h.params), h.params)[1]
  chex.assert_trees_all_equal(reply, jax.tree.map(lambda x: x[0], vreply))
  chex.assert_rank([reward, done, reply.length], 0)


def test_finished_episode_does_not_move():
  h = harness("clarify")
  keys = h.keys(jax.random.PRNGKey(4))
  state, _ = h.reset(keys[0], h.params)
  answer = h.actions(["<answer> red tiny wood </answer> <eot>"])
  state, reply, _, done, _ = h.step(keys[2], state, answer, h.params)
  assert np.all(np.asarray(done)) and np.all(np.asarray(reply.length) == 0)
  again, reply2, reward2, done2, _ = h.step(keys[4], state, answer, h.params)
  chex.assert_trees_all_equal(again, state)
  assert np.all(np.asarray(reward2) == 0) and np.all(np.asarray(reply2.tokens) == 0)


@pytest.mark.parametrize("name", ENVS)
def test_check_env_passes(name):
  """The public contract check (`mtrl_jax.envs.check_env`, tested on broken environments in
  test_check_env.py) on the built-in environment, reusing its compiled harness."""
  h = harness(name)
  report = check.check_env(h.env, h.params, harness=h)
  assert report["expert_success"] == 1.0
  assert report["garbage_success"] < 0.05 and report["garbage_error_rate"] > 0.9, report
  assert 0.05 < report["demo_success_noisy"] < 0.9, report


# --- behaviour: expert, noise, shortcuts, random -----------------------------------------------

@pytest.mark.parametrize("name", ENVS)
def test_expert_solves_every_episode(name):
  info = expert_stats(name, 0.0)
  assert info["success"].shape == (EPISODES,)
  assert info["success"].all(), f"{name}: expert success {info['success'].mean()}"
  assert (info["format_errors"] == 0).all()
  assert not info["truncated"].any()


@pytest.mark.parametrize("name", ENVS)
def test_baselines_below_expert(name):
  h = harness(name)
  noisy = expert_stats(name, 0.5)["success"].mean()
  shortcut = h.play(h.shortcut, h.params, jax.random.PRNGKey(2))["success"].mean()
  random = h.play(h.random, h.params, jax.random.PRNGKey(3))
  print(f"{name}: expert 1.0, noise 0.5 {noisy:.3f}, shortcut {shortcut:.3f}, "
        f"random {random['success'].mean():.3f}")
  assert 0.15 < noisy < 0.85
  # calculator: estimate right ~1%; search: stop a hop early 1/8; clarify: answer at once 1/16.
  assert shortcut < {"calculator": 0.05, "search": 0.25, "clarify": 0.15}[name]
  assert shortcut < noisy - 0.1
  assert random["success"].mean() < 0.02
  assert random["format_errors"].mean() > 0.5 * h.K  # garbage is mostly answered with errors


def test_clarify_info_and_premature_answers():
  h = harness("clarify")
  info = expert_stats("clarify", 0.0)
  k = h.env.num_attributes
  assert (info["num_asks"] == k - 1).all() and info["first_turn_ask"].all()
  assert (info["constraints_known"] == k).all() and not info["premature"].any()
  early = h.play(h.shortcut, h.params, jax.random.PRNGKey(5))
  assert early["premature"].all() and (early["num_asks"] == 0).all()
  assert abs(early["success"].mean() - h.env.num_values ** -(k - 1)) < 0.06


def test_search_answer_not_inferable_from_question():
  h = harness("search")
  env = h.env
  keys = h.keys(jax.random.PRNGKey(6))
  answers, subject_attr = [], []
  for b in range(4):
    state, _ = h.reset(jax.random.split(jax.random.fold_in(keys[0, 0], b), B), h.params)
    state = jax.tree.map(np.asarray, state)
    answers.append(state.answer % env.num_values)
    subject_attr.append(state.attr[np.arange(B), state.chain[:, 0], state.qattr])
    chain = state.chain
    assert all(len(set(c)) == env.hops for c in chain), "chain entities must be distinct"
  answers, subject_attr = np.concatenate(answers), np.concatenate(subject_attr)
  freq = np.bincount(answers, minlength=env.num_values) / answers.size
  assert freq.max() < 2.0 / env.num_values and freq.min() > 0.3 / env.num_values
  assert np.mean(answers == subject_attr) < 0.25  # ~ 1 / num_values


def test_search_record_and_chain():
  h = harness("search")
  env = h.env
  keys = h.keys(jax.random.PRNGKey(8))
  state, obs = h.reset(keys[0], h.params)
  s0 = jax.tree.map(lambda x: np.asarray(x[0]), state)
  prompt = env.vocab.decode(np.asarray(obs.tokens[0])).split()
  assert prompt[-4:] == [env.entity_names[s0.chain[0]], "?", "<eot>", "<assistant>"]
  assert prompt[2] == env.attribute_names[s0.qattr]
  for i in range(env.hops - 1):
    assert s0.rel[s0.chain[i], s0.qrel[i]] == s0.chain[i + 1]
  _, reply, _, _, _ = h.step(keys[2], state, h.expert(keys[1], state, h.params), h.params)
  record = env.vocab.decode(np.asarray(reply.tokens[0])).split()[1:-2]
  name = lambda e: env.entity_names[e]
  assert record == [name(s0.chain[0])] + [
      w for r, rel in enumerate(env.relation_names) for w in (rel, name(s0.rel[s0.chain[0], r]))
  ] + [w for a, attr in enumerate(env.attribute_names)
       for w in (attr, env.value_names[a * env.num_values + s0.attr[s0.chain[0], a]])]


# --- malformed actions -------------------------------------------------------------------------

OOV = 10_000
COMMON_ERRORS = [
    ([], "format"),
    ("<eot>", "format"),
    ("<system> <system> <eot>", "format"),
    ("</answer> <answer> <eot>", "format"),
    ([OOV, -5, 3], "format"),
    ("<answer> </answer> <eot> ", "bad-answer"),
    ("<answer> <system> </answer> <eot>", "bad-answer"),
    (["<answer>", OOV, "</answer>", "<eot>"], "bad-answer"),
    ("<answer> <answer> </answer> <eot>", "bad-answer"),
    ("<answer> <system> <eot>", "unclosed"),
    ("<answer>", "unclosed"),
    ("<call> <system> <system> </call> <eot>", "unknown-tool"),
    ("<call> </call> <eot>", "unknown-tool"),
    (["<call>", OOV, "</call>", "<eot>"], "unknown-tool"),
    ("<think> <system> <eot>", "unclosed"),
    ("<think> <system> </think> <eot>", "format"),
]
ENV_ERRORS = {
    "calculator": [
        ("<ask> <eot>", "format"),
        ("<call> calc 1 + 2 <eot>", "unclosed"),
        ("<call> calc 1 + 2", "unclosed"),
        ("<call> calc 1 + 2 </call> 3 <eot>", "format"),
        ("<call> calc </call> <eot>", "bad-argument"),
        ("<call> calc 1 + + 2 </call> <eot>", "bad-argument"),
        ("<call> calc 1 + 2 - </call> <eot>", "bad-argument"),
        ("<call> calc 1 ? 2 </call> <eot>", "bad-argument"),
        (["<call>", "calc", "1", OOV, "</call>", "<eot>"], "bad-argument"),
        ("<call> calc 9 9 9 9 9 9 * 9 9 9 9 9 9 </call>", "overflow"),
        ("<call> calc 9 9 9 9 9 9 9 9 9 9 9 </call>", "bad-argument"),  # > 10 digits
        ("<answer> - </answer> <eot>", "bad-answer"),
        ("<answer> 1 + 2 </answer> <eot>", "bad-answer"),
        ("<answer> 3 0 0 0 0 0 0 0 0 0 </answer>", "bad-answer"),  # > int32
    ],
    "search": [
        ("<ask> <eot>", "format"),
        ("<call> search e1 <eot>", "unclosed"),
        ("<call> search e1 </call> e1 <eot>", "format"),
        ("<call> search </call> <eot>", "bad-argument"),
        ("<call> search e1 e2 </call> <eot>", "bad-argument"),
        ("<call> search red </call> <eot>", "bad-argument"),
        ("<call> of e1 </call> <eot>", "unknown-tool"),
        ("<answer> e1 </answer> <eot>", "bad-answer"),
        ("<answer> red blue </answer> <eot>", "bad-answer"),
    ],
    "clarify": [
        ("<ask> <ask> <eot>", "format"),
        ("<ask> </answer> <eot>", "format"),
        ("<call> item </call> <eot>", "unknown-tool"),
        ("<answer> red </answer> <eot>", "bad-answer"),
        ("<answer> red blue tiny </answer> <eot>", "bad-answer"),
        ("<answer> red tiny wood wood </answer> <eot>", "bad-answer"),
        ("<answer> red tiny wood", "unclosed"),
    ],
}
ENV_VALID = {  # well-formed turns: no error, whatever their outcome
    "calculator": ["<call> calc 1 + 2 </call> <eot>", "<call> calc - 7 * 3 </call>",
                   "<think> ? 1 </think> <call> calc 2 </call> <eot>",
                   "<call> calc 1 2 3 </call> <eot> ? ? <ask>"],
    "search": ["<call> search e1 </call> <eot>", "<think> </think> <call> search e0 </call>"],
    "clarify": ["<ask> <eot>", "<ask>", "<think> red </think> <ask> <eot>",
                "<ask> <eot> <answer> <answer>"],
}


@pytest.mark.parametrize("name", ENVS)
def test_malformed_actions_answered_with_errors(name):
  h = harness(name)
  env = h.env
  table = COMMON_ERRORS + ENV_ERRORS[name]
  assert len(table) <= B
  keys = h.keys(jax.random.PRNGKey(9))
  state, _ = h.reset(keys[0], h.params)
  params = h.params.replace(format_penalty=0.25)
  new, reply, reward, done, info = jax.tree.map(
      np.asarray, h.step(keys[2], state, h.actions([r for r, _ in table]), params))
  toks = reply.tokens
  for i, (row, code) in enumerate(table):
    got = env.vocab.decode(toks[i])
    assert got == f"<tool> <error> {code} <eot> <assistant>", (row, got)
    assert int(info["format_errors"][i]) == 1, row
    assert not bool(done[i]), f"a malformed turn does not end the episode: {row}"
    assert float(reward[i]) == -0.25, row
    assert int(reply.role[i]) == base.ROLE_TOOL

  valid = ENV_VALID[name]
  _, reply, _, _, info = jax.tree.map(np.asarray, h.step(keys[2], state, h.actions(valid),
                                                         h.params))
  for i, row in enumerate(valid):
    assert int(info["format_errors"][i]) == 0, (row, env.vocab.decode(reply.tokens[i]))
    assert "<error>" not in env.vocab.decode(reply.tokens[i]), row


def test_tool_replies():
  h = harness("calculator")
  keys = h.keys(jax.random.PRNGKey(10))
  state, _ = h.reset(keys[0], h.params)
  # The question's stored answer is what the tool computes from the question's tokens.
  q, answer = np.asarray(state.question), np.asarray(state.answer)
  _, reply, _, _, _ = h.step(keys[2], state, h.actions(
      [["<call>", "calc", *map(int, row), "</call>"] for row in q]), h.params)
  reply_tokens = np.asarray(reply.tokens)
  for b in range(B):
    digits = h.env.vocab.decode(reply_tokens[b]).split()[1:-2]
    assert int("".join(digits)) == answer[b]
  rows = ["<call> calc 1 2 * 3 4 + 5 </call> <eot>", "<call> calc 2 - 3 * 4 </call> <eot>",
          "<call> calc - 2 * - 3 - 4 </call>", "<call> calc 0 0 7 </call>"]
  _, reply, _, _, info = jax.tree.map(np.asarray, h.step(keys[2], state, h.actions(rows),
                                                         h.params))
  got = [h.env.vocab.decode(reply.tokens[i]) for i in range(len(rows))]
  assert got == ["<tool> 4 1 3 <eot> <assistant>", "<tool> - 1 0 <eot> <assistant>",
                 "<tool> 2 <eot> <assistant>", "<tool> 7 <eot> <assistant>"]
  assert np.all(np.asarray(info["num_tool_calls"]) == 1)


@pytest.mark.parametrize("name", ENVS)
@settings(**SETTINGS)
@given(data=st.data())
def test_random_token_sequences_never_break_step(name, data):
  h = harness(name)
  env = h.env
  V_ = env.vocab.size
  control = [env.vocab.id(s) for s in V.SPECIAL_TOKENS] + [0, 1]
  token = st.one_of(st.sampled_from(control), st.integers(-3, V_ + 3),
                    st.integers(-2**31, 2**31 - 1))
  toks = data.draw(st.lists(token, max_size=h.W))
  length = data.draw(st.integers(-2, h.W + 2))
  state, reply, reward, done, info = _step_fixed(name, toks, length)
  assert np.all(np.isfinite(np.asarray(reward)))
  chex.assert_shape(reply.tokens, (B, env.reply_len))
  r = np.asarray(reply.tokens)
  assert r.min() >= 0 and r.max() < V_
  lengths = np.asarray(reply.length)
  assert np.all((lengths >= 0) & (lengths <= env.reply_len))
  errors = np.asarray(info["format_errors"]) - np.asarray(_mid_states(name)[0].format_errors)
  assert np.all((errors == 0) | (errors == 1))
  has_error = np.array([env.vocab.id(V.ERROR) in row for row in r])
  assert np.array_equal(has_error, errors == 1)


@functools.lru_cache(maxsize=None)
def _mid_states(name):
  """B states: half fresh, half after one expert turn."""
  h = harness(name)
  keys = h.keys(jax.random.PRNGKey(11))
  state, _ = h.reset(keys[0], h.params)
  stepped = h.step(keys[2], state, h.expert(keys[1], state, h.params), h.params)[0]
  half = jnp.arange(B) < B // 2
  mixed = jax.tree.map(lambda a, b: jnp.where(half.reshape((B,) + (1,) * (a.ndim - 1)), a, b),
                       state, stepped)
  return mixed, keys[2]


def _step_fixed(name, toks, length):
  h = harness(name)
  state, keys = _mid_states(name)
  arr = np.zeros((h.W,), np.int64)
  arr[:len(toks)] = toks
  arr = np.asarray(arr.astype(np.int64).clip(-2**31, 2**31 - 1), np.int32)
  action = base.Action(jnp.broadcast_to(jnp.asarray(arr), (B, h.W)),
                       jnp.full((B,), length, jnp.int32))
  return h.step(keys, state, action, h.params)


# --- tools ---------------------------------------------------------------------------------------

_TV = V.Vocab.build(V.DIGITS, T.OPERATORS, ["x"])
_DIGIT_OF, _OP_OF = T.table(_TV, V.DIGITS), T.table(_TV, T.OPERATORS)
_DIGIT_IDS, _MINUS = np.asarray(_TV.ids(V.DIGITS), np.int32), _TV.id("-")
_TW = 16
_eval = jax.jit(lambda t, n: T.eval_expression(t, 0, n, _DIGIT_OF, _OP_OF, max_operands=4))
_parse = jax.jit(lambda t, s, e: T.parse_int(t, s, e, _DIGIT_OF, _MINUS))
_encode = jax.jit(lambda v: T.encode_int(v, _DIGIT_IDS, _MINUS, 11))


def _ids(symbols):
  out = np.zeros((_TW,), np.int32)
  out[:len(symbols)] = [s if isinstance(s, int) else _TV.id(s) for s in symbols]
  return out


def _ref_eval(symbols, max_operands=4, max_digits=10):
  """Reference for eval_expression: (value, ok, overflow) with int32 checks at every step."""
  operands, ops, i, n = [], [], 0, len(symbols)
  while True:
    neg = i < n and symbols[i] == "-"
    i += neg
    j = i
    while j < n and symbols[j] in V.DIGITS:
      j += 1
    if j == i or j - i > max_digits:
      return 0, False, False
    operands.append(int("".join(symbols[i:j])) * (-1 if neg else 1))
    i = j
    if i == n:
      break
    if symbols[i] not in T.OPERATORS:
      return 0, False, False
    ops.append(symbols[i])
    i += 1
  if len(operands) > max_operands:
    return 0, False, False
  big = lambda v: abs(v) > T.INT_MAX
  if any(big(v) for v in operands):
    return 0, False, True
  total, term = 0, operands[0]
  for op, v in zip(ops, operands[1:]):
    if op == "*":
      term *= v
      if big(term):
        return 0, False, True
    else:
      total += term
      if big(total):
        return 0, False, True
      term = v if op == "+" else -v
  total += term
  return (0, False, True) if big(total) else (total, True, False)


@settings(**SETTINGS)
@given(st.lists(st.sampled_from(V.DIGITS * 3 + T.OPERATORS + ("x",)), max_size=_TW))
def test_eval_expression_matches_reference(symbols):
  value, ok, overflow = _eval(_ids(symbols), len(symbols))
  assert (int(value), bool(ok), bool(overflow)) == _ref_eval(symbols), symbols


@settings(**SETTINGS)
@given(st.lists(st.tuples(st.integers(0, 999), st.sampled_from(T.OPERATORS)), min_size=1,
                max_size=3))
def test_eval_expression_matches_python(terms):
  text = " ".join(f"{v} {op}" for v, op in terms)[:-2]
  symbols = [c for c in text if c != " "]
  value, ok, _ = _eval(_ids(symbols), len(symbols))
  assert bool(ok) and int(value) == eval(text), text


def test_eval_expression_cases():
  cases = {"2*-3+4": -2, "1+2*3": 7, "2*3-4*5": -14, "-5": -5, "7--2": 9, "0": 0,
           "2147483647": T.INT_MAX, "65536*32768": None, "2147483648": None, "": None,
           "1+": None, "+1": None, "--1": None, "1**2": None, "1-": None, "1x": None,
           "1+2+3+4+5": None}  # 5 operands > max_operands=4
  for text, want in cases.items():
    value, ok, _ = _eval(_ids(list(text)), len(text))
    assert (int(value) if bool(ok) else None) == want, text


@settings(**SETTINGS)
@given(st.integers(-T.INT_MAX, T.INT_MAX), st.integers(0, 3))
def test_encode_parse_int_roundtrip(value, offset):
  ids, n = _encode(jnp.int32(value))
  assert _TV.decode(np.asarray(ids)[: int(n)]).replace(" ", "") == str(value)
  row = np.zeros((_TW,), np.int32)
  row[offset:offset + int(n)] = np.asarray(ids)[: int(n)]
  got, ok = _parse(row, offset, offset + int(n))
  assert bool(ok) and int(got) == value


def test_parse_int_rejects():
  for text in ["", "-", "1-", "x", "--1", "2147483648", "-2147483648", "99999999999", "1x2"]:
    row = _ids(list(text))
    value, ok = _parse(row, 0, len(text))
    assert not bool(ok) and int(value) == 0, text
  value, ok = _parse(_ids(["1", 99999, "2"]), 0, 3)  # out-of-vocabulary id
  assert not bool(ok)
  value, ok = _parse(_ids(list("0042")), 0, 4)
  assert bool(ok) and int(value) == 42


def test_find_first_and_parse_turn():
  voc = harness("clarify").env.vocab
  find = jax.jit(T.find_first)
  row = jnp.asarray(voc.encode("<ask> <eot> <ask> <eot>") + [0, 0], jnp.int32)
  assert [int(x) for x in find(row, voc.eot_id, 0, 6)] == [1, 1]
  assert [int(x) for x in find(row, voc.eot_id, 2, 6)] == [3, 1]
  assert [int(x) for x in find(row, voc.id("<answer>"), 0, 4)] == [4, 0]
  parse = jax.jit(lambda t, n: T.parse_turn(t, n, voc))
  turn = parse(jnp.asarray(voc.encode("<think> red </think> <answer> red tiny </answer> <eot>"),
                           jnp.int32), 8)
  assert (int(turn.kind), int(turn.start), int(turn.end), int(turn.error)) == \
      (T.KIND_ANSWER, 4, 6, T.NO_ERROR)


# --- registry -----------------------------------------------------------------------------------

def test_registry():
  assert registry.list_envs() == sorted(ENVS + ("fix", "retrieval"))  # tested in their own files
  with pytest.raises(ValueError, match=r"unknown environment 'nope'.*calculator.*clarify.*search"):
    registry.make("nope")
  with pytest.raises(ValueError, match=r"colour_count.*hops.*noise"):
    registry.make("search", colour_count=3)
  env, params = registry.make("search", hops=3, noise=0.25, format_penalty=0.1)
  assert isinstance(env, Search) and env.hops == 3 and env.max_turns == 5
  assert params.noise == 0.25 and params.format_penalty == 0.1
  env, params = registry.make("clarify", fully_specified=True, ask_cost=0.05)
  assert env.fully_specified and params.ask_cost == 0.05
  vocab = registry.shared_vocab(*(registry.make(n)[0] for n in ENVS))
  envs = [registry.make(n, vocab=vocab)[0] for n in ENVS]
  assert all(e.vocab is vocab for e in envs)


def test_registry_factories():
  """Environments built by a factory (json_tool: files and the hf extra, tested in
  test_hf_chat.py) are made by name but not listed with the classes."""
  assert registry.list_factories() == ["json_tool"]
  with pytest.raises(ValueError, match=r"unknown environment 'nope'.*built by factories: "
                                       r"\['json_tool'\]"):
    registry.make("nope")
  with pytest.raises(ValueError, match="'json_tool' is already registered to "
                                       "mtrl_jax.envs.registry._json_tool"):
    registry.register("json_tool", Calculator)
  with pytest.raises(ValueError, match="'calculator' is already registered to Calculator"):
    registry.register_factory("calculator", lambda **kw: None)
  with pytest.raises(ValueError, match="'search' is already registered to Search"):
    registry.register("search", Calculator)
  calc, calc_params = registry.make("calculator", num_digits=1)
  registry.register_factory("test-factory", lambda **kw: (calc, calc_params.replace(**kw)))
  try:
    env, params = registry.make("test-factory", noise=0.5)
    assert env is calc and params.noise == 0.5
    assert "test-factory" in registry.list_factories()
  finally:
    del registry._FACTORIES["test-factory"]


def test_constructor_checks_name_the_setting():
  with pytest.raises(ValueError, match="num_digits"):
    Calculator(num_digits=5, num_operands=3)
  with pytest.raises(ValueError, match="max_tool_operands"):
    Calculator(num_operands=3, max_tool_operands=2)
  with pytest.raises(ValueError, match="operators"):
    Calculator(operators="+/")
  with pytest.raises(ValueError, match="num_entities"):
    Search(hops=4, num_entities=4)
  with pytest.raises(ValueError, match="max_turns"):
    Search(hops=3, max_turns=3)
  with pytest.raises(ValueError, match="num_values"):
    Clarify(num_values=9)
  with pytest.raises(ValueError, match="max_turns"):
    Clarify(num_attributes=3, max_turns=2)
  with pytest.raises(ValueError, match="lacks symbols"):
    Search(vocab=V.Vocab.build(["search"]))


# --- demonstrations ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", ENVS)
def test_demonstrations(name):
  h = harness(name)
  env = h.env
  traj = demo_batch(name)
  T_ = demos.required_len(env) + 5
  chex.assert_shape([traj.tokens, traj.loss_mask, traj.turn, traj.sampler_logprob], (B, T_))
  chex.assert_shape([traj.turn_end, traj.turn_reward, traj.turn_valid], (B, env.max_turns))
  chex.assert_shape([traj.done, traj.truncated], (B,))
  _leading_b(traj.info)
  check_trajectory(traj)
  assert np.asarray(traj.info["success"]).all() and np.asarray(traj.done).all()
  assert np.allclose(np.asarray(traj.returns), 1.0)
  assert not np.any(np.asarray(traj.sampler_logprob))

  # Replay: prompts, expert turns and replies in each row are exactly what reset/step emit.
  tokens, mask, turn = (np.asarray(x) for x in (traj.tokens, traj.loss_mask, traj.turn))
  assert np.array_equal(mask, turn >= 0)  # trained exactly on the expert's turns
  ep_keys = jax.vmap(lambda k: jax.random.split(k, 1 + 2 * h.K))(
      jax.random.split(jax.random.PRNGKey(7), B)).swapaxes(0, 1)
  state, prompt = h.reset(ep_keys[0], h.params)
  prompt = jax.tree.map(np.asarray, prompt)
  pos = prompt.length.copy()
  for b in range(B):
    assert np.array_equal(tokens[b, :pos[b]], prompt.tokens[b, :pos[b]])
  traj = jax.tree.map(np.asarray, traj)
  for k in range(h.K):
    rows = []
    for b in range(B):
      idx = np.nonzero(turn[b] == k)[0]
      assert np.all(mask[b, idx]) and (idx.size == 0 or idx[0] == pos[b])
      rows.append([int(t) for t in tokens[b, idx]])
    live = ~np.asarray(state.done)
    assert np.array_equal(live, [len(r) > 0 for r in rows])
    assert np.array_equal(traj.turn_valid[:, k], live)
    state, reply, reward, _, _ = h.step(ep_keys[2 + 2 * k], state, h.actions(rows), h.params)
    reply = jax.tree.map(np.asarray, reply)
    assert np.allclose(traj.turn_reward[:, k], np.asarray(reward))
    for b in np.nonzero(live)[0]:
      p, n = pos[b] + len(rows[b]), reply.length[b]
      assert traj.turn_end[b, k] == p - 1
      assert np.array_equal(tokens[b, p:p + n], reply.tokens[b, :n])
      assert not mask[b, p:p + n].any() and (turn[b, p:p + n] == -1).all()
      pos[b] = p + n
  assert np.all(tokens[np.arange(T_)[None, :] >= pos[:, None]] == V.PAD_ID)


def test_demonstrations_noisy_and_budget_error():
  h = harness("search")
  traj = demo_batch("search", 0.5)
  check_trajectory(traj)
  success = np.asarray(traj.info["success"]).mean()
  assert 0.05 < success < 0.9
  assert (np.asarray(traj.done) | np.asarray(traj.truncated)).all()
  assert not (np.asarray(traj.done) & np.asarray(traj.truncated)).any()
  need = demos.required_len(h.env)
  with pytest.raises(ValueError, match=rf"max_len={need - 1}.*{need}"):
    demos.demonstrations(h.env, h.params, jax.random.PRNGKey(0), 4, need - 1)


def test_clarify_full_fraction_mixes_the_variants_per_episode():
  env, params = registry.make("clarify", full_fraction=0.5)
  n = 256
  traj = jax.tree.map(np.asarray, demos.demonstrations(env, params, jax.random.PRNGKey(0), n,
                                                       demos.required_len(env)))
  check_trajectory(traj)
  full = traj.info["num_asks"] == 0  # the expert asks only when something is untold
  assert 0.4 < full.mean() < 0.6, full.mean()  # binomial(256, 0.5): 5 standard errors
  assert traj.info["success"].all() and not traj.info["premature"].any()
  np.testing.assert_array_equal(traj.info["num_turns"], np.where(full, 1, 3))
  for row in range(8):  # the prompt shows all k constraints exactly in the full episodes
    words = env.vocab.decode(traj.tokens[row]).split()
    prompt = words[:words.index("<assistant>")]  # up to the first agent turn
    shown = sum(a in prompt for a in env.attribute_names)
    assert shown == (3 if full[row] else 1), (row, prompt)
  # full_fraction = 1 is fully_specified=True: the same prompts and episodes from the same keys.
  a, pa = registry.make("clarify", fully_specified=True)
  b, pb = registry.make("clarify", full_fraction=1.0)
  assert b.fully_specified and a.prompt_len == b.prompt_len == env.prompt_len
  ta, tb = (demos.demonstrations(e, p, jax.random.PRNGKey(1), 8, demos.required_len(e))
            for e, p in ((a, pa), (b, pb)))
  chex.assert_trees_all_equal(ta, tb)
  assert registry.make("clarify")[0].prompt_len < env.prompt_len  # sharded: one constraint
  with pytest.raises(ValueError, match="full_fraction must be in"):
    registry.make("clarify", full_fraction=1.5)
  with pytest.raises(ValueError, match="full_fraction=0.5 contradicts"):
    registry.make("clarify", fully_specified=True, full_fraction=0.5)


def test_clarify_fully_specified():
  env, params = registry.make("clarify", fully_specified=True)
  traj = jax.tree.map(np.asarray, demos.demonstrations(env, params, jax.random.PRNGKey(0), 8,
                                                       demos.required_len(env)))
  check_trajectory(traj)
  assert traj.info["success"].all() and (traj.info["num_turns"] == 1).all()
  assert (traj.info["num_asks"] == 0).all() and not traj.info["premature"].any()
  prompt = env.vocab.decode(traj.tokens[0][traj.turn[0] < 0][:env.prompt_len]).split()
  assert all(a in prompt for a in env.attribute_names), prompt
