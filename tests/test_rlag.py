"""Knowledge internalisation (RLAG): the facts KB, grading, rationality, the preference loss,
masks and config validation, each against a plain reference."""

import os
import runpy
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import rlag_study as rlag
from mtrl_jax import vocab as V
from mtrl_jax.envs import facts as F
from mtrl_jax.models import transformer as tf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "rlag.py")


def small_config(**train):
  config = runpy.run_path(CONFIG)["get_config"]()
  config.model.update(dict(d_model=32, num_layers=1, num_heads=2, num_kv_heads=1, mlp_dim=64))
  config.env.num_entities = 6
  config.warm.update(dict(steps=2, batch_size=4))
  config.train.update(dict(steps=2, eval_every=2, batch_size=8, lr=1e-2, **train))
  config.num_seeds = 1
  return config


@pytest.fixture(scope="module")
def runner():
  return rlag.make_train(small_config())


@pytest.fixture(scope="module")
def params_kb(runner):
  return runner.init(jax.random.PRNGKey(3))


def words(vocab, ids):
  return [vocab.symbols[int(i)] for i in np.asarray(ids) if int(i) != V.PAD_ID]


# --- the knowledge base ------------------------------------------------------------------------

def python_answer(fact_triples, question):
  """Answer a question (list of words) from fact statements [(e, prop, value)] in plain Python."""
  table = {(e, p): v for e, p, v in fact_triples}
  canonical = dict(zip(F.SYNONYMS, F.PROPERTIES))
  if question[1] == "'s":                          # paraphrased: e 's syn ?
    return table[(question[0], canonical[question[2]])]
  if len(question) == 4:                           # direct: p of e ?
    return table[(question[2], question[0])]
  hop = table[(question[4], question[2])]          # two-hop: p2 of p1 of e ?
  return table[(hop, question[0])]


@pytest.mark.parametrize("kind", range(3))
def test_questions_are_answerable_from_the_facts(kind):
  facts = F.Facts(num_entities=7, num_values=5)
  kb = facts.sample_kb(jax.random.PRNGKey(kind))
  voc = facts.vocab
  triples = [tuple(words(voc, facts.fact(kb, e, p))) for e in range(7) for p in range(4)]
  assert len({(e, p) for e, p, _ in triples}) == 28
  qs = facts.all_questions(kind)
  n = {0: 28, 1: 28, 2: 56}[kind]
  assert qs.entity.shape == (n,)
  q = jax.tree.map(jnp.asarray, qs)
  render = jax.jit(jax.vmap(lambda q: (facts.answer(kb, q), facts.question(q),
                                        facts.prompt(kb, q, True), facts.response(kb, q))))
  gold, (qtok, qlen), (aug, _), (resp, _) = render(q)
  for i in range(n):
    question = words(voc, qtok[i])
    assert len(question) == int(qlen[i])
    want = python_answer(triples, question)
    assert voc.symbols[int(gold[i])] == want
    # The augmented prompt's facts alone answer it (the relevant facts are in context).
    text = words(voc, aug[i])
    ctx = text[text.index(V.SYSTEM) + 1:text.index(V.EOT)]
    ctx_triples = [tuple(ctx[j:j + 3]) for j in range(0, len(ctx), 3)]
    assert python_answer(ctx_triples, question) == want
    assert words(voc, resp[i]) == [V.THINK_OPEN, *ctx, V.THINK_CLOSE, V.ANSWER_OPEN, want,
                                   V.ANSWER_CLOSE, V.EOT]
  if kind == F.PARAPHRASED:  # other wording: a synonym, entity first
    assert all(words(voc, qtok[i])[2] in F.SYNONYMS for i in range(n))


def test_reference_answer_reads_the_table():
  facts = F.Facts(num_entities=5)
  kb = facts.sample_kb(jax.random.PRNGKey(0))
  table = np.asarray(kb.value)
  q = F.Question(kind=jnp.int32(2), entity=jnp.int32(1), p1=jnp.int32(0), p2=jnp.int32(2))
  prop, ent = F.reference_answer(table, 2, 1, 0, 2)
  assert (prop, ent) == (2, table[1][0])
  want = F.VALUES[0][table[ent][2]]
  assert facts.vocab.symbols[int(facts.answer(kb, q))] == want


