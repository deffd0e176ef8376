"""The fused rollout: contract, exact replies, logprobs, budgets, forcing, sharding, Python tools."""

import dataclasses
import functools
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from mtrl_jax import policy as policy_lib
from mtrl_jax import rollout as R
from mtrl_jax import types
from mtrl_jax import vocab as V
from mtrl_jax.envs import python_tool, registry
from mtrl_jax.envs.base import Action
from mtrl_jax.envs import tools as T
from mtrl_jax.models import transformer as tf

ENVS = ("calculator", "search", "clarify")
BASE = R.RolloutConfig(num_envs=6, group_size=2, max_len=160, turn_budget=24)


def model_for(env):
  cfg = tf.ModelConfig(vocab_size=env.vocab.size, d_model=32, num_layers=1, num_heads=2,
                       num_kv_heads=1, mlp_dim=64)
  params = tf.init_params(cfg, jax.random.key(0))
  return cfg, params


@functools.lru_cache(maxsize=None)
def setup(env_name, **env_overrides):
  env, env_params = registry.make(env_name, **env_overrides)
  cfg, params = model_for(env)
  return env, env_params, cfg, params


@functools.lru_cache(maxsize=None)
def run(env_name, key=1, **rollout_overrides):
  """Jitted rollout of `env_name` (random tiny policy unless force_expert), cached per config."""
  env, env_params, cfg, params = setup(env_name)
  config = dataclasses.replace(BASE, **rollout_overrides)
  rollout = jax.jit(R.make_rollout(env, cfg, config))
  return jax.tree.map(np.asarray, rollout(params, jax.random.key(key), env_params))


def turn_spans(traj, b):
  """[(start, end_inclusive)] of each valid turn of row b."""
  spans = []
  for k in range(traj.turn_valid.shape[1]):
    pos = np.nonzero(traj.turn[b] == k)[0]
    if pos.size:
      spans.append((int(pos[0]), int(pos[-1])))
  return spans


