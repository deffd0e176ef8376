"""Tests for the `retrieval` environment: BM25 against `rank_bm25`, NDCG@k / Recall@k against
plain Python, the catalog and the need, rewards, the search tool, malformed actions, the
expert, the raw-query baseline, demonstrations and a rollout.

Compile budget: one harness per mode (single-shot, multi-turn) jits reset / step / policies
once, vmapped over B = 64 (as in tests/test_envs.py).
"""

from __future__ import annotations

import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from rank_bm25 import BM25Okapi

from mtrl_jax import rollout as R
from mtrl_jax import vocab as V
from mtrl_jax.envs import base, demos, registry
from mtrl_jax.envs import retrieval as RV
from mtrl_jax.models import transformer as tf
from mtrl_jax.types import check_trajectory

from mtrl_jax.envs import check

B = 64
EXPERT, RANDOM = check.EXPERT, check.RANDOM


class Harness(check.EnvHarness):

  def __init__(self, **overrides):
    env, params = registry.make("retrieval", **overrides)
    super().__init__(env, params, width=env.max_query_terms + 7, batch=B)

  def play(self, mode, params, key, batches=4):
    """(final info, returns, initial states) of batches x B episodes, numpy."""
    infos, returns, states = [], [], []
    for i in range(batches):
      keys = self.keys(jax.random.fold_in(key, i))
      state, _ = self.reset(keys[0], params)
      states.append(jax.tree.map(np.asarray, state))
      total = np.zeros((B,), np.float32)
      for t in range(self.K):
        action = self.policy(mode)(keys[1 + 2 * t], state, params)
        state, _, reward, _, info = self.step(keys[2 + 2 * t], state, action, params)
        total += np.asarray(reward)
      assert np.asarray(state.done).all()
      infos.append(jax.tree.map(np.asarray, info))
      returns.append(total)
    cat = lambda *x: np.concatenate(x)
    return jax.tree.map(cat, *infos), np.concatenate(returns), jax.tree.map(cat, *states)


@functools.lru_cache(maxsize=None)
def harness(multi_turn: bool = False) -> Harness:
  return Harness(multi_turn=multi_turn)


@functools.lru_cache(maxsize=None)
def expert_play(multi_turn: bool, noise: float):
  h = harness(multi_turn)
  return h.play(EXPERT, h.params.replace(noise=noise), jax.random.PRNGKey(1))


# --- plain-Python references -------------------------------------------------------------------

def doc_words(env, docs):
  """Item texts (lists of words) of one episode's docs [N, D]."""
  return [[env.term_names[t] for t in row if t >= 0] for row in np.asarray(docs)]


def py_rank(scores):
  return sorted(range(len(scores)), key=lambda i: (-scores[i], i))


def py_ndcg(scores, relevant, k):
  order = py_rank(scores)
  dcg = sum(1.0 / math.log2(i + 2) for i in range(k) if relevant[order[i]])
  idcg = sum(1.0 / math.log2(i + 2) for i in range(min(k, sum(relevant))))
  return dcg / idcg if idcg else 0.0


def py_recall(scores, relevant, k):
  n = sum(relevant)
  return sum(relevant[i] for i in py_rank(scores)[:k]) / n if n else 0.0


# --- the ranker and the metrics ----------------------------------------------------------------

_bm25 = jax.jit(RV.bm25_scores)


def _tf_matrix(corpus, terms):
  return np.asarray([[doc.count(t) for t in terms] for doc in corpus], np.float32)


def test_bm25_matches_rank_bm25_on_random_corpora():
  rng = np.random.default_rng(0)
  words = [f"w{i}" for i in range(12)]
  for trial in range(20):
    n_docs = int(rng.integers(2, 30))
    # Skewed word frequencies: w0/w1 in most documents (negative idf, floored), repeats.
    probs = np.array([8, 6] + [1] * 10, float)
    probs /= probs.sum()
    corpus = [list(rng.choice(words, size=int(rng.integers(1, 9)), p=probs))
              for _ in range(n_docs)]
    query = list(rng.choice(words + ["oov"], size=int(rng.integers(1, 5))))
    k1, b, eps = [(1.5, 0.75, 0.25), (1.2, 0.5, 0.1), (2.0, 1.0, 0.5)][trial % 3]
    want = BM25Okapi(corpus, k1=k1, b=b, epsilon=eps).get_scores(query)
    terms = words + ["unused"]  # a term in no document is ignored, as in rank_bm25
    q = np.asarray([query.count(t) for t in terms], np.float32)
    got = np.asarray(_bm25(_tf_matrix(corpus, terms), q, k1, b, eps))
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5, err_msg=str((corpus, query)))
  # The flooring case is exercised: some corpus above has a word in more than half the docs.
  corpus = [["w0", "w1"], ["w0"], ["w0", "w2", "w2"]]
  bm = BM25Okapi(corpus)
  assert bm.idf["w0"] == pytest.approx(0.25 * bm.average_idf)
  got = np.asarray(_bm25(_tf_matrix(corpus, ["w0", "w1", "w2"]), np.ones(3, np.float32)))
  np.testing.assert_allclose(got, bm.get_scores(["w0", "w1", "w2"]), rtol=1e-5)


