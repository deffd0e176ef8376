"""Checkpoints of a training state: an orbax `CheckpointManager` with save, resume and keep-N
(plus named steps kept for good, `keep_steps`).

    ckpt = Checkpointer(workdir / "checkpoints", save_every=100, keep=3, keep_steps=(500,))
    state, meta = ckpt.restore(init_state) if ckpt.latest_step() is not None else (init_state, {})
    for step in ...:
      state, metrics = train_step(state)
      ckpt.save(step, state, {"config": config.to_dict()})   # every 100 steps, in the background
    ckpt.save(last_step, state, meta, force=True)
    ckpt.close()                                              # waits for the last write

The state is any JAX pytree (a `flax.struct.dataclass` TrainState of params, an optax state, an
int32 step, a PRNG key, ...); `meta` is a small JSON-able dict of host values (the config, the
number of metrics lines written). One checkpoint is the directory `<directory>/<step>/` with three
orbax items:

* `state`: the pytree (orbax `StandardSave`, OCDBT/zarr). New-style typed PRNG keys
  (`jax.random.key`) are stored as their `jax.random.key_data` and wrapped back on restore with
  the template's key implementation.
* `meta`: the JSON dict.
* `fingerprints`: per leaf, a 64-bit hash of the array's bits, computed on device at save time
  and checked after restore. Orbax/tensorstore checksum their index (b-tree) nodes but not the
  array chunks: without this, one flipped bit in a data file restores silently as a wrong
  parameter.

Restoring is exact: every array comes back bitwise equal, with the structure, dtypes and
shardings of the template (concrete arrays, or `jax.ShapeDtypeStruct`s with concrete
shardings). The stored tree is checked against the template before reading (same leaf paths,
shapes and dtypes: no silent casting or padding), and every failure (missing or garbled files,
an incompatible tree, a fingerprint mismatch) raises `CheckpointError` naming the directory, the
step and what is wrong. Nothing is ever deleted or overwritten because it failed to restore;
saving a step that already exists is skipped. To go on after a corrupt latest checkpoint,
`restore_newest_intact` finds the newest step that restores and `quarantine` moves the corrupt
newer ones to `<directory>.corrupt/` (what `python -m experiments.train --resume_intact` does).

Atomicity: orbax writes a step into `<step>.orbax-checkpoint-tmp*` and renames it to `<step>`
once every item is finalised (on GCS, where rename is not atomic, it writes a
`commit_success.txt` instead), so an interrupted save never shows up as `latest_step()`. Stale
temporary directories of interrupted saves are removed when a `Checkpointer` opens the directory.

Saves are asynchronous by default: `save` returns after the device-to-host copy and the files
are written in a background thread; the next `save`, `restore`, `wait` and `close` wait for it
(and raise `CheckpointError` if it failed).
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

_MAX_LISTED = 5  # mismatching paths named in one error message


class CheckpointError(RuntimeError):
  """A checkpoint that cannot be saved or restored (corrupt, incomplete or incompatible)."""


# ----------------------------------------------------------------------------- typed PRNG keys


def _is_typed_key(x: Any) -> bool:
  """True for new-style typed PRNG key arrays (concrete or `ShapeDtypeStruct`)."""
  dtype = getattr(x, "dtype", None)
  return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def _key_impl(x: Any):
  """The PRNG implementation of a typed key array or of a `ShapeDtypeStruct` of one."""
  if isinstance(x, jax.Array):
    return jax.random.key_impl(x)
  return x.dtype._impl  # pylint: disable=protected-access  # no public API for abstract keys


def _to_stored(state: Any) -> Any:
  """The tree that is written: typed PRNG keys replaced by their uint32 key data."""
  return jax.tree.map(lambda x: jax.random.key_data(x) if _is_typed_key(x) else x, state)


def _restore_target(template: Any) -> Any:
  """What orbax restores into: `ShapeDtypeStruct`s with the template's shardings.

  Typed keys become their key data's shape (key shape + the implementation's trailing dims),
  uint32, same sharding (a `NamedSharding` leaves the trailing dims unsharded).
  """

  def leaf(path, x):
    sharding = getattr(x, "sharding", None)
    if not _is_concrete(sharding):
      raise ValueError(f"template leaf {jax.tree_util.keystr(path)} has an abstract sharding "
                       f"({sharding}), e.g. from jax.eval_shape; pass concrete arrays or "
                       "ShapeDtypeStructs with a concrete sharding")
    if _is_typed_key(x):
      data = jax.eval_shape(jax.random.key_data, x)
      return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=sharding)
    if isinstance(x, jax.Array):
      return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
    return x

  return jax.tree_util.tree_map_with_path(leaf, template)


def _is_concrete(sharding: Any) -> bool:
  """False for shardings over an `AbstractMesh` (no devices to place the arrays on)."""
  if sharding is None:
    return True
  try:
    sharding.device_set  # pylint: disable=pointless-statement
  except Exception:  # pylint: disable=broad-except  # AbstractMesh: ValueError/NotImplemented
    return False
  return True


def _from_stored(restored: Any, template: Any) -> Any:
  """Wraps key data back into typed keys where the template has them."""
  return jax.tree.map(
      lambda t, r: jax.random.wrap_key_data(r, impl=_key_impl(t)) if _is_typed_key(t) else r,
      template, restored)


# ----------------------------------------------------------------------------- fingerprints


def _words(x: jax.Array) -> jax.Array:
  """The array's bits as uint32 words, injectively (a trailing axis of 2 for 64-bit types)."""
  if jnp.iscomplexobj(x):
    return _words(jnp.stack([jnp.real(x), jnp.imag(x)], axis=-1))
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  if jnp.issubdtype(x.dtype, jnp.integer) and jnp.iinfo(x.dtype).bits < 8:
    return x.astype(jnp.uint32)  # int4 & co: no bitcast, the conversion is injective
  size = x.dtype.itemsize
  if size in (4, 8):
    return jax.lax.bitcast_convert_type(x, jnp.uint32)
  unsigned = {1: jnp.uint8, 2: jnp.uint16}[size]
  return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


