"""The train step on a device mesh: data parallelism, FSDP and tensor parallelism, multi-host.

One `jax.jit` of the global-batch train step (`mtrl_jax.train.Trainer`) with explicit in/out
shardings, the state donated, traced under `jax.set_mesh(mesh)`; XLA's SPMD partitioner inserts
the collectives. There is no hand-written `psum`: the step is the single-device program, so a
mesh step equals the single-device step up to float summation order (DAPO's global
renormalisation and every batch statistic included, by construction).

The mesh has three named axes (`models.partitioning`, the MaxText / Tunix layout):

* `data`   - rows (episodes) are split over it; the state is replicated along it;
* `fsdp`   - rows are split over it too, and so are params, gradients and optimizer state:
             each device stores 1/fsdp of every large weight (`partitioning.PARAM_AXES`), and a
             layer's weights are all-gathered where the layer runs;
* `tensor` - attention heads, MLP columns and the vocabulary are split over it.

The rollout is data parallel over every device of the mesh (`partitioning.local_rows`): the
weights are gathered once per step, each device samples its own rows with no collective inside
the per-token loop, and host-callback tools run on each device for its rows. Scoring and the
update are FSDP x tensor parallel over the rows of (data, fsdp).

Multi-host: call `jax.distributed.initialize(...)` first (`initialize_distributed`); the mesh is
then built over every process's devices, each process holds and computes only its devices'
shards, and `to_host` brings a replicated result (metrics) to every process.

    mesh = sharding.make_mesh(data=1, fsdp=8, tensor=1)
    steps = sharding.MeshSteps(trainer, mesh)
    state = steps.start_rl(steps.init(jax.random.key(0)))
    state, metrics = steps.train_step(state)      # the state is donated
"""

from __future__ import annotations

import math
import os
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from mtrl_jax import train as train_lib
from mtrl_jax.models import partitioning
from mtrl_jax.models.partitioning import AXES, BATCH, DATA, FSDP, TENSOR  # noqa: F401



def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, *, devices=None,
              where: str = "config.mesh") -> Mesh:
  """A (data, fsdp, tensor) mesh over `devices` (default: every device of every process).

  One size may be -1: the devices left over by the other two. The product must equal the number
  of devices; otherwise a ValueError names `<where>.<axis>`. Devices are laid out by
  `jax.make_mesh` (tensor innermost, i.e. on the fastest links)."""
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  sizes = {DATA: data, FSDP: fsdp, TENSOR: tensor}
  for axis, size in sizes.items():
    if not isinstance(size, (int, np.integer)) or isinstance(size, bool) or (
        size < 1 and size != -1):
      raise ValueError(f"{where}.{axis} must be a positive integer or -1 (the rest), got "
                       f"{size!r}")
  free = [a for a, s in sizes.items() if s == -1]
  if len(free) > 1:
    raise ValueError(f"{where}: only one axis may be -1, got {free}")
  fixed = math.prod(s for s in sizes.values() if s != -1)
  if free:
    if n % fixed:
      raise ValueError(f"{where}: {n} devices are not divisible by "
                       + " x ".join(f"{a}={s}" for a, s in sizes.items() if s != -1))
    sizes[free[0]] = n // fixed
  if math.prod(sizes.values()) != n:
    worst = max((a for a in sizes if sizes[a] > 1), key=lambda a: sizes[a], default=DATA)
    raise ValueError(f"{where}.{worst}: data={sizes[DATA]} x fsdp={sizes[FSDP]} x "
                     f"tensor={sizes[TENSOR]} = {math.prod(sizes.values())}, but there are {n} "
                     "devices (the product must equal the device count; one axis may be -1)")
  shape = tuple(int(sizes[a]) for a in AXES)
  return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def data_mesh(num_devices: int | None = None) -> Mesh:
  """Pure data parallelism over the first `num_devices` devices (default: all)."""
  devices = jax.devices()
  n = len(devices) if num_devices is None else int(num_devices)
  if not 1 <= n <= len(devices):
    raise ValueError(f"num_devices={n}, but only {len(devices)} devices are visible")
  return make_mesh(n, 1, 1, devices=devices[:n])


def mesh_settings(config) -> dict[str, int]:
  """`config.mesh` (optional: {data, fsdp, tensor}, defaults -1, 1, 1) as a dict; unknown keys
  are errors naming the key."""
  section = config.get("mesh", None) if hasattr(config, "get") else None
  out = {DATA: -1, FSDP: 1, TENSOR: 1}
  if section is None:
    return out
  values = dict(section.items()) if hasattr(section, "items") else dict(section)
  unknown = sorted(set(values) - set(AXES))
  if unknown:
    raise ValueError(f"config.mesh: unknown keys {unknown}; valid keys: {list(AXES)}")
  out.update(values)
  return out


def mesh_from_config(config, devices=None) -> Mesh:
  """The mesh `config.mesh` asks for (default: every device on `data`)."""
  return make_mesh(**mesh_settings(config), devices=devices)