def test_bm25_matches_rank_bm25_on_env_catalogs():
  h = harness()
  env = h.env
  state, _ = h.reset(h.keys(jax.random.PRNGKey(2))[0], h.params)
  scores = jax.jit(jax.vmap(env.scores, in_axes=(0, 0, None)))
  rng = np.random.default_rng(1)
  queries = np.zeros((B, env.num_terms), np.float32)
  words = []
  for b in range(B):
    q = list(rng.choice(env.term_names, size=int(rng.integers(1, 4))))
    words.append(q)
    queries[b] = [q.count(t) for t in env.term_names]
  got = np.asarray(scores(state, jnp.asarray(queries), h.params))
  for b in range(B):
    corpus = doc_words(env, state.docs[b])
    np.testing.assert_allclose(got[b], BM25Okapi(corpus).get_scores(words[b]), rtol=2e-5,
                               atol=2e-5)


@settings(max_examples=40, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, 4), st.booleans()), min_size=12, max_size=12),
       st.sampled_from([1, 3, 5, 12]))
def test_ndcg_recall_match_python(items, k):
  scores = np.asarray([s for s, _ in items], np.float32)  # many ties
  relevant = np.asarray([r for _, r in items])
  got_ndcg, got_recall, got_rank, got_pos = _metrics(jnp.asarray(scores), jnp.asarray(relevant), k)
  order = py_rank(scores.tolist())
  assert np.asarray(got_rank).tolist() == order
  assert [order.index(i) for i in range(len(order))] == np.asarray(got_pos).tolist()
  assert float(got_ndcg) == pytest.approx(py_ndcg(scores.tolist(), relevant.tolist(), k), abs=1e-6)
  assert float(got_recall) == pytest.approx(py_recall(scores.tolist(), relevant.tolist(), k),
                                            abs=1e-6)


@functools.partial(jax.jit, static_argnums=2)
def _metrics(scores, relevant, k):
  return (RV.ndcg_at_k(scores, relevant, k), RV.recall_at_k(scores, relevant, k),
          RV.ranking(scores), RV.ranks(scores))


# --- API, catalog, need ------------------------------------------------------------------------

@pytest.mark.parametrize("multi_turn", [False, True])
def test_check_env_passes(multi_turn):
  """The public contract check (`mtrl_jax.envs.check_env`) on both variants, reusing their
  harnesses; the expert's perfect ranking is not guaranteed (ties), so 0.95 of the episodes."""
  h = harness(multi_turn)
  report = check.check_env(h.env, h.params, harness=h, expert_success=0.95)
  assert report["expert_success"] >= 0.95
  assert report["garbage_success"] < 0.05 and report["garbage_error_rate"] > 0.8, report


def test_reset_step_expert_shapes_jit_vmap():
  h = harness()
  env = h.env
  keys = h.keys(jax.random.PRNGKey(0))
  state, obs = h.reset(keys[0], h.params)
  chex.assert_shape(obs.tokens, (B, env.prompt_len))
  chex.assert_shape(state.docs, (B, env.num_items, env.doc_len))
  chex.assert_shape([state.relevant], (B, env.num_items))
  chex.assert_shape([state.want_attr, state.want_value, state.user], (B, env.need))
  chex.assert_type([state.raw_ndcg, state.raw_recall], jnp.float32)
  action, (new, reply, reward, done, info) = h.check_step_contract(keys, state, (
      "ndcg", "recall", "raw_ndcg", "raw_recall", "refinements", "answered", "num_relevant",
      "query_terms"))
  chex.assert_trees_all_equal((state, obs), h.reset(keys[0], h.params))
  s0, o0 = jax.jit(env.reset)(keys[0, 0], h.params)
  chex.assert_trees_all_equal((s0, o0), jax.tree.map(lambda x: x[0], (state, obs)))
  r0 = jax.jit(env.step)(keys[2, 0], s0, jax.tree.map(lambda x: x[0], action), h.params)[2]
  assert float(r0) == float(reward[0])


