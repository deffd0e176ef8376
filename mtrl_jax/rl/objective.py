"""The loss the RL update minimises: the PPO / DAPO objective of one minibatch.

    total = pg_loss - ent_coef * entropy [+ kl_coef * kl] [+ vf_coef * value_loss]

* `pg_loss`: the clipped surrogate (`losses.clipped_surrogate`: `eps_low` / `eps_high`
  clip-higher, optional dual clip), times the truncated importance weights, aggregated over the
  loss mask with `algo.loss_agg`;
* `entropy`: the policy's mean per-token entropy over the loss mask (nats);
* `kl`: the per-token KL estimate (`algo.kl_kind`) to the frozen reference, in the loss unless
  `algo.kl_in_reward` (then it shaped the rewards instead and is only reported);
* `value_loss`: the (optionally clipped) squared error of the critic on the value mask.

Every mean uses *global-batch* denominators (`Denominators`): a minibatch (or a device's
shard of one) contributes its share of the full-batch loss, so the loss does not change with
padding, minibatching or sharding (`losses.aggregate`). The per-token pieces live in
`mtrl_jax.rl.losses`.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp

from mtrl_jax.rl import losses
from mtrl_jax.rl.config import AlgoConfig


@flax.struct.dataclass
class Minibatch:
  """The per-row inputs of the loss, [b, T] each (b rows of a minibatch).

  tokens: int32 streams; mask: bool loss mask; adv: float32 advantages (0 off the mask);
  old_logp / ref_logp: float32 token log-probs of the rollout params / the reference;
  old_values: float32 critic values at rollout time; v_mask: bool value-loss mask; v_target:
  float32 value targets; tis: float32 truncated importance weights (1 when off).
  """

  tokens: jax.Array
  mask: jax.Array
  adv: jax.Array
  old_logp: jax.Array
  ref_logp: jax.Array
  old_values: jax.Array
  v_mask: jax.Array
  v_target: jax.Array
  tis: jax.Array


@flax.struct.dataclass
class Denominators:
  """Global-batch denominators of one minibatch's share (see `losses.aggregate`).

  num_tokens: [] float32 trained tokens of the global batch / minibatches; num_seqs: rows of
  the global batch / minibatches; max_len: T."""

  num_tokens: jax.Array
  num_seqs: int = flax.struct.field(pytree_node=False)
  max_len: int = flax.struct.field(pytree_node=False)

  def kwargs(self) -> dict[str, Any]:
    return dict(num_tokens=self.num_tokens, num_seqs=self.num_seqs, max_len=self.max_len)


# forward(params, tokens [b, T]) -> (token log-probs [b, T], entropy [b, T], values [b, T] | None)
Forward = Callable[[Any, jax.Array], tuple[jax.Array, jax.Array, jax.Array | None]]


def ppo_loss(params, mb: Minibatch, *, forward: Forward, algo: AlgoConfig,
             denom: Denominators, v_denom: Denominators) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The PPO / DAPO objective of one minibatch (module docstring).

  Args:
    params: the trained params (`{'policy': ..., ['critic': ...]}`), differentiated.
    mb: the minibatch.
    forward: scores `mb.tokens` under `params` (the learner's distribution, `Policy.learner`).
    algo: the algorithm's settings.
    denom: global denominators of the token losses; v_denom: of the value loss.

  Returns:
    (total loss [], metrics {'clip_frac', 'entropy', 'pg_loss', ['kl'], ['value_loss']}).
  """
  logp, entropy_tok, new_values = forward(params, mb.tokens)
  pg, clipped = losses.clipped_surrogate(
      logp, mb.old_logp, mb.adv, eps_low=algo.eps_low, eps_high=algo.eps_high,
      dual_clip=algo.dual_clip or None)
  pg_loss = losses.aggregate(pg * mb.tis, mb.mask, algo.loss_agg, **denom.kwargs())
  entropy = losses.aggregate(entropy_tok, mb.mask, "token_mean", **denom.kwargs())
  total = pg_loss - algo.ent_coef * entropy
  metrics = {"clip_frac": losses.aggregate(clipped.astype(jnp.float32), mb.mask, "token_mean",
                                           **denom.kwargs()),
             "entropy": entropy, "pg_loss": pg_loss}
  if algo.kl_coef:
    kl = losses.aggregate(losses.kl_estimate(logp, mb.ref_logp, algo.kl_kind), mb.mask,
                          "token_mean", **denom.kwargs())
    metrics["kl"] = kl
    if not algo.kl_in_reward:
      total = total + algo.kl_coef * kl
  if new_values is not None and algo.vf_coef:
    vl = losses.value_loss(new_values, mb.old_values, mb.v_target,
                           clip_eps=algo.value_clip or None)
    vl = losses.aggregate(vl, mb.v_mask, "token_mean", **v_denom.kwargs())
    total = total + algo.vf_coef * vl
    metrics["value_loss"] = vl
  return total, metrics
