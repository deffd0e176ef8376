"""The memory-bounded paths of a real-model step, each against the plain computation it replaces.

* token log-probs / entropy / KL from hidden states in sequence chunks == from full logits
  (values and gradients, to 1e-6 in f32);
* blockwise (online-softmax) attention == dense attention, forward and backward;
* decode attention over the filled blocks of a long cache == dense attention over all of it;
* the jitted train step holds no `[B, T, V]` logits and no `[.., T, T]` attention tensor;
* remat policies change memory, not values; the forward's program size is flat in depth;
* stacked layer params round-trip the round-1 per-layer layout; float32 optimizer moments for
  low-precision params; the real shapes' parameter counts are the published ones;
* `python -m experiments.benchmark memory / compile / decode` print their JSON contract.
"""

import dataclasses
import json
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import quickstart
from mtrl_jax import policy as policy_lib
from mtrl_jax import train as train_lib
from mtrl_jax.models import transformer as tf
from mtrl_jax.rl import losses

VOCAB = 61
F32 = dict(rtol=1e-6, atol=1e-6)


def small_config(**overrides):
  base = dict(d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=48,
              rope_theta=500.0)
  return tf.ModelConfig(vocab_size=VOCAB, **{**base, **overrides})


def random_params(cfg, seed=0):
  params = tf.init_params(cfg, jax.random.key(seed))
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  return jax.tree.unflatten(treedef, [x + 0.1 * jax.random.normal(k, x.shape, x.dtype)
                                      for x, k in zip(leaves, keys)])


def a_policy(**kw):
  banned = np.zeros(VOCAB, bool)
  banned[[0, 3, 7, VOCAB - 1]] = True
  return policy_lib.Policy(banned=banned, **kw)


# --------------------------------------------------------------- chunked log-probs / entropy

def full_scores(cfg, policy, params, tokens):
  """The plain computation: full [B, T, V] logits, then the policy's log-probs and the
  entropy of the distribution each token was drawn from (shifted like the log-probs)."""
  logits, _, _ = tf.apply(cfg, params, tokens)
  logp_all, logp = policy.token_log_probs(logits, tokens)
  ent = losses.entropy_from_logits(logp_all)
  return logp, jnp.pad(ent[:, :-1], ((0, 0), (1, 0)))


def chunked_scores(cfg, policy, params, tokens, chunk):
  hidden, _, _ = tf.apply(cfg, params, tokens, return_hidden=True)
  return policy.score_hidden(lambda h: tf.lm_logits(cfg, params, h), hidden, tokens,
                             chunk=chunk)


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("chunk", [1, 5, 16, 100])
def test_chunked_scoring_equals_full_logits(tie, chunk):
  cfg = small_config(tie_embeddings=tie, value_head=False)
  params = random_params(cfg)
  policy = a_policy(temperature=0.7)
  B, T = 3, 17  # 16 predicted positions: chunk 5 leaves a ragged last block
  tokens = jax.random.randint(jax.random.key(2), (B, T), 1, VOCAB)
  tokens = tokens.at[1, 4].set(3)  # a banned token: log-prob -inf -> 0
  want_lp, want_ent = jax.jit(lambda p: full_scores(cfg, policy, p, tokens))(params)
  got_lp, got_ent = jax.jit(lambda p: chunked_scores(cfg, policy, p, tokens, chunk))(params)
  chex.assert_shape([got_lp, got_ent], (B, T))
  np.testing.assert_allclose(got_lp, want_lp, **F32)
  np.testing.assert_allclose(got_ent, want_ent, **F32)
  assert float(got_lp[1, 4]) == 0.0 and float(got_lp[0, 0]) == 0.0
  assert float(got_ent[0, 0]) == 0.0 and float(got_ent[0, 1]) > 0.0

  # Gradients of a token-mean loss (as the objective's) of log-probs, entropy and a KL.
  ref_lp = want_lp - 0.1
  def loss(scores):
    def f(p):
      lp, ent = scores(p)
      kl = losses.kl_estimate(lp, ref_lp, "k3")
      return jnp.mean(lp * 0.3) - 0.01 * jnp.mean(ent) + jnp.mean(kl)
    return f
  g_want = jax.jit(jax.grad(loss(lambda p: full_scores(cfg, policy, p, tokens))))(params)
  g_got = jax.jit(jax.grad(loss(lambda p: chunked_scores(cfg, policy, p, tokens, chunk))))(
      params)
  chex.assert_trees_all_close(g_got, g_want, rtol=1e-5, atol=1e-6)


