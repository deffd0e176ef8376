"""Reflexion: the memory wrapper, templated reflections, the trial loop against a plain Python
loop, policy-written reflections, meta-training, and the errors."""

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ml_collections import config_dict

from mtrl_jax import reflexion as RX
from mtrl_jax import rollout as R
from mtrl_jax import train as train_lib
from mtrl_jax.rl import collect as collect_lib
from mtrl_jax import vocab as V
from mtrl_jax.envs import registry
from mtrl_jax.envs import wrappers
from mtrl_jax.models import transformer as tf

RC = R.RolloutConfig(num_envs=6, group_size=1, max_len=128, turn_budget=12)


@functools.lru_cache(maxsize=None)
def setup(name, **kw):
  env, env_params = registry.make(name, **kw)
  cfg = tf.ModelConfig(vocab_size=env.vocab.size, d_model=32, num_layers=1, num_heads=2,
                       num_kv_heads=1, mlp_dim=64)
  return env, env_params, cfg, tf.init_params(cfg, jax.random.key(0))


def keys(n, seed=0):
  return R.rollout_keys(jax.random.key(seed), n, 1)


def test_empty_memory_is_the_plain_prompt_and_memory_is_framed():
  env, p, _, _ = setup("search", hops=3)
  wrapped = RX.WithMemory(env, slots=2, reflection_len=5)
  assert wrapped.prompt_len == env.prompt_len + 2 * 7
  k = jax.random.key(3)
  _, plain = env.reset(k, p)
  _, empty = wrapped.reset(k, wrapped.empty_memory(p))
  n = int(plain.length)
  assert int(empty.length) == n
  np.testing.assert_array_equal(np.asarray(empty.tokens[:n]), np.asarray(plain.tokens[:n]))
  assert np.all(np.asarray(empty.tokens[n:]) == V.PAD_ID)

  mem = jnp.asarray([[11, 12, 13, 0, 0], [21, 22, 23, 24, 25]], jnp.int32)
  params = RX.MemoryParams(inner=p, tokens=mem, lengths=jnp.asarray([3, 5], jnp.int32))
  _, obs = jax.jit(wrapped.reset)(k, params)
  voc = env.vocab
  sysid, eot = voc.id(V.SYSTEM), voc.eot_id
  want = ([int(plain.tokens[0])] + [sysid, 11, 12, 13, eot] + [sysid, 21, 22, 23, 24, 25, eot]
          + [int(t) for t in plain.tokens[1:n]])
  assert int(obs.length) == len(want)
  assert [int(t) for t in obs.tokens[:len(want)]] == want
  # One empty slot contributes nothing.
  params = params.replace(lengths=jnp.asarray([0, 2], jnp.int32))
  _, obs = wrapped.reset(k, params)
  want = [int(plain.tokens[0]), sysid, 21, 22, eot] + [int(t) for t in plain.tokens[1:n]]
  assert [int(t) for t in obs.tokens[:int(obs.length)]] == want


def remember_reference(tokens, lengths, new, new_len, write):
  tokens, lengths = np.array(tokens), np.array(lengths)
  B, S, L = tokens.shape
  for b in range(B):
    n = min(int(new_len[b]), L)
    if S == 0 or not write[b] or n == 0:
      continue
    mem = [list(tokens[b, s, :lengths[b, s]]) for s in range(S)][1:] + [list(new[b, :n])]
    tokens[b] = 0
    for s, m in enumerate(mem):
      tokens[b, s, :len(m)] = m
      lengths[b, s] = len(m)
  return tokens, lengths


@pytest.mark.parametrize("slots", [0, 1, 3])
def test_remember_matches_a_python_reference(slots):
  rng = np.random.default_rng(slots)
  B, L = 7, 4
  lengths = rng.integers(0, L + 1, (B, slots))
  tokens = np.where(np.arange(L) < lengths[..., None], rng.integers(1, 50, (B, slots, L)), 0)
  new = rng.integers(1, 50, (B, L + 2))             # longer than L: cut
  new_len = rng.integers(0, L + 3, (B,))
  write = rng.random(B) < 0.7
  got = RX.remember(jnp.asarray(tokens), jnp.asarray(lengths), jnp.asarray(new),
                    jnp.asarray(new_len), jnp.asarray(write))
  want = remember_reference(tokens, lengths, new, new_len, write)
  np.testing.assert_array_equal(np.asarray(got[0]), want[0])
  np.testing.assert_array_equal(np.asarray(got[1]), want[1])


