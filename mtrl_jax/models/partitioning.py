"""How the transformer's parameters and activations are laid out on a device mesh.

The mesh has three named axes (`mtrl_jax.sharding.make_mesh`), in the MaxText / Tunix manner:

* `data`   - episodes (rows) are split over it; parameters are replicated along it;
* `fsdp`   - episodes are split over it too, and so are parameters, gradients and optimizer
             state (ZeRO-3 / FSDP): each device stores 1/fsdp of every large weight, and XLA's
             SPMD partitioner all-gathers a layer's weights where the layer runs and
             reduce-scatters its gradients;
* `tensor` - attention heads and MLP columns are split over it (Megatron tensor parallelism);
             the vocabulary dimension of the embedding / LM head too.

Every parameter gets *logical* axis names from its name (`PARAM_AXES`: `q_proj/kernel` is
(embed, heads), `down_proj/kernel` is (mlp, embed), ...), and `LOGICAL_RULES` map logical names
to mesh axes (embed -> fsdp, heads / kv_heads / mlp / vocab -> tensor). A leading stacked-layer
axis [L] is never split. A dimension that the mesh axis does not divide is left unsplit
(replicated along that axis: correct, only less memory-efficient), e.g. Qwen2.5-7B's 4 KV heads
on `tensor=8`.

Activations are constrained with `constrain(x, *logical_axes)`: a no-op unless the computation
is traced under `jax.set_mesh(mesh)` with these axis names (so single-device code paths are
untouched), e.g. rows of a batch on (data, fsdp), heads on tensor.

The same rule applies to any pytree whose leaf paths end in parameter names, so the optimizer
state (Adam's `mu`, `nu`: same paths below `mu`/`nu`) and the KL reference shard exactly like
the params (`tree_specs`).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
from jax.sharding import PartitionSpec as P

DATA, FSDP, TENSOR = "data", "fsdp", "tensor"
AXES = (DATA, FSDP, TENSOR)
BATCH = (DATA, FSDP)  # mesh axes that split the rows of a batch

# logical axis name -> mesh axis (None = replicated)
LOGICAL_RULES: dict[str, Any] = {
    "batch": BATCH,
    "embed": FSDP,
    "heads": TENSOR,
    "kv_heads": TENSOR,
    "mlp": TENSOR,
    "vocab": TENSOR,
}

# parameter name (the last two path entries, or the last one) -> logical axes of its trailing
# dimensions. Norm scales and the value head's bias are small and replicated.
PARAM_AXES: dict[str, tuple] = {
    "embed/embedding": ("vocab", "embed"),
    "q_proj/kernel": ("embed", "heads"),
    "k_proj/kernel": ("embed", "kv_heads"),
    "v_proj/kernel": ("embed", "kv_heads"),
    "q_proj/bias": ("heads",),
    "k_proj/bias": ("kv_heads",),
    "v_proj/bias": ("kv_heads",),
    "o_proj/kernel": ("heads", "embed"),
    "gate_proj/kernel": ("embed", "mlp"),
    "up_proj/kernel": ("embed", "mlp"),
    "down_proj/kernel": ("mlp", "embed"),
    "lm_head/kernel": ("embed", "vocab"),
    "value_head/kernel": ("embed", None),
    "value_head/bias": (None,),
    "scale": (None,),  # RMSNorm scales: attn_norm, mlp_norm, final_norm, q_norm, k_norm
}


def _key_name(entry) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(entry, attr):
      return str(getattr(entry, attr))
  return str(entry)


def param_logical_axes(path: tuple, ndim: int) -> tuple | None:
  """Logical axes [ndim] of a leaf at `path` (a pytree key path), or None when its name is not
  a model parameter's. Leading dimensions beyond the named ones (a stacked-layer axis, a
  vmapped seed axis) get None."""
  names = [_key_name(e) for e in path]
  axes = None
  if len(names) >= 2:
    axes = PARAM_AXES.get("/".join(names[-2:]))
  if axes is None and names:
    axes = PARAM_AXES.get(names[-1])
  if axes is None or len(axes) > ndim:
    return None
  return (None,) * (ndim - len(axes)) + tuple(axes)


def spec_for(logical: tuple, shape: tuple, mesh_shape: dict[str, int]) -> P:
  """PartitionSpec of an array of `shape` with `logical` axes on a mesh of `mesh_shape`
  ({axis: size}): each dimension goes to its rule's mesh axes when their size divides it (and
  they are not used by an earlier dimension), else stays unsplit."""
  used: set[str] = set()
  out = []
  for name, size in zip(logical, shape):
    axes = LOGICAL_RULES.get(name) if name is not None else None
    if axes is None:
      out.append(None)
      continue
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    axes = tuple(a for a in axes if a in mesh_shape and a not in used)
    n = 1
    for a in axes:
      n *= mesh_shape[a]
    if not axes or n == 1 or size % n:
      out.append(None)
      continue
    used.update(axes)
    out.append(axes[0] if len(axes) == 1 else axes)
  return P(*out)


def tree_specs(tree: Any, mesh_shape: dict[str, int]) -> Any:
  """PartitionSpecs for every leaf of `tree` (params, optimizer state, a whole TrainState):
  model parameters (and anything whose path ends in a parameter's name, e.g. Adam's moments)
  by `PARAM_AXES`, everything else (step counters, PRNG keys, scalars) replicated."""

  def leaf(path, x):
    shape = getattr(x, "shape", ())
    logical = param_logical_axes(path, len(shape))
    if logical is None:
      return P()
    return spec_for(logical, shape, mesh_shape)

  return jax.tree_util.tree_map_with_path(leaf, tree)


def _active_mesh_shape() -> dict[str, int] | None:
  """{axis: size} of the `jax.set_mesh` mesh the trace is under, manual axes (inside
  `local_rows`' shard_map) counted as size 1; None off a (data, fsdp, tensor) mesh or when
  nothing is split (one device, or inside `local_rows`)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or not set(AXES) <= set(mesh.axis_names):
    return None
  manual = jax.sharding.AxisType.Manual
  shape = {name: 1 if kind == manual else size
           for name, size, kind in zip(mesh.axis_names, mesh.axis_sizes, mesh.axis_types)}
  return None if all(v == 1 for v in shape.values()) else shape


def local_rows(fn: Callable, row_args: tuple[bool, ...], out_specs: Any = P(AXES)) -> Callable:
  """`fn(*args)` run by every device on its own rows: under a `jax.set_mesh` mesh, a
  `jax.shard_map` over all of its axes with the rows split over every device (data x fsdp x
  tensor of them); `fn` itself off a mesh, or when the rows do not split evenly.

  `row_args[i]`: argument i is split by rows (leading axis) - else it is replicated, e.g.
  FSDP- or tensor-sharded params, which are then gathered once on entry (as an inference
  engine takes the trainer's weights) instead of per layer per token. `out_specs`: the outputs'
  specs (default: every leaf split on its leading row axis over all devices).

  The rollout runs this way, as data parallelism with whole weights: a row-wise scatter
  `x.at[arange(B), pos]` of the KV cache or the token buffer would otherwise be all-gathered
  across devices by the SPMD partitioner every token; there is no collective inside its loop
  (each device's `while_loop` stops when its own rows are done), and host callbacks (Python
  tools, `jax.pure_callback`) run on each device for its rows, which JAX supports only in a
  fully manual computation. The cost: every device holds the whole weights while it samples
  (not 1/fsdp or 1/tensor of them)."""

  def run(*args):
    shape = _active_mesh_shape()
    rows = [a for a, r in zip(args, row_args) if r]
    n = 1 if shape is None else shape[DATA] * shape[FSDP] * shape[TENSOR]
    if n == 1 or any(jax.tree.leaves(a)[0].shape[0] % n for a in rows):
      return fn(*args)
    in_specs = tuple(P(AXES) if r else P() for r in row_args)
    return jax.shard_map(fn, mesh=jax.sharding.get_abstract_mesh(), in_specs=in_specs,
                         out_specs=out_specs, axis_names=frozenset(AXES),
                         check_vma=False)(*args)

  return run


def constrain(x: jax.Array, *logical) -> jax.Array:
  """`with_sharding_constraint(x, <spec of logical axes>)` under a `jax.set_mesh` mesh with
  the (data, fsdp, tensor) axes; `x` unchanged otherwise. `logical`: one name (or None) per
  dimension of x, e.g. `constrain(h, "batch", None, "embed_act")`; unknown names replicate."""
  mesh_shape = _active_mesh_shape()
  if mesh_shape is None:
    return x
  if len(logical) != x.ndim:
    raise ValueError(f"constrain: {len(logical)} logical axes for an array of shape {x.shape}")
  return jax.lax.with_sharding_constraint(x, spec_for(logical, x.shape, mesh_shape))


def constrain_rows(tree: Any) -> Any:
  """Every leaf's leading (row) axis split over (data, fsdp), the rest unsplit; a no-op
  outside a mesh. Scalars are left alone."""
  if _active_mesh_shape() is None:
    return tree
  return jax.tree.map(
      lambda x: constrain(x, "batch", *([None] * (x.ndim - 1))) if getattr(x, "ndim", 0) else x,
      tree)