@functools.partial(jax.jit, static_argnums=2)
def _block_fingerprint(x: jax.Array, offsets: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """[2] uint32: two position-weighted sums (mod 2^32) of the words of one block (e.g. a shard)
  of an array of global `shape` whose first element sits at `offsets` ([x.ndim] uint32).

  A checksum against corruption, not a cryptographic hash: the weights are odd, so changing
  any single word always changes both sums, and other changes are caught with high
  probability. Sums commute: the blocks' sums add up to the whole array's, whatever the
  sharding.
  """
  w = _words(x)
  full = tuple(shape) + w.shape[x.ndim:]  # 64-bit and complex types add trailing word axes
  idx = jnp.zeros(w.shape, jnp.uint32)
  stride = 1
  for d in reversed(range(w.ndim)):  # global row-major linear index, wrapping mod 2^32
    pos = jax.lax.broadcasted_iota(jnp.uint32, w.shape, d)
    if d < x.ndim:
      pos = pos + offsets[d]
    idx = idx + pos * jnp.uint32(stride % 2**32)
    stride *= full[d]
  m1 = (idx * jnp.uint32(0x9E3779B1) + jnp.uint32(0x7F4A7C15)) | jnp.uint32(1)
  m2 = ((idx ^ jnp.uint32(0x85EBCA6B)) * jnp.uint32(0xC2B2AE35)) | jnp.uint32(1)
  h1 = jnp.sum(w * m1, dtype=jnp.uint32)
  h2 = jnp.sum((w ^ (w >> 16)) * m2, dtype=jnp.uint32)
  return jnp.stack([h1, h2])


def _on_device(x: Any) -> jax.Array:
  """A leaf as a JAX array without losing bits: host values of 64-bit types (NumPy int64,
  Python floats, which JAX would narrow to 32 bits) go as their raw uint32 words."""
  if isinstance(x, jax.Array):
    return x
  a = np.asarray(x)
  if a.dtype.itemsize >= 8:
    a = np.ascontiguousarray(a).reshape(-1).view(np.uint32)
  return jnp.asarray(a)


def _local_blocks(x: jax.Array) -> list[jax.Array]:
  """[2] uint32 sums of the blocks of `x` this process holds, each distinct block once (the
  shards with replica id 0: over all processes, every element is counted exactly once)."""
  out = []
  for shard in x.addressable_shards:
    if shard.replica_id == 0:
      offsets = np.array([s.start or 0 for s in shard.index], np.uint32)
      out.append(_block_fingerprint(shard.data, offsets, x.shape))
  return out


def fingerprints(tree: Any) -> dict[str, str]:
  """{leaf path: 16 hex digits} for every array leaf of `tree` (typed keys not allowed).

  Each shard is hashed on its own device (no collective inside a compiled computation: two
  in one program can start in different orders on different CPU devices and deadlock XLA's
  CPU runtime), the sums are added on the host, and several processes exchange theirs in one
  all-gather. The result is that of the whole array on one device, whatever the sharding.
  """
  flat = ocp.tree.to_flat_dict(tree, sep="/")
  blocks = [_local_blocks(_on_device(v)) for v in flat.values()]
  host = jax.device_get(blocks)
  sums = np.array([np.sum(np.asarray(b, np.uint64).reshape(-1, 2), axis=0) for b in host],
                  np.uint64).reshape(-1, 2)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    sums = np.asarray(multihost_utils.process_allgather(
        (sums & 0xFFFFFFFF).astype(np.uint32))).astype(np.uint64).sum(axis=0)
  sums &= 0xFFFFFFFF
  return {k: f"{int(h[0]):08x}{int(h[1]):08x}" for k, h in zip(flat, sums)}


# ----------------------------------------------------------------------------- helpers


def _short(e: BaseException, limit: int = 400) -> str:
  """`Type: first line of the message`, cut to `limit` characters (tensorstore is verbose)."""
  text = str(e).strip().splitlines()[0] if str(e).strip() else ""
  text = text.split(" [tensorstore_spec=")[0]
  if len(text) > limit:
    text = text[:limit] + " ..."
  return f"{type(e).__name__}: {text}"


def _listing(title: str, items: list[str]) -> str:
  """`title: a, b, c (+N more)` or '' when there are none."""
  if not items:
    return ""
  more = f" (+{len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else ""
  return f"{title}: {', '.join(items[:_MAX_LISTED])}{more}"


def _compare_trees(stored: Mapping[str, Any], target: Mapping[str, Any]) -> list[str]:
  """Differences between the stored leaf metadata and the restore target, flat by path."""
  problems = [
      _listing("missing in the checkpoint", sorted(set(target) - set(stored))),
      _listing("in the checkpoint but not in the template", sorted(set(stored) - set(target))),
  ]
  shapes, dtypes = [], []
  for path in sorted(set(stored) & set(target)):
    s, t = stored[path], target[path]
    s_shape, t_shape = getattr(s, "shape", None), getattr(t, "shape", None)
    if s_shape is not None and t_shape is not None and tuple(s_shape) != tuple(t_shape):
      shapes.append(f"{path} {tuple(s_shape)} vs {tuple(t_shape)}")
    s_dtype, t_dtype = getattr(s, "dtype", None), getattr(t, "dtype", None)
    if s_dtype is not None and t_dtype is not None and np.dtype(s_dtype) != np.dtype(t_dtype):
      dtypes.append(f"{path} {np.dtype(s_dtype)} vs {np.dtype(t_dtype)}")
  problems += [_listing("shape (checkpoint vs template)", shapes),
               _listing("dtype (checkpoint vs template)", dtypes)]
  return [p for p in problems if p]


# ----------------------------------------------------------------------------- Checkpointer


def _handler_registry() -> ocp.handlers.DefaultCheckpointHandlerRegistry:
  """The three items and their handlers, registered up front.

  (`item_names=` is deprecated, and without registered handlers a fresh manager cannot read an
  item's metadata before it has saved or restored that item.)
  """
  registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
  items = (("state", ocp.args.StandardSave, ocp.args.StandardRestore,
            ocp.handlers.StandardCheckpointHandler()),
           ("meta", ocp.args.JsonSave, ocp.args.JsonRestore, ocp.handlers.JsonCheckpointHandler()),
           ("fingerprints", ocp.args.JsonSave, ocp.args.JsonRestore,
            ocp.handlers.JsonCheckpointHandler()))
  for name, save_args, restore_args, handler in items:
    registry.add(name, save_args, handler)
    registry.add(name, restore_args, handler)
  return registry


class Checkpointer:
  """Saves a training state every `save_every` steps, keeps the last `keep`, restores exactly.

  Args:
    directory: where the step directories go (created if needed).
    save_every: `save(step, ...)` writes when `step % save_every == 0` (or `force=True`).
    keep: how many of the most recent checkpoints to keep (older ones are deleted after a
      successful save).
    keep_steps: steps that are kept in addition, whatever `keep` says (e.g. the end of the
      supervised warm start, so that it can be evaluated after RL).
    async_save: write in a background thread (default); False blocks in `save`.
  """

  def __init__(self, directory: str | os.PathLike, *, save_every: int, keep: int,
               keep_steps=(), async_save: bool = True):
    if not isinstance(save_every, (int, np.integer)) or save_every < 1:
      raise ValueError(f"save_every must be a positive integer, got {save_every!r}")
    if not isinstance(keep, (int, np.integer)) or keep < 1:
      raise ValueError(f"keep must be a positive integer, got {keep!r}")
    self.directory = os.path.abspath(os.fspath(directory))
    self.save_every = int(save_every)
    self.keep = int(keep)
    self.keep_steps = tuple(sorted({int(x) for x in keep_steps}))
    policy = ocp.checkpoint_managers
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policy.AnyPreservationPolicy(
            [policy.LatestN(n=self.keep), policy.CustomSteps(steps=self.keep_steps)]),
        create=True,
        cleanup_tmp_directories=True,  # leftovers of interrupted saves (never a checkpoint)
        enable_async_checkpointing=async_save,
    )
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          handler_registry=_handler_registry())

  # -- queries

  def steps(self) -> list[int]:
    """All complete checkpoints, ascending."""
    return sorted(int(s) for s in self._manager.all_steps())

  def latest_step(self) -> int | None:
    """The most recent complete checkpoint, or None."""
    step = self._manager.latest_step()
    return None if step is None else int(step)

  def _where(self, step: int) -> str:
    return f"checkpoint step {step} in {self.directory}"

  # -- save

  def save(self, step: int, state: Any, meta: Mapping[str, Any] | None = None, *,
           force: bool = False) -> bool:
    """Writes `state` and `meta` as checkpoint `step` if it is due (or `force`).

    Returns whether a save was started. A step that already exists is never overwritten (the
    call logs a warning and returns False). Raises `CheckpointError` if this or the previous
    background save fails, `TypeError` if `meta` is not JSON-able.
    """
    step = int(step)
    if not force and step % self.save_every:
      return False
    self._wait(f"saving step {step}")
    if step in self.steps():
      logging.warning("%s already exists; not overwriting it", self._where(step))
      return False
    meta = dict(meta or {})
    try:
      json.dumps(meta)
    except (TypeError, ValueError) as e:
      raise TypeError(f"checkpoint meta for step {step} is not JSON-able: {e}") from e
    stored = _to_stored(state)
    args = ocp.args.Composite(
        state=ocp.args.StandardSave(stored),
        meta=ocp.args.JsonSave(meta),
        fingerprints=ocp.args.JsonSave(fingerprints(stored)),
    )
    try:
      self._manager.save(step, args=args, force=True)
    except Exception as e:  # orbax raises ValueError, OSError, tensorstore errors, ...
      raise CheckpointError(f"saving {self._where(step)} failed: {_short(e)}") from e
    return True

  def _wait(self, what: str) -> None:
    """Waits for a background save; its failure becomes a `CheckpointError`."""
    try:
      self._manager.wait_until_finished()
    except Exception as e:
      raise CheckpointError(f"a background checkpoint save to {self.directory} failed "
                            f"(noticed while {what}): {_short(e)}") from e

  def wait(self) -> None:
    """Blocks until the last save is on disk."""
    self._wait("waiting")

  def close(self) -> None:
    """Waits for the last save and releases orbax's threads."""
    try:
      self._wait("closing")
    finally:
      self._manager.close()

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  # -- restore

  def restore(self, template_state: Any, step: int | None = None) -> tuple[Any, dict]:
    """Reads checkpoint `step` (default: the latest) into the form of `template_state`.

    Args:
      template_state: a pytree like the saved one (e.g. the freshly initialised state, or
        `ShapeDtypeStruct`s with concrete shardings); its structure, dtypes and shardings are
        those of the result. Its values are not used.
      step: which checkpoint; None = `latest_step()`.

    Returns:
      (state, meta): arrays bitwise equal to the saved ones, and the saved meta dict.

    Raises:
      CheckpointError: no such checkpoint, unreadable files, a tree that does not match the
        template, or arrays whose fingerprints do not match.
      ValueError: a template leaf with an abstract sharding (from `jax.eval_shape`).
    """
    self._wait("restoring")
    steps = self.steps()
    if step is None:
      if not steps:
        raise CheckpointError(f"no checkpoint in {self.directory}")
      step = steps[-1]
    step = int(step)
    if step not in steps:
      raise CheckpointError(f"no {self._where(step)} (available: {steps})")
    target = _restore_target(template_state)
    self._check_structure(step, target)
    args = ocp.args.Composite(
        state=ocp.args.StandardRestore(target),
        meta=ocp.args.JsonRestore(),
        fingerprints=ocp.args.JsonRestore(),
    )
    try:
      restored = self._manager.restore(step, args=args)
    except Exception as e:
      raise CheckpointError(f"{self._where(step)} is corrupt or incomplete: {_short(e)}") from e
    self._check_fingerprints(step, restored.state, restored.fingerprints)
    if not isinstance(restored.meta, dict):
      raise CheckpointError(f"{self._where(step)}: meta is {type(restored.meta).__name__}, "
                            "expected a JSON object")
    return _from_stored(restored.state, template_state), restored.meta

  def meta(self, step: int | None = None) -> dict:
    """The meta dict of checkpoint `step` (default: the latest), read without the state (e.g.
    the config a run was trained with, to rebuild its template). Raises `CheckpointError`."""
    self._wait("reading meta")
    steps = self.steps()
    if step is None and not steps:
      raise CheckpointError(f"no checkpoint in {self.directory}")
    step = steps[-1] if step is None else int(step)
    if step not in steps:
      raise CheckpointError(f"no {self._where(step)} (available: {steps})")
    try:
      meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    except Exception as e:
      raise CheckpointError(f"{self._where(step)}: cannot read its meta: {_short(e)}") from e
    if not isinstance(meta.meta, dict):
      raise CheckpointError(f"{self._where(step)}: meta is {type(meta.meta).__name__}, "
                            "expected a JSON object")
    return meta.meta

  def restore_newest_intact(self, template_for, below: int | None = None
                            ) -> tuple[Any, dict, int, list[tuple[int, str]]]:
    """Restores the newest checkpoint that restores cleanly, trying steps newest first.

    Args:
      template_for: `template_for(step) -> template_state` (a run's state can change form
        between steps, e.g. from the SFT to the RL optimizer).
      below: only try steps < `below` (None: all).

    Returns:
      (state, meta, step, failures): the restored step and, newest first, the
      `(step, error message)` of each newer checkpoint that failed to restore.

    Raises:
      CheckpointError: no checkpoint restores (every failure is listed).
    """
    failures = []
    for step in reversed(self.steps()):
      if below is not None and step >= below:
        continue
      try:
        state, meta = self.restore(template_for(step), step)
        return state, meta, step, failures
      except CheckpointError as e:
        failures.append((step, str(e)))
    raise CheckpointError(f"no intact checkpoint in {self.directory}: "
                          + "; ".join(f"step {s}: {m}" for s, m in failures[:_MAX_LISTED]))

  def quarantine(self, steps) -> str:
    """Moves the checkpoints `steps` (e.g. corrupt ones) out of the way, into
    `<directory>.corrupt/<step>`, so that the run can continue from an older step and save
    those steps anew. Nothing is deleted. Returns the quarantine directory."""
    self._wait("quarantining")
    where = self.directory + ".corrupt"
    os.makedirs(where, exist_ok=True)
    for step in steps:
      dest, n = os.path.join(where, str(int(step))), 1
      while os.path.exists(dest):
        dest, n = os.path.join(where, f"{int(step)}.{n}"), n + 1
      os.rename(os.path.join(self.directory, str(int(step))), dest)
    self._manager.reload()
    return where

  def _check_structure(self, step: int, target: Any) -> None:
    """Compares the stored tree's paths, shapes and dtypes with the restore target."""
    try:
      metadata = self._manager.item_metadata(step)["state"]
    except Exception as e:
      raise CheckpointError(f"{self._where(step)}: cannot read the state's metadata: "
                            f"{_short(e)}") from e
    if getattr(metadata, "tree", None) is None:
      raise CheckpointError(f"{self._where(step)}: the state's tree metadata "
                            "(state/_METADATA) is missing or unreadable")
    stored = ocp.tree.to_flat_dict(metadata.tree, sep="/")
    problems = _compare_trees(stored, ocp.tree.to_flat_dict(target, sep="/"))
    if problems:
      raise CheckpointError(f"{self._where(step)} does not match the template state: "
                            + "; ".join(problems))

  def _check_fingerprints(self, step: int, state: Any, expected: Any) -> None:
    """Recomputes the restored arrays' fingerprints and compares them with the saved ones."""
    if not isinstance(expected, dict):
      raise CheckpointError(f"{self._where(step)}: fingerprints are missing or garbled")
    actual = fingerprints(state)
    bad = sorted(k for k in set(actual) | set(expected) if actual.get(k) != expected.get(k))
    if bad:
      raise CheckpointError(f"{self._where(step)} is corrupt: "
                            + _listing("array data does not match its fingerprint", bad))
