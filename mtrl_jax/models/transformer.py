"""Llama / Qwen-family decoder with a functional KV cache and a value head.

One module, two paths over the same weights:

* **Full forward** (training, scoring): `tokens [B, S]`, `positions [B, S]`, optional
  `key_mask [B, S]` -> `logits [B, S, V]`, `values [B, S]`. Attention is causal *by position*
  (token j is visible to token i iff `positions[j] <= positions[i]` and `key_mask[j]`), so
  left or right padding and packed rows all work.
* **Cached decoding** (rollout): the same call with `cache=KVCache`. The new tokens' keys and
  values are written into the cache at their `positions` (one or several tokens per row per
  call: chunked prefill and one-token decode are the same code), then the queries attend to
  cache slots `j <= position`. Rows may sit at different positions. The cache is a pytree
  passed in and returned, never hidden state. Contract: a row's tokens are fed in position
  order without gaps; a position `>= cache length` marks a padding token whose write is
  dropped (use it for rows with nothing to feed in a chunk).

Architecture knobs (`ModelConfig`): RoPE theta (and Llama-3 frequency scaling), RMSNorm,
grouped-query attention
(`num_heads`, `num_kv_heads`), optional q/k/v bias (Qwen2), optional per-head q/k RMSNorm
(Qwen3), SwiGLU MLP, tied or untied LM head, param and compute dtypes, a scalar value head on
the final hidden state. RoPE uses the Hugging Face "rotate half" layout so checkpoints load
without permuting weights.

Why Linen and not NNX: everything downstream (the jitted train step, `jax.vmap` over seeds,
sharding, checkpointing) is a function of a plain params pytree. Linen's
`model.apply({'params': p}, ...)` *is* that pure function, with no split/merge step and no
graph traversal per call.

Layers: the params of the blocks are stacked, `params['layers'][name]` has a leading
`[num_layers]` axis (MaxText's `scan_layers`). The full forward runs them as one `nn.scan`
(optionally rematerialised per block with a named policy, `ModelConfig.remat`), so the
training and scoring forward and its backward compile once whatever the depth. Cached decoding
loops over the layers in Python, slicing each layer's params, because the KV cache is one array
per layer: the rollout's while loop then updates every layer's cache in place; a stacked
`[L, ...]` cache carried through a scan over layers was copied on every decode step (measured
10x slower one-token decode on CPU). Initial values are those of the round-1 unrolled layout
(`layers_0`, `layers_1`, ... initialised under their own names, then stacked), so a seed gives
the same model as before.

Attention (`ModelConfig.attention`): "blockwise" (default) computes the full forward's
attention over key blocks of `attn_block` with an online softmax, rematerialised per block, so
`[B, H, S, S]` scores never exist (only `[B, H, S, attn_block]`); sequences no longer than one
block use the dense form, which is then the same computation. "dense" is the plain masked
softmax. Decode attends over the cache in blocks of `decode_block` up to the longest filled
position of the batch (a dynamic trip count), so a step costs the filled length, not the
static cache size; caches of at most one block use the dense masked form.

The LM head can be applied separately (`return_hidden=True`, then `lm_logits`), which is how
the learner scores tokens in sequence chunks without a `[B, T, V]` tensor
(`mtrl_jax.policy.Policy.score_hidden`) and how the rollout's prefill computes logits only at
each row's last prompt position.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from mtrl_jax.models.partitioning import constrain

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
_NEG_INF = -1e9  # finite: a query with no visible key gets a uniform (not NaN) softmax
ROPE_TYPES = ("default", "llama3")
ATTENTIONS = ("blockwise", "dense")
# What the backward pass saves of a block (jax.checkpoint policies); "none": no remat.
# Depth up to which the training forward's layer scan is unrolled by default
# (`ModelConfig.scan_unroll`).
SCAN_UNROLL_MAX_LAYERS = 4
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Static architecture of a decoder. Validated at construction; errors name the field.

  Attributes:
    vocab_size: number of token ids.
    d_model: width of the residual stream.
    num_layers: decoder blocks.
    num_heads: query heads.
    num_kv_heads: key/value heads (GQA); must divide `num_heads`.
    head_dim: width of one head; default `d_model // num_heads`.
    mlp_dim: hidden width of the SwiGLU MLP.
    rope_theta: RoPE base frequency.
    rope_type: "default" (plain RoPE) or "llama3" (Llama 3.1+ frequency scaling, with the four
      fields below; what Hugging Face calls `rope_scaling` / `rope_parameters`).
    rope_factor: llama3: wavelengths beyond the original context are divided by this.
    rope_low_freq_factor: llama3: `original_max_len / low_freq_factor` is the long-wavelength edge.
    rope_high_freq_factor: llama3: `original_max_len / high_freq_factor` is the short edge.
    rope_original_max_len: llama3: the context length the model was pre-trained at.
    norm_eps: RMSNorm epsilon.
    qkv_bias: bias on the q/k/v projections (Qwen2 / Qwen2.5).
    qk_norm: RMSNorm over each head of q and k before RoPE (Qwen3).
    tie_embeddings: the LM head is the transposed token embedding.
    value_head: add a scalar value head on the final hidden state.
    param_dtype: dtype of the parameters ("float32" | "bfloat16" | "float16").
    dtype: compute dtype of matmuls; norms, softmax, logits and values are float32.
    remat: what the backward pass keeps of each block of the full forward (`REMAT_POLICIES`):
      "none" (everything), "full" (only the block's input; recompute the rest), "dots" (the
      matmul outputs without a batch dimension: the projections, not the attention scores).
      True / False are read as "full" / "none".
    attention: the full forward's attention, "blockwise" (online softmax over key blocks, no
      `[B, H, S, S]` tensor) or "dense".
    attn_block: keys per block of blockwise attention (>= 1).
    decode_block: cache slots per block of decode attention (>= 1); a cache longer than this is
      attended block by block up to the longest filled position.
    logits_chunk: positions per chunk when the learner scores tokens from hidden states
      (`mtrl_jax.policy.Policy.score_hidden`): the largest logits block is `[b, chunk, V]`.
    scan_unroll: blocks of the full forward's layer scan run per loop trip (`nn.scan`'s
      `unroll`); 0 (default): all of them when `num_layers <= SCAN_UNROLL_MAX_LAYERS`, else 1.
      Unrolled, the backward pass no longer stacks and slices every layer's activations and
      gradients (measured on 2 shared CPU cores, same process, repeats interleaved: the
      quickstart's RL step 0.535 -> 0.458 s with the 2-layer tiny model, B=32); compile time
      then grows with the unrolled depth, which is why deep models keep the rolled scan.
  """

  vocab_size: int
  d_model: int = 128
  num_layers: int = 2
  num_heads: int = 4
  num_kv_heads: int = 2
  head_dim: int | None = None
  mlp_dim: int = 256
  rope_theta: float = 10000.0
  rope_type: str = "default"
  rope_factor: float = 8.0
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_original_max_len: int = 8192
  norm_eps: float = 1e-6
  qkv_bias: bool = False
  qk_norm: bool = False
  tie_embeddings: bool = True
  value_head: bool = True
  param_dtype: str = "float32"
  dtype: str = "float32"
  remat: str = "none"
  attention: str = "blockwise"
  attn_block: int = 512
  decode_block: int = 256
  logits_chunk: int = 128
  scan_unroll: int = 0

  def __post_init__(self):
    if isinstance(self.remat, (bool, np.bool_)):
      object.__setattr__(self, "remat", "full" if self.remat else "none")
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"ModelConfig.remat={self.remat!r}; expected one of "
                       f"{sorted(REMAT_POLICIES)} (or True / False)")
    if self.attention not in ATTENTIONS:
      raise ValueError(f"ModelConfig.attention={self.attention!r}; expected one of {ATTENTIONS}")
    for name in ("attn_block", "decode_block", "logits_chunk"):
      value = getattr(self, name)
      if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
        raise ValueError(f"ModelConfig.{name} must be a positive integer, got {value!r}")
    if (not isinstance(self.scan_unroll, (int, np.integer)) or isinstance(self.scan_unroll, bool)
        or self.scan_unroll < 0):
      raise ValueError(f"ModelConfig.scan_unroll must be an integer >= 0, got "
                       f"{self.scan_unroll!r}")
    for name in ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "mlp_dim"):
      value = getattr(self, name)
      if not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"ModelConfig.{name} must be a positive integer, got {value!r}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"ModelConfig.num_heads={self.num_heads} must be a multiple of "
                       f"ModelConfig.num_kv_heads={self.num_kv_heads}")
    if self.head_dim is None:
      if self.d_model % self.num_heads:
        raise ValueError(f"ModelConfig.d_model={self.d_model} is not divisible by "
                         f"num_heads={self.num_heads}; set ModelConfig.head_dim explicitly")
      object.__setattr__(self, "head_dim", self.d_model // self.num_heads)
    if self.head_dim <= 0 or self.head_dim % 2:
      raise ValueError(f"ModelConfig.head_dim={self.head_dim} must be a positive even number "
                       "(RoPE rotates pairs)")
    if self.rope_theta <= 0:
      raise ValueError(f"ModelConfig.rope_theta must be > 0, got {self.rope_theta}")
    if self.rope_type not in ROPE_TYPES:
      raise ValueError(f"ModelConfig.rope_type={self.rope_type!r}; expected one of {ROPE_TYPES}")
    if self.rope_type == "llama3":
      if not self.rope_factor > 0 or self.rope_original_max_len <= 0:
        raise ValueError("ModelConfig.rope_factor and rope_original_max_len must be > 0 for "
                         f"rope_type='llama3', got {self.rope_factor}, "
                         f"{self.rope_original_max_len}")
      if not 0 < self.rope_low_freq_factor < self.rope_high_freq_factor:
        raise ValueError("ModelConfig needs 0 < rope_low_freq_factor < rope_high_freq_factor "
                         f"for rope_type='llama3', got {self.rope_low_freq_factor}, "
                         f"{self.rope_high_freq_factor}")
    for name in ("param_dtype", "dtype"):
      if getattr(self, name) not in _DTYPES:
        raise ValueError(f"ModelConfig.{name}={getattr(self, name)!r}; expected one of "
                         f"{sorted(_DTYPES)}")

  @property
  def layer_unroll(self) -> int:
    """The `unroll` of the full forward's layer scan (see `scan_unroll`)."""
    if self.scan_unroll:
      return min(self.scan_unroll, self.num_layers)
    return self.num_layers if self.num_layers <= SCAN_UNROLL_MAX_LAYERS else 1

  @property
  def jnp_dtype(self):
    return _DTYPES[self.dtype]

  @property
  def jnp_param_dtype(self):
    return _DTYPES[self.param_dtype]

  def num_params(self, *, lm_head: bool = True) -> int:
    """Closed-form parameter count (what `count_params(init_params(...))` must equal)."""
    d, h, kv, hd, f = self.d_model, self.num_heads, self.num_kv_heads, self.head_dim, self.mlp_dim
    attn = d * h * hd + 2 * d * kv * hd + h * hd * d
    if self.qkv_bias:
      attn += h * hd + 2 * kv * hd
    if self.qk_norm:
      attn += 2 * hd
    per_layer = attn + 3 * d * f + 2 * d
    total = self.vocab_size * d + self.num_layers * per_layer + d
    if lm_head and not self.tie_embeddings:
      total += d * self.vocab_size
    if self.value_head:
      total += d + 1
    return total


# Named sizes. `vocab_size` comes from the environment's vocabulary at build time.
PRESETS: dict[str, dict[str, Any]] = {
    # ~0.3M params with a ~100-symbol vocabulary: CPU tests and the quickstart.
    "tiny": dict(d_model=128, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=256),
    # ~10M params: CPU experiments that need more capacity, GPU smoke tests.
    "small": dict(d_model=384, num_layers=6, num_heads=6, num_kv_heads=2, head_dim=64,
                  mlp_dim=1024),
}

# Published architectures (their config.json numbers), randomly initialised: real-model shapes
# for memory and compile benchmarks and accelerator smoke tests without weights. They carry
# their own vocabulary size (the environment's must fit in it). Weights come from a checkpoint
# (`config.model.checkpoint`, mtrl_jax.models.hf).
REAL_SHAPES: dict[str, dict[str, Any]] = {
    "qwen2.5-0.5b": dict(vocab_size=151936, d_model=896, num_layers=24, num_heads=14,
                         num_kv_heads=2, head_dim=64, mlp_dim=4864, rope_theta=1e6,
                         qkv_bias=True, tie_embeddings=True),
    "qwen2.5-1.5b": dict(vocab_size=151936, d_model=1536, num_layers=28, num_heads=12,
                         num_kv_heads=2, head_dim=128, mlp_dim=8960, rope_theta=1e6,
                         qkv_bias=True, tie_embeddings=True),
    "qwen2.5-7b": dict(vocab_size=152064, d_model=3584, num_layers=28, num_heads=28,
                       num_kv_heads=4, head_dim=128, mlp_dim=18944, rope_theta=1e6,
                       qkv_bias=True, tie_embeddings=False),
    "qwen3-0.6b": dict(vocab_size=151936, d_model=1024, num_layers=28, num_heads=16,
                       num_kv_heads=8, head_dim=128, mlp_dim=3072, rope_theta=1e6,
                       qk_norm=True, tie_embeddings=True),
    # Meta-Llama-3-8B (3.1 adds llama3 RoPE scaling; the shapes are the same).
    "llama3-8b": dict(vocab_size=128256, d_model=4096, num_layers=32, num_heads=32,
                      num_kv_heads=8, head_dim=128, mlp_dim=14336, rope_theta=500000.0,
                      norm_eps=1e-5, tie_embeddings=False),
}


def model_config(preset: str, vocab_size: int, /, **overrides) -> ModelConfig:
  """`ModelConfig` from a named preset, with field overrides (unknown fields are errors).

  `vocab_size` is the environment's vocabulary; a `REAL_SHAPES` preset keeps its own (larger)
  one. An override `vocab_size=` wins over both."""
  if preset not in PRESETS and preset not in REAL_SHAPES:
    raise ValueError(f"unknown model preset {preset!r}; known presets: "
                     f"{sorted(PRESETS) + sorted(REAL_SHAPES)}")
  fields = {f.name for f in dataclasses.fields(ModelConfig)}
  unknown = sorted(set(overrides) - fields)
  if unknown:
    raise ValueError(f"unknown ModelConfig fields {unknown}; valid fields: {sorted(fields)}")
  base = {"vocab_size": vocab_size, **PRESETS.get(preset, REAL_SHAPES.get(preset))}
  return ModelConfig(**{**base, **overrides})


@flax.struct.dataclass
class KVCache:
  """Keys and values, one array per layer: k[l] [B, num_kv_heads, head_dim, S_max] (keys
  stored transposed), v[l] [B, num_kv_heads, S_max, head_dim].

  Per-layer arrays (not one stacked [L, ...] array) so that XLA updates each layer's cache in
  place inside the rollout's while loop; slicing a stacked cache per layer copied it on every
  decode step (measured 10x slower one-token decode on CPU). Head-major (`[KV, ., .]` per row)
  so that one-token attention is two batched matmuls. Keys are stored `[D, S_max]` so that the
  scores `q @ k` contract q's last axis with the cache's second-to-last, the layout a matmul
  reads without transposing: with `[S_max, D]` keys XLA's CPU backend spent ~15 ms on the
  scores of one decode step at B=64 over 640 slots (4-layer benchmark model's heads), 0.9 ms
  with `[D, S_max]` (2 cores; `experiments/benchmark.py` rollout tables in the README).
  """

  k: tuple[jax.Array, ...]
  v: tuple[jax.Array, ...]

  @property
  def max_len(self) -> int:
    return self.v[0].shape[2]


def init_cache(config: ModelConfig, batch_size: int, max_len: int, dtype=None) -> KVCache:
  """An empty cache for `batch_size` rows of up to `max_len` tokens (compute dtype by default)."""
  shape = (batch_size, config.num_kv_heads, max_len, config.head_dim)
  k_shape = (batch_size, config.num_kv_heads, config.head_dim, max_len)
  dtype = config.jnp_dtype if dtype is None else dtype
  return KVCache(k=tuple(jnp.zeros(k_shape, dtype) for _ in range(config.num_layers)),
                 v=tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers)))