def one_hop_then_wrong(key):
  """A 3-hop search episode that reads the first record, then answers a wrong value:
  (env, params, final state, the wrong value)."""
  env, p, _, _ = setup("search", hops=3)
  s, _ = env.reset(key, p)
  s, *_ = env.step(key, s, env.search_action(s.chain[0]), p)
  wrong = (s.answer + 1) % (env.num_values * env.num_attributes)
  s, *_ = env.step(key, s, env.answer_action(wrong), p)
  assert not bool(s.success)
  return env, p, s, wrong


def test_search_reflection_names_the_wrong_answer_and_the_links_found():
  k = jax.random.key(5)
  env, p, s, wrong = one_hop_then_wrong(k)
  toks, n = env.reflection(s)
  voc = env.vocab
  c, r = np.asarray(s.chain), np.asarray(s.qrel)
  want = ["<error>", env.value_names[int(wrong)], env.entity_names[c[0]],
          env.relation_names[r[0]], env.entity_names[c[1]]]
  assert voc.decode(np.asarray(toks[:int(n)])).split() == want
  assert toks.shape == (env.reflection_len,)
  # Nothing answered, nothing found: an empty reflection.
  s0, _ = env.reset(k, p)
  assert int(env.reflection(s0)[1]) == 0


def test_fix_reflection_is_what_run_reports_on_the_final_program():
  env, p, _, _ = setup("fix")
  k = jax.random.key(2)
  s, _ = env.reset(k, p)
  _, obs, *_ = env.step(k, s, env.call_action(1), p)  # run
  toks, n = env.reflection(s)
  reply = np.asarray(obs.tokens[1:int(obs.length) - 2])  # <tool> content <eot> <assistant>
  np.testing.assert_array_equal(np.asarray(toks[:int(n)]), reply)
  assert env.vocab.decode(reply).split()[0] == "fail"


def test_search_action_reflection_names_the_search_it_lacked():
  """The template, then the search of the first chain entity whose record was not read."""
  k = jax.random.key(5)
  env, p, s, _ = one_hop_then_wrong(k)
  assert int(env.hops_found(s)) == 1
  toks, n = env.action_reflection(s)
  voc, c = env.vocab, np.asarray(s.chain)
  template = voc.decode(np.asarray(env.reflection(s)[0][:int(env.reflection(s)[1])])).split()
  got = voc.decode(np.asarray(toks[:int(n)])).split()
  assert got == template + ["<call>", "search", env.entity_names[c[1]], "</call>"]
  assert toks.shape == (env.action_reflection_len,)
  assert np.all(np.asarray(toks[int(n):]) == V.PAD_ID)
  # Nothing done at all: the empty template, then the first search.
  s0, _ = env.reset(k, p)
  got0 = voc.decode(np.asarray(env.action_reflection(s0)[0][:int(env.action_reflection(s0)[1])]))
  assert got0.split() == ["<call>", "search", env.entity_names[c[0]], "</call>"]


def test_fix_action_reflection_names_run_then_the_failing_line():
  """Never ran the tests (the habit): `run`; ran and still failing: `view` of the line `run`
  names; the program passes but was not submitted: `submit`."""
  env, p, _, _ = setup("fix")
  k = jax.random.key(2)
  s, _ = env.reset(k, p)
  voc = env.vocab
  words = lambda st: voc.decode(np.asarray(
      env.action_reflection(st)[0][:int(env.action_reflection(st)[1])])).split()
  template = lambda st: voc.decode(np.asarray(env.reflection(st)[0][:int(env.reflection(st)[1])])
                                   ).split()
  assert words(s) == template(s) + ["<call>", "run", "</call>"]
  s, *_ = env.step(k, s, env.call_action(1), p)  # run
  line = int(env.diagnose(s)[2])
  assert template(s)[0] == "fail"
  assert words(s) == template(s) + ["<call>", "view", str(line + 1), "</call>"]
  fixed = s.replace(ops=s.ref_ops, args=s.ref_args)
  assert words(fixed) == ["pass", "<call>", "submit", "</call>"]