@pytest.mark.parametrize("env_name", ENVS)
@pytest.mark.parametrize("force_expert", [False, True])
def test_trajectory_contract_and_exact_replies(env_name, force_expert):
  env, env_params, _, _ = setup(env_name)
  traj = run(env_name, force_expert=force_expert)
  B, T_, K = BASE.batch_size, BASE.max_len, env.max_turns
  chex.assert_shape([traj.tokens, traj.loss_mask, traj.turn, traj.sampler_logprob], (B, T_))
  chex.assert_shape([traj.turn_end, traj.turn_reward, traj.turn_valid], (B, K))
  types.check_trajectory(traj)
  assert np.all(traj.done | traj.truncated)

  reset_keys, _ = R.rollout_keys(jax.random.key(1), BASE.num_envs, BASE.group_size)
  step = jax.jit(env.step)
  for b in range(B):
    # Rows of a group share the environment instance: the same prompt.
    g0 = (b // BASE.group_size) * BASE.group_size
    state, prompt = env.reset(reset_keys[b], env_params)
    n = int(prompt.length)
    np.testing.assert_array_equal(traj.tokens[b, :n], np.asarray(prompt.tokens[:n]))
    np.testing.assert_array_equal(traj.tokens[b, :n], traj.tokens[g0, :n])
    spans = turn_spans(traj, b)
    for k, (s, e) in enumerate(spans):
      tokens = np.zeros((BASE.turn_budget,), np.int32)
      tokens[: e - s + 1] = traj.tokens[b, s:e + 1]
      action = T.pad_to(tokens, BASE.turn_budget)
      # Replay the turn with two different keys: the reply must not depend on the key, and
      # must be exactly the tokens that follow the turn in the row.
      act = Action(tokens=action, length=jnp.int32(e - s + 1))
      new_state, obs, reward, done, info = step(jax.random.key(7), state, act, env_params)
      _, obs_other_key, _, _, _ = step(jax.random.key(8), state, act, env_params)
      chex.assert_trees_all_equal(obs, obs_other_key)
      state = new_state
      m = int(obs.length)
      np.testing.assert_array_equal(traj.tokens[b, e + 1:e + 1 + m], np.asarray(obs.tokens[:m]))
      assert traj.turn_reward[b, k] == pytest.approx(float(reward))
      if k + 1 < len(spans):
        assert spans[k + 1][0] == e + 1 + m, "the next turn starts right after the reply"
      else:
        # The last turn: the row is `done` exactly when the environment terminated it (not
        # when it truncated it at its turn limit, and not when the context ran out).
        assert bool(traj.done[b]) == (bool(done) and not bool(info["truncated"]))
    # loss_mask: exactly the sampled tokens. Forced tokens: the whole turn under forcing, and
    # an <eot> in the last slot of a turn that used its whole budget.
    for s, e in spans:
      mask = traj.loss_mask[b, s:e + 1]
      if force_expert:
        assert not mask.any()
        continue
      forced_eot = (e - s + 1 == BASE.turn_budget) and traj.tokens[b, e] == env.vocab.eot_id
      assert mask[:-1].all() and mask[-1] == (not forced_eot)
    assert not traj.loss_mask[b][traj.turn[b] < 0].any()


@pytest.mark.parametrize("env_name", ENVS)
def test_expert_forcing_reproduces_expert_success(env_name):
  traj = run(env_name, force_expert=True)
  assert traj.info["success"].all(), "the noise-free expert must solve every episode"
  assert traj.done.all() and not traj.truncated.any()
  np.testing.assert_allclose(traj.turn_reward.sum(-1), 1.0)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampler_logprob_matches_teacher_forced_forward(temperature):
  env, _, cfg, params = setup("calculator")
  traj = run("calculator", temperature=temperature)
  logits, _, _ = jax.jit(lambda p, t: tf.apply(dataclasses.replace(cfg, value_head=False), p, t))(
      params, jnp.asarray(traj.tokens))
  banned = jnp.asarray(policy_lib.never_sampled_mask(env.vocab, cfg.vocab_size))
  logp = policy_lib.sampling_log_probs(logits[:, :-1], banned, temperature=temperature)
  token_logp = np.take_along_axis(np.asarray(logp), traj.tokens[:, 1:, None], -1)[..., 0]
  mask = traj.loss_mask[:, 1:]
  assert mask.sum() > 100
  np.testing.assert_allclose(token_logp[mask], traj.sampler_logprob[:, 1:][mask], atol=1e-4)
  # And the temperature matters: scoring at temperature 1 disagrees when sampling was at 0.7.
  if temperature != 1.0:
    logp1 = policy_lib.sampling_log_probs(logits[:, :-1], banned, temperature=1.0)
    t1 = np.take_along_axis(np.asarray(logp1), traj.tokens[:, 1:, None], -1)[..., 0]
    assert np.abs(t1[mask] - traj.sampler_logprob[:, 1:][mask]).max() > 1e-2


def test_turn_and_think_budgets_are_never_exceeded():
  env, _, _, _ = setup("calculator")
  budget, think = 8, 2
  traj = run("calculator", temperature=4.0, turn_budget=budget, think_budget=think, num_envs=32)
  types.check_trajectory(traj)
  think_open, think_close = env.vocab.id(V.THINK_OPEN), env.vocab.id(V.THINK_CLOSE)
  forced_close = forced_eot = 0
  for b in range(traj.tokens.shape[0]):
    for s, e in turn_spans(traj, b):
      assert e - s + 1 <= budget
      if e - s + 1 == budget:
        forced_eot += not traj.loss_mask[b, e]
      inside = None
      for t in range(s, e + 1):
        tok = traj.tokens[b, t]
        if inside is not None:
          if tok == think_close:
            forced_close += not traj.loss_mask[b, t]
            inside = None
            continue
          if tok == env.vocab.eot_id:  # the turn (budget) ended inside the think block
            break
          inside += 1
          assert inside <= think, f"row {b}: {inside} thinking tokens"
        elif tok == think_open:
          inside = 0
  assert forced_close > 0 and forced_eot > 0, "the budgets were never exercised"


def test_context_truncation_keeps_the_contract():
  env, _, _, _ = setup("calculator")
  tight = env.prompt_len + BASE.turn_budget + env.reply_len
  traj = run("calculator", max_len=tight)
  types.check_trajectory(traj)
  assert traj.truncated.any()
  assert (traj.tokens != V.PAD_ID).sum(-1).max() <= tight


def test_greedy_is_deterministic_across_keys_within_a_group():
  traj = run("calculator", greedy=True)
  G = BASE.group_size
  for g in range(BASE.num_envs):
    np.testing.assert_array_equal(traj.tokens[g * G], traj.tokens[g * G + 1])


@pytest.mark.parametrize("overrides, setting", [
    (dict(max_len=20), "max_len"),
    (dict(turn_budget=1), "turn_budget"),
    (dict(turn_budget=5, force_expert=True), "turn_budget"),
    (dict(think_budget=30), "think_budget"),
    (dict(max_turns=99), "max_turns"),
    (dict(temperature=0.0), "temperature"),
    (dict(top_p=1.5), "top_p"),
    (dict(num_envs=0), "num_envs"),
])
def test_budget_errors_name_the_setting(overrides, setting):
  env, _, cfg, _ = setup("calculator")
  with pytest.raises(R.BudgetError, match=f"rollout.{setting}"):
    R.make_rollout(env, cfg, dataclasses.replace(BASE, **overrides))


def test_deterministic_and_compiles_once():
  env, env_params, cfg, params = setup("calculator")
  traces = []
  inner = R.make_rollout(env, cfg, BASE)

  @jax.jit
  def rollout(p, key):
    traces.append(1)
    return inner(p, key, env_params)

  a = rollout(params, jax.random.key(3))
  b = rollout(params, jax.random.key(3))
  c = rollout(params, jax.random.key(4))
  chex.assert_trees_all_equal(a, b)
  assert not np.array_equal(a.tokens, c.tokens)
  assert len(traces) == 1


def test_row_depends_only_on_its_key():
  """A row's episode is the same whatever else is in the batch (per-row PRNG keys)."""
  env, env_params, cfg, params = setup("calculator")
  ro = R.make_rollout(env, cfg, BASE)
  reset, sample = R.rollout_keys(jax.random.key(5), BASE.num_envs, BASE.group_size)
  full = jax.jit(ro.rows)(params, reset, sample, env_params)
  half = jax.jit(ro.rows)(params, reset[::2], sample[::2], env_params)
  full = jax.tree.map(lambda x: x[::2], full)
  np.testing.assert_array_equal(full.tokens, half.tokens)
  # Log-probs agree to float rounding (a different batch shape blocks the matmuls differently).
  chex.assert_trees_all_close(full, half, atol=1e-5)


def test_sharded_over_8_devices_equals_single_device():
  assert jax.device_count() >= 8, "conftest.py sets 8 CPU devices"
  env, env_params, cfg, params = setup("search")
  config = dataclasses.replace(BASE, num_envs=8, group_size=2)
  ro = R.make_rollout(env, cfg, config)
  reset, sample = R.rollout_keys(jax.random.key(6), config.num_envs, config.group_size)
  single = jax.jit(ro.rows)(params, reset, sample, env_params)
  mesh = jax.make_mesh((8,), ("data",))
  sharded = jax.jit(jax.shard_map(
      lambda p, r, s: ro.rows(p, r, s, env_params), mesh=mesh,
      in_specs=(P(), P("data"), P("data")), out_specs=P("data"), check_vma=False))
  rows = NamedSharding(mesh, P("data"))
  out = sharded(params, jax.device_put(reset, rows), jax.device_put(sample, rows))
  assert len(out.tokens.sharding.device_set) == 8
  chex.assert_trees_all_close(single, out, atol=1e-5)
  np.testing.assert_array_equal(single.tokens, out.tokens)


def test_python_calculator_matches_eval_expression():
  env, _, _, _ = setup("calculator")
  calc = python_tool.python_calculator(env.max_tool_operands)
  digit_of = T.table(env.vocab, V.DIGITS)
  op_of = T.table(env.vocab, T.OPERATORS)
  rng = np.random.default_rng(0)
  alphabet = list(V.DIGITS) + ["+", "-", "*", "?", "calc"]
  cases = [" ".join(rng.choice(alphabet, size=rng.integers(1, 14))) for _ in range(300)]
  cases += ["9 9 9 9 9 9 9 9 9 9", "2 1 4 7 4 8 3 6 4 7", "- 2 1 4 7 4 8 3 6 4 7",
            "6 5 5 3 6 * 6 5 5 3 6", "1 2 * - 3 + 4", "3 - - 4", "- - 3", "1 + 2 * 3 * 4 - 5"]
  cases += [" ".join(rng.choice(list(V.DIGITS) + ["+", "-", "*"] * 3, size=15)) for _ in range(200)]
  evaluate = jax.jit(lambda t, n: T.eval_expression(t, 0, n, digit_of, op_of, env.max_tool_operands))
  for text in cases:
    ids = env.vocab.encode(text)
    value, ok, overflow = evaluate(T.pad_to(ids, 24), len(ids))
    want = (" ".join(("-" if value < 0 else "") + str(abs(int(value)))) if ok else
            "<error> overflow" if overflow else "<error> bad-argument")
    assert calc(text) == want, text


@pytest.mark.parametrize("force_expert, noise", [(False, 0.0), (True, 0.6)])
def test_python_tool_path_equals_pure_jax_calculator(force_expert, noise):
  env, env_params = registry.make("calculator", noise=noise)
  cfg, params = model_for(env)
  calls = []

  def calc(args):
    calls.append(args)
    return python_tool.python_calculator(env.max_tool_operands)(args)

  py_env = python_tool.PythonToolEnv(env, {"calc": calc})
  config = dataclasses.replace(BASE, num_envs=16, group_size=1, force_expert=force_expert,
                               temperature=1.5)
  pure = jax.jit(R.make_rollout(env, cfg, config))(params, jax.random.key(9), env_params)
  via_python = jax.jit(R.make_rollout(py_env, cfg, config))(params, jax.random.key(9), env_params)
  chex.assert_trees_all_equal(pure, via_python)
  if force_expert:
    # Every tool call of the episodes went through Python (rows stepped alongside a finished
    # turn may add calls whose results are discarded, so this is a lower bound).
    made = int(np.sum(pure.info["num_tool_calls"]))
    assert made >= 8, "the noisy expert still calls the tool in most episodes"
    assert len(calls) >= made, (len(calls), made)


def test_python_tool_errors_become_replies():
  env, env_params = registry.make("calculator")
  cfg, params = model_for(env)

  def broken(args):
    raise RuntimeError("tool crashed")

  py_env = python_tool.PythonToolEnv(env, {"calc": broken})
  traj = jax.jit(R.make_rollout(py_env, cfg, dataclasses.replace(BASE, force_expert=True)))(
      params, jax.random.key(1), env_params)
  text = V.render_trajectory(traj, env.vocab, 0)
  assert "<tool> <error> bad-argument <eot>" in text
  with pytest.raises(ValueError, match="not symbols"):
    python_tool.PythonToolEnv(env, {"grep": broken})


def test_sampling_log_probs_top_k_top_p_and_bans():
  logits = jnp.log(jnp.asarray([[0.05, 0.4, 0.1, 0.3, 0.15]]))
  banned = jnp.asarray([True, False, False, False, False])
  full = np.exp(np.asarray(policy_lib.sampling_log_probs(logits, banned)))[0]
  np.testing.assert_allclose(full, np.array([0, 0.4, 0.1, 0.3, 0.15]) / 0.95, rtol=1e-5)
  # top-k = 2 keeps the two most likely allowed tokens, renormalised.
  k2 = np.exp(np.asarray(policy_lib.sampling_log_probs(logits, banned, top_k=2)))[0]
  np.testing.assert_allclose(k2, [0, 0.4 / 0.7, 0, 0.3 / 0.7, 0], rtol=1e-5)
  # top-p = 0.8 keeps the smallest prefix (by probability) whose mass reaches 0.8:
  # 0.42 + 0.32 = 0.74 < 0.8, so the third token (0.16) is kept too.
  p8 = np.exp(np.asarray(policy_lib.sampling_log_probs(logits, banned, top_p=0.8)))[0]
  kept = np.array([0, 0.4, 0, 0.3, 0.15]) / 0.85
  np.testing.assert_allclose(p8, kept, rtol=1e-5)
  # Temperature sharpens: T -> small puts almost all mass on the argmax.
  cold = np.exp(np.asarray(policy_lib.sampling_log_probs(logits, banned, temperature=0.05)))[0]
  assert cold[1] > 0.99


# --- issue 21: chunked reply feeding, per-position keys, inverse-CDF sampling ---------------

def test_inverse_cdf_sample_follows_the_distribution_and_its_log_prob_is_exact():
  V_ = 100  # not a multiple of the 32-id search block: the padded tail must never be picked
  x = jax.random.normal(jax.random.key(0), (V_,)) * 2.0
  x = x.at[jnp.asarray([0, 1, 37, 99])].set(-jnp.inf)  # banned ids, also in the last block
  n = 40000
  u = jax.random.uniform(jax.random.key(1), (n,))
  tok, logp = jax.jit(policy_lib.inverse_cdf_sample)(jnp.broadcast_to(x, (n, V_)), u)
  tok, logp = np.asarray(tok), np.asarray(logp)
  p = np.asarray(jax.nn.softmax(x))
  chex.assert_shape(tok, (n,))
  assert tok.min() >= 0 and tok.max() < V_
  assert not np.isin(tok, [0, 1, 37, 99]).any(), "a zero-probability id was sampled"
  freq = np.bincount(tok, minlength=V_) / n
  # Every id within 5 standard errors of its probability (binomial).
  np.testing.assert_array_less(np.abs(freq - p), 5 * np.sqrt(p * (1 - p) / n) + 1e-4)
  np.testing.assert_allclose(logp, np.log(p[tok]), atol=1e-5)


@pytest.mark.parametrize("u", [0.0, 1e-9, 0.5, 1.0 - 2.0**-24])
def test_inverse_cdf_sample_edges_never_pick_banned_ids(u):
  # Support only in the middle: the extreme uniforms must land on its first / last id.
  x = jnp.full((70,), -jnp.inf).at[40:43].set(jnp.asarray([0.0, 1.0, -1.0]))
  tok, logp = policy_lib.inverse_cdf_sample(x, jnp.float32(u))
  assert 40 <= int(tok) <= 42
  assert np.isfinite(float(logp)) and float(logp) <= 0.0
  if u == 0.0:
    assert int(tok) == 40
  if u > 0.99:
    assert int(tok) == 42


@pytest.mark.parametrize("top_k, top_p", [(5, 1.0), (0, 0.8)])
def test_truncated_sampling_stays_in_support_with_exact_log_probs(top_k, top_p):
  logits = jax.random.normal(jax.random.key(2), (512, 60)) * 3.0
  banned = np.zeros((60,), bool)
  banned[:3] = True
  pol = policy_lib.Policy(banned=banned, temperature=0.8, top_k=top_k, top_p=top_p)
  u = jax.random.uniform(jax.random.key(3), (512,))
  tok, logp = jax.jit(pol.sample_uniform)(u, logits)
  want = np.asarray(pol.log_probs(logits))
  got = want[np.arange(512), np.asarray(tok)]
  assert np.isfinite(got).all(), "sampled outside the top-k / top-p support"
  np.testing.assert_allclose(np.asarray(logp), got, atol=1e-5)
  # Greedy: the argmax, with its log-prob.
  gtok, glogp = pol.sample_uniform(u, logits, greedy=True)
  np.testing.assert_array_equal(np.asarray(gtok), want.argmax(-1))
  np.testing.assert_allclose(np.asarray(glogp), want.max(-1), atol=1e-5)


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 8, 1.0), (0.8, 0, 0.9)])
def test_truncated_sampler_logprob_matches_teacher_forced_forward(temperature, top_k, top_p):
  env, _, cfg, params = setup("calculator")
  traj = run("calculator", temperature=temperature, top_k=top_k, top_p=top_p)
  logits, _, _ = jax.jit(lambda p, t: tf.apply(dataclasses.replace(cfg, value_head=False), p, t))(
      params, jnp.asarray(traj.tokens))
  banned = jnp.asarray(policy_lib.never_sampled_mask(env.vocab, cfg.vocab_size))
  logp = policy_lib.sampling_log_probs(logits[:, :-1], banned, temperature=temperature,
                                       top_k=top_k, top_p=top_p)
  token_logp = np.take_along_axis(np.asarray(logp), traj.tokens[:, 1:, None], -1)[..., 0]
  mask = traj.loss_mask[:, 1:]
  assert mask.sum() > 100
  np.testing.assert_allclose(token_logp[mask], traj.sampler_logprob[:, 1:][mask], atol=1e-4)


