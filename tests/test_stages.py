"""The train step's stages (rl/scoring, rl/estimators, rl/objective, rl/update, rl/collect) and
the validated configs, each against a plain reference written here."""

import ast
import inspect
import os
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs.quickstart import base_config
from mtrl_jax import train as train_lib
from mtrl_jax.rl import collect, estimators, objective, scoring
from mtrl_jax.rl.config import AlgoConfig, ConfigError
from mtrl_jax.rl.update import ppo_update
from mtrl_jax.types import Trajectory

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ----------------------------------------------------------------------------- a hand-made batch
#
# Row 0 (terminated):  prompt 0-2 | turn 0: 3-5 | reply 6-7 | turn 1: 8-10 | reply 11 |
#                      turn 2: 12-13 (13 is a forced <eot>: not sampled) | pad 14-15
# Row 1 (truncated):   prompt 0-1 | turn 0: 2-6 | reply 7-9 | turn 1: 10-15 (cut at the end)
# Row 2 (truncated, no turn at all): prompt 0-3 | pad
T, K = 16, 3
SPANS = [[(3, 5), (8, 10), (12, 13)], [(2, 6), (10, 15)], []]
PROMPT = [3, 2, 4]
DONE = [True, False, False]
UNSAMPLED = {(0, 13)}  # forced tokens inside a turn


def make_traj(seed=0) -> Trajectory:
  rng = np.random.default_rng(seed)
  B = len(SPANS)
  tokens = np.zeros((B, T), np.int32)
  turn = np.full((B, T), -1, np.int32)
  loss_mask = np.zeros((B, T), bool)
  turn_end = np.zeros((B, K), np.int32)
  turn_valid = np.zeros((B, K), bool)
  turn_reward = np.zeros((B, K), np.float32)
  for b, spans in enumerate(SPANS):
    last = PROMPT[b] - 1
    for k, (s, e) in enumerate(spans):
      turn[b, s:e + 1] = k
      loss_mask[b, s:e + 1] = True
      turn_end[b, k], turn_valid[b, k] = e, True
      turn_reward[b, k] = rng.normal()
      last = max(last, e)
    # replies: every non-turn position between the prompt and the last turn is written
    tokens[b, :last + 1] = rng.integers(1, 9, last + 1)
    if b == 0:
      tokens[b, 11] = 5  # reply 11 exists; tokens after 13 are pad
  for b, t in UNSAMPLED:
    loss_mask[b, t] = False
  return Trajectory(
      tokens=jnp.asarray(tokens), loss_mask=jnp.asarray(loss_mask), turn=jnp.asarray(turn),
      sampler_logprob=jnp.asarray(np.where(loss_mask, -rng.random((B, T)), 0.0), jnp.float32),
      turn_end=jnp.asarray(turn_end), turn_reward=jnp.asarray(turn_reward),
      turn_valid=jnp.asarray(turn_valid), done=jnp.asarray(DONE),
      truncated=jnp.asarray([not d for d in DONE]),
      info={"success": jnp.asarray(DONE)})


def last_written(tokens_row):
  nz = np.nonzero(tokens_row)[0]
  return int(nz[-1]) if len(nz) else 0


# ------------------------------------------------------------------------------------- scoring


@pytest.mark.parametrize("mask_replies", [True, False])
@pytest.mark.parametrize("keep_truncated", [True, False])
def test_loss_mask_vs_loop(mask_replies, keep_truncated):
  traj = make_traj()
  mask, kept = jax.jit(scoring.loss_mask, static_argnames=("mask_replies", "keep_truncated"))(
      traj, mask_replies=mask_replies, keep_truncated=keep_truncated)
  tokens, turn, lm = map(np.asarray, (traj.tokens, traj.turn, traj.loss_mask))
  ref = np.zeros_like(lm)
  for b in range(len(SPANS)):
    if not keep_truncated and not DONE[b]:
      continue
    started = False
    for t in range(T):
      started |= turn[b, t] >= 0
      ref[b, t] = lm[b, t] or (not mask_replies and started and turn[b, t] < 0
                               and t <= last_written(tokens[b]))
  chex.assert_shape(mask, (3, T))
  np.testing.assert_array_equal(np.asarray(mask), ref)
  np.testing.assert_array_equal(np.asarray(kept), [True, keep_truncated, keep_truncated])
  if not mask_replies:  # the replies 6-7 and 11 of row 0 are trained on; prompt and pad never
    assert ref[0, 6] and ref[0, 7] and ref[0, 11] and not ref[0, :3].any() and not ref[0, 14:].any()


