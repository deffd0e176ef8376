"""Main job: `python -m experiments.train --config configs/<name>.py [--workdir DIR]
[--config.<key>=<value> ...]`.

Runs supervised warm start on expert demonstrations (`config.sft.steps`), then multi-turn RL
(`config.train.steps`), both as jitted steps of `mtrl_jax.train.make_train(config)`. Writes to
the work directory (default `runs/<config name>`):

* `metrics.jsonl` - one JSON object per logged step (`step`, `sft/*`, `train/*`, `eval/*`,
  `perf/*`), and the same scalars as TensorBoard event files;
* `checkpoints/` - orbax checkpoints every `config.train.checkpoint_every` steps (keep
  `keep_checkpoints`), at the end of SFT (always kept) and at the end; rerunning the same
  command resumes from the latest one, exactly; `mtrl_jax.runs.load_run(workdir, step)` loads
  one in Python;
* `samples.txt` - greedy conversations of the warm start (the end of SFT) and of the final
  policy on the same episodes (`▶` sampled tokens, in the loss; `│` prompt, tool replies and
  forced tokens, masked);
* `learning_curves.png`.

With `config.train.num_seeds > 1` every step is `jax.vmap`-ed over seeds (the PureJaxRL idiom):
metrics are the mean over seeds, with per-seed values under `<key>/seed<i>`.

`config.init_from=DIR` starts from the params of the latest checkpoint in another run's workdir
(e.g. an SFT-only run of `python -m experiments.sft`), which are then also the KL reference.

Devices: every step is jitted on a (data, fsdp, tensor) mesh (`mtrl_jax.sharding`) of all
devices, by default all on `data` (`--mesh data=1,fsdp=8,tensor=1`, or a `config.mesh`
section, chooses otherwise). Several hosts: start one process per host with
`--coordinator=HOST:PORT --num_processes=N --process_id=I` (or MTRL_COORDINATOR /
MTRL_NUM_PROCESSES / MTRL_PROCESS_ID, or a cluster JAX detects by itself: SLURM, Cloud TPU);
each process computes its own devices' shards, all of them write the (sharded) checkpoints
together, and process 0 alone writes metrics, samples and plots.
"""

from __future__ import annotations

import os
import sys
import time

import jax
import numpy as np
from absl import app, flags, logging

from experiments import cli
from mtrl_jax import checkpoint as ckpt_lib
from mtrl_jax import metrics as metrics_lib
from mtrl_jax import sharding
from mtrl_jax import vocab as V
from mtrl_jax.rl import collect as collect_lib

_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (default runs/<config name>).")
_RESUME_INTACT = flags.DEFINE_bool(
    "resume_intact", False, "If the latest checkpoint is corrupt, resume from the newest intact "
    "one (the corrupt newer ones are moved to checkpoints.corrupt/, nothing is deleted).")
_MESH = flags.DEFINE_string(
    "mesh", None, "Device mesh, e.g. data=1,fsdp=8,tensor=1 (one size may be -1: the rest); "
    "default config.mesh, else every device on data.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator", None, "Multi-host: the coordinator's HOST:PORT (process 0's host); with "
    "--num_processes and --process_id (or MTRL_COORDINATOR, ...). See mtrl_jax.sharding.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Multi-host: this process's index.")
flags.mark_flags_as_required(["config"])

PLOT_KEYS = ("sft/loss", "train/success_rate", "eval/success_rate", "train/return",
             "train/entropy", "train/value_loss", "train/clip_frac", "train/tool_calls")


def _host(metrics, num_seeds: int) -> dict[str, float]:
  """Device metrics (replicated) -> floats; with seeds, the mean plus `<key>/seed<i>`."""
  out = {}
  for k, v in sharding.to_host(metrics).items():
    v = np.asarray(v, np.float64)
    out[k] = float(v.mean())
    if num_seeds > 1:
      out.update({f"{k}/seed{i}": float(x) for i, x in enumerate(v.reshape(-1))})
  return out


def _dataset_batches(config, trainer):
  """Infinite iterator of (tokens, loss_mask) from `config.sft.dataset`; checks that it was
  built for this environment's vocabulary."""
  from mtrl_jax.data import demos as data
  try:
    _, meta = data.load_demo_dataset(config.sft.data_dir, config.sft.dataset)
  except ValueError as e:
    sys.exit(f"error: config.sft.dataset: {e}")
  if tuple(meta["vocab"]) != trainer.env.vocab.symbols:
    sys.exit(f"error: config.sft.dataset {config.sft.dataset!r} was built for "
             f"{meta['env_name']} with another vocabulary than config.env ({config.env.name})")
  batches = data.demo_batches(config.sft.data_dir, config.sft.dataset, config.sft.batch_size,
                              seed=config.seed)
  return ((b["tokens"], b["loss_mask"]) for b in batches)