def test_knowledge_bases_differ_by_key_and_are_not_guessable():
  facts = F.Facts()
  a = np.asarray(facts.sample_kb(jax.random.PRNGKey(0)).value)
  b = np.asarray(facts.sample_kb(jax.random.PRNGKey(1)).value)
  assert (a != b).any()
  assert (a[:, :2] != np.arange(12)[:, None]).all()  # nobody is their own friend or boss
  assert a[:, 2:].max() < 8 and a[:, :2].max() < 12


# --- grading -------------------------------------------------------------------------------------

def python_exact_match(vocab, tokens, gold):
  seq = [vocab.symbols[int(t)] if 0 <= int(t) < vocab.size else "?" for t in tokens]
  if V.EOT in seq:
    seq = seq[:seq.index(V.EOT)]
  seq = [s for s in seq if s != V.PAD]
  if seq and seq[0] == V.THINK_OPEN:
    if V.THINK_CLOSE not in seq:
      return False
    seq = seq[seq.index(V.THINK_CLOSE) + 1:]
  return seq == [V.ANSWER_OPEN, vocab.symbols[gold], V.ANSWER_CLOSE]


def test_score_matches_a_python_exact_match():
  facts = F.Facts()
  voc = facts.vocab
  G = facts.response_len
  gold = voc.id("red")
  enc = lambda s: np.asarray(voc.encode(s) + [0] * (G - len(s.split())), np.int32)
  cases = [
      "<think> e3 colour red </think> <answer> red </answer> <eot>",   # correct
      "<answer> red </answer> <eot>",                                 # correct, no explanation
      "<think> e3 colour blue </think> <answer> red </answer> <eot>",  # correct (answer graded)
      "<think> e3 colour red </think> <answer> blue </answer> <eot>",  # wrong answer
      "<think> e3 colour red <answer> red </answer> <eot>",            # unclosed think
      "<think> e3 colour red </think> <answer> red <eot>",             # unclosed answer
      "<answer> red red </answer> <eot>",                              # two tokens
      "<answer> red </answer> e3 <eot>",                               # trailing tokens
      "<answer> </answer> <eot>",                                      # empty
      "red <eot>",                                                     # no tags
      "<eot> <answer> red </answer>",                                  # nothing before eot
  ]
  toks = [enc(c) for c in cases]
  rng = np.random.default_rng(0)
  toks += list(rng.integers(0, voc.size, (300, G)).astype(np.int32))
  # Random answers in the right format, some correct.
  for v in rng.integers(0, voc.size, 60):
    toks.append(enc(f"<answer> {voc.symbols[v] if v > 15 else 'red'} </answer> <eot>"))
  toks = np.stack(toks)
  got = np.asarray(jax.jit(jax.vmap(facts.score, in_axes=(0, None)))(toks, gold))
  want = np.asarray([python_exact_match(voc, t, gold) for t in toks])
  np.testing.assert_array_equal(got, want)
  assert got[:4].tolist() == [True, True, True, False] and not got[4:11].any()
  assert 0 < want[len(cases) + 300:].sum() < 60


def test_evaluate_matches_python_grading_of_greedy_outputs(runner, params_kb):
  params, kb = params_kb
  # A model that has learnt something: a few steps of SFT on the KB's direct questions.
  state = runner.start_arm(params, kb, jax.random.PRNGKey(1))
  state, _ = jax.jit(lambda s: runner.arm_steps("sft", s, 60))(state)
  out, outputs = jax.jit(lambda p, kb: runner.evaluate(p, kb, with_outputs=True))(
      state.params, kb)
  for kind, (y, gold) in outputs.items():
    want = np.mean([python_exact_match(runner.facts.vocab, t, int(g))
                    for t, g in zip(np.asarray(y), np.asarray(gold))])
    assert float(out[f"eval/{kind}"]) == pytest.approx(want)
  assert 0 < float(out["eval/direct"])  # something to grade: a few SFT steps learnt some facts


# --- model pieces: masks, generation, rationality ------------------------------------------------