def test_shaped_rewards_vs_loop():
  traj = make_traj()
  kl_tok = jnp.asarray(np.random.default_rng(1).random((3, T)), jnp.float32)
  mask = traj.loss_mask
  rewards, returns = scoring.shaped_rewards(traj, mask, overlong_len=6, overlong_cache=2,
                                            kl_tok=kl_tok, kl_coef=0.3)
  r = np.array(traj.turn_reward, np.float64)
  lm, turn, kl = np.asarray(traj.loss_mask), np.asarray(traj.turn), np.asarray(kl_tok)
  for b in range(3):
    n = lm[b].sum()
    pen = 0.0 if n <= 4 else ((4 - n) / 2 if n <= 6 else -1.0)
    if SPANS[b]:
      r[b, len(SPANS[b]) - 1] += pen
    for k in range(K):
      r[b, k] -= 0.3 * sum(kl[b, t] for t in range(T) if lm[b, t] and turn[b, t] == k)
  r *= np.asarray(traj.turn_valid)
  np.testing.assert_allclose(np.asarray(rewards) * np.asarray(traj.turn_valid), r, atol=1e-6)
  np.testing.assert_allclose(np.asarray(returns), r.sum(1), atol=1e-5)


def test_score_override_replaces_env_reward_and_is_myopic():
  traj = make_traj()
  algo = AlgoConfig(gamma_turn=0.9, overlong_len=6, overlong_cache=2)
  override = jnp.full((3, K), 7.0)
  plain = scoring.score(traj, algo)
  over = scoring.score(traj, algo, turn_reward_override=override)
  assert plain.gamma_turn == 0.9 and over.gamma_turn == 0.0
  np.testing.assert_allclose(over.returns, plain.returns)  # returns stay the environment's
  np.testing.assert_allclose(over.rewards, plain.rewards - traj.turn_reward + 7.0, atol=1e-6)


# ---------------------------------------------------------------------------------- estimators


def ref_turn_gae(traj, scored, values, gamma, lam):
  """Loop reference: turn k's value sits before its first token; every trained token of turn k
  (and any reply token after it) takes turn k's advantage; targets at the value positions."""
  values = np.asarray(values, np.float64)
  turn, mask = np.asarray(traj.turn), np.asarray(scored.mask)
  B = values.shape[0]
  adv_tok, v_t, v_m = np.zeros((B, T)), np.zeros((B, T)), np.zeros((B, T), bool)
  for b in range(B):
    spans = SPANS[b]
    v_pos = [s - 1 for s, _ in spans]
    vals = [values[b, p] for p in v_pos]
    boot = 0.0  # terminated or truncated: nothing is earned after the last turn
    adv, nxt_v, nxt_a = [0.0] * len(spans), boot, 0.0
    for k in reversed(range(len(spans))):
      delta = float(scored.rewards[b, k]) + gamma * nxt_v - vals[k]
      adv[k] = delta + gamma * lam * nxt_a
      nxt_v, nxt_a = vals[k], adv[k]
    owner = -1
    for t in range(T):
      owner = max(owner, turn[b, t])
      if mask[b, t] and owner >= 0:
        adv_tok[b, t] = adv[owner]
    for k, p in enumerate(v_pos):
      v_m[b, p], v_t[b, p] = True, adv[k] + vals[k]
  return adv_tok, v_t, v_m


def ref_token_gae(traj, scored, values, gamma, lam):
  """Loop reference: each trained token t is a decision valued at t - 1; turn k's reward sits at
  turn_end[k], or, when that token is not trained (a forced <eot>), at the nearest trained
  token before it."""
  values = np.asarray(values, np.float64)
  mask = np.asarray(scored.mask)
  B = values.shape[0]
  adv_tok, v_t, v_m = np.zeros((B, T)), np.zeros((B, T)), np.zeros((B, T), bool)
  for b in range(B):
    r = np.zeros(T)
    for k, (_, e) in enumerate(SPANS[b]):
      r[e] += float(scored.rewards[b, k])
    pts = [t for t in range(T) if mask[b, t]]
    credit = np.zeros(T)
    for t in range(T):
      if r[t]:
        before = [p for p in pts if p <= t]
        if before:
          credit[before[-1]] += r[t]
    boot = 0.0  # terminated or truncated: nothing is earned after the last turn
    nxt_v, nxt_a = boot, 0.0
    for t in reversed(pts):
      v = values[b, t - 1]
      a = credit[t] + gamma * nxt_v - v + gamma * lam * nxt_a
      adv_tok[b, t] = a
      v_m[b, t - 1], v_t[b, t - 1] = True, a + v
      nxt_v, nxt_a = v, a
  return adv_tok, v_t, v_m


