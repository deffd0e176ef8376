"""The policy's token distribution: what tokens are sampled from and scored under.

One `Policy` object holds everything that turns model logits into the distribution of the next
token: the ids the policy may never emit (`banned`: the environment's control tokens such as
role headers and padding, and ids beyond the vocabulary), the temperature, and top-k / top-p
truncation. The rollout samples with it and the learner scores with `policy.learner()`, the same
distribution without the truncation, so sampler/learner agreement is structural:

* at `top_k = 0`, `top_p = 1` the rollout's `sampler_logprob` and the learner's token log-probs
  of the same params are the same computation, and the PPO ratio is exactly 1 before the first
  update (tested);
* with truncation they differ, which the train step reports (`train/logprob_agreement`) and can
  correct (`algo.tis_cap`).

Used by `mtrl_jax.rollout` (sampling), `mtrl_jax.train` (policy and reference scoring, SFT) and
the RLAG study (`experiments/rlag_study.py`).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from mtrl_jax import vocab as V
from mtrl_jax.rl import losses

# Control tokens of a symbol vocabulary the policy never emits (they are the environment's).
NEVER_SAMPLED = (V.PAD, V.BOS, V.SYSTEM, V.USER, V.ASSISTANT, V.TOOL)


def never_sampled_mask(vocab: V.TokenizerAdapter, vocab_size: int) -> np.ndarray:
  """[V] bool: True for ids the policy may not emit (control tokens, ids beyond the vocab).

  A tokenizer adapter with a `never_sampled_ids()` method (a real tokenizer's role headers,
  `mtrl_jax.models.chat.ChatTokenizer`) names its own; a symbol `Vocab` bans `NEVER_SAMPLED`.
  """
  mask = np.zeros((vocab_size,), bool)
  if hasattr(vocab, "never_sampled_ids"):
    mask[list(vocab.never_sampled_ids())] = True
  else:
    mask[[vocab.id(s) for s in NEVER_SAMPLED if s in vocab]] = True
  mask[vocab.size:] = True
  return mask


def sampling_logits(logits: jax.Array, banned: jax.Array, *, temperature: float = 1.0,
                    top_k: int = 0, top_p: float = 1.0) -> jax.Array:
  """Unnormalised log-probabilities of the distribution tokens are sampled from.

  `sampling_log_probs` without the final log-softmax: temperature-scaled logits, -inf on
  banned ids and outside the top-k / top-p support. Same arguments and shapes."""
  x = jnp.where(banned, -jnp.inf, logits.astype(jnp.float32) / temperature)
  if top_k:
    kth = jax.lax.top_k(x, top_k)[0][..., -1:]
    x = jnp.where(x < kth, -jnp.inf, x)
  if top_p < 1.0:
    order = jnp.argsort(-x, axis=-1)
    sorted_x = jnp.take_along_axis(x, order, axis=-1)
    probs = jax.nn.softmax(sorted_x, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep_sorted = mass_before < top_p
    keep = jnp.zeros_like(keep_sorted).at[
        tuple(jnp.indices(order.shape)[:-1]) + (order,)].set(keep_sorted)
    x = jnp.where(keep, x, -jnp.inf)
  return x


def sampling_log_probs(logits: jax.Array, banned: jax.Array, *, temperature: float = 1.0,
                       top_k: int = 0, top_p: float = 1.0) -> jax.Array:
  """Log-probabilities of the distribution tokens are sampled from.

  Args:
    logits: [..., V] float32 model logits.
    banned: [V] bool, ids that are never sampled (their log-prob is -inf).
    temperature: > 0, divides the logits.
    top_k: keep the k largest (0 = all).
    top_p: keep the smallest set of tokens whose mass reaches top_p (1.0 = all).

  Returns:
    [..., V] float32 normalised log-probabilities (-inf outside the support).
  """
  return jax.nn.log_softmax(sampling_logits(logits, banned, temperature=temperature,
                                            top_k=top_k, top_p=top_p), axis=-1)


SAMPLE_BLOCK = 32  # ids per block of the two-level inverse-CDF search in `inverse_cdf_sample`


def inverse_cdf_sample(x: jax.Array, u: jax.Array, *,
                       block: int = SAMPLE_BLOCK) -> tuple[jax.Array, jax.Array]:
  """Sample from `softmax(x)` with one uniform per row: (token [...] int32, its log-prob [...]).

  Args:
    x: [..., V] float32 unnormalised log-probabilities (-inf: never sampled; at least one
      finite entry per row).
    u: [...] float32 uniforms in [0, 1).

  The token is the first id whose cumulative mass exceeds `u * Z` (inverse CDF), found in two
  levels so that no length-V cumulative sum is needed (a plain `cumsum` over the vocabulary
  costs several times the rest on CPU): the cumulative mass of blocks of `block` ids picks the
  block, then a cumulative sum inside that one block picks the id. Zero-mass ids (banned,
  outside top-k / top-p) can never be picked: thresholds are kept strictly below the mass they
  are compared with. The log-prob is exact, `x[tok] - logsumexp(x)`, from the same
  exponentials, without a `[.., V]` log-softmax. One uniform replaces the V Gumbel draws of
  `jax.random.categorical` (per row per token: 2 threefry hashes instead of ~V/2).
  """
  *lead, V = x.shape
  nb = -(-V // block)
  m = jnp.max(x, axis=-1, keepdims=True)
  e = jnp.exp(x - m)                                                    # [..., V], 0 off support
  e = jnp.pad(e, [(0, 0)] * len(lead) + [(0, nb * block - V)]).reshape(*lead, nb, block)
  bsum = jnp.sum(e, axis=-1)                                            # [..., nb]
  cb = jnp.cumsum(bsum, axis=-1)
  z = cb[..., -1:]                                                      # total mass (>= 1)
  t = jnp.minimum(u[..., None].astype(jnp.float32) * z, jnp.nextafter(z, 0.0))
  blk = jnp.minimum(jnp.sum(cb <= t, axis=-1), nb - 1)                  # first block past t
  take = lambda a, i: jnp.take_along_axis(a, i[..., None], axis=-1)[..., 0]
  before = take(cb, blk) - take(bsum, blk)
  eb = jnp.take_along_axis(e, blk[..., None, None], axis=-2)[..., 0, :]  # [..., block]
  w = jnp.cumsum(eb, axis=-1)
  r = jnp.minimum(jnp.maximum(t[..., 0] - before, 0.0), jnp.nextafter(w[..., -1], 0.0))
  tok = blk * block + jnp.minimum(jnp.sum(w <= r[..., None], axis=-1), block - 1)
  logp = take(x, tok) - m[..., 0] - jnp.log(z[..., 0])
  return tok.astype(jnp.int32), logp


@dataclasses.dataclass(frozen=True, eq=False)
class Policy:
  """The next-token distribution of the policy, from model logits.

  Attributes:
    banned: [V] bool numpy array, ids never sampled (see `never_sampled_mask`).
    temperature: > 0, divides the logits (also when scoring).
    top_k: keep the k most likely tokens when sampling (0 = off).
    top_p: nucleus mass when sampling (1.0 = off).
  """

  banned: np.ndarray
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0

  @classmethod
  def for_vocab(cls, vocab: V.TokenizerAdapter, vocab_size: int, **kwargs) -> "Policy":
    """The policy of a model with `vocab_size` logits talking through `vocab`."""
    return cls(banned=never_sampled_mask(vocab, vocab_size), **kwargs)

  def learner(self) -> "Policy":
    """The same distribution without top-k / top-p: what the learner scores tokens under."""
    return dataclasses.replace(self, top_k=0, top_p=1.0)

  def log_probs(self, logits: jax.Array) -> jax.Array:
    """[..., V] logits -> [..., V] log-probs of this distribution (-inf outside its support)."""
    return sampling_log_probs(logits, jnp.asarray(self.banned), temperature=self.temperature,
                              top_k=self.top_k, top_p=self.top_p)

  def logits(self, logits: jax.Array) -> jax.Array:
    """[..., V] logits -> [..., V] unnormalised log-probs of this distribution (-inf outside
    its support): `log_probs` without the normalisation."""
    return sampling_logits(logits, jnp.asarray(self.banned), temperature=self.temperature,
                           top_k=self.top_k, top_p=self.top_p)

  def sample(self, key: jax.Array, logits: jax.Array, *,
             greedy: bool = False) -> tuple[jax.Array, jax.Array]:
    """One token from `logits` [V]: (token [] int32, its log-prob [] under this distribution).

    Inverse-CDF sampling from one uniform drawn with `key` (`inverse_cdf_sample`); the
    log-prob is exact. `greedy`: the argmax of the distribution (its log-prob is still
    reported)."""
    u = jax.random.uniform(key, logits.shape[:-1])
    return self.sample_uniform(u, logits, greedy=greedy)

  def sample_uniform(self, u: jax.Array, logits: jax.Array, *,
                     greedy: bool = False) -> tuple[jax.Array, jax.Array]:
    """`sample` from given uniforms: u [...] in [0, 1), logits [..., V] -> (tokens [...],
    log-probs [...]). Batched: the rollout draws one uniform per row per token."""
    x = self.logits(logits)
    if greedy:
      tok = jnp.argmax(x, axis=-1).astype(jnp.int32)
      logp = (jnp.take_along_axis(x, tok[..., None], -1)[..., 0]
              - jax.nn.logsumexp(x, axis=-1))
      return tok, logp
    return inverse_cdf_sample(x, u)

  def token_log_probs(self, logits: jax.Array,
                      tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Score a token stream: (log-probs [B, T, V], token log-probs [B, T]).

    `token_logp[:, t] = log p(tokens[:, t] | tokens[:, :t])` (0 at t = 0), aligned with
    `Trajectory.sampler_logprob` and `loss_mask`. Tokens the policy can never emit (prompt and
    reply role headers, padding) have log-prob -inf under it; they are set to 0 here, so that
    masked-out positions cannot turn into NaN gradients (0 * d exp(-inf - -inf)).

    Args:
      logits: [B, T, V] model logits for `tokens`.
      tokens: [B, T] int32.
    """
    logp_all = self.log_probs(logits)
    logp = losses.token_log_probs(logp_all, tokens)
    return logp_all, jnp.where(jnp.isfinite(logp), logp, 0.0)

  def score_hidden(self, logits_fn: Callable[[jax.Array], jax.Array], hidden: jax.Array,
                   tokens: jax.Array, *, chunk: int) -> tuple[jax.Array, jax.Array]:
    """Score a token stream from final hidden states, never holding `[B, T, V]`.

    The LM head, this distribution (temperature, bans, truncation), the log-softmax, the
    gather and the entropy run on `chunk` positions at a time in a `lax.map` whose body is
    rematerialised (`jax.checkpoint`), so forward and backward hold at most one `[B, chunk, V]`
    block of logits. The values are those of `self.token_log_probs(logits_fn(hidden), tokens)`
    and the entropy of the same distributions (tested to 1e-6 in f32, gradients included).

    Args:
      logits_fn: hidden [B, C, d] -> logits [B, C, V] float32 (e.g. `transformer.lm_logits`
        with the params bound).
      hidden: [B, T, d] final hidden states of `tokens` (`transformer.apply(...,
        return_hidden=True)`).
      tokens: [B, T] int32.
      chunk: positions per block (>= 1).

    Returns:
      (token log-probs [B, T], 0 at t = 0 and on tokens this distribution cannot emit;
       entropy [B, T] nats of the distribution each token was drawn from, 0 at t = 0).
      Both are aligned with `Trajectory.loss_mask`: position t describes token t.
    """
    B, T, d = hidden.shape
    n = T - 1  # positions 0 .. T-2 predict tokens 1 .. T-1
    if n < 1:
      return jnp.zeros((B, T), jnp.float32), jnp.zeros((B, T), jnp.float32)
    c = min(int(chunk), n)
    blocks = -(-n // c)
    pad = blocks * c - n
    h = jnp.pad(hidden[:, :-1], ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(tokens[:, 1:], ((0, 0), (0, pad)))
    h = h.reshape(B, blocks, c, d).swapaxes(0, 1)            # [blocks, B, c, d]
    targets = targets.reshape(B, blocks, c).swapaxes(0, 1)   # [blocks, B, c]

    @jax.checkpoint
    def block(args):
      h_c, t_c = args
      logp_all = self.log_probs(logits_fn(h_c))
      logp = losses.gather_log_probs(logp_all, t_c)
      return jnp.where(jnp.isfinite(logp), logp, 0.0), losses.entropy_from_logits(logp_all)

    logp, entropy = jax.lax.map(block, (h, targets))
    unblock = lambda x: jnp.pad(x.swapaxes(0, 1).reshape(B, blocks * c)[:, :n], ((0, 0), (1, 0)))
    return unblock(logp), unblock(entropy)
