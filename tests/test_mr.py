"""CollabLLM's multiturn-aware reward: replaying recorded turns, continuations, MR, train step."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtrl_jax import rollout as R
from mtrl_jax import train as train_lib
from mtrl_jax import types
from mtrl_jax.envs import registry
from mtrl_jax.models import transformer as tf

CFG = R.RolloutConfig(num_envs=4, group_size=2, max_len=112, turn_budget=10, temperature=1.5)


@functools.lru_cache(maxsize=None)
def setup():
  env, env_params = registry.make("clarify")
  cfg = tf.ModelConfig(vocab_size=env.vocab.size, d_model=32, num_layers=1, num_heads=2,
                       num_kv_heads=1, mlp_dim=64)
  return env, env_params, cfg, tf.init_params(cfg, jax.random.key(0))


@functools.lru_cache(maxsize=None)
def rows_fn(**overrides):
  env, env_params, cfg, _ = setup()
  ro = R.make_rollout(env, cfg, dataclasses.replace(CFG, **overrides))

  @jax.jit
  def play(params, reset, sample, actions=None, num_forced=None, stop=None, ckeys=None):
    return ro.rows(params, reset, sample, env_params, forced_actions=actions,
                   num_forced=num_forced, stop_after_turn=stop, continue_keys=ckeys)

  return ro, play


def recorded(key=1, **overrides):
  """A recorded batch (sampled by the random tiny policy unless overridden) and its keys."""
  _, env_params, _, params = setup()
  ro, play = rows_fn(**overrides)
  reset, sample = R.rollout_keys(jax.random.key(key), CFG.num_envs, CFG.group_size)
  return play(params, reset, sample), reset, sample


def np_tree(t):
  return jax.tree.map(np.asarray, t)


def test_all_turns_forced_reproduce_the_recording():
  _, _, _, params = setup()
  traj, reset, sample = recorded()
  B, K = traj.turn_valid.shape
  actions, lengths = R.turn_actions(traj, CFG.turn_budget)
  np.testing.assert_array_equal(lengths, np.sum(np.asarray(traj.turn)[:, :, None]
                                                == np.arange(K), axis=1))
  _, play = rows_fn()
  fresh = jax.random.split(jax.random.key(42), B)
  replay = np_tree(play(params, reset, sample, actions, jnp.full((B,), K), None, fresh))
  traj = np_tree(traj)
  types.check_trajectory(replay)
  assert traj.loss_mask.sum() > 50 and traj.turn_valid.sum() > B
  for name in ("tokens", "turn", "turn_end", "turn_reward", "turn_valid", "done", "truncated"):
    np.testing.assert_array_equal(getattr(replay, name), getattr(traj, name), err_msg=name)
  jax.tree.map(np.testing.assert_array_equal, replay.info, traj.info)
  assert not replay.loss_mask.any() and not replay.sampler_logprob.any()


def test_forced_prefix_then_sampled_continuation():
  _, _, _, params = setup()
  traj, reset, sample = recorded()
  B, K = traj.turn_valid.shape
  actions, _ = R.turn_actions(traj, CFG.turn_budget)
  _, play = rows_fn()
  t = np_tree(traj)
  k = 1
  nf = jnp.full((B,), k + 1)
  fresh = np_tree(play(params, reset, sample, actions, nf, None,
                       jax.random.split(jax.random.key(42), B)))
  same_keys = np_tree(play(params, reset, sample, actions, nf))
  types.check_trajectory(fresh)
  # Without fresh keys the continuation is the recording itself (same keys, same state).
  np.testing.assert_array_equal(same_keys.tokens, t.tokens)
  np.testing.assert_array_equal(same_keys.loss_mask, t.loss_mask & (t.turn > k))
  differs = 0
  for b in range(B):
    assert t.turn_valid[b, k + 1], "the random policy plays every episode to the turn limit"
    start = int(np.nonzero(t.turn[b] == k + 1)[0][0])  # after turn k and its reply
    np.testing.assert_array_equal(fresh.tokens[b, :start], t.tokens[b, :start])
    np.testing.assert_array_equal(fresh.turn_reward[b, :k + 1], t.turn_reward[b, :k + 1])
    assert not fresh.loss_mask[b, :start].any()
    later = fresh.turn[b] > k
    assert fresh.loss_mask[b][later].mean() > 0.8  # sampled (bar forced <eot>s)
    differs += not np.array_equal(fresh.tokens[b, start:], t.tokens[b, start:])
  assert differs >= B - 1, "the continuation is sampled with fresh keys"


def expert_mr_reference(env, env_params, traj, reset, window):
  """MR of a noise-free expert continuation, in Python: replay the recorded turns with
  `env.step`; after turn k the expert needs (k_attrs - told) asks and one answer (reward 1)."""
  t = np_tree(traj)
  B, K = t.turn_valid.shape
  mr = np.zeros((B, K))
  step = jax.jit(env.step)
  for b in range(B):
    state, _ = env.reset(reset[b], env_params)
    n = int(t.turn_valid[b].sum())
    for k in range(n):
      pos = np.nonzero(t.turn[b] == k)[0]
      act = np.zeros((CFG.turn_budget,), np.int32)
      act[:pos.size] = t.tokens[b, pos]
      state, _, reward, done, _ = step(
          jax.random.key(0), state, R.envs_base.Action(jnp.asarray(act), jnp.int32(pos.size)),
          env_params)
      assert float(reward) == pytest.approx(t.turn_reward[b, k])
      mr[b, k] = float(reward)
      if not bool(done):
        need = env.num_attributes - int(state.told) + 1
        mr[b, k] += float(need <= min(window, K - k - 1))
  return mr


@pytest.mark.parametrize("window", [1, 99])
def test_mr_of_an_expert_continuation_equals_a_python_reference(window):
  """Prefix: a noisy expert (asks, premature and malformed answers); continuation: the
  noise-free expert, so MR is known exactly for every window."""
  env, env_params, _, params = setup()
  noisy = env_params.replace(noise=0.5)
  ro, _ = rows_fn(force_expert=True)
  reset, sample = R.rollout_keys(jax.random.key(3), 8, 1)
  traj = jax.jit(ro.rows)(params, reset, sample, noisy)
  mr, cont = jax.jit(functools.partial(R.multiturn_aware_reward, ro, window=window,
                                       samples=2, env_params=env_params))(
      params, traj, reset, sample)
  assert mr.shape == traj.turn_valid.shape and cont.tokens.shape[0] == 8 * env.max_turns * 2
  want = expert_mr_reference(env, noisy, traj, reset, window)
  np.testing.assert_allclose(np.asarray(mr), want, atol=1e-6)
  if window == 99:
    assert 0 < want[np.asarray(traj.turn_valid)].mean() < 1  # some prefixes already failed


def test_mr_equals_separately_run_continuations():
  """Sampled prefix, greedy continuation (deterministic): the batched MR equals, entry by
  entry, a numpy sum over continuations run one at a time."""
  env, env_params, _, params = setup()
  traj, reset, sample = recorded(key=2)
  ro_greedy, play = rows_fn(greedy=True)
  window = 2
  mr, _ = jax.jit(functools.partial(R.multiturn_aware_reward, ro_greedy, window=window,
                                    env_params=env_params))(
      params, traj, reset, sample)
  actions, _ = R.turn_actions(traj, CFG.turn_budget)
  t = np_tree(traj)
  B, K = t.turn_valid.shape
  want = np.zeros((B, K))
  for b in range(0, B, 3):
    for k in range(int(t.turn_valid[b].sum())):
      one = np_tree(play(params, reset[b:b + 1], sample[b:b + 1], actions[b:b + 1],
                         jnp.asarray([k + 1]), jnp.asarray([k + 1 + window]),
                         jax.random.split(jax.random.key(b * K + k), 1)))
      assert one.turn_valid.sum() <= k + 1 + window
      want[b, k] = np.sum(np.where(one.turn_valid, one.turn_reward, 0.0)[0, k:])
  np.testing.assert_allclose(np.asarray(mr)[::3], want[::3], atol=1e-6)


@pytest.mark.parametrize("key, value, match", [
    ("mr_window", -1, "mr_window"), ("mr_samples", 0, "mr_samples"),
])
def test_bad_mr_configs_fail_before_compiling(key, value, match):
  from configs import clarify_mr
  c = clarify_mr.get_config()
  c.algo[key] = value
  with pytest.raises(ValueError, match=match):
    train_lib.make_train(c)
  c = clarify_mr.get_config()
  c.algo.advantage = "token_gae"
  with pytest.raises(ValueError, match="turn_gae"):
    train_lib.make_train(c)


def small_mr_config(window, **rollout):
  from configs import clarify_mr
  c = clarify_mr.with_window(window)
  c.rollout.num_envs = 4
  c.rollout.update(rollout)
  c.train.eval_envs = 4
  return c


def test_train_step_with_mr_reports_the_experts_mr():
  """Rollouts and continuations forced to the noise-free expert (ask, ask, answer): with a
  one-turn window MR is (0, 1, 1) (played to the end it would be (1, 1, 1))."""
  tr = train_lib.make_train(small_mr_config(1, force_expert=True))
  state = tr.start_rl(tr.init(jax.random.key(0)))
  state, m = jax.jit(tr.train_step)(state)
  assert float(m["train/mr_mean"]) == pytest.approx(2 / 3, abs=1e-6)
  assert float(m["train/return"]) == pytest.approx(1.0)
  assert all(np.isfinite(float(v)) for v in m.values())


@pytest.mark.slow  # ~20-45 s of compiling; `pytest -m slow tests/test_mr.py`
def test_train_step_with_mr_updates_a_sampling_policy():
  """The random policy's turns are mostly malformed: with a format penalty MR is negative and
  varies, so the critic regresses on it and the policy gets a gradient."""
  c = small_mr_config(99)
  c.env.format_penalty = 0.1
  c.algo.mr_samples = 2
  tr = train_lib.make_train(c)
  state = tr.start_rl(tr.init(jax.random.key(0)))
  _, m = jax.jit(tr.train_step)(state)
  assert all(np.isfinite(float(v)) for v in m.values())
  # At least this turn's penalty, at most the whole episode's (K = 5 turns).
  assert -0.5 <= float(m["train/mr_mean"]) < -0.05
  assert float(m["train/mr_mean"]) > float(m["train/return"])  # later turns carry less
  assert float(m["train/sampled_tokens"]) > 0 and float(m["train/nan_skipped"]) == 0
  assert float(m["train/value_loss"]) > 0 and float(m["train/grad_norm"]) > 0


@pytest.mark.slow  # ~20-45 s of compiling; `pytest -m slow tests/test_mr.py`
def test_sharded_train_step_with_mr_equals_single_device():
  """Continuation keys come from each row's own keys: 8 devices give the single-device step."""
  import chex
  from mtrl_jax import sharding
  c = small_mr_config(2, num_envs=8)
  c.env.format_penalty = 0.1
  c.algo.update(minibatches=1, epochs=1)
  c.optim.warmup = 0  # the first step must move the params (lr 0 at step 0 shows nothing)
  single = train_lib.make_train(c)
  state = jax.jit(single.start_rl)(single.init(jax.random.key(4)))
  ref_state, ref_m = jax.jit(single.train_step)(state)
  _, step = sharding.sharded_trainer(c, sharding.data_mesh(8))
  new_state, m = step(state)
  chex.assert_trees_all_close(new_state.params, ref_state.params, atol=2e-5)
  moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), ref_state.params,
                       state.params)
  assert max(jax.tree.leaves(moved)) > 1e-5
  for k in ("train/mr_mean", "train/return", "train/value_loss", "train/loss"):
    np.testing.assert_allclose(m[k], ref_m[k], rtol=1e-4, atol=1e-5, err_msg=k)