@pytest.mark.parametrize("name, ref", [("turn_gae", ref_turn_gae), ("token_gae", ref_token_gae)])
@pytest.mark.parametrize("mask_replies", [True, False])
def test_critic_estimators_place_values_on_the_right_tokens(name, ref, mask_replies):
  traj = make_traj()
  algo = AlgoConfig(advantage=name, gamma_turn=0.9, lam=0.8, mask_replies=mask_replies)
  scored = scoring.score(traj, algo)
  values = jnp.asarray(np.random.default_rng(2).normal(size=(3, T)), jnp.float32)
  out = jax.jit(lambda t, s, v: estimators.ESTIMATORS[name].fn(t, s, v, algo=algo,
                                                               group_size=1))(traj, scored, values)
  chex.assert_shape([out.adv, out.v_target, out.v_mask], (3, T))
  adv, v_t, v_m = ref(traj, scored, values, 0.9, 0.8)
  mask = np.asarray(scored.mask)
  np.testing.assert_allclose(np.where(mask, out.adv, 0.0), adv, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(out.v_mask), v_m)
  np.testing.assert_allclose(np.where(v_m, out.v_target, 0.0), v_t, atol=1e-5)
  # The row with no turn has no value target and no advantage.
  assert not np.asarray(out.v_mask)[2].any()


@pytest.mark.parametrize("name", ["turn_gae", "token_gae"])
def test_truncated_episode_is_valued_zero_after_its_last_turn(name):
  """A truncated row (row 1: done False) gets the targets it would get had it terminated: the
  critic's output after its last token (here large) is not used as a bootstrap."""
  traj = make_traj()
  assert not bool(traj.done[1]) and bool(traj.truncated[1])
  algo = AlgoConfig(advantage=name, gamma_turn=1.0, lam=0.95)
  values = jnp.asarray(np.random.default_rng(3).normal(size=(3, T)), jnp.float32)
  last = last_written(np.asarray(traj.tokens[1]))
  values = values.at[1, last].set(100.0)
  fn = lambda t: estimators.ESTIMATORS[name].fn(t, scoring.score(t, algo), values, algo=algo,
                                                group_size=1)
  truncated, terminated = fn(traj), fn(traj.replace(done=traj.done.at[1].set(True)))
  chex.assert_trees_all_close(truncated, terminated, atol=0, rtol=0)
  assert float(jnp.max(jnp.abs(truncated.adv[1]))) < 50  # 100 would dominate a bootstrap


def test_turn_gae_value_positions_are_the_tokens_before_each_turn():
  traj = make_traj()
  algo = AlgoConfig()
  out = estimators.turn_gae_targets(traj, scoring.score(traj, algo), jnp.zeros((3, T)),
                                    algo=algo, group_size=1)
  np.testing.assert_array_equal(np.nonzero(np.asarray(out.v_mask)[0])[0], [2, 7, 11])
  np.testing.assert_array_equal(np.nonzero(np.asarray(out.v_mask)[1])[0], [1, 9])


@pytest.mark.parametrize("name", ["grpo", "rloo"])
def test_group_estimators_broadcast_one_scalar_per_row(name):
  traj = make_traj()
  traj = jax.tree.map(lambda x: jnp.concatenate([x, x[::-1]], 0), traj)  # 6 rows, 2 groups of 3
  algo = AlgoConfig(advantage=name)
  scored = scoring.score(traj, algo)
  out = estimators.ESTIMATORS[name].fn(traj, scored, None, algo=algo, group_size=3)
  r = np.asarray(scored.returns).reshape(2, 3)
  if name == "grpo":
    ref = (r - r.mean(1, keepdims=True)) / (r.std(1, keepdims=True) + 1e-6)
  else:
    ref = r - (r.sum(1, keepdims=True) - r) / 2
  np.testing.assert_allclose(np.asarray(out.adv), np.repeat(ref.reshape(-1, 1), T, 1), atol=1e-5)
  assert not np.asarray(out.v_mask).any()