def resume(ckpt, template_for, step: int, workdir: str, resume_intact: bool):
  """Restore checkpoint `step`; if it is corrupt, name the newest intact one (and resume from it
  with `--resume_intact`, moving the corrupt newer ones aside). Returns (state, meta, step)."""
  try:
    return (*ckpt.restore(template_for(step), step), step)
  except ckpt_lib.CheckpointError as e:
    error = e
  try:
    state, meta, intact, failed = ckpt.restore_newest_intact(template_for, below=step)
  except ckpt_lib.CheckpointError:
    sys.exit(f"error: cannot resume from {workdir}: {error}; no older checkpoint is intact "
             f"either (move {ckpt.directory} away to start afresh)")
  corrupt = [step] + [s for s, _ in failed]
  if not resume_intact:
    sys.exit(f"error: cannot resume from {workdir}: {error}\nthe newest intact checkpoint is "
             f"step {intact}: rerun with --resume_intact to resume from it (checkpoint(s) "
             f"{corrupt} are then moved to {ckpt.directory}.corrupt/)")
  where = ckpt.quarantine(corrupt)
  print(f"warning: checkpoint(s) {corrupt} could not be restored ({error}); moved to {where}; "
        f"resuming from step {intact}", file=sys.stderr)
  return state, meta, intact


