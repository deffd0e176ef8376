"""A trained run, loaded back in Python: `load_run(workdir, step=None) -> (trainer, state)`.

A run's directory (what `python -m experiments.train` writes) holds orbax checkpoints whose
meta records the config the run was trained with; `load_run` rebuilds the trainer from it and
restores the `TrainState` of one checkpoint (the latest by default; the end of the supervised
warm start is always kept, at step `config.sft.steps`)::

    import jax
    from mtrl_jax import runs, vocab

    trainer, state = runs.load_run("runs/quickstart")
    traj = jax.jit(trainer.eval_rollout)(state.params["policy"], jax.random.key(0),
                                         trainer.env_params)     # greedy episodes
    print(vocab.render_trajectory(traj, trainer.env.vocab, row=0))
    print(jax.jit(trainer.evaluate)(state.params, jax.random.key(1)))   # eval/* metrics

`trainer.rollout` samples at the config's temperature instead; both rollouts take the
policy's params (`state.params["policy"]`), `evaluate` and `train_step` the whole params
(policy and critic). With `config.train.num_seeds > 1` every leaf of the state has a leading
seed axis (`seed_state(state, i)` takes one seed's). `config=` loads the checkpoint into
another config's trainer (e.g. the same run evaluated on an environment variant); its model
must match the checkpoint.
"""

from __future__ import annotations

import os
from typing import Any

import jax

from mtrl_jax import checkpoint as ckpt_lib
from mtrl_jax import train as train_lib


def checkpoint_dir(workdir: str | os.PathLike) -> str:
  """`<workdir>/checkpoints` if it exists, else `workdir` itself (a checkpoints directory)."""
  workdir = os.fspath(workdir)
  inner = os.path.join(workdir, "checkpoints")
  return inner if os.path.isdir(inner) else workdir


def load_run(workdir: str | os.PathLike, step: int | None = None, *, config=None
             ) -> tuple[train_lib.Trainer, train_lib.TrainState]:
  """(trainer, state) of checkpoint `step` (default: the latest) in the run directory
  `workdir` (or its `checkpoints/`).

  The trainer is built from the config saved with the checkpoint (or from `config`); the state
  is restored exactly (every array bitwise equal), with the optimizer of its phase (SFT before
  `config.sft.steps`, RL from there on) and a leading seed axis when the run trained several
  seeds. An environment named by import path must be importable (e.g. run from its folder).

  Raises:
    FileNotFoundError: `workdir` is not a directory.
    ckpt_lib.CheckpointError: no such checkpoint, no config in its meta, or a checkpoint that
      does not fit the trainer (the message names the step and what differs).
    ValueError: the config is bad (the message names the setting).
  """
  directory = checkpoint_dir(workdir)
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"load_run: {os.fspath(workdir)!r} is not a directory")
  ckpt = ckpt_lib.Checkpointer(directory, save_every=1, keep=1)
  try:
    step = ckpt.latest_step() if step is None else int(step)
    if step is None:
      raise ckpt_lib.CheckpointError(f"no checkpoint in {directory}")
    meta = ckpt.meta(step)
    if config is None:
      if not isinstance(meta.get("config"), dict):
        raise ckpt_lib.CheckpointError(
            f"checkpoint step {step} in {directory} has no config in its meta (pass config=)")
      from ml_collections import config_dict
      config = config_dict.ConfigDict(meta["config"])
    trainer = train_lib.make_train(config)
    state = _restore(ckpt, trainer, step, meta.get("phase"))
  finally:
    ckpt.close()
  return trainer, state


def seed_state(state: Any, seed: int) -> Any:
  """Seed `seed`'s slice of a state with a leading seed axis (`num_seeds > 1`)."""
  return jax.tree.map(lambda x: x[seed], state)


def _restore(ckpt: ckpt_lib.Checkpointer, trainer: train_lib.Trainer, step: int,
             phase: str | None) -> train_lib.TrainState:
  """Restore `step` into the template of its phase (RL optimizer at and after the end of SFT),
  built abstractly (`jax.eval_shape`: no weights are computed or loaded for it)."""
  seeds = trainer.train_config.num_seeds
  keys = jax.random.split(jax.random.key(trainer.config.seed), seeds)
  init = jax.vmap(trainer.init) if seeds > 1 else trainer.init
  start_rl = jax.vmap(trainer.start_rl) if seeds > 1 else trainer.start_rl
  keys = keys if seeds > 1 else keys[0]
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  concrete = lambda tree: jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), tree)
  sft = lambda: concrete(jax.eval_shape(init, keys))
  rl = lambda: concrete(jax.eval_shape(lambda k: start_rl(init(k)), keys))
  rl_first = phase == "rl" or (phase is None and step >= int(trainer.sft.steps))
  errors = []
  for template in ((rl, sft) if rl_first else (sft, rl)):
    try:
      state, _ = ckpt.restore(template(), step)
      return state
    except ckpt_lib.CheckpointError as e:
      errors.append(str(e))
  raise ckpt_lib.CheckpointError(f"checkpoint step {step} does not fit the trainer of its "
                                 f"config: {errors[0]}")