def test_normalize_and_group_weights():
  adv = jnp.asarray(np.random.default_rng(3).normal(size=(4, 5)), jnp.float32)
  mask = jnp.asarray(np.random.default_rng(4).random((4, 5)) > 0.4)
  out = np.asarray(estimators.normalize(adv, mask))
  a = np.asarray(adv)[np.asarray(mask)]
  np.testing.assert_allclose(out[np.asarray(mask)], (a - a.mean()) / (a.std() + 1e-6), atol=1e-5)
  returns = jnp.asarray([1.0, 1.0, 0.0, 1.0, 2.0, 2.0])
  w, frac = estimators.group_weights(returns, 2, dynamic_sampling=True)
  np.testing.assert_allclose(w, [0, 0, 3, 3, 0, 0])
  assert float(frac) == pytest.approx(1 / 3)
  w, _ = estimators.group_weights(returns, 2, dynamic_sampling=False)
  np.testing.assert_allclose(w, np.ones(6))


def test_a_new_estimator_is_one_function_and_one_table_entry(monkeypatch):
  calls = []

  def zero_targets(traj, scored, values, *, algo, group_size):
    calls.append(group_size)
    z = jnp.zeros_like(scored.mask, jnp.float32)
    return estimators.TokenTargets(adv=z, v_target=z, v_mask=jnp.zeros_like(scored.mask))

  monkeypatch.setitem(estimators.ESTIMATORS, "zero",
                      estimators.Estimator(zero_targets, uses_critic=False))
  c = small_config(advantage="zero")
  trainer = train_lib.make_train(c)
  state = trainer.start_rl(trainer.init(jax.random.key(0)))
  _, m = jax.jit(trainer.train_step)(state)
  assert calls and float(m["train/pg_loss"]) == 0.0 and float(m["train/value_loss"]) == 0.0
  with pytest.raises(ValueError, match="config.algo.advantage"):
    AlgoConfig(advantage="not_registered")


# ----------------------------------------------------------------------------------- objective


def test_ppo_loss_vs_hand_computation():
  rng = np.random.default_rng(5)
  b, n = 2, 6
  logp = jnp.asarray(-rng.random((b, n)), jnp.float32)
  ent = jnp.asarray(rng.random((b, n)), jnp.float32)
  vals = jnp.asarray(rng.normal(size=(b, n)), jnp.float32)
  mb = objective.Minibatch(
      tokens=jnp.zeros((b, n), jnp.int32), mask=jnp.asarray(rng.random((b, n)) > 0.3),
      adv=jnp.asarray(rng.normal(size=(b, n)), jnp.float32),
      old_logp=logp + jnp.asarray(rng.normal(size=(b, n)) * 0.3, jnp.float32),
      ref_logp=logp - 0.2, old_values=vals + 0.1, v_mask=jnp.asarray(rng.random((b, n)) > 0.5),
      v_target=jnp.asarray(rng.normal(size=(b, n)), jnp.float32),
      tis=jnp.asarray(0.5 + rng.random((b, n)), jnp.float32))
  forward = lambda params, tokens: (logp, ent, vals)
  denom = objective.Denominators(jnp.float32(10.0), 4, n)
  v_denom = objective.Denominators(jnp.float32(3.0), 4, n)
  for kl_in_reward in (False, True):
    algo = AlgoConfig(eps_low=0.2, eps_high=0.28, ent_coef=0.01, kl_coef=0.1,
                      kl_in_reward=kl_in_reward, vf_coef=0.5, value_clip=0.2)
    total, m = objective.ppo_loss(None, mb, forward=forward, algo=algo, denom=denom,
                                  v_denom=v_denom)
    M, A, lp, old = map(np.asarray, (mb.mask, mb.adv, logp, mb.old_logp))
    ratio = np.exp(lp - old)
    pg = -np.minimum(ratio * A, np.clip(ratio, 0.8, 1.28) * A) * np.asarray(mb.tis)
    pg_loss = (pg * M).sum() / 10.0
    entropy = (np.asarray(ent) * M).sum() / 10.0
    d = lp - np.asarray(mb.ref_logp)
    kl = ((np.exp(-d) + d - 1) * M).sum() / 10.0
    v, old_v, tgt, vm = map(np.asarray, (vals, mb.old_values, mb.v_target, mb.v_mask))
    v_clip = old_v + np.clip(v - old_v, -0.2, 0.2)
    vl = (0.5 * np.maximum((v - tgt) ** 2, (v_clip - tgt) ** 2) * vm).sum() / 3.0
    ref = pg_loss - 0.01 * entropy + 0.5 * vl + (0.0 if kl_in_reward else 0.1 * kl)
    np.testing.assert_allclose(float(total), ref, rtol=1e-5)
    np.testing.assert_allclose(float(m["kl"]), kl, rtol=1e-5)
    np.testing.assert_allclose(float(m["value_loss"]), vl, rtol=1e-5)
    np.testing.assert_allclose(float(m["pg_loss"]), pg_loss, rtol=1e-5)