def main(argv, *, sft_only: bool = False):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  # Before anything touches a device. On CPU (tests, simulated devices) one computation at a
  # time: two in flight with collectives each can deadlock XLA's CPU runtime (tests/conftest.py);
  # accelerators are not affected by this setting.
  jax.config.update("jax_cpu_enable_async_dispatch", False)
  # Several processes form one set of devices.
  try:
    sharding.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  except ValueError as e:
    sys.exit(f"error: {e}")
  config = cli.CONFIG.value
  if sft_only:
    config.train.steps = 0
  name = os.path.splitext(os.path.basename(flags.FLAGS["config"].config_filename))[0]
  workdir = _WORKDIR.value or os.path.join("runs", name + ("_sft" if sft_only else ""))
  # Bad configs fail here, before anything compiles, with the offending key named (exit 2).
  trainer = cli.build_trainer(config)
  tc = trainer.train_config
  seeds = tc.num_seeds
  sft_steps, rl_steps = int(config.sft.steps), int(tc.steps)
  if sft_only and sft_steps < 1:
    sys.exit(f"error: config.sft.steps={sft_steps}: experiments.sft needs at least one step")
  total = sft_steps + rl_steps
  env, mc = trainer.env, trainer.model_config
  episodes = f"{trainer.rollout_config.batch_size} episodes/step"
  if isinstance(trainer.collect, collect_lib.ReflexionTrials):
    episodes = (f"{config.reflexion.train_trials} Reflexion trials x {episodes} (memory "
                f"{config.reflexion.memory})")
  try:
    mesh = (sharding.make_mesh(**sharding.parse_mesh(_MESH.value), where="--mesh")
            if _MESH.value else sharding.mesh_from_config(config))
    # The state shardings, jitted steps with the state donated (its buffers are reused for the
    # new state, so a step does not hold two copies of params and optimizer state).
    steps = sharding.MeshSteps(trainer, mesh, vmap_seeds=seeds > 1,
                               eval_key=jax.random.key(config.seed + 1))
  except ValueError as e:
    sys.exit(f"error: {e}")
  lead = jax.process_index() == 0  # writes metrics, samples, plots and prints progress
  if lead:
    print(f"env {config.env.name}: vocab {env.vocab.size}, max turns {env.max_turns}; model "
          f"{config.model.preset}: {mc.num_params():,} params; {episodes}; {seeds} seed(s); "
          f"jax {jax.__version__} on {jax.device_count()} {jax.devices()[0].platform} "
          f"device(s)" + (f" in {jax.process_count()} processes" if jax.process_count() > 1
                          else "") + f", mesh {dict(mesh.shape)}")
    print(f"workdir {workdir}: {sft_steps} SFT steps, then {rl_steps} RL steps "
          f"({config.algo.advantage})")

  init, start_rl, sft_step, rl_step = steps.init, steps.start_rl, steps.sft_step, steps.train_step
  evaluate = steps.evaluate
  if config.sft.dataset:  # SFT batches from a TFDS demonstration dataset instead
    batches = _dataset_batches(config, trainer)
    # Every seed (and every process) trains on the same batch: vmap over the state only.
    sft_step = lambda s: steps.sft_update(s, *map(steps.global_array, next(batches)))
  seed_keys = jax.random.split(jax.random.key(config.seed), seeds)
  seed_keys = seed_keys if seeds > 1 else seed_keys[0]

  # The end of SFT is always saved and kept (whatever keep_checkpoints says): the warm start
  # stays loadable for evaluation after RL (`mtrl_jax.runs.load_run(workdir, step=sft_steps)`).
  ckpt = ckpt_lib.Checkpointer(os.path.join(os.path.abspath(workdir), "checkpoints"),
                               save_every=tc.checkpoint_every, keep=tc.keep_checkpoints,
                               keep_steps=(sft_steps,) if sft_steps else (),
                               # several processes: blocking saves (orbax's background thread
                               # runs collectives of its own, which then interleave with the
                               # next step's differently on different processes)
                               async_save=jax.process_count() == 1)
  step = ckpt.latest_step() or 0
  if step:
    # The state switched to the RL optimizer at step == sft_steps.
    template_for = lambda s: start_rl(init(seed_keys)) if s >= sft_steps else init(seed_keys)
    state, meta, step = resume(ckpt, template_for, step, workdir, _RESUME_INTACT.value)
    if lead:
      print(f"resumed from step {step} ({meta.get('phase')})")
  elif config.init_from:
    state = cli.init_from_run(config.init_from, init, start_rl, seed_keys)
  else:
    state = init(seed_keys)
  writer = metrics_lib.MetricsWriter(workdir, resume_step=step if step else None) if lead else None
  bar = metrics_lib.ProgressBar(total, initial=step, keys=(
      "sft/loss", "train/success_rate", "eval/success_rate", "train/kl")) if lead else None
  log_every = tc.log_every
  if config.sft.dataset:  # resume: skip the batches the earlier run consumed
    for _ in range(min(step, sft_steps)):
      next(batches)

  def log(step, metrics, force=False):
    if not lead:
      return
    if force or step % log_every == 0:
      writer.write(step, metrics)
    bar.update(step, metrics)

  try:
    if total == 0:  # nothing to train: evaluate the initial (e.g. `init_from`) policy
      state = start_rl(state)
      log(0, _host(evaluate(state.params), seeds), force=True)
    while step < total:
      t0 = time.perf_counter()
      if step < sft_steps:
        state, m = sft_step(state)
        m = _host(m, seeds)
        step += 1
        m["perf/step_s"] = time.perf_counter() - t0
        if step == sft_steps:  # end of SFT: evaluate the warm start, switch optimizers
          state = start_rl(state)
          m.update(_host(evaluate(state.params), seeds))
        log(step, m, force=step == sft_steps)
        phase = "sft" if step < sft_steps else "rl"
      else:
        if step == 0:  # no SFT: evaluate the initial policy first
          state = start_rl(state)
          log(0, _host(evaluate(state.params), seeds), force=True)
        state, m = rl_step(state)
        m = _host(m, seeds)
        step += 1
        dt = time.perf_counter() - t0
        m["perf/step_s"] = dt
        m["perf/tokens_per_s"] = m["train/sampled_tokens"] * seeds / dt
        rl_done = step - sft_steps
        eval_now = rl_done % tc.eval_every == 0 or step == total
        if eval_now:
          m.update(_host(evaluate(state.params), seeds))
        log(step, m, force=eval_now)
        phase = "rl"
      if step % tc.checkpoint_every == 0 or step in (sft_steps, total):
        ckpt.save(step, state, {"phase": phase, "config": config.to_dict()}, force=True)
  finally:
    if lead:
      bar.close()
    ckpt.wait()
    if lead:
      writer.close()

  # The end: rendered conversations of the final policy and the learning curves.
  eval_rollout = sharding.jit_on_mesh(
      lambda p: trainer.eval_rollout(jax.tree.map(lambda x: x[0], p) if seeds > 1 else p,
                                     jax.random.key(config.seed + 2), trainer.env_params),
      mesh, in_shardings=(steps.rl_state_shardings.params["policy"],),
      out_shardings=sharding.replicated(mesh))

  def conversations(params):
    traj = sharding.to_host(eval_rollout(params["policy"]))
    return [V.render_trajectory(traj, env.vocab, row)
            for row in range(min(int(config.num_samples), traj.batch_size))]

  samples = conversations(state.params)
  # The same episodes played by the warm start: the end of SFT is always kept.
  before = None
  if sft_steps and rl_steps:
    try:
      before = conversations(ckpt.restore(start_rl(init(seed_keys)), sft_steps)[0].params)
    except ckpt_lib.CheckpointError as e:  # e.g. moved away by hand: the final ones only
      print(f"warning: no warm-start conversations in samples.txt: {e}", file=sys.stderr)
  ckpt.close()
  if not lead:
    return
  with open(os.path.join(workdir, "samples.txt"), "w") as f:
    if before:
      f.write(f"# the warm start (step {sft_steps}, end of SFT), greedy\n\n"
              + "\n\n".join(before) + f"\n\n# the final policy (step {step}), greedy, the "
              "same episodes\n\n")
    f.write("\n\n".join(samples) + "\n")
  png = metrics_lib.plot_learning_curves(os.path.join(workdir, "metrics.jsonl"),
                                         os.path.join(workdir, "learning_curves.png"),
                                         keys=PLOT_KEYS)
  final = metrics_lib.read_metrics(os.path.join(workdir, "metrics.jsonl"))
  evals = [r for r in final if r.get("eval/success_rate") is not None]
  if evals:
    ci = lambda r: (f"{r['eval/success_rate']:.2f} +- {1.96 * r['eval/success_se']:.2f}"
                    if r.get("eval/success_se") is not None else f"{r['eval/success_rate']:.2f}")
    what = (f"warm start {ci(evals[0])} -> final {ci(evals[-1])}" if len(evals) > 1
            else ci(evals[-1]))
    print(f"eval success: {what} (greedy, {config.train.eval_envs} fixed episodes, +- 95% CI)")
  print(f"samples: {os.path.join(workdir, 'samples.txt')}; curves: {png}")
  print(samples[0])


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