def parse_mesh(text: str) -> dict[str, int]:
  """'data=1,fsdp=8,tensor=1' -> {'data': 1, 'fsdp': 8, 'tensor': 1} (omitted axes: 1)."""
  out = {DATA: 1, FSDP: 1, TENSOR: 1}
  for part in filter(None, (p.strip() for p in text.split(","))):
    name, _, value = part.partition("=")
    if name not in out or not value.lstrip("-").isdigit():
      raise ValueError(f"--mesh {text!r}: expected e.g. data=1,fsdp=8,tensor=1 (axes "
                       f"{list(out)}), got {part!r}")
    out[name] = int(value)
  return out


def mesh_shape(mesh) -> dict[str, int]:
  return dict(zip(mesh.axis_names, mesh.axis_sizes))


def batch_devices(mesh) -> int:
  """How many ways the rows of a batch are split: data x fsdp."""
  shape = mesh_shape(mesh)
  return shape.get(DATA, 1) * shape.get(FSDP, 1)


def check_fits(trainer: train_lib.Trainer, mesh) -> None:
  """The batch splits evenly over the mesh's row axes (errors name the setting): the episodes,
  each scoring/update minibatch (`algo.minibatches`)."""
  n = batch_devices(mesh)
  rc, M = trainer.rollout_config, trainer.algo.minibatches
  shape = mesh_shape(mesh)
  where = f"the data x fsdp = {shape.get(DATA, 1)} x {shape.get(FSDP, 1)} = {n} row shards"
  if rc.num_envs % n:
    raise ValueError(f"config.rollout.num_envs={rc.num_envs} is not divisible by {where} of "
                     "the mesh (config.mesh)")
  everywhere = n * shape.get(TENSOR, 1)
  if rc.batch_size % everywhere:
    raise ValueError(f"config.rollout: a batch of {rc.batch_size} episodes (num_envs x "
                     f"group_size) is not divisible by the {everywhere} devices of the mesh "
                     "(config.mesh): the rollout splits its rows over all of them")
  if (rc.batch_size // M) % n:
    raise ValueError(f"config.algo.minibatches={M}: a minibatch of {rc.batch_size // M} "
                     f"episodes is not divisible by {where} of the mesh (config.mesh)")


def shardings(tree: Any, mesh) -> Any:
  """NamedShardings of every leaf of `tree` (arrays or ShapeDtypeStructs; a TrainState, params,
  optimizer state) by parameter name (`partitioning.tree_specs`); other leaves replicated."""
  specs = partitioning.tree_specs(tree, mesh_shape(mesh))
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                      is_leaf=lambda x: isinstance(x, P))


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def jit_on_mesh(fn: Callable, mesh, *, in_shardings=None, out_shardings=None,
                donate_argnums=()) -> Callable:
  """`jax.jit(fn, ...)` called (and so traced) under `jax.set_mesh(mesh)`, which is what makes
  the `partitioning.constrain` annotations inside the model and the trainer take effect."""
  jitted = jax.jit(fn, in_shardings=in_shardings, out_shardings=out_shardings,
                   donate_argnums=donate_argnums)

  def call(*args):
    with jax.set_mesh(mesh):
      return jitted(*args)

  call.jitted = jitted
  call.lower = lambda *args: _lower(jitted, mesh, *args)
  return call


def _lower(jitted, mesh, *args):
  with jax.set_mesh(mesh):
    return jitted.lower(*args)


def place(tree: Any, target_shardings: Any) -> Any:
  """Put `tree` on `target_shardings`: leaves already there are kept, others are copied (never
  aliased, so donating the result leaves `tree` intact). Single-process only for arrays that
  live elsewhere; on several processes build the state on the mesh instead (`MeshSteps.init`)."""
  # (jax 0.10.2's device_put aliases a one-device array's buffer in a replicated result even
  # with may_alias=False: copy first, so that donating the result cannot delete `tree`.)
  return jax.tree.map(lambda x, s: x if getattr(x, "sharding", None) == s
                      else jax.device_put(jnp.array(x, copy=True), s), tree, target_shardings)


def to_host(tree: Any) -> Any:
  """numpy copies of replicated (or fully addressable) arrays, on every process."""

  def leaf(x):
    if not isinstance(x, jax.Array):
      return np.asarray(x)
    if x.is_fully_addressable:
      return np.asarray(x)
    if not x.sharding.is_fully_replicated:
      raise ValueError(f"to_host: an array of shape {x.shape} with sharding {x.sharding} is "
                       "neither replicated nor on this process alone")
    return np.asarray(x.addressable_data(0))

  return jax.tree.map(leaf, tree)


