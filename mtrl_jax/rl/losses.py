"""Per-token RL losses and their aggregation: PPO/DAPO surrogate, value loss, KL, entropy.

Small pure functions, composed by the train step rather than configured by flags. Every
per-token function returns [B, T] and knows nothing about masks; `aggregate` is the one place
where `loss_mask` and the denominators enter, e.g.::

  logp = token_log_probs(logits, traj.tokens)
  pg, clipped = clipped_surrogate(logp, traj.sampler_logprob, adv, eps_low=0.2, eps_high=0.28)
  w = truncated_importance_weights(logp, traj.sampler_logprob, traj.loss_mask, cap=2.0)
  loss = aggregate(w * pg, traj.loss_mask, "token_mean", num_tokens=global_tokens)

Log-probabilities are natural logs (nats); entropies and KLs are in nats per token.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

AGGREGATION_MODES = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")
KL_KINDS = ("k1", "k2", "k3")

# Log-ratios are clamped to +-this before exp (as verl does): keeps the ratio finite so that
# garbage on unmasked positions cannot turn into inf * 0 = NaN in the backward pass.
MAX_LOG_RATIO = 20.0


def aggregate(x: jax.Array, mask: jax.Array, mode: str, *, num_tokens=None, num_seqs=None,
              max_len=None) -> jax.Array:
  """Reduce a per-token quantity to a scalar over the tokens where `mask` is True.

  Modes (m = mask, n_b = sum_t m[b, t]):

  * `"token_mean"`: `sum_{b,t} m x / N`, N = `num_tokens` (default: sum of m). Every token
    weighs the same; long sequences weigh more (DAPO).
  * `"seq_mean_token_mean"`: `(1 / S) sum_b [sum_t m x / n_b]`, S = `num_seqs` (default B).
    Every sequence weighs the same (original GRPO). A row with no masked token contributes 0
    but *still counts* in S: the loss does not depend on which rows happen to be empty, and
    padding rows in a static batch shrink the loss rather than reweight the others.
  * `"seq_mean_token_sum_norm"`: `sum_{b,t} m x / (S * L)`, S = `num_seqs` (default B), L =
    `max_len` (default T): a constant denominator, no length bias (Dr.GRPO).

  Global denominators: by default the denominators are those of the arrays passed in. A
  minibatch or a device shard that passes the *global-batch* `num_tokens` (total masked tokens)
  / `num_seqs` (total rows) / `max_len` computes its share of the global loss: the sum of the
  shards' results equals the loss on the whole batch (shards must split rows, not tokens of a
  row, for the seq modes), so `lax.psum` of the shard losses -- or the sum of minibatch
  gradients -- is exactly the full-batch loss, independent of padding and sharding.
  `num_tokens` may be traced (e.g. a `lax.psum` of mask sums). A zero token count gives 0.

  Args:
    x: [B, T] per-token quantity (loss, KL, entropy ...).
    mask: [B, T] bool (`loss_mask`, possibly times a row weight via `x`).
    mode: one of `AGGREGATION_MODES` (static).
    num_tokens, num_seqs, max_len: optional global denominators (see above).

  Returns:
    [] float32. Masked-out positions contribute exactly 0 (value and gradient), even if `x`
    is inf/NaN there.
  """
  mask = jnp.asarray(mask, bool)
  xm = jnp.where(mask, x, 0.0)
  batch, length = mask.shape
  if mode == "token_mean":
    n = jnp.sum(mask) if num_tokens is None else num_tokens
    return jnp.sum(xm) / jnp.maximum(jnp.asarray(n, jnp.float32), 1.0)
  if mode == "seq_mean_token_mean":
    per_seq = jnp.sum(xm, axis=-1) / jnp.maximum(jnp.sum(mask, axis=-1), 1).astype(jnp.float32)
    s = batch if num_seqs is None else num_seqs
    return jnp.sum(per_seq) / jnp.asarray(s, jnp.float32)
  if mode == "seq_mean_token_sum_norm":
    s = batch if num_seqs is None else num_seqs
    l = length if max_len is None else max_len
    return jnp.sum(xm) / (jnp.asarray(s, jnp.float32) * jnp.asarray(l, jnp.float32))
  raise ValueError(f"unknown aggregation mode {mode!r}; expected one of {AGGREGATION_MODES}")


def clipped_surrogate(logp: jax.Array, old_logp: jax.Array, advantages: jax.Array, *,
                      eps_low: float, eps_high: float,
                      dual_clip: float | None = None) -> tuple[jax.Array, jax.Array]:
  """PPO clipped surrogate with asymmetric clip (DAPO clip-higher) and optional dual clip.

  With `r = exp(logp - old_logp)` (log-ratio clamped to +-`MAX_LOG_RATIO`) and A the advantage:
    `loss = -min(r A, clip(r, 1 - eps_low, 1 + eps_high) A)`;
  with `dual_clip = c > 1` (Ye et al. 2020, as in verl), for A < 0 only:
    `loss = min(loss, -c A)`,
  i.e. the loss of a negative-advantage token is bounded by `c |A|` however large r grows
  (without it, `|A| r` is unbounded). For A >= 0 dual clip changes nothing.

  Args:
    logp: [B, T] log-prob of each token under the policy being optimised (nats).
    old_logp: [B, T] log-prob under the behaviour/rollout policy (no gradient flows into it).
    advantages: [B, T] per-token advantage (treated as a constant).
    eps_low, eps_high: clip range `[1 - eps_low, 1 + eps_high]` for the ratio.
    dual_clip: c > 1, or None for no dual clip.

  Returns:
    (per_token_loss [B, T] float32 = negative objective, clipped [B, T] bool): `clipped` is
    True where a clip is active and selected, i.e. where the token's gradient is exactly 0
    (A > 0 and r > 1 + eps_high; A < 0 and r < 1 - eps_low; dual clip: A < 0 and r > c).
  """
  if dual_clip is not None and dual_clip <= 1.0:
    raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
  adv = jax.lax.stop_gradient(jnp.asarray(advantages, jnp.float32))
  log_ratio = jnp.clip(logp - jax.lax.stop_gradient(old_logp), -MAX_LOG_RATIO, MAX_LOG_RATIO)
  ratio = jnp.exp(log_ratio)
  unclipped = -ratio * adv
  clipped_loss = -jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high) * adv
  is_clipped = clipped_loss > unclipped          # max of the losses = min of the objectives
  loss = jnp.where(is_clipped, clipped_loss, unclipped)
  if dual_clip is not None:
    bound = -dual_clip * adv
    dual = (adv < 0) & (bound < loss)
    loss = jnp.where(dual, bound, loss)
    is_clipped = is_clipped | dual
  return loss, is_clipped


def value_loss(values: jax.Array, old_values: jax.Array, returns: jax.Array, *,
               clip_eps: float | None = None) -> jax.Array:
  """Per-token (or per-turn) value regression loss, optionally PPO-clipped.

  `0.5 (v - R)^2`, or with `clip_eps`:
  `0.5 max((v - R)^2, (v_clip - R)^2)`, `v_clip = old + clip(v - old, -clip_eps, clip_eps)`.

  Args:
    values: [B, T] current critic values (reward units).
    old_values: [B, T] critic values at rollout time (no gradient).
    returns: [B, T] regression targets (no gradient).
    clip_eps: value clip range in reward units, or None.

  Returns:
    [B, T] float32 loss, squared reward units.
  """
  returns = jax.lax.stop_gradient(returns)
  loss = jnp.square(values - returns)
  if clip_eps is not None:
    old = jax.lax.stop_gradient(old_values)
    v_clip = old + jnp.clip(values - old, -clip_eps, clip_eps)
    loss = jnp.maximum(loss, jnp.square(v_clip - returns))
  return 0.5 * loss


def kl_estimate(logp: jax.Array, ref_logp: jax.Array, kind: str) -> jax.Array:
  """Per-token estimate of KL(pi || ref) from samples of pi (Schulman's estimators).

  With `d = logp - ref_logp`:
  * `"k1"`: `d` (unbiased, can be negative);
  * `"k2"`: `0.5 d^2` (biased, low variance, >= 0);
  * `"k3"`: `exp(-d) + d - 1` (unbiased, >= 0), with the `d` inside the exp clamped to
    +-`MAX_LOG_RATIO` (as verl does): `exp(-d)` overflows float32 for d < -88, and an inf
    there would turn into a NaN gradient (0 * inf) even at masked-out positions, which skips
    the update. Beyond the clamp the value is a lower bound and the gradient stays finite.
  All are 0 where `logp == ref_logp`. Used in the loss (aggregate it) or subtracted from the
  reward (stop_gradient it first).

  Args:
    logp: [B, T] log-prob of the sampled tokens under the policy (nats).
    ref_logp: [B, T] log-prob under the frozen reference.
    kind: "k1", "k2" or "k3" (static).

  Returns:
    [B, T] float32, nats.
  """
  d = logp - ref_logp
  if kind == "k1":
    return d
  if kind == "k2":
    return 0.5 * jnp.square(d)
  if kind == "k3":
    return jnp.exp(-jnp.clip(d, -MAX_LOG_RATIO, MAX_LOG_RATIO)) + d - 1.0
  raise ValueError(f"unknown KL estimator kind {kind!r}; expected one of {KL_KINDS}")


def _safe_log_softmax(logits: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(log_probs, probs) over the last axis; -inf logits allowed, an all -inf row gives p = 0."""
  logits = jnp.asarray(logits, jnp.float32)
  m = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  e = jnp.exp(logits - m)
  z = jnp.sum(e, axis=-1, keepdims=True)
  z = jnp.where(z > 0, z, 1.0)
  return logits - m - jnp.log(z), e / z


def entropy_from_logits(logits: jax.Array) -> jax.Array:
  """Entropy of softmax(logits) per position, `-sum_v p_v log p_v`.

  Numerically stable (max-shifted); `-inf` logits (banned tokens) contribute 0 with no NaN in
  value or gradient; a position whose logits are all `-inf` gets 0.

  Args:
    logits: [B, T, V] unnormalised logits (apply temperature / bans first).

  Returns:
    [B, T] float32 entropy in nats.
  """
  logp, p = _safe_log_softmax(logits)
  safe_logp = jnp.where(p > 0, logp, 0.0)
  return -jnp.sum(p * safe_logp, axis=-1)


def token_log_probs(logits: jax.Array, tokens: jax.Array) -> jax.Array:
  """Log-probability of each token of the stream given its prefix, aligned with `tokens`.

  A causal model's `logits[:, t]` (computed from `tokens[:, :t+1]`) predicts `tokens[:, t+1]`.
  This function shifts that back so that output and input align position by position:

    `out[:, t] = log softmax(logits[:, t-1])[tokens[:, t]]`   for t >= 1,
    `out[:, 0] = 0`                                           (nothing predicts the first token),

  i.e. `out[b, t]` is log p(tokens[b, t] | tokens[b, :t]) -- the same alignment as
  `Trajectory.sampler_logprob` and `loss_mask`, so `out` can be compared with
  `sampler_logprob` and masked with `loss_mask` directly. The last position's logits are unused.
  To match the sampler exactly pass the distribution it sampled from, e.g.
  `mtrl_jax.policy.Policy.log_probs(logits)` (log-softmax is idempotent).

  Args:
    logits: [B, T, V] model outputs for the stream `tokens`.
    tokens: [B, T] int token ids.

  Returns:
    [B, T] float32 log-probs (nats), 0 at t = 0.
  """
  return jnp.pad(gather_log_probs(logits[:, :-1], tokens[:, 1:]), ((0, 0), (1, 0)))


def gather_log_probs(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """`log softmax(logits)[targets]`, unshifted: logits [..., V], targets [...] int -> [...]
  float32 (what `token_log_probs` computes after aligning the stream)."""
  logp, _ = _safe_log_softmax(logits)
  return jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]


def truncated_importance_weights(learner_logp: jax.Array, sampler_logp: jax.Array,
                                 mask: jax.Array, cap: float) -> jax.Array:
  """Truncated importance sampling (TIS) weights against the sampler's distribution.

  `w = min(exp(learner_logp - sampler_logp), cap)` where `mask`, 1 elsewhere, under
  `stop_gradient`: a constant per-token weight that corrects the off-policy gap between the
  rollout sampler (`Trajectory.sampler_logprob`: other numerics, top-k/p) and the learner's
  distribution at rollout time. Multiply the per-token policy loss by it.

  Args:
    learner_logp: [B, T] learner log-probs of the sampled tokens (e.g. under the old params).
    sampler_logp: [B, T] `sampler_logprob`.
    mask: [B, T] bool `loss_mask`.
    cap: truncation C > 0.

  Returns:
    [B, T] float32 weights in (0, cap], no gradient.
  """
  log_w = jnp.minimum(learner_logp - sampler_logp, jnp.log(jnp.float32(cap)))
  w = jnp.where(mask, jnp.exp(log_w), 1.0)
  return jax.lax.stop_gradient(w)
