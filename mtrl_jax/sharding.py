"""Data parallelism: a `data` mesh axis, episodes sharded on it, params replicated.

pmap semantics written with `jax.shard_map` (DESIGN section 2): every device runs the same
train step on its slice of the episode batch - its own rollout, with no cross-device traffic
inside the rollout - and the quantities that define the update (token counts, advantage
statistics, gradients, metrics) are summed over the `data` axis. Row keys are derived from the
global batch and sliced per device, so a sharded step sees exactly the episodes the
single-device step sees and computes the same update up to float summation order (DAPO's
dynamic-sampling weights included: they are renormalised over the global batch).
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

from mtrl_jax import train as train_lib

DATA = "data"


def data_mesh(num_devices: int | None = None) -> Mesh:
  """A 1-D mesh over the first `num_devices` devices (default: all), axis name `data`."""
  devices = jax.devices()
  n = len(devices) if num_devices is None else int(num_devices)
  if not 1 <= n <= len(devices):
    raise ValueError(f"num_devices={n}, but only {len(devices)} devices are visible")
  return Mesh(np.asarray(devices[:n]), (DATA,))


def sharded_trainer(config, mesh: Mesh):
  """(trainer, train_step) where train_step(state) -> (state, metrics) runs data-parallel.

  The state is replicated on every device of `mesh` and donated to the step (its buffers are
  reused for the new state: do not read the old one after the call); `config.rollout.num_envs`
  must be divisible by the number of devices (checked, with the setting named).
  """
  n = mesh.shape[DATA]
  trainer = train_lib.Trainer(config, num_devices=n, axis_name=DATA)
  step = jax.jit(jax.shard_map(lambda s: trainer.train_step(s), mesh=mesh, in_specs=(P(),),
                               out_specs=(P(), P()), check_vma=False), donate_argnums=0)
  return trainer, step
