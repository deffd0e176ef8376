"""The decoder: cached decoding == full forward, variants, param counts, config errors."""

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtrl_jax.models import transformer as tf

VOCAB = 61
VARIANTS = {
    "gqa": dict(num_heads=4, num_kv_heads=2),
    "mha_untied": dict(num_heads=4, num_kv_heads=4, tie_embeddings=False),
    "mqa_qkv_bias": dict(num_heads=4, num_kv_heads=1, qkv_bias=True),
    "qk_norm_head_dim": dict(num_heads=2, num_kv_heads=1, head_dim=24, qk_norm=True),
}


def small_config(**overrides):
  base = dict(d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=48, rope_theta=500.0)
  return tf.ModelConfig(vocab_size=VOCAB, **{**base, **overrides})


def forward(cfg, params, tokens, positions=None, **kw):
  """Jitted full forward (eager Linen dispatch is slow on CPU)."""
  return _jit_apply(cfg, params, tokens, positions, **kw)


@functools.partial(jax.jit, static_argnums=0, static_argnames=("return_logits",))
def _jit_apply(cfg, params, tokens, positions=None, key_mask=None, return_logits=True):
  return tf.apply(cfg, params, tokens, positions, key_mask=key_mask, return_logits=return_logits)


def random_params(cfg, seed=0):
  """Init, then randomise every leaf so no head is trivially zero (the value head inits at 0)."""
  params = tf.init_params(cfg, jax.random.key(seed))
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  leaves = [x + 0.1 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
  return jax.tree.unflatten(treedef, leaves)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_token_by_token_decode_matches_full_forward(variant):
  cfg = small_config(**VARIANTS[variant])
  params = random_params(cfg)
  B, S = 3, 12
  tokens = jax.random.randint(jax.random.key(2), (B, S), 1, VOCAB)
  logits, values, _ = forward(cfg, params, tokens)
  chex.assert_shape(logits, (B, S, VOCAB))
  chex.assert_shape(values, (B, S))

  step = jax.jit(lambda p, tok, pos, c: tf.apply(cfg, p, tok, pos, cache=c))
  cache = tf.init_cache(cfg, B, 16)
  got_l, got_v = [], []
  for t in range(S):
    l, v, cache = step(params, tokens[:, t:t + 1], jnp.full((B, 1), t, jnp.int32), cache)
    got_l.append(l)
    got_v.append(v)
  np.testing.assert_allclose(np.concatenate(got_l, 1), logits, atol=1e-5, rtol=0)
  np.testing.assert_allclose(np.concatenate(got_v, 1), values, atol=1e-5, rtol=0)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_chunked_decode_with_rows_at_different_positions(variant):
  """Rows of different lengths fed in chunks of different sizes, with padding in each chunk,
  give the same logits/values as each row's own full forward."""
  cfg = small_config(**VARIANTS[variant])
  params = random_params(cfg, seed=3)
  lengths = [11, 5, 8]
  S_max = 16
  rows = [jax.random.randint(jax.random.key(10 + i), (n,), 1, VOCAB) for i, n in enumerate(lengths)]
  full = [forward(cfg, params, r[None]) for r in rows]

  chunk = 4
  cache = tf.init_cache(cfg, len(rows), S_max)
  fed = [0, 0, 0]
  got_l = [[] for _ in rows]
  got_v = [[] for _ in rows]
  step = jax.jit(lambda p, tok, pos, c: tf.apply(cfg, p, tok, pos, cache=c))
  # Row i feeds (i + 1) tokens per call at most, so rows drift to different positions.
  while any(f < n for f, n in zip(fed, lengths)):
    tok = np.zeros((len(rows), chunk), np.int32)
    pos = np.full((len(rows), chunk), S_max, np.int32)  # >= S_max: padding, write dropped
    counts = []
    for i, r in enumerate(rows):
      c = min(i + 1, chunk, lengths[i] - fed[i])
      tok[i, :c] = np.asarray(r[fed[i]:fed[i] + c])
      pos[i, :c] = np.arange(fed[i], fed[i] + c)
      counts.append(c)
    l, v, cache = step(params, jnp.asarray(tok), jnp.asarray(pos), cache)
    for i, c in enumerate(counts):
      got_l[i].append(np.asarray(l[i, :c]))
      got_v[i].append(np.asarray(v[i, :c]))
      fed[i] += c
  for i in range(len(rows)):
    np.testing.assert_allclose(np.concatenate(got_l[i]), full[i][0][0], atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.concatenate(got_v[i]), full[i][1][0], atol=1e-5, rtol=0)


def test_full_forward_respects_padding_and_positions():
  """Left-padded rows with a key mask and shifted positions equal the unpadded forward."""
  cfg = small_config()
  params = random_params(cfg, seed=5)
  row = jax.random.randint(jax.random.key(6), (7,), 1, VOCAB)
  ref_l, ref_v, _ = forward(cfg, params, row[None])
  pad = 3
  tokens = jnp.concatenate([jnp.zeros((pad,), jnp.int32), row])[None]
  positions = jnp.concatenate([jnp.zeros((pad,), jnp.int32), jnp.arange(7)])[None]
  key_mask = (jnp.arange(pad + 7) >= pad)[None]
  l, v, _ = forward(cfg, params, tokens, positions, key_mask=key_mask)
  np.testing.assert_allclose(l[0, pad:], ref_l[0], atol=1e-5, rtol=0)
  np.testing.assert_allclose(v[0, pad:], ref_v[0], atol=1e-5, rtol=0)
  assert np.all(np.isfinite(l))


def test_future_tokens_do_not_change_past_logits():
  cfg = small_config()
  params = random_params(cfg, seed=7)
  a = jax.random.randint(jax.random.key(8), (1, 10), 1, VOCAB)
  b = a.at[0, 6:].set((a[0, 6:] + 1) % VOCAB)
  la, _, _ = forward(cfg, params, a)
  lb, _, _ = forward(cfg, params, b)
  np.testing.assert_allclose(la[0, :6], lb[0, :6], atol=1e-6, rtol=0)
  assert np.abs(la[0, 6:] - lb[0, 6:]).max() > 1e-3


def test_decode_step_compiles_once():
  cfg = small_config()
  params = random_params(cfg)
  traces = []

  @jax.jit
  def step(p, tok, pos, c):
    traces.append(1)
    return tf.apply(cfg, p, tok, pos, cache=c)

  cache = tf.init_cache(cfg, 2, 8)
  for t in range(8):
    _, _, cache = step(params, jnp.ones((2, 1), jnp.int32), jnp.full((2, 1), t, jnp.int32), cache)
  assert len(traces) == 1


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_param_count_matches_formula(variant):
  cfg = small_config(**VARIANTS[variant])
  assert tf.count_params(tf.init_params(cfg, jax.random.key(0))) == cfg.num_params()
  no_value = dataclasses.replace(cfg, value_head=False)
  assert tf.count_params(tf.init_params(no_value, jax.random.key(0))) == no_value.num_params()


def test_presets_have_their_advertised_sizes():
  assert 1e5 <= tf.model_config("tiny", 100).num_params() <= 1e6
  assert 5e6 <= tf.model_config("small", 100).num_params() <= 2e7


def test_separate_critic():
  cfg = small_config()
  shared = tf.init_actor_critic(cfg, jax.random.key(0))
  separate = tf.init_actor_critic(cfg, jax.random.key(0), separate_critic=True)
  assert set(shared) == {"policy"} and set(separate) == {"policy", "critic"}
  assert "value_head" in shared["policy"] and "value_head" not in separate["policy"]
  # The critic has the same architecture with a value head and no LM head (tied: no extra).
  assert tf.count_params(separate["critic"]) == cfg.num_params()
  tokens = jnp.ones((2, 5), jnp.int32)
  ac = jax.jit(functools.partial(tf.apply_actor_critic, cfg))
  logits, values = ac(separate, tokens)
  chex.assert_shape(logits, (2, 5, VOCAB))
  chex.assert_shape(values, (2, 5))
  # Values come from the critic: changing the policy does not change them.
  other = dict(separate, policy=tf.init_actor_critic(cfg, jax.random.key(9), separate_critic=True)["policy"])
  _, values2 = ac(other, tokens)
  np.testing.assert_array_equal(values, values2)


def test_bfloat16_compute_and_params():
  cfg = small_config(dtype="bfloat16", param_dtype="bfloat16")
  params = tf.init_params(cfg, jax.random.key(0))
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params))
  logits, values, _ = forward(cfg, params, jnp.ones((2, 6), jnp.int32))
  assert logits.dtype == jnp.float32 and values.dtype == jnp.float32
  assert np.all(np.isfinite(logits))
  cache = tf.init_cache(cfg, 2, 8)
  assert all(k.dtype == jnp.bfloat16 for k in cache.k)


@pytest.mark.parametrize("overrides, field", [
    (dict(num_heads=6, num_kv_heads=4), "num_kv_heads"),
    (dict(d_model=30, num_heads=4), "head_dim"),
    (dict(head_dim=7), "head_dim"),
    (dict(num_layers=0), "num_layers"),
    (dict(dtype="float64"), "dtype"),
    (dict(rope_theta=-1.0), "rope_theta"),
])
def test_config_errors_name_the_field(overrides, field):
  with pytest.raises(ValueError, match=field):
    small_config(**overrides)


def test_unknown_preset_and_field():
  with pytest.raises(ValueError, match="huge"):
    tf.model_config("huge", 10)
  with pytest.raises(ValueError, match="n_layer"):
    tf.model_config("tiny", 10, n_layer=3)


def test_cache_rejects_key_mask():
  cfg = small_config()
  params = random_params(cfg)
  with pytest.raises(ValueError, match="key_mask"):
    tf.apply(cfg, params, jnp.ones((1, 1), jnp.int32), jnp.zeros((1, 1), jnp.int32),
             key_mask=jnp.ones((1, 1), bool), cache=tf.init_cache(cfg, 1, 4))