# -------------------------------------------------------------------------------------- update


def test_ppo_update_is_sequential_sgd_over_permuted_minibatches():
  """1 epoch x 2 minibatches of SGD on a quadratic equals two hand-made steps in permutation
  order; a NaN minibatch is skipped and counted; `reduce` is applied to the gradients."""
  x = jnp.arange(8.0)
  loss_fn = lambda p, mb: (jnp.mean((p["w"] - mb) ** 2), {"m": jnp.mean(mb)})
  opt = optax.sgd(0.1)
  params = {"w": jnp.float32(0.0)}
  key = jax.random.key(0)
  p, _, skipped, metrics = ppo_update(params, opt.init(params), x, key, loss_fn=loss_fn,
                                      optimizer=opt, epochs=1, minibatches=2)
  perm = np.asarray(jax.random.permutation(jax.random.split(key, 1)[0], 8)).reshape(2, 4)
  w = 0.0
  for idx in perm:
    w -= 0.1 * np.mean(2 * (w - np.asarray(x)[idx]))
  np.testing.assert_allclose(float(p["w"]), w, rtol=1e-6)
  assert int(skipped) == 0 and set(metrics) == {"m", "loss", "grad_norm"}
  np.testing.assert_allclose(float(metrics["m"]), 3.5, rtol=1e-6)

  bad = x.at[perm[1][0]].set(jnp.nan)
  p2, _, skipped, _ = ppo_update(params, opt.init(params), bad, key, loss_fn=loss_fn,
                                 optimizer=opt, epochs=1, minibatches=2)
  w1 = -0.1 * np.mean(2 * (0.0 - np.asarray(x)[perm[0]]))
  assert int(skipped) == 1
  np.testing.assert_allclose(float(p2["w"]), w1, rtol=1e-6)  # the NaN step changed nothing

  doubled = lambda tree: jax.tree.map(lambda g: 2 * g, tree)
  p3, _, _, _ = ppo_update(params, opt.init(params), x, key, loss_fn=loss_fn, optimizer=opt,
                           epochs=1, minibatches=1, reduce=doubled)
  np.testing.assert_allclose(float(p3["w"]), -0.1 * 2 * np.mean(2 * (0.0 - np.asarray(x))),
                             rtol=1e-6)
  with pytest.raises(ValueError, match="not divisible by minibatches=3"):
    ppo_update(params, opt.init(params), x, key, loss_fn=loss_fn, optimizer=opt, epochs=1,
               minibatches=3)


# ------------------------------------------------------------------- collection and the policy


def small_config(**algo):
  c = base_config()
  c.rollout.num_envs = 4
  c.sft.batch_size = 8
  c.train.eval_envs = 4
  c.algo.update(algo)
  return c


def test_collection_strategy_is_chosen_once():
  assert isinstance(train_lib.make_train(small_config()).collect, collect.PlainRollout)
  mr = train_lib.make_train(small_config(mr_window=1))
  assert isinstance(mr.collect, collect.MultiturnAwareReward)
  assert mr.collect.window == 1 and mr.collect.samples == 1
  # The train step never names a strategy, and reads top to bottom in about 60 lines.
  source = inspect.getsource(train_lib.Trainer.train_step)
  for word in ("reflexion", "mr_window", "multiturn"):
    assert word not in source
  assert len(source.splitlines()) <= 62
  imported = [n.module or "" for n in ast.walk(ast.parse(inspect.getsource(train_lib)))
              if isinstance(n, ast.ImportFrom)]
  assert "mtrl_jax.rl" in imported and not any("reflexion" in m for m in imported)


def test_one_policy_object_for_sampler_and_learner():
  c = small_config()
  c.rollout.top_k = 5
  trainer = train_lib.make_train(c)
  assert trainer.policy is trainer.rollout.policy
  assert trainer.policy.top_k == 5 and trainer.learner.top_k == 0
  assert trainer.learner.temperature == trainer.policy.temperature
  np.testing.assert_array_equal(trainer.learner.banned, trainer.policy.banned)
  # At top-k = 0 the learner's log-probs of the rollout's own params are the sampler's.
  trainer = train_lib.make_train(small_config())
  state = trainer.start_rl(trainer.init(jax.random.key(0)))
  _, m = jax.jit(trainer.train_step)(state)
  assert float(m["train/logprob_agreement"]) < 1e-5