def test_only_response_tokens_enter_the_loss(runner, params_kb):
  params, kb = params_kb
  d = runner._render(kb, runner.direct_questions(jax.random.PRNGKey(0), 4))
  prompt, plen, resp, rlen = d["aug"], d["aug_len"], d["resp"], d["resp_len"]
  nll = jax.jit(runner.nll)
  loss = float(nll(params, prompt, plen, resp, rlen))
  # Reference: each row unpadded, log-softmax of the model at every response token only.
  banned = np.asarray(runner.model.banned)
  apply = jax.jit(lambda p, s: tf.apply(runner.model.config, p, s)[0])
  total, count = 0.0, 0
  for b in range(4):
    p = np.asarray(prompt[b])[runner.P - int(plen[b]):]
    r = np.asarray(resp[b])[:int(rlen[b])]
    seq = np.concatenate([p, r])[None]
    logits = apply(params, jnp.asarray(seq))
    lp = jax.nn.log_softmax(jnp.where(banned, -jnp.inf, logits[0]), axis=-1)
    for j in range(len(r)):
      total += float(lp[len(p) + j - 1, r[j]])
      count += 1
  assert loss == pytest.approx(-total / count, rel=1e-4)
  # Tokens after the response's end are not in the loss; prompt padding is not attended to.
  junk = jnp.where(jnp.arange(runner.G)[None] >= rlen[:, None], 7, resp)
  assert float(nll(params, prompt, plen, junk, rlen)) == pytest.approx(loss, rel=1e-5)
  pad_junk = jnp.where(jnp.arange(runner.P)[None] < (runner.P - plen)[:, None], 9, prompt)
  assert float(nll(params, pad_junk, plen, resp, rlen)) == pytest.approx(loss, rel=1e-4)


@pytest.fixture(scope="module")
def sampled(params_kb):
  """One RLAG batch (8 questions) sampled by a runner without the chosen/rejected clips."""
  config = small_config()
  config.train.lr = 3e-3
  config.rlag.clip_chosen = 0.0    # no clip: every pair pushes
  config.rlag.clip_rejected = -1e9
  runner = rlag.make_train(config)
  params, kb = params_kb
  b = jax.jit(lambda p, kb, k: runner.rlag_batch(p, kb, k, 8))(params, kb,
                                                                 jax.random.PRNGKey(4))
  return runner, b


def test_generate_stops_at_eot(sampled):
  runner, b = sampled
  eot = runner.facts.vocab.eot_id
  for y, n in ((b["yw"], b["wlen"]), (b["yl"], b["llen"])):
    for row, length in zip(np.asarray(y), np.asarray(n)):
      hits = np.nonzero(row == eot)[0]
      assert length == (hits[0] + 1 if hits.size else runner.G)
      assert (row[length:] == V.PAD_ID).all() and (row[:length] != V.PAD_ID).all()


def test_rationality_is_the_hand_computed_log_likelihood(runner, params_kb):
  params, kb = params_kb
  voc = runner.facts.vocab
  q = runner.direct_questions(jax.random.PRNGKey(5), 2)
  d = runner._render(kb, q)
  gold = d["gold"]
  enc = lambda s: np.asarray(voc.encode(s) + [0] * (runner.G - len(s.split())), np.int32)
  responses = np.stack([enc("<think> e1 colour red </think> <answer> blue </answer> <eot>"),
                        enc("<answer> blue </answer> <eot>")])          # no explanation
  got = np.asarray(jax.jit(runner.rationality)(params, d["closed"], d["closed_len"],
                                               jnp.asarray(responses), gold))
  banned = np.asarray(runner.model.banned)
  probes = [["<think>", "e1", "colour", "red", "</think>", "<answer>"],
            ["<think>", "</think>", "<answer>"]]
  for b in range(2):
    p = list(np.asarray(d["closed"][b])[runner.P - int(d["closed_len"][b]):])
    seq = jnp.asarray([p + voc.ids(probes[b])])
    logits = jax.jit(lambda p, s: tf.apply(runner.model.config, p, s)[0])(params, seq)
    lp = jax.nn.log_softmax(jnp.where(banned, -jnp.inf, logits[0, -1]))
    assert got[b] == pytest.approx(float(lp[int(gold[b])]), abs=1e-5)


# --- the RLAG loss -------------------------------------------------------------------------------

def reference_rlag_loss(info, w, l, beta_d, beta_a, gamma, cw, cl):
  out = []
  for i, a, b, bd, ba in zip(info, w, l, beta_d, beta_a):
    z = bd * i + ba * (min(a, cw) - max(b, cl)) - gamma
    out.append(np.log1p(np.exp(-z)))  # -log sigmoid(z)
  return float(np.mean(out))