class MeshSteps:
  """The trainer's functions jitted on `mesh` with explicit shardings; the state is donated to
  every step (`train_step`, `sft_step`, `sft_update`: do not read the old state after a call).

  `vmap_seeds`: every function is vmapped over a leading seed axis (`train.num_seeds`); the
  seed axis is never split.

  Attributes: `init(key)`, `start_rl(state)`, `sft_step(state)`, `sft_update(state, tokens,
  loss_mask)`, `train_step(state)`, `evaluate(params)` (metrics replicated), `rl_state_shardings`,
  `sft_state_shardings`.
  """

  def __init__(self, trainer: train_lib.Trainer, mesh, *, vmap_seeds: bool = False,
               eval_key=None):
    check_fits(trainer, mesh)
    self.trainer, self.mesh = trainer, mesh
    v = jax.vmap if vmap_seeds else (lambda f, **_: f)
    key = jax.random.key(0)
    keys = jax.random.split(key, 1) if vmap_seeds else key
    sft_shape = jax.eval_shape(v(trainer.init), keys)
    rl_shape = jax.eval_shape(v(trainer.start_rl), sft_shape)
    self.sft_state_shardings = shardings(sft_shape, mesh)
    self.rl_state_shardings = shardings(rl_shape, mesh)
    rep = replicated(mesh)
    params_sh = self.rl_state_shardings.params
    self.init = jit_on_mesh(v(trainer.init), mesh, out_shardings=self.sft_state_shardings)
    self.start_rl = jit_on_mesh(v(trainer.start_rl), mesh,
                                in_shardings=(self.sft_state_shardings,),
                                out_shardings=self.rl_state_shardings)
    self.sft_step = jit_on_mesh(v(lambda s: trainer.sft_step(s)), mesh,
                                in_shardings=(self.sft_state_shardings,),
                                out_shardings=(self.sft_state_shardings, rep), donate_argnums=0)
    sft_update = (jax.vmap(trainer.sft_update, in_axes=(0, None, None)) if vmap_seeds
                  else trainer.sft_update)
    self.sft_update = jit_on_mesh(sft_update, mesh,
                                  in_shardings=(self.sft_state_shardings, rep, rep),
                                  out_shardings=(self.sft_state_shardings, rep),
                                  donate_argnums=0)
    self._train_step = jit_on_mesh(v(lambda s: trainer.train_step(s)), mesh,
                                   in_shardings=(self.rl_state_shardings,),
                                   out_shardings=(self.rl_state_shardings, rep),
                                   donate_argnums=0)
    eval_key = jax.random.key(0) if eval_key is None else eval_key
    self.evaluate = jit_on_mesh(v(lambda p: trainer.evaluate(p, eval_key)), mesh,
                                in_shardings=(params_sh,), out_shardings=rep)

  def train_step(self, state):
    """(state, metrics): one RL step on the mesh; `state` is placed on the mesh if it is not
    there yet (single process), then donated."""
    return self._train_step(place(state, self.rl_state_shardings))

  def global_array(self, x) -> jax.Array:
    """A host array that every process holds in full (e.g. an SFT batch read with the same
    seed everywhere) as a replicated global array on the mesh."""
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, replicated(self.mesh), lambda idx: x[idx])


def sharded_trainer(config, mesh):
  """(trainer, train_step) where train_step(state) -> (state, metrics) runs on `mesh`.

  The state is placed with the mesh's shardings (`MeshSteps`) and donated to the step (do not
  read the old one after the call); the batch must split evenly over the mesh's row axes
  (checked, with the setting named)."""
  trainer = train_lib.Trainer(config)
  steps = MeshSteps(trainer, mesh)
  return trainer, steps.train_step


def initialize_distributed(coordinator: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None,
                           local_device_ids: list[int] | None = None) -> bool:
  """`jax.distributed.initialize` when asked: by arguments, else by the environment variables
  MTRL_COORDINATOR ('host:port'), MTRL_NUM_PROCESSES, MTRL_PROCESS_ID; with none of them set,
  `jax.distributed.initialize()` is still called when JAX's own cluster detection has
  something to find (SLURM, Open MPI, a Cloud TPU slice, `JAX_COORDINATOR_ADDRESS`). Returns
  whether it initialised. Must run before anything touches a device."""
  env: Mapping[str, str] = os.environ
  coordinator = coordinator or env.get("MTRL_COORDINATOR") or None
  if num_processes is None and env.get("MTRL_NUM_PROCESSES"):
    num_processes = int(env["MTRL_NUM_PROCESSES"])
  if process_id is None and env.get("MTRL_PROCESS_ID"):
    process_id = int(env["MTRL_PROCESS_ID"])
  if coordinator or num_processes is not None or process_id is not None:
    missing = [n for n, v in (("coordinator", coordinator), ("num_processes", num_processes),
                              ("process_id", process_id)) if v is None]
    if missing:
      raise ValueError(f"jax.distributed: {missing} not set (flags --coordinator, "
                       "--num_processes, --process_id or MTRL_COORDINATOR, MTRL_NUM_PROCESSES, "
                       "MTRL_PROCESS_ID)")
    jax.distributed.initialize(coordinator, num_processes, process_id,
                               local_device_ids=local_device_ids)
    return True
  cluster = ("JAX_COORDINATOR_ADDRESS", "SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE",
             "TPU_WORKER_HOSTNAMES")
  if any(env.get(k) for k in cluster):
    jax.distributed.initialize()
    return True
  return False
