"""rl/advantages.py and rl/losses.py against plain numpy loop references written here."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.extra import numpy as hnp

from mtrl_jax.rl import advantages as A
from mtrl_jax.rl import losses as L

TOL = dict(rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- references


def ref_discounted_returns(r, valid, gamma):
  B, K = r.shape
  out = np.zeros((B, K))
  for b in range(B):
    for k in range(K):
      if not valid[b, k]:
        continue
      steps = 0
      for j in range(k, K):
        if valid[b, j]:
          out[b, k] += gamma ** steps * r[b, j]
          steps += 1
  return out


def ref_gae_row(r, v, last_value, gamma, lam):
  """Textbook backwards GAE over a list of decision points."""
  n = len(r)
  adv = np.zeros(n)
  next_v, next_a = last_value, 0.0
  for i in reversed(range(n)):
    delta = r[i] + gamma * next_v - v[i]
    next_a = delta + gamma * lam * next_a
    adv[i] = next_a
    next_v = v[i]
  return adv


def ref_turn_gae(r, v, valid, done, boot, gamma, lam):
  B, K = r.shape
  adv, ret = np.zeros((B, K)), np.zeros((B, K))
  for b in range(B):
    idx = [k for k in range(K) if valid[b, k]]
    last = 0.0 if done[b] else boot[b]
    a = ref_gae_row([r[b, k] for k in idx], [v[b, k] for k in idx], last, gamma, lam)
    for i, k in enumerate(idx):
      adv[b, k] = a[i]
      ret[b, k] = a[i] + v[b, k]
  return adv, ret


def ref_token_gae(r, v, mask, gamma, lam, done, boot):
  """Decision points = masked positions; rewards on the unmasked positions after a masked one
  (up to the next masked one) are added to its reward."""
  B, T = r.shape
  adv, ret = np.zeros((B, T)), np.zeros((B, T))
  for b in range(B):
    idx = [t for t in range(T) if mask[b, t]]
    rew = []
    for i, t in enumerate(idx):
      stop = idx[i + 1] if i + 1 < len(idx) else T
      rew.append(r[b, t] + sum(r[b, u] for u in range(t + 1, stop)))
    last = 0.0 if done[b] else boot[b]
    a = ref_gae_row(rew, [v[b, t] for t in idx], last, gamma, lam)
    for i, t in enumerate(idx):
      adv[b, t] = a[i]
      ret[b, t] = a[i] + v[b, t]
  return adv, ret


def random_turns(rng, B, K):
  """Prefix-valid turns (some rows empty, some full), rewards 0 on invalid turns."""
  n = rng.integers(0, K + 1, size=B)
  n[0] = 0
  if B > 1:
    n[1] = K
  valid = np.arange(K)[None] < n[:, None]
  r = np.where(valid, rng.normal(size=(B, K)), 0.0).astype(np.float32)
  v = rng.normal(size=(B, K)).astype(np.float32)
  done = rng.random(B) < 0.5
  done[0], done[-1] = True, False
  boot = rng.normal(size=B).astype(np.float32)
  return r, v, valid, done, boot


SHAPES_BK = [(5, 4), (7, 1), (3, 8)]


# ----------------------------------------------------------------------------- returns / GAE


@pytest.mark.parametrize("B,K", SHAPES_BK)
@pytest.mark.parametrize("gamma", [0.0, 0.9, 1.0])
def test_discounted_returns_vs_loop(B, K, gamma):
  rng = np.random.default_rng(B * 10 + K)
  r, _, valid, _, _ = random_turns(rng, B, K)
  out = jax.jit(A.discounted_returns)(r, valid, gamma)
  chex.assert_shape(out, (B, K))
  np.testing.assert_allclose(out, ref_discounted_returns(r, valid, gamma), **TOL)


def test_discounted_returns_skips_invalid_turns_in_the_middle():
  r = np.array([[1.0, 5.0, 2.0]], np.float32)
  valid = np.array([[True, False, True]])
  out = A.discounted_returns(r, valid, 0.5)
  np.testing.assert_allclose(out, [[2.0, 0.0, 2.0]], **TOL)


@pytest.mark.parametrize("B,K", SHAPES_BK)
@pytest.mark.parametrize("gamma,lam", [(0.9, 0.95), (1.0, 0.5), (0.5, 1.0)])
def test_turn_gae_vs_loop(B, K, gamma, lam):
  rng = np.random.default_rng(B * 100 + K)
  r, v, valid, done, boot = random_turns(rng, B, K)
  adv, ret = jax.jit(A.turn_gae)(r, v, valid, done, boot, gamma, lam)
  chex.assert_shape([adv, ret], (B, K))
  ref_adv, ref_ret = ref_turn_gae(r, v, valid, done, boot, gamma, lam)
  np.testing.assert_allclose(adv, ref_adv, **TOL)
  np.testing.assert_allclose(ret, ref_ret, **TOL)
  assert np.all(np.asarray(adv)[~valid] == 0) and np.all(np.asarray(ret)[~valid] == 0)
  assert np.all(np.asarray(adv)[0] == 0)          # row 0 has no valid turn


def test_turn_gae_truncated_bootstraps_done_does_not():
  r = np.array([[1.0, 2.0], [1.0, 2.0]], np.float32)
  v = np.zeros((2, 2), np.float32)
  valid = np.ones((2, 2), bool)
  done = np.array([True, False])
  boot = np.array([10.0, 10.0], np.float32)
  adv, _ = A.turn_gae(r, v, valid, done, boot, 0.5, 1.0)
  np.testing.assert_allclose(adv, [[2.0, 2.0], [4.5, 7.0]], **TOL)


def test_turn_gae_gamma_zero_is_myopic():
  rng = np.random.default_rng(0)
  r, v, valid, done, boot = random_turns(rng, 6, 5)
  adv, ret = A.turn_gae(r, v, valid, done, boot, 0.0, 0.7)
  np.testing.assert_allclose(adv, np.where(valid, r - v, 0.0), **TOL)
  np.testing.assert_allclose(ret, np.where(valid, r, 0.0), **TOL)


def test_turn_gae_lam_one_is_monte_carlo():
  rng = np.random.default_rng(1)
  r, v, valid, _, _ = random_turns(rng, 6, 5)
  done = np.ones(6, bool)
  gamma = 0.8
  adv, ret = A.turn_gae(r, v, valid, done, np.zeros(6, np.float32), gamma, 1.0)
  mc = A.discounted_returns(r, valid, gamma)
  np.testing.assert_allclose(ret, mc, **TOL)
  np.testing.assert_allclose(adv, np.where(valid, np.asarray(mc) - v, 0.0), **TOL)


def random_tokens(rng, B, T):
  mask = rng.random((B, T)) < 0.5
  mask[0] = False                                   # a row with no sampled token
  r = np.where(rng.random((B, T)) < 0.3, rng.normal(size=(B, T)), 0.0).astype(np.float32)
  v = rng.normal(size=(B, T)).astype(np.float32)
  done = rng.random(B) < 0.5
  done[0], done[-1] = True, False
  boot = rng.normal(size=B).astype(np.float32)
  return r, v, mask, done, boot


@pytest.mark.parametrize("B,T", [(4, 12), (2, 1), (5, 30)])
@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.9, 0.95), (0.0, 0.5)])
def test_token_gae_vs_loop(B, T, gamma, lam):
  rng = np.random.default_rng(B * 1000 + T)
  r, v, mask, done, boot = random_tokens(rng, B, T)
  adv, ret = jax.jit(A.token_gae)(r, v, mask, gamma, lam, done, boot)
  chex.assert_shape([adv, ret], (B, T))
  ref_adv, ref_ret = ref_token_gae(r, v, mask, gamma, lam, done, boot)
  np.testing.assert_allclose(adv, ref_adv, **TOL)
  np.testing.assert_allclose(ret, ref_ret, **TOL)
  assert np.all(np.asarray(adv)[~mask] == 0)


def test_token_gae_carries_across_replies_and_credits_unmasked_reward():
  # [sampled, reply, sampled, forced <eot> with the reward]
  mask = np.array([[True, False, True, False]])
  r = np.array([[0.0, 0.0, 0.0, 1.0]], np.float32)
  v = np.array([[0.0, 99.0, 0.0, 99.0]], np.float32)   # values on unmasked tokens are ignored
  adv, _ = A.token_gae(r, v, mask, 0.5, 1.0, np.array([True]), np.zeros(1, np.float32))
  np.testing.assert_allclose(adv, [[0.5, 0.0, 1.0, 0.0]], **TOL)


def test_token_gae_single_token_turns_equals_turn_gae():
  rng = np.random.default_rng(2)
  B, K, gap = 5, 4, 3
  r, v, valid, done, boot = random_turns(rng, B, K)
  T = K * gap + 2
  pos = 1 + gap * np.arange(K)                   # one sampled token per turn, replies between
  tr, tv, tm = (np.zeros((B, T), np.float32), np.zeros((B, T), np.float32),
                np.zeros((B, T), bool))
  tr[:, pos], tv[:, pos], tm[:, pos] = r, v, valid
  tok_adv, tok_ret = A.token_gae(tr, tv, tm, 0.9, 0.8, done, boot)
  turn_adv, turn_ret = A.turn_gae(r, v, valid, done, boot, 0.9, 0.8)
  np.testing.assert_allclose(np.asarray(tok_adv)[:, pos], turn_adv, **TOL)
  np.testing.assert_allclose(np.asarray(tok_ret)[:, pos], turn_ret, **TOL)


HB, HT = 3, 10
_token_gae_jit = jax.jit(A.token_gae)
_floats = dict(min_value=-3.0, max_value=3.0, allow_nan=False, allow_infinity=False, width=32)


@settings(max_examples=30, deadline=None)
@given(r=hnp.arrays(np.float32, (HB, HT), elements=st.floats(**_floats)),
       v=hnp.arrays(np.float32, (HB, HT), elements=st.floats(**_floats)),
       mask=hnp.arrays(np.bool_, (HB, HT)),
       done=hnp.arrays(np.bool_, (HB,)),
       boot=hnp.arrays(np.float32, (HB,), elements=st.floats(**_floats)),
       gamma=st.floats(0.0, 1.0), lam=st.floats(0.0, 1.0))
def test_token_gae_property(r, v, mask, done, boot, gamma, lam):
  adv, ret = _token_gae_jit(r, v, mask, np.float32(gamma), np.float32(lam), done, boot)
  ref_adv, ref_ret = ref_token_gae(r, v, mask, gamma, lam, done, boot)
  np.testing.assert_allclose(adv, ref_adv, rtol=1e-4, atol=1e-3)
  np.testing.assert_allclose(ret, ref_ret, rtol=1e-4, atol=1e-3)


def test_broadcast_to_tokens_vs_loop():
  rng = np.random.default_rng(3)
  B, K, T = 4, 3, 15
  x = rng.normal(size=(B, K)).astype(np.float32)
  turn = rng.integers(-1, K, size=(B, T)).astype(np.int32)
  out = jax.jit(A.broadcast_to_tokens)(x, turn)
  ref = np.zeros((B, T))
  for b in range(B):
    for t in range(T):
      if turn[b, t] >= 0:
        ref[b, t] = x[b, turn[b, t]]
  np.testing.assert_allclose(out, ref)


# ----------------------------------------------------------------------------- group baselines


def ref_group(returns, G, scale, eps):
  out = np.zeros(len(returns))
  for g0 in range(0, len(returns), G):
    grp = returns[g0:g0 + G].astype(np.float64)
    mean = sum(grp) / G
    std = np.sqrt(sum((x - mean) ** 2 for x in grp) / G)      # population std
    for i in range(G):
      out[g0 + i] = (grp[i] - mean) / (std + eps) if scale else grp[i] - mean
  return out


def group_returns(rng, B, G):
  ret = rng.integers(0, 3, size=B).astype(np.float32)        # ties and constant groups happen
  ret[:G] = 1.0                                              # group 0 constant
  return ret


@pytest.mark.parametrize("B,G", [(8, 4), (6, 1), (12, 3)])
@pytest.mark.parametrize("scale", [True, False])
def test_group_advantages_vs_loop(B, G, scale):
  ret = group_returns(np.random.default_rng(B + G), B, G)
  fn = jax.jit(functools.partial(A.group_advantages, group_size=G, scale_by_std=scale))
  out = fn(ret)
  np.testing.assert_allclose(out, ref_group(ret, G, scale, 1e-6), **TOL)
  assert np.all(np.asarray(out)[:G] == 0)


def test_group_size_must_divide_batch():
  with pytest.raises(ValueError, match="group_size"):
    A.group_advantages(jnp.zeros(6), 4)


@pytest.mark.parametrize("B,G", [(8, 4), (6, 2), (9, 3)])
def test_rloo_vs_loop(B, G):
  ret = np.random.default_rng(B).normal(size=B).astype(np.float32)
  out = jax.jit(A.rloo_advantages, static_argnums=1)(ret, G)
  ref = np.zeros(B)
  for g0 in range(0, B, G):
    for i in range(G):
      others = [ret[g0 + j] for j in range(G) if j != i]
      ref[g0 + i] = ret[g0 + i] - sum(others) / (G - 1)
  np.testing.assert_allclose(out, ref, **TOL)
  with pytest.raises(ValueError):
    A.rloo_advantages(ret, 1)


def ref_dynamic(ret, G, eps):
  keep = []
  for g0 in range(0, len(ret), G):
    grp = ret[g0:g0 + G]
    keep += [max(grp) - min(grp) > eps] * G
  keep = np.array(keep)
  w = np.where(keep, len(ret) / max(keep.sum(), 1), 0.0)
  return w, keep.reshape(-1, G)[:, 0].mean()


@pytest.mark.parametrize("B,G", [(8, 4), (12, 3), (6, 1)])
def test_dynamic_sampling_weights_vs_loop(B, G):
  ret = group_returns(np.random.default_rng(10 + B), B, G)
  if G > 1:
    ret[G:2 * G] = np.arange(G)                              # group 1 kept
  w, frac = jax.jit(A.dynamic_sampling_weights, static_argnums=1)(ret, G)
  ref_w, ref_frac = ref_dynamic(ret, G, 1e-6)
  np.testing.assert_allclose(w, ref_w, **TOL)
  np.testing.assert_allclose(frac, ref_frac, **TOL)
  if ref_frac > 0:
    np.testing.assert_allclose(np.mean(w), 1.0, **TOL)


def test_dynamic_sampling_none_kept_is_zero_not_nan():
  ret = jnp.array([1.0, 1.0, 0.0, 0.0, 2.0, 2.0])
  w, frac = A.dynamic_sampling_weights(ret, 2)
  assert np.all(np.isfinite(w)) and np.all(np.asarray(w) == 0) and float(frac) == 0.0
  w, frac = A.dynamic_sampling_weights(jnp.array([1.0, 0.0, 1.0, 1.0]), 2)
  np.testing.assert_allclose(w, [2.0, 2.0, 0.0, 0.0])
  np.testing.assert_allclose(frac, 0.5)


def test_overlong_penalty_regimes():
  lengths = jnp.array([0, 10, 15, 16, 17, 19, 20, 21, 100])
  out = jax.jit(A.overlong_penalty, static_argnums=(1, 2))(lengths, 20, 5)
  np.testing.assert_allclose(out, [0, 0, 0, -0.2, -0.4, -0.8, -1.0, -1.0, -1.0], **TOL)


# ----------------------------------------------------------------------------- aggregation


def ref_aggregate(x, mask, mode, num_tokens=None, num_seqs=None, max_len=None):
  B, T = x.shape
  total, count = 0.0, 0
  per_seq = []
  for b in range(B):
    s, n = 0.0, 0
    for t in range(T):
      if mask[b, t]:
        s += float(x[b, t])
        n += 1
    total += s
    count += n
    per_seq.append(s / n if n else 0.0)
  if mode == "token_mean":
    return total / (num_tokens if num_tokens is not None else max(count, 1))
  if mode == "seq_mean_token_mean":
    return sum(per_seq) / (num_seqs or B)
  return total / ((num_seqs or B) * (max_len or T))


def random_loss_batch(rng, B, T):
  x = rng.normal(size=(B, T)).astype(np.float32)
  mask = rng.random((B, T)) < 0.6
  mask[1] = False                                          # an empty row
  x[~mask] = np.where(rng.random((~mask).sum()) < 0.5, np.nan, 1e30)   # garbage off-mask
  return x, mask


@pytest.mark.parametrize("mode", L.AGGREGATION_MODES)
@pytest.mark.parametrize("B,T", [(8, 6), (3, 17)])
def test_aggregate_vs_loop(mode, B, T):
  x, mask = random_loss_batch(np.random.default_rng(B * T), B, T)
  out = jax.jit(L.aggregate, static_argnums=2)(x, mask, mode)
  chex.assert_shape(out, ())
  np.testing.assert_allclose(out, ref_aggregate(x, mask, mode), **TOL)


@pytest.mark.parametrize("mode", L.AGGREGATION_MODES)
def test_aggregate_shards_sum_to_full_batch(mode):
  B, T = 8, 9
  x, mask = random_loss_batch(np.random.default_rng(7), B, T)
  full = L.aggregate(x, mask, mode)
  glob = dict(num_tokens=int(mask.sum()), num_seqs=B, max_len=T)
  shards = [L.aggregate(x[i:i + 2], mask[i:i + 2], mode, **glob) for i in range(0, B, 2)]
  np.testing.assert_allclose(sum(float(s) for s in shards), float(full), **TOL)
  np.testing.assert_allclose(float(shards[0]),
                             ref_aggregate(x[:2], mask[:2], mode, **glob), **TOL)


def test_aggregate_empty_and_unknown_mode():
  x, mask = jnp.ones((2, 3)), jnp.zeros((2, 3), bool)
  for mode in L.AGGREGATION_MODES:
    assert float(L.aggregate(x, mask, mode)) == 0.0
  with pytest.raises(ValueError, match="token_sum"):
    L.aggregate(x, mask, "token_sum")


# ----------------------------------------------------------------------------- surrogate


# (ratio, advantage, loss without dual clip, clipped, loss with dual clip c=3, clipped)
SURROGATE_CASES = [
    (1.5, 1.0, -1.28, True, -1.28, True),       # above 1 + eps_high
    (1.2, 1.0, -1.2, False, -1.2, False),       # clip-higher: a symmetric 0.2 would clip this
    (1.28 * 0.999, 1.0, -1.28 * 0.999, False, -1.28 * 0.999, False),
    (1.28 * 1.001, 1.0, -1.28, True, -1.28, True),
    (0.5, 1.0, -0.5, False, -0.5, False),       # A > 0 is never clipped from below
    (0.7, -1.0, 0.8, True, 0.8, True),          # below 1 - eps_low
    (0.8 * 1.001, -1.0, 0.8 * 1.001, False, 0.8 * 1.001, False),
    (0.8 * 0.999, -1.0, 0.8, True, 0.8, True),
    (1.5, -1.0, 1.5, False, 1.5, False),        # A < 0, r > 1: PPO never clips, dual below c
    (2.9, -2.0, 5.8, False, 5.8, False),
    (3.1, -2.0, 6.2, False, 6.0, True),         # dual clip: bounded by c |A|
    (50.0, -2.0, 100.0, False, 6.0, True),
    (5.0, 2.0, -2.56, True, -2.56, True),       # dual clip does nothing for A > 0
    (0.3, 0.0, 0.0, False, 0.0, False),
]


@pytest.mark.parametrize("dual", [None, 3.0])
def test_clipped_surrogate_hand_values(dual):
  ratio, adv, loss0, clip0, loss3, clip3 = (np.array(c) for c in zip(*SURROGATE_CASES))
  old = np.full((1, ratio.size), -1.0, np.float32)
  logp = (old + np.log(ratio)).astype(np.float32)
  fn = jax.jit(functools.partial(L.clipped_surrogate, eps_low=0.2, eps_high=0.28,
                                 dual_clip=dual))
  loss, clipped = fn(logp, old, adv[None].astype(np.float32))
  np.testing.assert_allclose(loss[0], loss0 if dual is None else loss3, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(clipped[0], clip0 if dual is None else clip3)


@pytest.mark.parametrize("dual", [None, 3.0])
def test_surrogate_gradient_zero_on_clipped_tokens(dual):
  rng = np.random.default_rng(4)
  old = -rng.random((4, 16)).astype(np.float32)
  logp = old + rng.normal(scale=0.8, size=old.shape).astype(np.float32)
  adv = rng.normal(size=old.shape).astype(np.float32)
  kw = dict(eps_low=0.2, eps_high=0.28, dual_clip=dual)
  grad = jax.grad(lambda lp: jnp.sum(L.clipped_surrogate(lp, old, adv, **kw)[0]))(logp)
  _, clipped = L.clipped_surrogate(logp, old, adv, **kw)
  clipped = np.asarray(clipped)
  assert clipped.any() and (~clipped).any()
  assert np.all(np.asarray(grad)[clipped] == 0)
  ratio = np.exp(logp - old)
  np.testing.assert_allclose(np.asarray(grad)[~clipped], (-ratio * adv)[~clipped], **TOL)


@pytest.mark.parametrize("mode", L.AGGREGATION_MODES)
def test_masked_tokens_contribute_no_gradient(mode):
  rng = np.random.default_rng(5)
  old = -rng.random((3, 10)).astype(np.float32)
  logp = old + rng.normal(scale=0.3, size=old.shape).astype(np.float32)
  adv = rng.normal(size=old.shape).astype(np.float32)
  mask = rng.random(old.shape) < 0.5
  mask[0, 3] = False

  @jax.jit
  def loss_and_grad(lp):
    f = lambda lp: L.aggregate(
        L.clipped_surrogate(lp, old, adv, eps_low=0.2, eps_high=0.28, dual_clip=3.0)[0],
        mask, mode)
    return jax.value_and_grad(f)(lp)

  val, grad = loss_and_grad(logp)
  assert np.all(np.asarray(grad)[~mask] == 0)
  assert np.any(np.asarray(grad)[mask] != 0)
  perturbed = logp.copy()
  perturbed[0, 3] += 100.0                     # exp(100) would overflow without the clamp
  val2, grad2 = loss_and_grad(perturbed)
  assert float(val2) == float(val)
  np.testing.assert_array_equal(grad2, grad)


def test_value_loss_vs_loop():
  rng = np.random.default_rng(6)
  v, old, ret = (rng.normal(size=(3, 7)).astype(np.float32) for _ in range(3))
  for clip in (None, 0.2):
    out = L.value_loss(v, old, ret, clip_eps=clip)
    ref = np.zeros(v.shape)
    for i in np.ndindex(v.shape):
      l = (v[i] - ret[i]) ** 2
      if clip is not None:
        vc = old[i] + min(max(v[i] - old[i], -clip), clip)
        l = max(l, (vc - ret[i]) ** 2)
      ref[i] = 0.5 * l
    np.testing.assert_allclose(out, ref, **TOL)


# ------------------------------------------------------------------- KL, entropy, log-probs


def test_kl_estimators():
  rng = np.random.default_rng(8)
  logp = -rng.random((4, 9)).astype(np.float32) * 3
  ref = -rng.random((4, 9)).astype(np.float32) * 3
  d = logp.astype(np.float64) - ref
  expected = {"k1": d, "k2": 0.5 * d ** 2, "k3": np.exp(-d) + d - 1}
  for kind in L.KL_KINDS:
    out = jax.jit(L.kl_estimate, static_argnums=2)(logp, ref, kind)
    np.testing.assert_allclose(out, expected[kind], **TOL)
    np.testing.assert_array_equal(L.kl_estimate(logp, logp, kind), np.zeros_like(logp))
  assert np.all(np.asarray(L.kl_estimate(logp, ref, "k3")) >= 0)
  assert np.all(np.asarray(L.kl_estimate(logp, ref, "k2")) >= 0)
  with pytest.raises(ValueError, match="k4"):
    L.kl_estimate(logp, ref, "k4")


def test_entropy_from_logits():
  rng = np.random.default_rng(9)
  logits = rng.normal(size=(2, 3, 6)).astype(np.float32) * 3
  logits[0, 0, :2] = -np.inf
  logits[1, 2, :] = -np.inf                    # nothing allowed: entropy 0 by convention
  ent = jax.jit(L.entropy_from_logits)(logits)
  ref = np.zeros((2, 3))
  for b, t in np.ndindex(2, 3):
    z = logits[b, t][np.isfinite(logits[b, t])].astype(np.float64)
    if z.size:
      p = np.exp(z - z.max())
      p /= p.sum()
      ref[b, t] = -np.sum(p * np.log(p))
  np.testing.assert_allclose(ent, ref, **TOL)
  grad = jax.grad(lambda x: jnp.sum(L.entropy_from_logits(x)))(logits)
  assert np.all(np.isfinite(grad))
  big = L.entropy_from_logits(jnp.array([[[1e4, 0.0, -1e4]]]))
  assert np.isfinite(big).all()
  np.testing.assert_allclose(L.entropy_from_logits(jnp.zeros((1, 1, 8))), [[np.log(8)]], **TOL)


def test_token_log_probs_alignment_vs_loop():
  rng = np.random.default_rng(10)
  B, T, V = 2, 6, 5
  logits = rng.normal(size=(B, T, V)).astype(np.float32)
  tokens = rng.integers(0, V, size=(B, T)).astype(np.int32)
  out = jax.jit(L.token_log_probs)(logits, tokens)
  chex.assert_shape(out, (B, T))
  ref = np.zeros((B, T))
  for b in range(B):
    for t in range(1, T):
      z = logits[b, t - 1].astype(np.float64)
      ref[b, t] = z[tokens[b, t]] - np.log(np.sum(np.exp(z)))
  np.testing.assert_allclose(out, ref, **TOL)
  # A model that predicts the next token with certainty scores every token but the first 0.
  sure = np.full((B, T, V), -1e9, np.float32)
  for b, t in np.ndindex(B, T - 1):
    sure[b, t, tokens[b, t + 1]] = 0.0
  np.testing.assert_allclose(L.token_log_probs(sure, tokens), np.zeros((B, T)), atol=1e-6)


def test_truncated_importance_weights():
  learner = jnp.array([[-1.0, -1.0, -1.0, -5.0]])
  sampler = jnp.array([[-1.5, -3.0, -0.5, -1.0]])
  mask = jnp.array([[True, True, True, False]])
  w = jax.jit(L.truncated_importance_weights)(learner, sampler, mask, 2.0)
  np.testing.assert_allclose(w, [[np.exp(0.5), 2.0, np.exp(-0.5), 1.0]], **TOL)
  g = jax.grad(lambda lp: jnp.sum(L.truncated_importance_weights(lp, sampler, mask, 2.0)))(
      learner)
  assert np.all(np.asarray(g) == 0)


@pytest.mark.parametrize("kind", L.KL_KINDS)
def test_kl_gradient_is_exactly_zero_at_masked_positions_for_extreme_inputs(kind):
  """A log-ratio of -200 (k3's exp(-d) overflows for d < -88) at a masked position must give a
  finite loss and exactly 0 gradient there; the unmasked positions keep finite gradients."""
  logp = jnp.asarray([[-0.5, -200.0, -1.0], [-300.0, -0.2, -0.1]], jnp.float32)
  ref = jnp.asarray([[-0.4, 0.0, -1.2], [0.0, -0.3, -100.0]], jnp.float32)
  mask = jnp.asarray([[True, False, True], [False, True, True]])
  loss_fn = lambda lp: L.aggregate(L.kl_estimate(lp, ref, kind), mask, "token_mean")
  loss, grad = jax.value_and_grad(loss_fn)(logp)
  assert np.isfinite(float(loss))
  g = np.asarray(grad)
  assert np.all(np.isfinite(g))
  assert g[0, 1] == 0.0 and g[1, 0] == 0.0
  # k3's exp takes the log-ratio clamped to +-MAX_LOG_RATIO, as peers do (k1, k2 have no exp):
  # a huge unmasked one stays finite.
  d = np.asarray(logp - ref, np.float64)
  ref_k = {"k1": d, "k2": 0.5 * d ** 2,
           "k3": np.exp(-np.clip(d, -L.MAX_LOG_RATIO, L.MAX_LOG_RATIO)) + d - 1}[kind]
  np.testing.assert_allclose(float(loss), (ref_k * np.asarray(mask)).sum() / 4, rtol=1e-5)