def test_rlag_loss_matches_reference_and_prefers_the_chosen():
  rng = np.random.default_rng(0)
  info, w, l = (-rng.uniform(0, 8, 16) for _ in range(3))
  w[:3] = [-0.1, -0.05, -0.15]   # above the chosen clip
  l[3:6] = [-6.0, -9.0, -5.5]    # below the rejected clip
  beta_a = np.where(rng.uniform(size=16) < 0.5, 0.5, 0.0)
  beta_d = np.where(beta_a > 0, 0.2, 0.5)
  kw = dict(gamma=0.1, clip_chosen=-0.2, clip_rejected=-5.0)
  got = rlag.rlag_loss(*map(jnp.asarray, (info, w, l, beta_d, beta_a)), **kw)
  assert float(got) == pytest.approx(reference_rlag_loss(info, w, l, beta_d, beta_a, 0.1, -0.2,
                                                         -5.0), rel=1e-5)
  g_info, g_w, g_l = jax.grad(lambda a, b, c: rlag.rlag_loss(a, b, c, jnp.asarray(beta_d),
                                                             jnp.asarray(beta_a), **kw),
                              argnums=(0, 1, 2))(*map(jnp.asarray, (info, w, l)))
  g_info, g_w, g_l = map(np.asarray, (g_info, g_w, g_l))
  pair = beta_a > 0
  # Descent raises the chosen's and the knowledge's likelihood, lowers the rejected's ...
  assert (g_info < 0).all()
  active_w = pair & (w < -0.2)
  active_l = pair & (l > -5.0)
  assert (g_w[active_w] < 0).all() and (g_l[active_l] > 0).all()
  # ... and nothing moves through a clipped term or a pair without preference.
  assert (g_w[~active_w] == 0).all() and (g_l[~active_l] == 0).all()


def test_rlag_update_moves_the_policy_toward_the_augmented_generation(params_kb, sampled):
  runner, b = sampled
  params, kb = params_kb
  b = dict(b, pair=jnp.ones((8,), bool))
  G = runner.G
  mask = lambda n: rlag.lengths_to_mask(n, G)
  lw = lambda p: rlag.mean_logp(runner.model.response_logp(p, b["closed"], b["closed_len"],
                                                           b["yw"]), mask(b["wlen"]))
  ll = lambda p: rlag.mean_logp(runner.model.response_logp(p, b["closed"], b["closed_len"],
                                                           b["yl"]), mask(b["llen"]))
  state = runner.start_arm(params, kb, jax.random.PRNGKey(0))
  update = jax.jit(lambda p, o, b: runner._update(runner.arm_opt, p, o,
                                                  lambda q: runner.rlag_objective(q, b)))
  new, _, m = update(params, state.opt_state, b)
  differs = np.asarray(jnp.any(b["yw"] != b["yl"], axis=1))
  assert differs.sum() >= 4
  gap = jax.jit(lambda p: lw(p) - ll(p))
  gap_before = np.asarray(gap(params))
  gap_after = np.asarray(gap(new))
  assert (gap_after - gap_before)[differs].mean() > 0
  assert float(m["loss"]) > 0


# --- config --------------------------------------------------------------------------------------

def test_bad_config_key_is_named():
  config = small_config()
  config.rlag.bogus_beta = 1.0
  with pytest.raises(ValueError, match="bogus_beta"):
    rlag.make_train(config)
  config = small_config()
  config.train.arms = "sft,dpo"
  with pytest.raises(ValueError, match="dpo"):
    rlag.make_train(config)


def test_cli_names_an_unknown_override(capsys):
  from experiments import cli
  with pytest.raises(SystemExit) as e:
    cli.parse_flags(["rlag", f"--config={CONFIG}", "--config.rlag.bogus_beta=1"])
  assert e.value.code == 2
  assert "bogus_beta" in capsys.readouterr().err


@pytest.mark.slow
def test_experiment_runs_end_to_end(tmp_path):
  import subprocess
  import sys
  cmd = [sys.executable, "-m", "experiments.rlag", f"--config={CONFIG}",
         f"--config.workdir={tmp_path}", f"--plot={tmp_path}/p.png", "--config.num_seeds=2",
         "--config.warm.steps=4", "--config.train.steps=4", "--config.train.eval_every=2"]
  out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stderr[-2000:]
  assert "| RLAG |" in out.stdout
  assert (tmp_path / "p.png").exists() and (tmp_path / "rlag" / "metrics.jsonl").exists()


def test_cli_bad_value_is_one_line_exit_2():
  out = subprocess.run([sys.executable, "-m", "experiments.rlag", f"--config={CONFIG}",
                        "--config.train.arms=sft,dpo"], cwd=ROOT, capture_output=True,
                       text=True, timeout=180)
  assert out.returncode == 2, out.stderr[-2000:]
  assert out.stderr.strip().startswith("error:") and "dpo" in out.stderr
  assert "Traceback" not in out.stderr