def test_catalog_need_and_user_text():
  h = harness()
  env = h.env
  state, obs = jax.tree.map(np.asarray, h.reset(h.keys(jax.random.PRNGKey(3))[0], h.params))
  nv, nf = env.num_values, env.num_forms
  n_synonyms = 0
  for b in range(B):
    docs, dialect = state.docs[b], state.dialect[b]
    attrs = docs[:, :env.num_attributes]
    # Item text: one word per attribute (in order), in the episode's dialect.
    assert ((attrs % nf) == dialect).all()
    assert ((attrs // nf) // nv == np.arange(env.num_attributes)).all()
    values = (attrs // nf) % nv
    want = values[:, state.want_attr[b]] == state.want_value[b]
    np.testing.assert_array_equal(state.relevant[b], want.all(1))
    assert state.relevant[b].any() and len(set(state.want_attr[b])) == env.need
    # The user's words: catalog wording or the user wording of each wanted value.
    prompt = env.vocab.decode(obs.tokens[b]).split()
    assert prompt[:4] == ["<bos>", "<user>", "i", "need"]
    assert prompt[-2:] == ["<eot>", "<assistant>"]
    for i, word in enumerate(prompt[4:4 + env.need]):
      a, v = state.want_attr[b, i], state.want_value[b, i]
      catalog = RV.ATTRIBUTES[a][1][v][dialect]
      assert word in (catalog, RV.ATTRIBUTES[a][1][v][2])
      n_synonyms += word != catalog
    # raw metrics = the user's text through the Python BM25.
    scores = BM25Okapi(doc_words(env, docs)).get_scores(prompt[2:4 + env.need])
    rel = list(state.relevant[b])
    assert state.raw_ndcg[b] == pytest.approx(py_ndcg(list(scores), rel, env.k), abs=1e-5)
    assert state.raw_recall[b] == pytest.approx(py_recall(list(scores), rel, env.k), abs=1e-5)
  assert 0.5 < n_synonyms / (B * env.need) < 0.9  # synonym_prob = 0.7
  assert 0 < state.dialect.mean() < 1


# --- rewards, expert, baselines ----------------------------------------------------------------

def test_expert_and_rewards_single_shot():
  info, returns, _ = expert_play(False, 0.0)
  assert info["answered"].all() and (info["num_turns"] == 1).all()
  assert info["ndcg"].mean() > 0.99 and info["success"].mean() > 0.97
  assert (info["format_errors"] == 0).all() and (info["query_terms"] == 2).all()
  np.testing.assert_allclose(returns, info["ndcg"] + 0.1, atol=1e-6)
  assert info["raw_ndcg"].mean() < 0.6 and info["raw_recall"].mean() < info["recall"].mean()
  noisy, _, _ = expert_play(False, 0.5)
  print(f"retrieval: expert ndcg {info['ndcg'].mean():.3f}, noise 0.5 {noisy['ndcg'].mean():.3f}, "
        f"raw {info['raw_ndcg'].mean():.3f}")
  assert 0.4 < noisy["ndcg"].mean() < 0.95
  h = harness()
  rand, r_ret, _ = h.play(RANDOM, h.params, jax.random.PRNGKey(3), batches=1)
  assert rand["success"].mean() < 0.05 and (rand["format_errors"] == 1).mean() > 0.8
  assert (r_ret[rand["format_errors"] == 1] == pytest.approx(-0.1))


def test_recall_reward_and_raw_query_baseline():
  h = harness()
  keys = h.keys(jax.random.PRNGKey(4))
  state, _ = h.reset(keys[0], h.params)
  action = h.policy(EXPERT)(keys[1], state, h.params)
  recall_params = h.params.replace(ndcg_weight=0.0, recall_weight=1.0, format_bonus=0.0)
  _, _, reward, done, info = h.step(keys[2], state, action, recall_params)
  np.testing.assert_allclose(np.asarray(reward), np.asarray(info["recall"]), atol=1e-6)
  # raw_query: whatever the policy writes (here garbage), the user's text is scored.
  raw = h.params.replace(raw_query=True)
  garbage = h.actions([["<call>", "<system>"], []])
  _, reply, reward, done, info = jax.tree.map(np.asarray, h.step(keys[2], state, garbage, raw))
  assert done.all() and (info["format_errors"] == 0).all() and (reply.length == 0).all()
  np.testing.assert_allclose(info["ndcg"], np.asarray(state.raw_ndcg), atol=1e-6)
  np.testing.assert_allclose(reward, np.asarray(state.raw_ndcg) + 0.1, atol=1e-6)


def test_multi_turn_expert_searches_when_needed():
  h = harness(True)
  env = h.env
  info, returns, states = expert_play(True, 0.0)
  assert info["ndcg"].mean() > 0.99 and info["success"].mean() > 0.97
  # It searches once exactly when the user's text does not reveal the dialect.
  revealed = np.array([any(w in env.term_names for w in env.vocab.decode(u).split())
                       for u in states.user])
  np.testing.assert_array_equal(info["refinements"], (~revealed).astype(int))
  np.testing.assert_array_equal(info["num_turns"], 1 + (~revealed))
  assert 0.2 < revealed.mean() < 0.8
  # Single-shot at the same noise-free expert: privileged; a real single-shot policy can only
  # guess the dialect when it is not revealed.
  assert info["num_tool_calls"].sum() == (~revealed).sum()


def test_search_reply():
  h = harness(True)
  env = h.env
  keys = h.keys(jax.random.PRNGKey(5))
  state, _ = h.reset(keys[0], h.params)
  rows = ["<call> search red chair </call> <eot>", "<call> search scarlet </call>",
          "<call> search i new </call>", "<call> search seat seat </call>"]
  new, reply, reward, done, info = jax.tree.map(np.asarray, h.step(keys[2], state,
                                                                   h.actions(rows), h.params))
  assert not done.any() and (reward == 0).all() and (info["refinements"] == 1).all()
  assert (info["num_tool_calls"] == 1).all() and (info["format_errors"] == 0).all()
  for i, row in enumerate(rows):
    s = jax.tree.map(lambda x: np.asarray(x[i]), state)
    corpus = doc_words(env, s.docs)
    words = row.split()
    query = words[words.index("search") + 1:words.index("</call>")]
    scores = BM25Okapi(corpus).get_scores(query)
    top = corpus[py_rank(list(scores))[0]]
    parts = []
    for w in query:
      parts += [w, *str(sum(w in doc for doc in corpus))]
    want = f"<tool> {' '.join(parts)} : {' '.join(top)} <eot> <assistant>"
    assert h.decode(reply, i) == want, row


# --- malformed actions -------------------------------------------------------------------------

OOV = 10_000
COMMON = [
    ([], "format"),
    ("<eot>", "format"),
    ([OOV, 3], "format"),
    ("<ask> <eot>", "format"),
    ("<answer> red <eot>", "unclosed"),
    ("<answer> red </answer> red <eot>", "format"),
    ("<answer> </answer> <eot>", "bad-answer"),
    ("<answer> red blue wood </answer>", "bad-answer"),       # more than max_query_terms
    ("<answer> red 3 </answer>", "bad-answer"),
    ("<answer> red : </answer>", "bad-answer"),
    ("<answer> <system> </answer>", "bad-answer"),
    (["<answer>", OOV, "</answer>"], "bad-answer"),
    ("<call> </call> <eot>", "unknown-tool"),
    ("<call> red </call> <eot>", "unknown-tool"),
]
SINGLE = COMMON + [("<call> search red </call>", "unknown-tool")]
MULTI = COMMON + [
    ("<call> search </call>", "bad-argument"),
    ("<call> search red blue wood </call>", "bad-argument"),
    ("<call> search 1 </call>", "bad-argument"),
    ("<call> search red", "unclosed"),
]


@pytest.mark.parametrize("multi_turn", [False, True])
def test_malformed_actions_answered_with_errors(multi_turn):
  h = harness(multi_turn)
  table = MULTI if multi_turn else SINGLE
  keys = h.keys(jax.random.PRNGKey(9))
  state, _ = h.reset(keys[0], h.params)
  params = h.params.replace(format_penalty=0.25)
  _, reply, reward, done, info = jax.tree.map(
      np.asarray, h.step(keys[2], state, h.actions([r for r, _ in table]), params))
  for i, (row, code) in enumerate(table):
    # Single-shot: the one turn is the last, so the reply is empty but the error is counted.
    if multi_turn:
      assert h.decode(reply, i) == f"<tool> <error> {code} <eot> <assistant>", row
      assert not done[i], row
    else:
      assert info["truncated"][i] and reply.length[i] == 0, row
    assert info["format_errors"][i] == 1 and reward[i] == -0.25 and not info["answered"][i], row
  valid = ["<answer> red </answer>", "<answer> crimson i </answer> <eot>",
           "<think> red </think> <answer> red red </answer>"]
  _, _, reward, done, info = jax.tree.map(np.asarray, h.step(keys[2], state, h.actions(valid),
                                                              h.params))
  assert done[:3].all() and (info["format_errors"][:3] == 0).all()
  np.testing.assert_allclose(reward[:3], info["ndcg"][:3] + 0.1, atol=1e-6)


def test_single_shot_error_reply_when_turns_remain():
  env, params = registry.make("retrieval", max_turns=2)
  state, _ = jax.jit(env.reset)(jax.random.PRNGKey(0), params)
  toks = jnp.asarray(env.vocab.encode("<answer> 3 </answer>") + [0] * 5, jnp.int32)
  _, reply, reward, done, info = jax.jit(env.step)(jax.random.PRNGKey(1), state,
                                                   base.Action(toks, jnp.int32(3)), params)
  assert env.vocab.decode(np.asarray(reply.tokens)) == "<tool> <error> bad-answer <eot> <assistant>"
  assert not bool(done) and int(info["format_errors"]) == 1 and float(reward) == pytest.approx(-0.1)


@settings(max_examples=25, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_random_token_sequences_never_break_step(data):
  h = harness(True)
  env = h.env
  control = [env.vocab.id(s) for s in V.SPECIAL_TOKENS] + [env.vocab.id("search")]
  token = st.one_of(st.sampled_from(control), st.integers(-3, env.vocab.size + 3),
                    st.integers(-2**31, 2**31 - 1))
  toks = data.draw(st.lists(token, max_size=h.W))
  length = data.draw(st.integers(-2, h.W + 2))
  keys = h.keys(jax.random.PRNGKey(11))
  state, _ = _fresh_multi()
  arr = np.zeros((h.W,), np.int32)
  arr[:len(toks)] = toks
  action = base.Action(jnp.broadcast_to(jnp.asarray(arr), (B, h.W)),
                       jnp.full((B,), length, jnp.int32))
  _, reply, reward, done, info = h.step(keys[2], state, action, h.params)
  assert np.all(np.isfinite(np.asarray(reward)))
  r = np.asarray(reply.tokens)
  assert r.min() >= 0 and r.max() < env.vocab.size
  assert np.all(np.asarray(reply.length) <= env.reply_len)
  errors = np.asarray(info["format_errors"])
  assert np.array_equal(np.array([env.vocab.id(V.ERROR) in row for row in r]), errors == 1)
  ndcg = np.asarray(info["ndcg"])
  assert ((ndcg >= 0) & (ndcg <= 1 + 1e-6)).all()


@functools.lru_cache(maxsize=None)
def _fresh_multi():
  h = harness(True)
  return h.reset(h.keys(jax.random.PRNGKey(11))[0], h.params)


# --- construction, demonstrations, rollout -----------------------------------------------------

def test_constructor_checks_name_the_setting():
  for kwargs, name in [(dict(num_attributes=5), "num_attributes"),
                       (dict(num_values=7), "num_values"), (dict(num_forms=3), "num_forms"),
                       (dict(need=4), "need"),
                       (dict(num_items=1), "num_items"), (dict(k=49), r"\bk must"),
                       (dict(max_query_terms=1), "max_query_terms"),
                       (dict(multi_turn=True, max_turns=1), "max_turns"),
                       (dict(max_turns=0), "max_turns")]:
    with pytest.raises(ValueError, match=name):
      RV.Retrieval(**kwargs)
  env, params = registry.make("retrieval", multi_turn=True, num_items=120, k=5, synonym_prob=1.0,
                              recall_weight=1.0, ndcg_weight=0.0)
  assert env.max_turns == 3 and env.df_width == 3 and env.reply_len == 2 * 4 + 1 + 5 + 3
  assert params.synonym_prob == 1.0 and params.recall_weight == 1.0 and params.format_penalty == 0.1


def test_demonstrations_and_rollout():
  h = harness(True)
  env = h.env
  need = demos.required_len(env)
  assert need == env.prompt_len + env.max_turns * (env.action_len + env.reply_len)
  traj = jax.tree.map(np.asarray, demos.demonstrations(env, h.params.replace(noise=0.3),
                                                       jax.random.PRNGKey(7), 32, need))
  check_trajectory(traj)
  assert 0.3 < traj.info["success"].mean() < 1.0
  cfg = tf.ModelConfig(vocab_size=env.vocab.size, d_model=32, num_layers=1, num_heads=2,
                       num_kv_heads=1, mlp_dim=64)
  params = tf.init_params(cfg, jax.random.key(0))
  rc = R.RolloutConfig(num_envs=4, group_size=2, max_len=64, turn_budget=10)
  traj = jax.tree.map(np.asarray, jax.jit(R.make_rollout(env, cfg, rc))(
      params, jax.random.key(1), h.params))
  check_trajectory(traj)
  chex.assert_shape(traj.tokens, (8, 64))
  assert (traj.done | traj.truncated).all() and traj.loss_mask.any()