class RMSNorm(nn.Module):
  eps: float
  param_dtype: Any

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (y * scale.astype(jnp.float32)).astype(x.dtype)


def rope_inv_freq(config: ModelConfig) -> np.ndarray | None:
  """[head_dim / 2] float32 RoPE inverse frequencies for a scaled RoPE, None for plain RoPE.

  llama3 (as Hugging Face's `_compute_llama3_parameters`): wavelengths longer than
  `original_max_len / low_freq_factor` are divided by `factor`, those shorter than
  `original_max_len / high_freq_factor` are kept, and the band between is interpolated.
  """
  if config.rope_type == "default":
    return None
  d = config.head_dim
  inv = 1.0 / (config.rope_theta ** (np.arange(0, d, 2, dtype=np.float32) / d))
  factor, lo, hi = config.rope_factor, config.rope_low_freq_factor, config.rope_high_freq_factor
  old = float(config.rope_original_max_len)
  wavelen = 2 * np.pi / inv
  scaled = np.where(wavelen > old / lo, inv / factor, inv)
  smooth = (old / wavelen - lo) / (hi - lo)
  smoothed = (1 - smooth) * scaled / factor + smooth * scaled
  medium = ~(wavelen < old / hi) & ~(wavelen > old / lo)
  return np.where(medium, smoothed, scaled).astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, theta: float,
               inv_freq: np.ndarray | None = None) -> jax.Array:
  """Rotary embedding, HF rotate-half layout. x: [B, S, H, D]; positions: [B, S] int.

  `inv_freq` [D/2] overrides the frequencies `theta ** (-2i / D)` (scaled RoPE, see
  `rope_inv_freq`)."""
  d = x.shape[-1]
  if inv_freq is None:
    inv_freq = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))  # [D/2]
  else:
    inv_freq = jnp.asarray(inv_freq, jnp.float32)
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, S, D/2]
  cos = jnp.concatenate([jnp.cos(angles)] * 2, axis=-1)[:, :, None, :]
  sin = jnp.concatenate([jnp.sin(angles)] * 2, axis=-1)[:, :, None, :]
  x32 = x.astype(jnp.float32)
  x1, x2 = x32[..., : d // 2], x32[..., d // 2:]
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  return (x32 * cos + rotated * sin).astype(x.dtype)


def _write_cache(cache: jax.Array, new: jax.Array, positions: jax.Array,
                 transposed: bool = False) -> jax.Array:
  """Write new [B, KV, S, D] into cache [B, KV, S_max, D] (`transposed`: [B, KV, D, S_max], the
  keys' layout) at positions [B, S] (>= S_max: skip)."""
  b, s = positions.shape
  rows = jnp.broadcast_to(jnp.arange(b)[:, None], (b, s))
  new = new.astype(cache.dtype).transpose(0, 2, 1, 3)  # [B, S, KV, D]: the indexed axes first
  if transposed:
    return cache.at[rows, :, :, positions].set(new, mode="drop")
  return cache.at[rows, :, positions].set(new, mode="drop")


def _scores(q, k, scale, k_transposed: bool = False):
  """q [B, KV, G, S, D], k [B, KV, Sk, D] (`k_transposed`: [B, KV, D, Sk]) -> f32 scores
  [B, KV, G, S, Sk]."""
  spec = "bkgsd,bkdt->bkgst" if k_transposed else "bkgsd,bktd->bkgst"
  return jnp.einsum(spec, q, k, preferred_element_type=jnp.float32) / scale


def dense_attention(q, k, v, mask, dtype, k_transposed: bool = False):
  """Masked softmax attention. q [B, KV, G, S, D]; k, v [B, KV, Sk, D] (`k_transposed`: k is
  [B, KV, D, Sk]); mask broadcastable to [B, KV, G, S, Sk] bool. Returns [B, KV, G, S, D] in
  `dtype`."""
  scores = _scores(q, k, np.sqrt(q.shape[-1]).astype(np.float32), k_transposed)
  scores = jnp.where(mask, scores, _NEG_INF)
  probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
  return jnp.einsum("bkgst,bktd->bkgsd", probs, v)


def _online_softmax_step(carry, q, k_blk, v_blk, mask_blk, dtype, k_transposed: bool = False):
  """Fold one key block into the running (max m, normaliser l, accumulator acc) of an online
  softmax. q [B, KV, G, S, D]; k_blk, v_blk [B, KV, C, D] (`k_transposed`: k_blk [B, KV, D, C]);
  mask_blk [B, 1, 1, S, C]."""
  m, l, acc = carry
  s = _scores(q, k_blk, np.sqrt(q.shape[-1]).astype(np.float32), k_transposed)
  s = jnp.where(mask_blk, s, _NEG_INF)
  # The max only keeps exp() in range; the result does not depend on it.
  m_new = jax.lax.stop_gradient(jnp.maximum(m, jnp.max(s, axis=-1)))
  p = jnp.exp(s - m_new[..., None])
  corr = jnp.exp(m - m_new)
  l = l * corr + jnp.sum(p, axis=-1)
  acc = acc * corr[..., None] + jnp.einsum("bkgst,bktd->bkgsd", p.astype(dtype), v_blk,
                                           preferred_element_type=jnp.float32)
  return m_new, l, acc


def _online_init(q):
  shape = q.shape[:-1]
  return (jnp.full(shape, -jnp.inf, jnp.float32), jnp.zeros(shape, jnp.float32),
          jnp.zeros(q.shape, jnp.float32))


def blockwise_attention(q, k, v, q_pos, k_pos, k_valid, block: int, dtype):
  """Attention over key blocks with an online softmax (full forward, differentiable).

  q [B, KV, G, S, D]; k, v [B, KV, Sk, D]; q_pos [B, S], k_pos [B, Sk] int positions; k_valid
  [B, Sk] bool. Key j is visible to query i iff `k_pos[j] <= q_pos[i]` and `k_valid[j]`. The
  scan body is rematerialised, so neither pass holds more than one `[B, KV, G, S, block]` block
  of scores. Same values as `dense_attention` up to float summation order for every query that
  sees at least one key. Returns [B, KV, G, S, D] in `dtype`.
  """
  b, kv, sk, d = k.shape
  n = -(-sk // block)
  pad = n * block - sk
  if pad:
    k = jnp.pad(k, ((0, 0), (0, 0), (0, pad), (0, 0)))
    v = jnp.pad(v, ((0, 0), (0, 0), (0, pad), (0, 0)))
    k_pos = jnp.pad(k_pos, ((0, 0), (0, pad)))
    k_valid = jnp.pad(k_valid, ((0, 0), (0, pad)))
  blocks = (k.reshape(b, kv, n, block, d).transpose(2, 0, 1, 3, 4),
            v.reshape(b, kv, n, block, d).transpose(2, 0, 1, 3, 4),
            k_pos.reshape(b, n, block).transpose(1, 0, 2),
            k_valid.reshape(b, n, block).transpose(1, 0, 2))

  @jax.checkpoint
  def step(carry, blk):
    k_blk, v_blk, kp, kvalid = blk
    mask = ((kp[:, None, :] <= q_pos[:, :, None]) & kvalid[:, None, :])[:, None, None]
    return _online_softmax_step(carry, q, k_blk, v_blk, mask, dtype), None

  (_, l, acc), _ = jax.lax.scan(step, _online_init(q), blocks)
  return (acc / l[..., None]).astype(dtype)


def cached_attention(q, k_cache, v_cache, q_pos, num_filled, block: int, dtype):
  """Attention of new tokens over a KV cache, costing the filled length (decode, prefill).

  q [B, KV, G, S, D]; k_cache [B, KV, D, S_max], v_cache [B, KV, S_max, D] (`KVCache`'s
  layouts, already holding the new tokens);
  q_pos [B, S] (a position >= S_max is a padding query: it sees the whole cache); num_filled
  [] int32: slots `>= num_filled` are empty for every row (the longest filled length). Slot j is
  visible to query i iff `j <= q_pos[i]`. A cache of at most `block` slots is attended densely;
  a longer one block by block, `ceil(num_filled / block)` blocks (a dynamic trip count inside
  one compiled loop) while that is at most half the cache, densely over the whole cache beyond
  (where one fused matmul is cheaper than the block loop). Not differentiable (the rollout
  does not need it).
  """
  s_max = v_cache.shape[2]
  if s_max <= block:
    slots = jnp.arange(s_max, dtype=jnp.int32)
    mask = (slots[None, None, :] <= q_pos[:, :, None])[:, None, None]
    return dense_attention(q, k_cache.astype(dtype), v_cache.astype(dtype), mask, dtype,
                           k_transposed=True)
  n_blocks = s_max // block + (s_max % block > 0)
  # Padding queries (q_pos >= S_max) would see every slot: clamp them to the filled part.
  q_vis = jnp.minimum(q_pos, num_filled - 1)

  # The block loop runs only while trips <= n_blocks / 2 (below), so its blocks lie inside the
  # cache even when `block` does not divide S_max (i + 1 <= n_blocks / 2 <= S_max // block):
  # no padding (padding the cache to a multiple of the block copied all of it on every step).
  def body(i, carry):
    start = i * block
    k_blk = jax.lax.dynamic_slice_in_dim(k_cache, start, block, axis=3).astype(dtype)
    v_blk = jax.lax.dynamic_slice_in_dim(v_cache, start, block, axis=2).astype(dtype)
    slots = start + jnp.arange(block, dtype=jnp.int32)
    mask = (slots[None, None, :] <= q_vis[:, :, None])[:, None, None]
    return _online_softmax_step(carry, q, k_blk, v_blk, mask, dtype, k_transposed=True)

  def blockwise(q, k_cache, v_cache):
    _, l, acc = jax.lax.fori_loop(0, trips, body, _online_init(q))
    return (acc / l[..., None]).astype(dtype)

  def dense(q, k_cache, v_cache):
    slots = jnp.arange(v_cache.shape[2], dtype=jnp.int32)
    mask = (slots[None, None, :] <= q_vis[:, :, None])[:, None, None]
    return dense_attention(q, k_cache.astype(dtype), v_cache.astype(dtype), mask, dtype,
                           k_transposed=True)

  # Past about half the cache, the dense form is cheaper than the block loop (one fused
  # matmul, no per-block slices): take whichever costs less (the cache is only read here).
  trips = jnp.clip((num_filled + block - 1) // block, 1, n_blocks)
  return jax.lax.cond(trips * 2 <= n_blocks, blockwise, dense, q, k_cache, v_cache)


class Block(nn.Module):
  """Pre-norm decoder block: x + Attn(RMSNorm(x)); x + SwiGLU(RMSNorm(x))."""

  config: ModelConfig

  @nn.compact
  def __call__(self, x, layer_cache, positions, key_mask, num_filled=None):
    """x: [B, S, d]; layer_cache: (k [B, KV, D, S_max], v [B, KV, S_max, D]) or None;
    positions: [B, S]; key_mask: [B, S] bool (full forward: which tokens may be attended to;
    unused with a cache);
    num_filled: [] int32, cache slots in use after this call (with a cache).
    Returns (x, new layer_cache)."""
    cfg = self.config
    dense = lambda n, name, bias=False: nn.Dense(n, use_bias=bias, dtype=cfg.jnp_dtype,
                                                 param_dtype=cfg.jnp_param_dtype, name=name)
    b, s, _ = x.shape
    h, kv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim

    # Sharding annotations (no-ops off a mesh, `partitioning.constrain`): rows on (data, fsdp),
    # heads and MLP columns on tensor; the residual stream is replicated along tensor.
    rows = lambda a, *rest: constrain(a, "batch", *rest)
    x = rows(x, None, None)
    y = RMSNorm(cfg.norm_eps, cfg.jnp_param_dtype, name="attn_norm")(x)
    q = rows(dense(h * hd, "q_proj", cfg.qkv_bias)(y).reshape(b, s, h, hd), None, "heads", None)
    k = rows(dense(kv * hd, "k_proj", cfg.qkv_bias)(y).reshape(b, s, kv, hd), None, "kv_heads",
             None)
    v = rows(dense(kv * hd, "v_proj", cfg.qkv_bias)(y).reshape(b, s, kv, hd), None, "kv_heads",
             None)
    if cfg.qk_norm:
      q = RMSNorm(cfg.norm_eps, cfg.jnp_param_dtype, name="q_norm")(q)
      k = RMSNorm(cfg.norm_eps, cfg.jnp_param_dtype, name="k_norm")(k)
    inv_freq = rope_inv_freq(cfg)
    q = apply_rope(q, positions, cfg.rope_theta, inv_freq)
    k = apply_rope(k, positions, cfg.rope_theta, inv_freq)

    k = k.transpose(0, 2, 1, 3)  # [B, KV, S, D]
    v = v.transpose(0, 2, 1, 3)
    q = q.reshape(b, s, kv, h // kv, hd).transpose(0, 2, 3, 1, 4)  # [B, KV, G, S, D]
    if layer_cache is not None:
      k_cache, v_cache = layer_cache
      k_cache = _write_cache(k_cache, k, positions, transposed=True)
      v_cache = _write_cache(v_cache, v, positions)
      layer_cache = (k_cache, v_cache)
      attn = cached_attention(q, k_cache, v_cache, positions, num_filled, cfg.decode_block,
                              cfg.jnp_dtype)
    elif cfg.attention == "dense" or s <= cfg.attn_block:
      mask = (positions[:, None, :] <= positions[:, :, None]) & key_mask[:, None, :]
      attn = dense_attention(q, k, v, mask[:, None, None], cfg.jnp_dtype)
    else:
      attn = blockwise_attention(q, k, v, positions, positions, key_mask, cfg.attn_block,
                                 cfg.jnp_dtype)
    attn = attn.transpose(0, 3, 1, 2, 4).reshape(b, s, h * hd)
    x = x + dense(cfg.d_model, "o_proj")(attn)

    y = RMSNorm(cfg.norm_eps, cfg.jnp_param_dtype, name="mlp_norm")(x)
    gate = rows(dense(cfg.mlp_dim, "gate_proj")(y), None, "mlp")
    up = rows(dense(cfg.mlp_dim, "up_proj")(y), None, "mlp")
    x = rows(x + dense(cfg.d_model, "down_proj")(nn.silu(gate) * up), None, None)
    return x, layer_cache


class _ScanBlock(nn.Module):
  """One block as an `nn.scan` body: carry x, layer-invariant positions and key mask."""

  config: ModelConfig

  @nn.compact
  def __call__(self, x, positions, key_mask):
    block = Block
    policy = REMAT_POLICIES[self.config.remat]
    if policy is not None:
      block = nn.remat(Block, policy=policy, prevent_cse=False)
    x, _ = block(self.config, name="block")(x, None, positions, key_mask)
    return x, None


def lm_logits(config: ModelConfig, params, hidden: jax.Array) -> jax.Array:
  """The LM head: final hidden states [..., d] -> logits [..., V] float32.

  Exactly the computation of the full forward's head (tied: the transposed embedding, as
  `nn.Embed.attend`; untied: `lm_head`, as `nn.Dense`), so applying it to `return_hidden`
  states gives the same logits."""
  if config.tie_embeddings:
    weight = params["embed"]["embedding"]
    h, weight = nn.dtypes.promote_dtype(hidden, weight, dtype=config.jnp_dtype)
    return jnp.dot(h, weight.T).astype(jnp.float32)
  kernel = params["lm_head"]["kernel"]
  h, kernel = nn.dtypes.promote_dtype(hidden, kernel, dtype=config.jnp_dtype)
  return jax.lax.dot_general(h, kernel, (((h.ndim - 1,), (0,)), ((), ()))).astype(jnp.float32)


class Transformer(nn.Module):
  """Decoder-only LM with an optional value head. See the module docstring.

  `unrolled=True` is the round-1 layout (`layers_0`, `layers_1`, ...), used only to draw the
  initial values (`init_params` then stacks them)."""

  config: ModelConfig
  unrolled: bool = False

  @nn.compact
  def __call__(self, tokens, positions=None, *, key_mask=None, cache: KVCache | None = None,
               return_logits: bool = True, return_hidden: bool = False):
    """Forward pass.

    Args:
      tokens: [B, S] int32.
      positions: [B, S] int32 position of each token; default `arange(S)` per row.
      key_mask: [B, S] bool, tokens that may be attended to (full forward only; default all).
      cache: `KVCache` (per-layer k [B, KV, D, S_max], v [B, KV, S_max, D]) for incremental
        decoding.
      return_logits: compute the LM head (False for a value-only critic).
      return_hidden: return the final (normed) hidden states [B, S, d] instead of logits (the
        head is then `lm_logits`).

    Returns:
      (logits [B, S, V] float32, or hidden [B, S, d] with `return_hidden`, or None;
       values [B, S] float32 or None; cache or None).
    """
    cfg = self.config
    b, s = tokens.shape
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    positions = positions.astype(jnp.int32)
    if cache is not None and key_mask is not None:
      raise ValueError("key_mask is for the full forward; with a cache, pass positions >= "
                       "cache length for tokens that must not be written")
    if key_mask is None:
      key_mask = jnp.ones((b, s), bool)

    embed = nn.Embed(cfg.vocab_size, cfg.d_model, dtype=cfg.jnp_dtype,
                     param_dtype=cfg.jnp_param_dtype,
                     embedding_init=nn.initializers.normal(stddev=0.02), name="embed")
    # `embed(tokens)`, written out so that on a mesh the table is gathered over fsdp before the
    # lookup (an FSDP weight gather) and the rows come out split like the tokens.
    (table,) = embed.promote_dtype(constrain(embed.embedding, "vocab", None), dtype=embed.dtype,
                                   inexact=False)
    x = constrain(jnp.take(table, tokens, axis=0), "batch", None, None)

    new_cache = None
    if self.unrolled:
      for i in range(cfg.num_layers):
        x, _ = Block(cfg, name=f"layers_{i}")(x, None, positions, key_mask)
    elif cache is None:
      layers = nn.scan(_ScanBlock, variable_axes={"params": 0}, split_rngs={"params": True},
                       in_axes=(nn.broadcast, nn.broadcast), length=cfg.num_layers,
                       unroll=cfg.layer_unroll)
      x, _ = layers(cfg, name="layers")(x, positions, key_mask)
    else:
      stacked = self.variables["params"]["layers"]["block"]
      in_range = positions < cache.max_len
      num_filled = jnp.max(jnp.where(in_range, positions + 1, 0))
      new_k, new_v = [], []
      for i in range(cfg.num_layers):
        layer = jax.tree.map(lambda a, i=i: a[i], stacked)
        x, (k_i, v_i) = Block(cfg, parent=None).apply({"params": layer}, x, (cache.k[i], cache.v[i]),
                                         positions, key_mask, num_filled)
        new_k.append(k_i)
        new_v.append(v_i)
      new_cache = KVCache(k=tuple(new_k), v=tuple(new_v))
    x = RMSNorm(cfg.norm_eps, cfg.jnp_param_dtype, name="final_norm")(x)

    out = None
    if return_hidden:
      out = x
    elif return_logits:
      if cfg.tie_embeddings:
        out = embed.attend(x)
      else:
        out = nn.Dense(cfg.vocab_size, use_bias=False, dtype=cfg.jnp_dtype,
                       param_dtype=cfg.jnp_param_dtype, name="lm_head")(x)
      out = out.astype(jnp.float32)
    values = None
    if cfg.value_head:
      values = nn.Dense(1, dtype=jnp.float32, param_dtype=cfg.jnp_param_dtype,
                        kernel_init=nn.initializers.zeros, name="value_head")(x)[..., 0]
    return out, values, new_cache


def stack_layers(params, num_layers: int):
  """Round-1 unrolled params (`layers_0` ... `layers_{L-1}`) -> the stacked layout
  (`layers/block/<name>` with a leading [L] axis). Other entries are kept."""
  out = {k: v for k, v in params.items() if not k.startswith("layers_")}
  per_layer = [params[f"layers_{i}"] for i in range(num_layers)]
  out["layers"] = {"block": jax.tree.map(lambda *xs: jnp.stack(xs), *per_layer)}
  return out


def unstack_layers(params, num_layers: int):
  """The inverse of `stack_layers` (e.g. to read a round-1 style per-layer view)."""
  out = {k: v for k, v in params.items() if k != "layers"}
  for i in range(num_layers):
    out[f"layers_{i}"] = jax.tree.map(lambda a, i=i: a[i], params["layers"]["block"])
  return out


def init_params(config: ModelConfig, key: jax.Array, *, lm_head: bool = True):
  """Initialise a `Transformer`'s params pytree (`{'embed': ..., 'layers': ..., ...}`).

  Jitted: eager Linen init dispatches op by op and is several times slower on CPU. The values
  are drawn per layer under the round-1 names and stacked (module docstring).
  """
  return _init_params(config, key, lm_head)


@functools.partial(jax.jit, static_argnums=(0, 2))
def _init_params(config: ModelConfig, key: jax.Array, lm_head: bool):
  tokens = jnp.zeros((1, 1), jnp.int32)
  params = Transformer(config, unrolled=True).init(key, tokens, return_logits=lm_head)["params"]
  return stack_layers(params, config.num_layers)


def apply(config: ModelConfig, params, tokens, positions=None, *, key_mask=None, cache=None,
          return_logits: bool = True, return_hidden: bool = False):
  """Pure function view of `Transformer.__call__` (see its docstring for shapes)."""
  return Transformer(config).apply({"params": params}, tokens, positions, key_mask=key_mask,
                                   cache=cache, return_logits=return_logits,
                                   return_hidden=return_hidden)


def count_params(params) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


# --- actor-critic ---------------------------------------------------------------------------
# The policy params always live under 'policy'. With a shared critic the policy's value head
# gives the values; with a separate critic a second network of the same architecture (value
# head, no LM head) lives under 'critic'.

def init_actor_critic(config: ModelConfig, key: jax.Array, *, separate_critic: bool = False):
  """Params `{'policy': ..., ['critic': ...]}` for a shared or separate critic."""
  k_policy, k_critic = jax.random.split(key)
  policy_cfg = dataclasses.replace(config, value_head=not separate_critic)
  params = {"policy": init_params(policy_cfg, k_policy)}
  if separate_critic:
    critic_cfg = dataclasses.replace(config, value_head=True)
    params["critic"] = init_params(critic_cfg, k_critic, lm_head=False)
  return params


def apply_actor_critic(config: ModelConfig, params, tokens, positions=None, *, key_mask=None,
                       return_hidden: bool = False):
  """Full forward of policy and critic: (logits [B, S, V] f32, or the policy's final hidden
  states [B, S, d] with `return_hidden`; values [B, S] f32)."""
  separate = "critic" in params
  policy_cfg = dataclasses.replace(config, value_head=not separate)
  logits, values, _ = apply(policy_cfg, params["policy"], tokens, positions, key_mask=key_mask,
                            return_hidden=return_hidden)
  if separate:
    critic_cfg = dataclasses.replace(config, value_head=True)
    _, values, _ = apply(critic_cfg, params["critic"], tokens, positions, key_mask=key_mask,
                         return_logits=False)
  return logits, values