def test_trainer_forward_and_reference_equal_the_full_computation():
  """The learner's scoring in the train step (policy, values, KL reference) is the chunked
  path, and it equals full logits."""
  c = quickstart.base_config()
  c.model.logits_chunk = 16
  c.algo.kl_coef = 0.1
  tr = train_lib.make_train(c)
  params = tr.init(jax.random.key(0)).params
  tokens = jax.random.randint(jax.random.key(1), (4, 50), 0, tr.env.vocab.size)
  logp, ent, values = jax.jit(tr._forward)(params, tokens)
  logits, want_values = tf.apply_actor_critic(tr.model_config, params, tokens)
  logp_all, want_logp = tr.learner.token_log_probs(logits, tokens)
  np.testing.assert_allclose(logp, want_logp, **F32)
  np.testing.assert_allclose(ent[:, 1:], losses.entropy_from_logits(logp_all)[:, :-1], **F32)
  np.testing.assert_allclose(values, want_values, **F32)
  ref = jax.jit(tr._reference_logp)(params["policy"], tokens)
  np.testing.assert_allclose(ref, want_logp, **F32)


# ----------------------------------------------------------------------------- attention

def test_blockwise_attention_equals_dense_forward_and_backward():
  """Left padding, a key mask and packed (restarting) positions: every mask case."""
  dense = small_config(attention="dense")
  block = small_config(attention="blockwise", attn_block=8)  # S = 30: 4 blocks, ragged
  params = random_params(dense)
  B, S = 3, 30
  tokens = jax.random.randint(jax.random.key(3), (B, S), 1, VOCAB)
  positions = jnp.stack([jnp.arange(S), jnp.maximum(jnp.arange(S) - 5, 0),
                         jnp.concatenate([jnp.arange(12), jnp.arange(18)])]).astype(jnp.int32)
  key_mask = jnp.ones((B, S), bool).at[1, :5].set(False)
  key_mask = key_mask.at[1, 5].set(True)
  run = lambda cfg: jax.jit(lambda p: tf.apply(cfg, p, tokens, positions,
                                               key_mask=key_mask)[:2])(params)
  (l_d, v_d), (l_b, v_b) = run(dense), run(block)
  np.testing.assert_allclose(l_b, l_d, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(v_b, v_d, rtol=1e-5, atol=1e-5)
  grad = lambda cfg: jax.jit(jax.grad(lambda p: jnp.mean(jnp.tanh(tf.apply(
      cfg, p, tokens, positions, key_mask=key_mask)[0]))))(params)
  chex.assert_trees_all_close(grad(block), grad(dense), rtol=1e-4, atol=1e-6)


def test_blockwise_attention_never_builds_the_score_matrix():
  cfg = small_config(attention="blockwise", attn_block=8)
  params = random_params(cfg)
  S = 40
  jaxpr = jax.make_jaxpr(jax.grad(lambda p: jnp.sum(tf.apply(
      cfg, p, jnp.ones((2, S), jnp.int32))[0])))(params)
  shapes = all_shapes(jaxpr.jaxpr)
  assert any(s[-2:] == (S, 8) for s in shapes)          # blocks of scores ...
  assert not any(s[-2:] == (S, S) for s in shapes), "a [.., S, S] tensor exists"  # ... only


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_policies_keep_values_and_gradients(remat):
  base = small_config(attention="blockwise", attn_block=8)
  params = random_params(base)
  tokens = jax.random.randint(jax.random.key(4), (2, 20), 1, VOCAB)
  f = lambda cfg: jax.jit(jax.value_and_grad(
      lambda p: jnp.sum(jnp.tanh(tf.apply(cfg, p, tokens)[0]))))(params)
  (v0, g0), (v1, g1) = f(base), f(dataclasses.replace(base, remat=remat))
  np.testing.assert_allclose(v1, v0, rtol=1e-6)
  chex.assert_trees_all_close(g1, g0, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("S_max", [64, 56])
def test_blockwise_decode_equals_dense_decode(S_max):
  """Prefill then one-token steps with rows at different positions and padding writes: a
  cache of 64 slots (or 56, which blocks of 16 do not divide) attended in blocks of 16 up to
  the filled length == attended densely."""
  dense = small_config(value_head=False)  # decode_block 512 >= 64: dense
  block = dataclasses.replace(dense, decode_block=16)
  params = random_params(dense)
  B, P = 3, 20
  lengths = jnp.array([20, 7, 13])
  prompt = jax.random.randint(jax.random.key(5), (B, P), 1, VOCAB)
  p_pos = jnp.where(jnp.arange(P) < lengths[:, None], jnp.arange(P), S_max)

  def run(cfg):
    @jax.jit
    def go(params):
      cache = tf.init_cache(cfg, B, S_max)
      logits, _, cache = tf.apply(cfg, params, prompt, p_pos, cache=cache)
      outs = [jnp.where((p_pos < S_max)[:, :, None], logits, 0.0)]  # padding queries: any
      pos = lengths
      for t in range(30):  # crosses block boundaries 16, 32, 48
        tok = (prompt[:, t % P] + t) % VOCAB
        live = jnp.arange(B) != t % 3  # one row pads each step (write dropped)
        step_pos = jnp.where(live, pos, S_max)
        logits, _, cache = tf.apply(cfg, params, tok[:, None], step_pos[:, None], cache=cache)
        outs.append(jnp.where(live[:, None, None], logits, 0.0))
        pos = pos + live
      return outs
    return go(params)

  for got, want in zip(run(block), run(dense)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_rollout_with_blockwise_decode_equals_dense_decode():
  from mtrl_jax import rollout as R
  from mtrl_jax.envs import registry
  env, env_params = registry.make("calculator")
  rc = R.RolloutConfig(num_envs=4, group_size=2, max_len=144, turn_budget=20)
  cfg = tf.model_config("tiny", env.vocab.size)
  params = tf.init_params(dataclasses.replace(cfg, value_head=False), jax.random.key(0))
  out = []
  for decode_block in (512, 32):
    roll = R.make_rollout(env, dataclasses.replace(cfg, decode_block=decode_block), rc)
    out.append(jax.jit(roll)(params, jax.random.key(1), env_params))
  np.testing.assert_array_equal(out[1].tokens, out[0].tokens)
  np.testing.assert_allclose(out[1].sampler_logprob, out[0].sampler_logprob, atol=1e-5)


# ------------------------------------------------------------------- what the step holds

def all_shapes(jaxpr) -> list[tuple[int, ...]]:
  """Shapes of every value a jaxpr (and every jaxpr nested in it) computes."""
  out = []
  def visit(j):
    for eqn in j.eqns:
      out.extend(tuple(v.aval.shape) for v in eqn.outvars if hasattr(v.aval, "shape"))
      for p in eqn.params.values():
        for sub in (p if isinstance(p, (list, tuple)) else [p]):
          if isinstance(sub, jax.extend.core.ClosedJaxpr):
            visit(sub.jaxpr)
          elif isinstance(sub, jax.extend.core.Jaxpr):
            visit(sub)
  visit(jaxpr)
  return out


def test_train_step_holds_no_full_vocabulary_or_attention_tensor():
  """The whole RL step (rollout with prefill, scoring forward, reference, PPO updates): no
  value has the vocabulary axis next to more than `logits_chunk` positions (prefill logits
  only at the last prompt position), and none is a [.., T, T] attention matrix."""
  c = quickstart.base_config()
  c.model.update(dict(logits_chunk=16, attn_block=32, vocab_size=509))  # a distinctive V
  c.algo.kl_coef = 0.1
  tr = train_lib.make_train(c)
  T, V, P = tr.rollout_config.max_len, 509, tr.env.prompt_len
  state = jax.eval_shape(lambda k: tr.start_rl(tr.init(k)), jax.random.key(0))
  shapes = all_shapes(jax.make_jaxpr(tr.train_step)(state).jaxpr)
  with_v = [s for s in shapes if V in s]
  assert with_v, "the LM head never ran?"
  assert max(int(np.prod(s)) // V for s in with_v) <= tr.rollout_config.batch_size * 16, \
      sorted({s for s in with_v}, key=np.prod)[-3:]
  assert not [s for s in shapes if V in s and (T in s or T - 1 in s or P in s)]
  assert not [s for s in shapes if len(s) >= 2 and s[-2:] == (T, T)]


def test_forward_program_size_is_flat_in_depth():
  """Scanned blocks: the full forward's and its gradient's programs do not grow with depth."""
  def size(layers):
    cfg = small_config(num_layers=layers)
    params = jax.eval_shape(lambda k: tf.init_params(cfg, k), jax.random.key(0))
    f = jax.grad(lambda p: jnp.sum(tf.apply(cfg, p, jnp.ones((2, 8), jnp.int32))[0]))
    return len(jax.make_jaxpr(f)(params).jaxpr.eqns)
  assert size(2) == size(12)


# ------------------------------------------------------------------ params and optimizer

def test_stacked_params_round_trip_the_per_layer_layout():
  cfg = small_config(num_layers=3)
  params = tf.init_params(cfg, jax.random.key(0))
  chex.assert_shape(params["layers"]["block"]["q_proj"]["kernel"], (3, 32, 32))
  per_layer = tf.unstack_layers(params, 3)
  assert "layers" not in per_layer and sorted(k for k in per_layer if k.startswith("layers_")) \
      == ["layers_0", "layers_1", "layers_2"]
  chex.assert_trees_all_equal(tf.stack_layers(per_layer, 3), params)
  # Each layer's initial values are its own (different layers, different draws).
  q = params["layers"]["block"]["q_proj"]["kernel"]
  assert not np.allclose(q[0], q[1])


def test_f32_moments_for_bfloat16_params():
  params = {"w": jnp.ones((4, 3), jnp.bfloat16), "b": jnp.zeros((3,), jnp.float32)}
  grads = jax.tree.map(lambda x: jnp.full(x.shape, 0.5, x.dtype), params)
  opt = train_lib.f32_moments(optax.adam(1e-2))
  state = opt.init(params)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state) if x.ndim)
  updates, state = opt.update(grads, state, params)
  assert updates["w"].dtype == jnp.bfloat16 and updates["b"].dtype == jnp.float32
  # float32 params: exactly the wrapped optimizer.
  p32 = jax.tree.map(lambda x: x.astype(jnp.float32), params)
  g32 = jax.tree.map(lambda x: x.astype(jnp.float32), grads)
  u_plain, _ = optax.adam(1e-2).update(g32, optax.adam(1e-2).init(p32), p32)
  u_wrapped, _ = opt.update(g32, opt.init(p32), p32)
  chex.assert_trees_all_equal(u_wrapped, u_plain)


def test_bfloat16_training_config_builds_and_steps():
  c = quickstart.base_config()
  c.model.update(dict(param_dtype="bfloat16", dtype="bfloat16"))
  c.rollout.num_envs = 4
  c.algo.minibatches = 1
  tr = train_lib.make_train(c)
  state = tr.start_rl(tr.init(jax.random.key(0)))
  assert state.params["policy"]["embed"]["embedding"].dtype == jnp.bfloat16
  (mu,) = optax.tree_utils.tree_get_all_with_path(state.opt_state, "mu")
  assert {x.dtype for x in jax.tree.leaves(mu[1])} == {jnp.dtype(jnp.float32)}
  state, m = jax.jit(tr.train_step)(state)
  assert np.isfinite(float(m["train/loss"]))
  assert state.params["policy"]["embed"]["embedding"].dtype == jnp.bfloat16


# Published parameter counts (the model cards), in millions.
PUBLISHED_M = {"qwen2.5-0.5b": 494, "qwen2.5-1.5b": 1544, "qwen2.5-7b": 7616,
               "qwen3-0.6b": 596, "llama3-8b": 8030}


@pytest.mark.parametrize("name", sorted(tf.REAL_SHAPES))
def test_real_shapes_have_their_published_sizes(name):
  cfg = tf.model_config(name, 100, value_head=False)
  assert cfg.vocab_size > 100
  assert abs(cfg.num_params() / 1e6 - PUBLISHED_M[name]) / PUBLISHED_M[name] < 0.01
  shapes = jax.eval_shape(lambda k: tf.init_params(cfg, k), jax.random.key(0))
  assert tf.count_params(shapes) == cfg.num_params()


@pytest.mark.parametrize("field, value", [("remat", "sometimes"), ("attention", "flash"),
                                          ("attn_block", 0), ("logits_chunk", -1),
                                          ("decode_block", 1.5)])
def test_memory_settings_are_validated(field, value):
  with pytest.raises(ValueError, match=f"ModelConfig.{field}"):
    small_config(**{field: value})
  c = quickstart.base_config()
  c.model[field] = value
  with pytest.raises(ValueError, match=f"config.model.{field}"):
    train_lib.make_train(c)


# ---------------------------------------------------------------------------- benchmarks

def run_benchmark(*args):
  out = subprocess.run([sys.executable, "-m", "experiments.benchmark", *args],
                       capture_output=True, text=True, timeout=600, check=True)
  return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def test_benchmark_memory_prints_its_contract():
  rows = run_benchmark("memory", "--model", "qwen2.5-0.5b", "--batch", "4", "--max_len", "256",
                       "--minibatches", "2", "--extrapolate_from", "1", "2")
  (row,) = rows
  for key in ("bench", "model", "devices", "batch", "max_len", "layers",
              "peak_bytes_per_device", "argument_bytes", "temp_bytes", "output_bytes",
              "alias_bytes", "compile_s", "extrapolated_from"):
    assert key in row, key
  assert row["bench"] == "memory" and row["layers"] == 24 and row["extrapolated_from"] == [1, 2]
  # The state alone (f32 params + 2 Adam moments, donated) is ~3 x 4 bytes x 494M params.
  assert row["argument_bytes"] > 3 * 4 * 490e6
  assert row["alias_bytes"] > 0.9 * 3 * 4 * 490e6  # donation: the new state reuses it
  assert row["peak_bytes_per_device"] >= row["argument_bytes"]