@pytest.mark.parametrize("env_name", ["calculator", "search"])
def test_episode_does_not_depend_on_the_feed_schedule(env_name):
  """Replies fed as soon as one row waits, when half do, or when all do, in chunks of 3 or of
  the whole reply: the same episodes (per-position keys, per-turn environment keys)."""
  env, env_params, cfg, params = setup(env_name)
  reset, sample = R.rollout_keys(jax.random.key(11), BASE.num_envs, BASE.group_size)
  outs = {}
  for frac, chunk in [(0.5, 32), (0.0, 32), (1.0, 32), (0.5, 3)]:
    config = dataclasses.replace(BASE, feed_fraction=frac, feed_chunk=chunk, temperature=1.5)
    ro = R.make_rollout(env, cfg, config)
    outs[frac, chunk] = jax.tree.map(np.asarray, jax.jit(ro.rows)(params, reset, sample,
                                                                  env_params))
  ref = outs[0.5, 32]
  types.check_trajectory(ref)
  assert ref.turn_valid.sum(1).min() >= 2, "multi-turn episodes exercise the feeding"
  assert env.reply_len > 3, "chunks of 3 split the replies"
  for key, traj in outs.items():
    types.check_trajectory(traj)
    np.testing.assert_array_equal(traj.tokens, ref.tokens, err_msg=str(key))
    np.testing.assert_array_equal(traj.loss_mask, ref.loss_mask, err_msg=str(key))
    np.testing.assert_array_equal(traj.turn, ref.turn, err_msg=str(key))
    chex.assert_trees_all_close(traj, ref, atol=1e-5)


