"""The update stage: epochs x minibatches of gradient steps, in `lax.scan`.

The last stage of the train step (collect -> score -> advantages -> **update**), as in
PureJaxRL's `_update_epoch` / `_update_minbatch`: every epoch permutes the rows and splits them
into `minibatches` equal minibatches; each minibatch takes one optimizer step on the loss
function's gradient. Rows are permuted, never tokens, so sequence-level aggregations stay exact.

The trainer calls it on the global batch, also on a device mesh (`mtrl_jax.sharding`: the SPMD
partitioner inserts the collectives). `reduce` is for a caller that runs it per device inside its
own `shard_map`: `lax.psum` over that axis sums loss, metrics and gradients (each device's loss
its share of the global one, see `rl.objective`) so that every device applies the same update;
the identity by default.

A non-finite loss or gradient skips the step (params and optimizer state unchanged) and is
counted; it never poisons the params.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax


def _identity(tree):
  return tree


def ppo_update(params, opt_state, batch, key: jax.Array, *,
               loss_fn: Callable[[Any, Any], tuple[jax.Array, dict[str, jax.Array]]],
               optimizer: optax.GradientTransformation, epochs: int, minibatches: int,
               reduce: Callable[[Any], Any] = _identity):
  """`epochs` x `minibatches` optimizer steps on `loss_fn`.

  Args:
    params, opt_state: the trained params and their optimizer state.
    batch: a pytree of arrays with a leading row axis [B, ...] (e.g. `objective.Minibatch`);
      B must be divisible by `minibatches`.
    key: PRNG key of the row permutations (one split per epoch).
    loss_fn: `loss_fn(params, minibatch) -> (loss [], metrics dict of [])`.
    optimizer: the optax transformation.
    epochs, minibatches: static counts (>= 1).
    reduce: sum over a `shard_map` axis when called per device (`lambda t: lax.psum(t,
      'data')`), identity otherwise (the default).

  Returns:
    (params, opt_state, skipped [] int32: steps skipped as non-finite, metrics: each metric
     and `loss`, `grad_norm` averaged over all epochs x minibatches steps).
  """
  B = jax.tree.leaves(batch)[0].shape[0]
  if B % minibatches:
    raise ValueError(f"batch of {B} rows is not divisible by minibatches={minibatches}")

  def minibatch_step(carry, mb):
    params, opt_state, skipped = carry
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, mb)
    loss, metrics, grads = reduce((loss, metrics, grads))
    # One global reduction (not a per-leaf chain of `and`s, which XLA copied into every
    # leaf's `where` and made compile time quadratic in depth): any NaN/inf gradient entry
    # makes the global norm non-finite.
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, new_opt = optimizer.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    params = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new_params, params)
    opt_state = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new_opt, opt_state)
    metrics = dict(metrics, loss=loss, grad_norm=grad_norm)
    return (params, opt_state, skipped + (~finite).astype(jnp.int32)), metrics

  def epoch(carry, key):
    perm = jax.random.permutation(key, B).reshape(minibatches, B // minibatches)
    mbs = jax.tree.map(lambda x: x[perm], batch)
    return jax.lax.scan(minibatch_step, carry, mbs)

  (params, opt_state, skipped), metrics = jax.lax.scan(
      epoch, (params, opt_state, jnp.int32(0)), jax.random.split(key, epochs))
  return params, opt_state, skipped, jax.tree.map(jnp.mean, metrics)
