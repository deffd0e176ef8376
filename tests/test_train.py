"""The trainer: config validation, NaN safety, exact resume, vmapped seeds, and learning."""

import functools
import os
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.quickstart import base_config
from mtrl_jax import checkpoint as ckpt_lib
from mtrl_jax import metrics as metrics_lib
from mtrl_jax import rollout as rollout_lib
from mtrl_jax import train as train_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def small_config(**algo):
  c = base_config()
  c.model.preset = "tiny"
  c.rollout.num_envs = 4
  c.sft.batch_size = 8
  c.train.eval_envs = 4
  c.algo.update(algo)
  return c


@functools.lru_cache(maxsize=None)
def trainer_and_fns():
  tr = train_lib.make_train(small_config())
  return tr, jax.jit(tr.sft_step), jax.jit(tr.train_step), jax.jit(tr.start_rl)


@pytest.mark.parametrize("section, key, value, match", [
    ("algo", "advantage", "ppo2", "config.algo.advantage"),
    ("algo", "advantage", "grpo", "group_size"),
    ("algo", "minibatches", 3, "minibatches"),
    ("algo", "loss_agg", "sum", "config.algo.loss_agg"),
    ("rollout", "max_len", 100, "config.rollout.max_len"),
    ("env", "name", "chess", "unknown environment 'chess'"),
    ("sft", "habit_p", 1.5, "config.sft.habit_p"),
])
def test_bad_configs_fail_before_compiling(section, key, value, match):
  c = small_config()
  with c.unlocked():
    c[section][key] = value
  with pytest.raises(ValueError, match=match):
    train_lib.make_train(c)


def test_fill_env_section_declares_every_override():
  """config.env gets every constructor argument and Params field of its environment (what the
  CLI does on loading, so --config.env.<key> can set any of them); set keys are kept."""
  c = small_config()
  c.lock()
  train_lib.fill_env_section(c)
  assert sorted(c.env) == ["format_penalty", "habit_p", "max_tool_operands", "max_turns", "name",
                           "noise", "num_digits", "num_operands", "operators"]  # not `vocab`
  assert c.env.num_digits == 3 and c.env.operators == "+-*" and c.env.format_penalty == 0.0
  c.env.format_penalty = 0.1  # the locked config takes a declared key...
  with pytest.raises(AttributeError, match="formt_penalty"):
    c.env.formt_penalty = 0.1  # ...and still refuses an unknown one
  assert train_lib.make_train(c).env_params.format_penalty == 0.1
  section = {"env": {"name": "clarify", "ask_cost": 0.05}}  # a plain dict; None defaults too
  train_lib.fill_env_section(section)
  assert section["env"]["ask_cost"] == 0.05 and section["env"]["max_turns"] is None
  assert section["env"]["fully_specified"] is False
  for name in ("json_tool", "chess"):  # a factory's overrides are its own; unknown: build_env
    section = {"env": {"name": name}}
    train_lib.fill_env_section(section)
    assert section == {"env": {"name": name}}