def test_row_depends_only_on_its_key_with_replay_and_continuation_keys():
  """Continuation sampling is keyed by (continue key, position) too: a row's continuation is
  the same in a batch of 12 and of 6."""
  env, env_params, cfg, params = setup("calculator")
  ro = R.make_rollout(env, cfg, dataclasses.replace(BASE, temperature=1.5))
  reset, sample = R.rollout_keys(jax.random.key(12), BASE.num_envs, BASE.group_size)
  rec = jax.jit(ro.rows)(params, reset, sample, env_params)
  actions, _ = R.turn_actions(rec, BASE.turn_budget)
  ckeys = jax.random.split(jax.random.key(13), BASE.batch_size)
  nf = jnp.ones((BASE.batch_size,), jnp.int32)
  play = jax.jit(lambda r, s, a, n, c: ro.rows(params, r, s, env_params, forced_actions=a,
                                                num_forced=n, continue_keys=c))
  full = play(reset, sample, actions, nf, ckeys)
  half = play(reset[::2], sample[::2], actions[::2], nf[::2], ckeys[::2])
  np.testing.assert_array_equal(np.asarray(full.tokens)[::2], np.asarray(half.tokens))
  # The forced first turn is the recording's, token for token, and is not a policy sample.
  first = np.asarray(rec.turn) == 0
  np.testing.assert_array_equal(np.asarray(full.tokens)[first], np.asarray(rec.tokens)[first])
  assert not np.asarray(full.loss_mask)[first].any()