# -------------------------------------------------------------------------- validated configs


@pytest.mark.parametrize("section, key, value", [
    ("algo", "epochs", 0), ("algo", "minibatches", 0), ("algo", "lam", 1.5),
    ("algo", "gamma_turn", -0.1), ("algo", "eps_low", -0.1), ("algo", "eps_low", 1.0),
    ("algo", "dual_clip", 0.5), ("algo", "kl_kind", "k4"), ("algo", "vf_coef", -1.0),
    ("algo", "overlong_cache", 0), ("algo", "mr_samples", 0),
    ("optim", "lr", -1.0), ("optim", "lr", 0.0), ("optim", "warmup", -1), ("optim", "b2", 1.0),
    ("train", "steps", -5), ("train", "eval_every", 0), ("train", "eval_envs", 0),
    ("train", "checkpoint_every", 0), ("train", "keep_checkpoints", 0),
    ("sft", "noise", 2.0), ("sft", "noise", -1.0), ("sft", "batch_size", -8),
    ("sft", "steps", -1), ("sft", "lr", 0.0),
    ("env", "noise", 2.0), ("env", "format_penalty", -1.0), ("model", "num_layers", 0),
    ("rollout", "num_envs", 0), ("rollout", "temperature", 0.0),
])
def test_every_value_is_range_checked_with_its_name(section, key, value):
  """Each bad value is refused when the trainer is built (before anything compiles), naming
  config.<section>.<key>: values that used to pass silently (optim.lr=-1, algo.epochs=0,
  train.steps=-5, env.noise=2.0, sft.noise=-1, sft.batch_size=-8), end in a ZeroDivisionError
  later (algo.minibatches=0, train.eval_every=0), or blame another setting (train.eval_envs=0
  blamed rollout.num_envs; checkpoint_every / keep_checkpoints named internal arguments)."""
  c = small_config()
  if key == "overlong_cache":
    c.algo.overlong_len = 10
  with c.unlocked():
    c[section][key] = value
  with pytest.raises(ConfigError, match=rf"config\.{section}\.{key}"):
    train_lib.make_train(c)


@pytest.mark.parametrize("section", ["algo", "optim", "sft", "train"])
def test_unknown_keys_are_rejected_with_the_valid_ones(section):
  c = small_config()
  with c.unlocked():
    c[section]["bogus"] = 1
  with pytest.raises(ConfigError, match=rf"config\.{section}: unknown keys \['bogus'\]"):
    train_lib.make_train(c)


def test_algo_defaults_are_the_base_config():
  """No defaults hidden in code: the dataclass defaults are exactly configs/quickstart.py's
  base_config (the quick start itself changes the environment and the SFT data on top)."""
  assert AlgoConfig.from_section(base_config().algo) == AlgoConfig()
  assert train_lib.from_section(train_lib.TrainConfig, base_config().train, "train") == \
      train_lib.TrainConfig()
  assert train_lib.from_section(train_lib.SFTConfig, base_config().sft, "sft") == \
      train_lib.SFTConfig()
  assert train_lib.from_section(train_lib.OptimConfig, base_config().optim, "optim") == \
      train_lib.OptimConfig()


def test_top_level_settings_are_checked():
  c = small_config()
  c.seed = -1
  with pytest.raises(ConfigError, match=r"config\.seed must be an integer >= 0"):
    train_lib.make_train(c)


@pytest.mark.parametrize("override, name", [
    ("--config.optim.lr=-1", "config.optim.lr"),
    ("--config.algo.minibatches=0", "config.algo.minibatches"),
    ("--config.train.eval_every=0", "config.train.eval_every"),
    ("--config.train.eval_envs=0", "config.train.eval_envs"),
    ("--config.env.noise=2.0", "config.env.noise"),
    ("--config.rollout.max_len=10", "config.rollout.max_len"),
])
def test_cli_bad_value_is_one_line_exit_2(override, name):
  out = subprocess.run([sys.executable, "-m", "experiments.train", "--config",
                        "configs/quickstart.py", override, "--workdir", "/nonexistent/x"],
                       cwd=ROOT, capture_output=True, text=True, timeout=180)
  assert out.returncode == 2, out.stderr[-2000:]
  lines = [l for l in out.stderr.splitlines() if l.startswith("error:")]
  assert len(lines) == 1 and name in lines[0], out.stderr[-2000:]
  assert "Traceback" not in out.stderr