def test_unknown_config_key_is_rejected_by_the_cli():
  out = subprocess.run(
      [sys.executable, "-m", "experiments.train", "--config", "configs/quickstart.py",
       "--config.algo.gama=0.5"], cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert out.returncode == 2
  assert "config.algo.gama" in out.stderr and "gamma_turn" in out.stderr


def test_train_step_runs_and_reports_metrics():
  tr, sft_step, rl_step, start_rl = trainer_and_fns()
  state = start_rl(tr.init(jax.random.key(0)))
  state, m = rl_step(state)
  for k in ("train/return", "train/success_rate", "train/kl", "train/entropy", "train/clip_frac",
            "train/value_loss", "train/logprob_agreement", "train/nan_skipped"):
    assert k in m and np.isfinite(float(m[k])), k
  assert int(state.step) == 1
  # The learner scores the rollout's tokens with the sampler's distribution: before any update
  # the two agree to float rounding (top-k/top-p are off in this config).
  assert float(m["train/logprob_agreement"]) < 1e-4
  assert float(m["train/nan_skipped"]) == 0


def test_warmup_never_gives_a_zero_learning_rate():
  """The first RL update moves the params (the old linear_schedule(0, lr, w) made it a no-op),
  the rate rises linearly to lr after `warmup` updates, and warmup 0 is constant."""
  sched = train_lib.warmup_schedule(6e-4, 5)
  np.testing.assert_allclose([float(sched(i)) for i in range(8)],
                             [1e-4, 2e-4, 3e-4, 4e-4, 5e-4, 6e-4, 6e-4, 6e-4], rtol=1e-6)
  assert float(train_lib.warmup_schedule(6e-4, 0)(0)) == 6e-4
  tr, *_ = trainer_and_fns()
  assert tr.optim.warmup == 5  # the default
  # The trainer's RL optimizer, first update, on a gradient of ones: it moves every param.
  params = tr.init(jax.random.key(0)).params
  updates, _ = tr.rl_opt.update(jax.tree.map(jnp.ones_like, params), tr.rl_opt.init(params),
                                params)
  assert min(float(jnp.min(jnp.abs(u))) for u in jax.tree.leaves(updates)) > 0


def test_evaluate_reports_success_with_its_standard_error():
  """eval/success_se is the standard error of the mean of the per-episode successes (NumPy's
  population std / sqrt(n)) of the fixed evaluation episodes."""
  for succ in ([1, 0, 0, 1, 1, 1, 0, 1], [1] * 5, [0, 1, 0]):
    x = np.asarray(succ, np.float64)
    np.testing.assert_allclose(float(train_lib.success_se(jnp.float32(x.mean()), x.size)),
                               x.std() / np.sqrt(x.size), rtol=1e-6)
  tr, *_ = trainer_and_fns()
  state = tr.init(jax.random.key(0))
  m = jax.jit(tr.evaluate)(state.params, jax.random.key(1))
  n = tr.train_config.eval_envs
  reset_keys, sample_keys = rollout_lib.rollout_keys(jax.random.key(1), n, 1)
  succ = np.asarray(tr.eval_rollout.rows(state.params["policy"], reset_keys, sample_keys,
                                         tr.env_params).info["success"], np.float64)
  assert succ.shape == (n,)
  np.testing.assert_allclose(float(m["eval/success_rate"]), succ.mean(), atol=1e-6)
  np.testing.assert_allclose(float(m["eval/success_se"]), succ.std() / np.sqrt(n), atol=1e-6)
  assert train_lib.TrainConfig().eval_envs >= 256


def test_nan_loss_skips_the_update_and_is_reported():
  tr, _, rl_step, start_rl = trainer_and_fns()
  state = start_rl(tr.init(jax.random.key(1)))
  policy = state.params["policy"]
  poisoned = dict(policy, value_head=jax.tree.map(lambda x: x * jnp.nan, policy["value_head"]))
  state = state.replace(params=dict(state.params, policy=poisoned))
  new, m = rl_step(state)
  algo = tr.algo
  assert float(m["train/nan_skipped"]) == algo.epochs * algo.minibatches
  # Nothing was updated: params and optimizer state are the old ones (NaN where they were).
  chex.assert_trees_all_equal(new.params, state.params)
  chex.assert_trees_all_equal(new.opt_state, state.opt_state)


def test_resume_is_exact(tmp_path):
  """N steps + checkpoint + restore + N steps == 2N steps straight, bitwise."""
  tr, sft_step, rl_step, start_rl = trainer_and_fns()
  state = tr.init(jax.random.key(2))
  for _ in range(2):
    state, _ = sft_step(state)
  state = start_rl(state)
  straight, straight_metrics = state, []
  for _ in range(4):
    straight, m = rl_step(straight)
    straight_metrics.append(m)

  half = state
  for _ in range(2):
    half, _ = rl_step(half)
  ckpt = ckpt_lib.Checkpointer(tmp_path / "ckpt", save_every=1, keep=2)
  ckpt.save(2, half, {"phase": "rl"}, force=True)
  ckpt.wait()
  template = start_rl(tr.init(jax.random.key(99)))
  resumed, meta = ckpt.restore(template)
  assert meta["phase"] == "rl"
  resumed_metrics = []
  for _ in range(2):
    resumed, m = rl_step(resumed)
    resumed_metrics.append(m)
  chex.assert_trees_all_equal(resumed, straight)
  chex.assert_trees_all_equal(resumed_metrics, straight_metrics[2:])


def test_vmapped_seeds_equal_separate_runs():
  tr, _, rl_step, start_rl = trainer_and_fns()
  keys = jax.random.split(jax.random.key(3), 2)
  states = jax.jit(jax.vmap(lambda k: tr.start_rl(tr.init(k))))(keys)
  vstates, vm = jax.jit(jax.vmap(tr.train_step))(states)
  for i in range(2):
    single, m = rl_step(start_rl(tr.init(keys[i])))
    mine = jax.tree.map(lambda x: x[i], vstates)
    chex.assert_trees_all_close(mine.params, single.params, atol=1e-5)
    np.testing.assert_allclose(vm["train/return"][i], m["train/return"])
    np.testing.assert_allclose(vm["train/entropy"][i], m["train/entropy"], atol=1e-5)


def test_short_rl_run_raises_success_above_the_sft_start():
  """The default suite's learning check (~1.5 min on 2 cores): a weak SFT start on easy
  calculator tasks, then 20 PPO steps (turn-level critic), raise the *sampled* success rate
  (256 episodes at temperature 1, the same keys before and after) by more than 0.15. Measured
  when written with 30 steps, seeds 0/1/2: 0.24 -> 0.76, 0.30 -> 0.56, 0.16 -> 0.50; the
  training success of seed 0 passes 0.6 by step 10."""
  c = base_config()
  c.env.update(dict(num_digits=1, num_operands=2))
  c.rollout.update(dict(num_envs=32, max_len=96))
  c.sft.update(dict(steps=100, batch_size=16, lr=3e-3, noise=0.5))
  c.train.steps = 20
  c.optim.update(dict(lr=3e-4, warmup=1))
  tr = train_lib.make_train(c)

  def sampled_success(params):
    keys = jax.random.split(jax.random.key(42), 8)
    success = jax.vmap(lambda k: tr.rollout(params["policy"], k, tr.env_params).info["success"])
    return jnp.mean(success(keys).astype(jnp.float32))

  @jax.jit
  def run(key):
    state = tr.init(key)
    state, _ = jax.lax.scan(lambda s, _: tr.sft_step(s), state, None, length=c.sft.steps)
    state = tr.start_rl(state)
    before = sampled_success(state.params)
    state, m = jax.lax.scan(lambda s, _: tr.train_step(s), state, None, length=c.train.steps)
    return before, sampled_success(state.params), m

  before, after, m = run(jax.random.key(0))
  chex.assert_shape(m["train/success_rate"], (20,))
  assert float(jnp.sum(m["train/nan_skipped"])) == 0
  assert 0.05 < float(before) < 0.6, before  # a weak start, with room to improve
  assert float(after) > float(before) + 0.15, (float(before), float(after))


@pytest.mark.slow
def test_quickstart_trains_to_high_success(tmp_path):
  """The README's main job: SFT on habit demonstrations leaves a greedy policy that guesses
  (success <= 0.5 on 256 fixed episodes), and PPO takes it to >= 0.95 (~3 minutes on 2 cores);
  samples.txt shows the warm start and the final policy on the same episodes."""
  from conftest import default_optimisation_env  # the numbers of the README's run
  out = subprocess.run(
      [sys.executable, "-m", "experiments.train", "--config", "configs/quickstart.py",
       "--workdir", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=1800,
      env=default_optimisation_env())
  assert out.returncode == 0, out.stderr[-3000:]
  records = metrics_lib.read_metrics(tmp_path / "metrics.jsonl")
  evals = [r for r in records if r.get("eval/success_rate") is not None]
  assert all(r["eval/success_se"] is not None for r in evals)
  rates = [r["eval/success_rate"] for r in evals]
  assert rates[0] <= 0.5 and rates[-1] >= 0.95, rates
  samples = (tmp_path / "samples.txt").read_text()
  assert "# the warm start" in samples and "# the final policy" in samples
  assert samples.count("prompt") == 2 * 3
  assert (tmp_path / "learning_curves.png").stat().st_size > 1000


@pytest.mark.parametrize("name", sorted(
    f[:-3] for f in os.listdir(os.path.join(ROOT, "configs"))
    if f.endswith(".py") and f != "__init__.py"))
def test_every_config_builds(name):
  import importlib
  config = importlib.import_module(f"configs.{name}").get_config()
  if name.startswith("hf_"):  # needs your local checkpoint (tests/test_hf_train.py builds one)
    with pytest.raises(ValueError, match="config.model.checkpoint"):
      train_lib.make_train(config)
    return
  if name == "rlag":  # its own program (experiments/rlag.py), not a Trainer config
    from experiments import rlag_study as rlag
    rlag.make_train(config)
    return
  if name == "search_think":  # two phases, as its docstring runs them: SFT at the
    #  demonstrations' length, RL and evaluation in the fixed 192-token context
    with pytest.raises(ValueError, match="rollout.max_len=192 cannot hold an expert episode"):
      train_lib.make_train(config)
    sft = importlib.import_module("configs.search_think").get_config()
    sft.rollout.max_len = importlib.import_module("configs.search_think").SFT_MAX_LEN
    train_lib.make_train(sft)
    config.sft.steps = 0
  tr = train_lib.make_train(config)
  assert tr.rollout_config.batch_size % config.algo.minibatches == 0


# The mesh step (data / FSDP / tensor parallel) against the single-device step: test_mesh.py.


def test_whole_run_as_one_function_equals_stepping():
  """`Trainer.train(key)` (SFT then RL, each one lax.scan) == the steps called one by one."""
  c = small_config()
  c.sft.steps, c.train.steps = 2, 2
  tr = train_lib.make_train(c)
  key = jax.random.key(5)
  final, metrics = jax.jit(tr.train)(key)
  chex.assert_shape(metrics["sft"]["sft/loss"], (2,))
  chex.assert_shape(metrics["rl"]["train/return"], (2,))
  state = tr.init(key)
  for _ in range(2):
    state, _ = jax.jit(tr.sft_step)(state)
  state = tr.start_rl(state)
  for _ in range(2):
    state, m = jax.jit(tr.train_step)(state)
  chex.assert_trees_all_close(final.params, state.params, atol=1e-5)
  np.testing.assert_allclose(metrics["rl"]["train/return"][-1], m["train/return"])


@pytest.mark.slow
def test_cli_resumes_across_the_sft_to_rl_boundary(tmp_path):
  args = [sys.executable, "-m", "experiments.train", "--config", "configs/quickstart.py",
          "--workdir", str(tmp_path), "--config.sft.steps=2", "--config.train.checkpoint_every=2",
          "--config.rollout.num_envs=4", "--config.train.eval_envs=4",
          "--config.sft.batch_size=4"]
  first = subprocess.run(args + ["--config.train.steps=0"], cwd=ROOT, capture_output=True,
                         text=True, timeout=900)
  assert first.returncode == 0, first.stderr[-3000:]
  second = subprocess.run(args + ["--config.train.steps=2"], cwd=ROOT, capture_output=True,
                          text=True, timeout=900)
  assert second.returncode == 0, second.stderr[-3000:]
  assert "resumed from step 2 (rl)" in second.stdout
  steps = [r["step"] for r in metrics_lib.read_metrics(tmp_path / "metrics.jsonl")]
  assert steps == [1, 2, 3, 4]


def test_cli_resume_intact_after_a_corrupt_latest_checkpoint(tmp_path):
  """The program as a user runs it: the latest checkpoint is damaged after the run; rerunning
  with --resume_intact resumes from the newest intact step and reproduces the same metrics."""
  import glob
  args = [sys.executable, "-m", "experiments.train", "--config", "configs/quickstart.py",
          "--workdir", str(tmp_path), "--config.sft.steps=2", "--config.train.steps=2",
          "--config.train.checkpoint_every=2", "--config.rollout.num_envs=4",
          "--config.train.eval_envs=4", "--config.sft.batch_size=4"]
  first = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=900)
  assert first.returncode == 0, first.stderr[-3000:]
  strip = lambda rows: [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in rows]
  before = strip(metrics_lib.read_metrics(tmp_path / "metrics.jsonl"))
  files = [f for f in glob.glob(str(tmp_path / "checkpoints" / "4" / "**" / "*"), recursive=True)
           if os.path.isfile(f)]
  path = max(files, key=os.path.getsize)
  data = bytearray(open(path, "rb").read())
  data[len(data) // 2] ^= 0x01
  open(path, "wb").write(bytes(data))
  again = subprocess.run(args + ["--resume_intact"], cwd=ROOT, capture_output=True, text=True,
                         timeout=900)
  assert again.returncode == 0, again.stderr[-3000:]
  assert "resuming from step 2" in again.stderr and "resumed from step 2" in again.stdout
  assert strip(metrics_lib.read_metrics(tmp_path / "metrics.jsonl")) == before
  assert os.listdir(tmp_path / "checkpoints.corrupt") == ["4"]


def test_sft_from_a_tfds_dataset(tmp_path):
  from mtrl_jax.data import demos as data
  tr, _, _, _ = trainer_and_fns()
  builder = data.build_demo_dataset(tmp_path, "calculator", 16, tr.rollout_config.max_len,
                                    noise=0.3)
  batch = next(data.demo_batches(tmp_path, builder.builder_config.name, 8, seed=0))
  update = jax.jit(tr.sft_update)
  state = tr.init(jax.random.key(6))
  losses_seen = []
  for _ in range(3):
    state, m = update(state, batch["tokens"], batch["loss_mask"])
    losses_seen.append(float(m["sft/loss"]))
  assert losses_seen[2] < losses_seen[1] < losses_seen[0], losses_seen
  assert int(state.step) == 3


def test_init_from_another_runs_checkpoint(tmp_path):
  """`config.init_from`: the params of an SFT run's last checkpoint (saved after the switch to
  the RL optimizer) start the new run; everything else is the new run's fresh state."""
  from experiments import cli
  tr, sft_step, _, start_rl = trainer_and_fns()
  sft_state, _ = sft_step(tr.init(jax.random.key(7)))
  sft_state = start_rl(sft_state)
  with ckpt_lib.Checkpointer(tmp_path / "sft" / "checkpoints", save_every=1, keep=1) as ckpt:
    ckpt.save(1, sft_state, {"phase": "rl"}, force=True)
  init = jax.jit(tr.init)
  fresh = init(jax.random.key(8))
  state = cli.init_from_run(str(tmp_path / "sft"), init, start_rl, jax.random.key(8))
  chex.assert_trees_all_equal(state.params, sft_state.params)
  chex.assert_trees_all_equal(state.opt_state, fresh.opt_state)  # the SFT optimizer, fresh
  assert int(state.step) == 0
  # Without a KL term there is no reference (no second copy of the weights) ...
  assert tr.algo.kl_coef == 0 and start_rl(state).ref_params is None
  # ... with one, the KL reference of the RL phase is the loaded policy, in its own buffers.
  c = small_config()
  c.algo.kl_coef = 0.1
  tr_kl = train_lib.make_train(c)
  ref = tr_kl.start_rl(state).ref_params
  chex.assert_trees_all_equal(ref, sft_state.params["policy"])
  assert all(a is not b for a, b in zip(jax.tree.leaves(ref),
                                        jax.tree.leaves(state.params["policy"])))
  with pytest.raises(SystemExit, match="has no checkpoint"):
    cli.init_from_run(str(tmp_path), init, start_rl, jax.random.key(8))


def test_evaluation_output_path():
  """`experiments.evaluate` / `reflexion` without `--run` (a loaded checkpoint's own params)
  must be told where to write, before anything runs."""
  from experiments import cli
  assert cli.output_path("x.json", None, "eval.json") == "x.json"
  assert cli.output_path(None, "runs/a", "eval.json") == os.path.join("runs/a", "eval.json")
  with pytest.raises(SystemExit, match="without --run, name the output file with --out"):
    cli.output_path(None, None, "eval.json")


@pytest.mark.slow
def test_cli_sft_then_rl_from_its_checkpoint(tmp_path):
  small = ["--config", "configs/quickstart.py", "--config.rollout.num_envs=4",
           "--config.train.eval_envs=4", "--config.sft.batch_size=4"]
  sft = subprocess.run([sys.executable, "-m", "experiments.sft", *small, "--workdir",
                        str(tmp_path / "sft"), "--config.sft.steps=3"],
                       cwd=ROOT, capture_output=True, text=True, timeout=900)
  assert sft.returncode == 0, sft.stderr[-3000:]
  rl = subprocess.run([sys.executable, "-m", "experiments.train", *small, "--workdir",
                       str(tmp_path / "rl"), f"--config.init_from={tmp_path / 'sft'}",
                       "--config.sft.steps=0", "--config.train.steps=1"],
                      cwd=ROOT, capture_output=True, text=True, timeout=900)
  assert rl.returncode == 0, rl.stderr[-3000:]
  assert "initialised from" in rl.stdout and "step 3 (rl)" in rl.stdout
  assert [r["step"] for r in metrics_lib.read_metrics(tmp_path / "rl" / "metrics.jsonl")] == [0, 1]


def test_written_mask_keeps_pad_ids_inside_the_stream():
  tokens = jnp.array([[5, 0, 7, 0, 0], [3, 4, 0, 0, 0], [1, 2, 3, 4, 5]])
  expected = np.array([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]], bool)
  np.testing.assert_array_equal(train_lib.written_mask(tokens), expected)


def test_keep_truncated_false_drops_truncated_episodes_from_the_loss():
  """The untrained policy never answers within the turn limit: every episode is truncated, so
  with `keep_truncated=False` nothing is left to learn from and nothing changes. (Two steps:
  the warm-up schedule's first learning rate is 0; a format penalty gives the returns, and so
  the advantages, some spread.)"""
  def two_steps(**algo):
    c = small_config(epochs=1, minibatches=1, **algo)
    c.optim.warmup = 1
    c.env.format_penalty = 0.1
    tr = train_lib.make_train(c)
    step = jax.jit(tr.train_step)
    state = jax.jit(tr.start_rl)(tr.init(jax.random.key(9)))
    new, m1 = step(state)
    new, m2 = step(new)
    assert float(m1["train/truncated"]) == float(m2["train/truncated"]) == 1.0
    return state, new

  state, new = two_steps(keep_truncated=False)
  chex.assert_trees_all_equal(new.params, state.params)
  state, kept = two_steps()  # truncated episodes kept: the policy is updated
  assert not np.allclose(kept.params["policy"]["embed"]["embedding"],
                         state.params["policy"]["embed"]["embedding"])