def reflexion_reference(env, cfg, params, env_params, rc, trials, memory, reset_keys,
                        sample_keys, reflection="template"):
  """Plain Python loop over trials: rollout per trial, reflection, memory update (the last
  `memory` reflections, newest in the last slot)."""
  reflect = env.reflection if reflection == "template" else env.action_reflection
  L = env.reflection_len if reflection == "template" else env.action_reflection_len
  wrapped = RX.WithMemory(env, memory, L)
  play = jax.jit(functools.partial(R.make_rollout(wrapped, cfg, rc).rows,
                                   env_params_per_row=True, return_env_state=True))
  B = reset_keys.shape[0]
  mem = [[] for _ in range(B)]
  solved = np.zeros(B, bool)
  out = []
  for n in range(trials):
    toks = np.zeros((B, memory, L), np.int32)
    lens = np.zeros((B, memory), np.int32)
    for b in range(B):  # newest last; empty slots first
      for j, m in enumerate(mem[b]):
        slot = memory - len(mem[b]) + j
        toks[b, slot, :len(m)] = m
        lens[b, slot] = len(m)
    per_row = jax.tree.map(lambda x: jnp.broadcast_to(x, (B, *jnp.shape(x))), env_params)
    ks = jax.vmap(lambda k: jax.random.fold_in(k, n))(sample_keys)
    traj, final = play(params, reset_keys, ks, RX.MemoryParams(per_row, toks, lens))
    success = np.asarray(traj.info["success"]).astype(bool)
    ref_toks, ref_n = jax.vmap(reflect)(final)
    for b in range(B):
      if not success[b] and not solved[b] and memory and int(ref_n[b]) > 0:
        mem[b] = (mem[b] + [list(np.asarray(ref_toks[b, :int(ref_n[b])]))])[-memory:]
    solved |= success
    out.append((success.copy(), solved.copy(), toks, lens, np.asarray(traj.tokens)))
  return out


@pytest.mark.parametrize("reflection", ["template", "action"])
def test_trial_loop_matches_a_python_loop(reflection, memory=2):
  # The noisy expert plays (it fails often, and its failures leave reflections to remember).
  env, env_params, cfg, params = setup("search", hops=2)
  env_params = env_params.replace(noise=0.7)
  rc = dataclasses.replace(RC, force_expert=True)
  reset_keys, sample_keys = keys(8)
  run = RX.make_reflexion(env, cfg, rc, trials=3, memory=memory, keep_trajectories=True,
                          reflection=reflection)
  got = jax.jit(run)(params, reset_keys, sample_keys, env_params)
  L = env.reflection_len if reflection == "template" else env.action_reflection_len
  assert run.reflection_len == L
  chex.assert_shape(got.success, (3, 8))
  chex.assert_shape(got.memory, (3, 8, memory, L))
  want = reflexion_reference(env, cfg, params, env_params, rc, 3, memory, reset_keys,
                             sample_keys, reflection)
  for n, (success, solved, toks, lens, tokens) in enumerate(want):
    np.testing.assert_array_equal(np.asarray(got.success[n]), success)
    np.testing.assert_array_equal(np.asarray(got.solved[n]), solved)
    np.testing.assert_array_equal(np.asarray(got.memory[n]), toks)
    np.testing.assert_array_equal(np.asarray(got.memory_len[n]), lens)
    np.testing.assert_array_equal(np.asarray(got.trajs.tokens[n]), tokens)
  assert not np.any(np.asarray(got.memory_len[0]))  # the first trial has no memory
  success = np.asarray(got.success)
  assert 0 < success.mean() < 1
  if memory:  # failures were reflected on
    assert np.any(np.asarray(got.memory_len[1:]) > 0)


def test_without_memory_each_trial_is_the_plain_rollout():
  """Omega = 0: trial n is exactly the ordinary rollout with sample keys fold_in(key, n)."""
  env, env_params, cfg, params = setup("search", hops=2)
  reset_keys, sample_keys = keys(6, seed=4)
  run = RX.make_reflexion(env, cfg, RC, trials=2, memory=0, keep_trajectories=True)
  got = jax.jit(run)(params, reset_keys, sample_keys, env_params)
  plain = jax.jit(R.make_rollout(env, cfg, RC).rows)
  for n in range(2):
    ks = jax.vmap(lambda k: jax.random.fold_in(k, n))(sample_keys)
    traj = plain(params, reset_keys, ks, env_params)
    np.testing.assert_array_equal(np.asarray(got.trajs.tokens[n]), np.asarray(traj.tokens))
    np.testing.assert_array_equal(np.asarray(got.success[n]),
                                  np.asarray(traj.info["success"]).astype(bool))
  np.testing.assert_array_equal(np.asarray(got.solved[1]),
                                np.asarray(got.success[0] | got.success[1]))