@pytest.mark.parametrize("decode_block", [256, 64])
def test_kv_cache_is_updated_in_place_in_the_compiled_loop(decode_block):
  """No copy, pad or concatenation of a cache-sized buffer in the compiled rollout beyond the
  initial zeros (2 per layer): every decode step and reply chunk writes the per-layer caches in
  place, and decode attention reads them where they are, densely (decode_block 256 >= 168
  slots) or block by block with a block that does not divide the cache (64). (Checked to fail
  when an old cache value is kept alive across a step, which forces XLA to copy, and when the
  block loop padded the cache to a multiple of the block.)"""
  env, env_params, cfg, params = setup("calculator")
  cfg = dataclasses.replace(cfg, num_layers=2, decode_block=decode_block)
  params = tf.init_params(cfg, jax.random.key(0))
  config = dataclasses.replace(BASE, max_len=168)
  hlo = jax.jit(R.make_rollout(env, cfg, config)).lower(
      params, jax.random.key(1), env_params).compile().as_text()
  B, KV, D = config.batch_size, cfg.num_kv_heads, cfg.head_dim
  for shape in (f"[{B},{KV},{D},168]", f"[{B},{KV},168,{D}]"):  # KVCache's k and v layouts
    assert any(shape in l for l in hlo.splitlines()), f"the cache shape {shape} is in the program"
  copies = []  # cache-like buffers: [B, KV, D, >= 168] or [B, KV, >= 168, D]
  for line in hlo.splitlines():
    m = re.search(r"= f32\[([0-9,]+)\]\S* (copy|pad|concatenate)\(", line)
    dims = [int(d) for d in m.group(1).split(",")] if m else []
    if len(dims) == 4 and dims[:2] == [B, KV] and D in dims[2:] and max(dims[2:]) >= 168:
      copies.append(line.strip()[:160])
  assert len(copies) <= 2 * cfg.num_layers, copies