def test_per_row_env_params_equal_broadcast_params():
  """Per-row params reach their own row only: expert noise 1 on row 0, 0 elsewhere, vs noise 0
  broadcast: rows 1.. are identical (the per-row path equals the broadcast one), row 0 differs."""
  env, env_params, cfg, params = setup("fix")
  rc = dataclasses.replace(RC, force_expert=True)
  play = R.make_rollout(env, cfg, rc)
  reset_keys, sample_keys = keys(6, seed=1)
  a = play.rows(params, reset_keys, sample_keys, env_params.replace(noise=0.0))
  rows_params = jax.tree.map(lambda x: jnp.broadcast_to(x, (6, *jnp.shape(x))), env_params)
  noisy = rows_params.replace(noise=jnp.asarray([1.0, 0, 0, 0, 0, 0]))
  c = play.rows(params, reset_keys, sample_keys, noisy, env_params_per_row=True)
  chex.assert_trees_all_equal(jax.tree.map(lambda x: x[1:], a), jax.tree.map(lambda x: x[1:], c))
  assert not np.array_equal(np.asarray(c.tokens[0]), np.asarray(a.tokens[0]))


def test_policy_written_reflections():
  env, env_params, cfg, params = setup("calculator")  # no template: the policy writes them
  L = 6
  rc = dataclasses.replace(RC, max_len=160)
  run = RX.make_reflexion(env, cfg, rc, trials=3, memory=1, reflection="policy",
                          reflection_len=L, keep_trajectories=True)
  reset_keys, sample_keys = keys(6, seed=2)
  got = jax.jit(run)(params, reset_keys, sample_keys, env_params)
  mem, lens = np.asarray(got.memory), np.asarray(got.memory_len)
  chex.assert_shape(mem, (3, 6, 1, L))
  assert np.all(lens <= L) and np.any(lens > 0)
  assert np.all(mem[np.arange(L) >= lens[..., None]] == V.PAD_ID)  # padded after the length
  assert not np.any((mem == env.vocab.eot_id) & (np.arange(L) < lens[..., None]))
  failed_first = ~np.asarray(got.success[0])
  assert np.all(lens[1, :, 0][~failed_first] == 0)  # only failures are reflected on
  # Deterministic given the keys.
  again = jax.jit(run)(params, reset_keys, sample_keys, env_params)
  np.testing.assert_array_equal(np.asarray(again.memory), mem)


def test_the_last_trial_writes_no_reflection():
  """No trial reads the last trial's reflection, so none is built (it would be a whole
  generation with reflection='policy'): count the template's calls per number of trials."""
  env, env_params = registry.make("search", hops=2)
  _, _, cfg, params = setup("search", hops=2)
  calls = []
  template = env.reflection

  def counted(state):
    jax.debug.callback(lambda: calls.append(1))
    return template(state)

  env.reflection = counted
  reset_keys, sample_keys = keys(4, seed=1)

  def count(trials):
    calls.clear()
    run = RX.make_reflexion(env, cfg, RC, trials=trials, memory=1)
    jax.block_until_ready(jax.jit(run)(params, reset_keys, sample_keys, env_params))
    jax.effects_barrier()
    return len(calls)

  per_trial = count(2)
  assert per_trial > 0
  assert count(1) == 0
  assert count(4) == 3 * per_trial


def test_errors_name_the_setting():
  env, _, cfg, _ = setup("calculator")
  with pytest.raises(ValueError, match="reflection='policy'"):
    RX.make_reflexion(env, cfg, RC, trials=2, memory=1)
  senv, _, scfg, _ = setup("search", hops=2)
  with pytest.raises(ValueError, match="trials"):
    RX.make_reflexion(senv, scfg, RC, trials=0, memory=1)
  with pytest.raises(ValueError, match="reflection="):
    RX.make_reflexion(senv, scfg, RC, trials=2, memory=1, reflection="magic")

  class Mute(wrappers.Wrapper):  # a templated reflection, but no action to name
    names_actions = False
  with pytest.raises(ValueError, match="names_actions"):
    RX.make_reflexion(Mute(senv), scfg, RC, trials=2, memory=1, reflection="action")
  with pytest.raises(ValueError, match="memory"):
    RX.make_reflexion(senv, scfg, RC, trials=2, memory=-1)
  with pytest.raises(ValueError, match=r"max_len.*prompt_len"):
    RX.make_reflexion(senv, scfg, dataclasses.replace(RC, max_len=40), trials=2, memory=3)


def meta_config(**reflexion):
  from configs import search_ppo
  config = search_ppo.get_config()
  config.rollout.num_envs = 4
  config.rollout.max_len = 96
  config.model.preset = "tiny"
  config.algo.minibatches = 2
  config.sft.steps = 0
  config.train.eval_envs = 4
  config.reflexion = config_dict.ConfigDict(dict(train_trials=1, memory=1, reflection="template",
                                                 reflection_len=0))
  config.reflexion.update(reflexion)
  return config


def test_meta_training_trains_on_every_trial():
  config = meta_config(train_trials=3, memory=1)
  config.algo.ent_coef = 0.01
  trainer = train_lib.make_train(config)
  assert isinstance(trainer.collect, collect_lib.ReflexionTrials)
  state = trainer.start_rl(trainer.init(jax.random.key(0)))
  # The update's batch is the 3 trials' 4 episodes each.
  reset_keys, sample_keys = keys(4)
  shapes = jax.eval_shape(lambda p: RX.flatten_trials(
      trainer.collect.play(p, reset_keys, sample_keys, trainer.env_params).trajs),
      state.params["policy"])
  assert shapes.tokens.shape == (12, trainer.rollout_config.max_len)
  new, metrics = jax.jit(trainer.train_step)(state, jax.random.key(1))
  for k in ("train/success_first_trial", "train/success_last_trial", "train/solved_any_trial"):
    assert 0.0 <= float(metrics[k]) <= 1.0
  # The per-trial metrics read the right trial, over its 4 tasks (an untrained policy solves
  # nothing, so give the trial loop's result a known pattern).
  play = trainer.collect.play

  def patterned(*args):
    out = play(*args)
    success = jnp.asarray([[1, 1, 0, 0], [0, 0, 0, 1], [1, 0, 0, 0]], bool)
    return out.replace(success=success, solved=jnp.cumsum(success, axis=0) > 0)

  trainer.collect.play = patterned
  _, metrics = jax.jit(trainer.train_step)(state, jax.random.key(1))
  assert float(metrics["train/success_first_trial"]) == 0.5
  assert float(metrics["train/success_last_trial"]) == 0.25
  assert float(metrics["train/solved_any_trial"]) == 0.75
  trainer.collect.play = play
  # A real gradient (an untrained policy earns no reward here: the entropy bonus gives one; the
  # first RL update itself is scaled by the warm-up's lr of 0).
  assert np.isfinite(float(metrics["train/grad_norm"])) and float(metrics["train/grad_norm"]) > 0
  assert int(new.step) == 1
  assert isinstance(train_lib.make_train(meta_config(train_trials=1)).collect,
                    collect_lib.PlainRollout)


def test_meta_config_errors():
  with pytest.raises(ValueError, match="config.reflexion: unknown keys.*'trails'"):
    train_lib.make_train(meta_config(trails=3))
  with pytest.raises(ValueError, match="train_trials"):
    train_lib.make_train(meta_config(train_trials=0))
  config = meta_config(train_trials=2)
  config.env = dict(name="calculator")
  with pytest.raises(ValueError, match="config.reflexion.*reflection='policy'"):
    train_lib.make_train(config)


@pytest.mark.slow
def test_cli_evaluate_and_reflexion_of_a_trained_run(tmp_path):
  """The two evaluation programs on a 2-seed SFT run, as a user runs them."""
  import json
  import os
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  small = ["--config", "configs/search_reflexion.py", "--config.train.num_seeds=2",
           "--config.rollout.num_envs=4", "--config.train.eval_envs=4",
           "--config.sft.batch_size=4"]
  run = lambda *a: subprocess.run([sys.executable, "-m", *a], cwd=root, capture_output=True,
                                  text=True, timeout=900)
  sft = run("experiments.sft", *small, "--workdir", str(tmp_path / "sft"), "--config.sft.steps=2")
  assert sft.returncode == 0, sft.stderr[-3000:]
  ev = run("experiments.evaluate", *small, "--run", str(tmp_path / "sft"), "--instances", "3",
           "--samples", "2", "--out", str(tmp_path / "eval.json"))
  assert ev.returncode == 0, ev.stderr[-3000:]
  assert len(json.loads((tmp_path / "eval.json").read_text())["per_seed"]) == 2
  rx = run("experiments.reflexion", *small, "--run", str(tmp_path / "sft"), "--instances", "4",
           "--trials", "3", "--memory", "0,2", "--out", str(tmp_path / "rx.json"))
  assert rx.returncode == 0, rx.stderr[-3000:]
  out = json.loads((tmp_path / "rx.json").read_text())
  for m in ("0", "2"):
    solved = np.asarray(out["memory"][m]["solved"])
    assert solved.shape == (2, 3) and np.all(np.diff(solved, axis=1) >= 0)
  bad = run("experiments.reflexion", *small, "--run", str(tmp_path / "sft"), "--memory", "x")
  assert bad.returncode != 0 and "--memory must be" in bad.stderr
