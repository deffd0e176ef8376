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
graph traversal per call. Layers are unrolled (`layers_0`, `layers_1`, ...), each with its own
cache arrays, so the rollout's while loop updates every layer's cache in place; `nn.scan` over
stacked layers keeps compile time flat in depth but made XLA copy the stacked cache on every
decode step (10x slower decode on CPU). Compile time therefore grows with depth.

Decode attention cost: each decode call attends over the whole static cache `[B, S_max]` with
a mask (O(S_max) per token and layer), not only the filled part. With static shapes the
alternative is a loop over key blocks up to the filled length with an online softmax; on the
CPU sizes used here (S_max <= 512, a few heads) the dense masked form is faster, because it is
one fused matmul. `experiments/benchmark.py rollout` measures how time per token grows with
the filled length; revisit for long contexts on accelerators.
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

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
_NEG_INF = -1e9  # finite: a query with no visible key gets a uniform (not NaN) softmax
ROPE_TYPES = ("default", "llama3")


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
    remat: rematerialise each block in the backward pass (saves memory on long contexts).
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
  remat: bool = False

  def __post_init__(self):
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


def model_config(preset: str, vocab_size: int, **overrides) -> ModelConfig:
  """`ModelConfig` from a named preset, with field overrides (unknown fields are errors)."""
  if preset not in PRESETS:
    raise ValueError(f"unknown model preset {preset!r}; known presets: {sorted(PRESETS)}")
  fields = {f.name for f in dataclasses.fields(ModelConfig)}
  unknown = sorted(set(overrides) - fields)
  if unknown:
    raise ValueError(f"unknown ModelConfig fields {unknown}; valid fields: {sorted(fields)}")
  return ModelConfig(vocab_size=vocab_size, **{**PRESETS[preset], **overrides})


@flax.struct.dataclass
class KVCache:
  """Keys and values, one array per layer: k[l], v[l]: [B, num_kv_heads, S_max, head_dim].

  Per-layer arrays (not one stacked [L, ...] array) so that XLA updates each layer's cache in
  place inside the rollout's while loop; slicing a stacked cache per layer copied it on every
  decode step (measured 10x slower one-token decode on CPU). Head-major (`[KV, S_max, D]` per
  row) so that one-token attention is a batched matmul over contiguous keys.
  """

  k: tuple[jax.Array, ...]
  v: tuple[jax.Array, ...]

  @property
  def max_len(self) -> int:
    return self.k[0].shape[2]


def init_cache(config: ModelConfig, batch_size: int, max_len: int, dtype=None) -> KVCache:
  """An empty cache for `batch_size` rows of up to `max_len` tokens (compute dtype by default)."""
  shape = (batch_size, config.num_kv_heads, max_len, config.head_dim)
  dtype = config.jnp_dtype if dtype is None else dtype
  zeros = tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers))
  return KVCache(k=zeros, v=tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers)))


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


def _write_cache(cache: jax.Array, new: jax.Array, positions: jax.Array) -> jax.Array:
  """Write new [B, KV, S, D] into cache [B, KV, S_max, D] at positions [B, S] (>= S_max: skip)."""
  b, s = positions.shape
  rows = jnp.broadcast_to(jnp.arange(b)[:, None], (b, s))
  return cache.at[rows, :, positions].set(new.astype(cache.dtype).transpose(0, 2, 1, 3),
                                          mode="drop")


class Block(nn.Module):
  """Pre-norm decoder block: x + Attn(RMSNorm(x)); x + SwiGLU(RMSNorm(x))."""

  config: ModelConfig

  @nn.compact
  def __call__(self, x, layer_cache, positions, mask):
    """x: [B, S, d]; layer_cache: (k, v) each [B, KV, S_max, D] or None; positions: [B, S];
    mask: [B, 1, 1, S, S_keys] bool. Returns (x, new layer_cache)."""
    cfg = self.config
    dense = lambda n, name, bias=False: nn.Dense(n, use_bias=bias, dtype=cfg.jnp_dtype,
                                                 param_dtype=cfg.jnp_param_dtype, name=name)
    b, s, _ = x.shape
    h, kv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim

    y = RMSNorm(cfg.norm_eps, cfg.jnp_param_dtype, name="attn_norm")(x)
    q = dense(h * hd, "q_proj", cfg.qkv_bias)(y).reshape(b, s, h, hd)
    k = dense(kv * hd, "k_proj", cfg.qkv_bias)(y).reshape(b, s, kv, hd)
    v = dense(kv * hd, "v_proj", cfg.qkv_bias)(y).reshape(b, s, kv, hd)
    if cfg.qk_norm:
      q = RMSNorm(cfg.norm_eps, cfg.jnp_param_dtype, name="q_norm")(q)
      k = RMSNorm(cfg.norm_eps, cfg.jnp_param_dtype, name="k_norm")(k)
    inv_freq = rope_inv_freq(cfg)
    q = apply_rope(q, positions, cfg.rope_theta, inv_freq)
    k = apply_rope(k, positions, cfg.rope_theta, inv_freq)

    k = k.transpose(0, 2, 1, 3)  # [B, KV, S, D]
    v = v.transpose(0, 2, 1, 3)
    if layer_cache is not None:
      k_cache, v_cache = layer_cache
      k_cache = _write_cache(k_cache, k, positions)
      v_cache = _write_cache(v_cache, v, positions)
      layer_cache = (k_cache, v_cache)
      k, v = k_cache.astype(cfg.jnp_dtype), v_cache.astype(cfg.jnp_dtype)

    q = q.reshape(b, s, kv, h // kv, hd).transpose(0, 2, 3, 1, 4)  # [B, KV, G, S, D]
    scores = jnp.einsum("bkgsd,bktd->bkgst", q, k, preferred_element_type=jnp.float32)
    scores = scores / np.sqrt(hd).astype(np.float32)
    scores = jnp.where(mask, scores, _NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1).astype(cfg.jnp_dtype)
    attn = jnp.einsum("bkgst,bktd->bkgsd", probs, v)
    attn = attn.transpose(0, 3, 1, 2, 4).reshape(b, s, h * hd)
    x = x + dense(cfg.d_model, "o_proj")(attn)

    y = RMSNorm(cfg.norm_eps, cfg.jnp_param_dtype, name="mlp_norm")(x)
    gate = dense(cfg.mlp_dim, "gate_proj")(y)
    up = dense(cfg.mlp_dim, "up_proj")(y)
    x = x + dense(cfg.d_model, "down_proj")(nn.silu(gate) * up)
    return x, layer_cache


class Transformer(nn.Module):
  """Decoder-only LM with an optional value head. See the module docstring."""

  config: ModelConfig

  @nn.compact
  def __call__(self, tokens, positions=None, *, key_mask=None, cache: KVCache | None = None,
               return_logits: bool = True):
    """Forward pass.

    Args:
      tokens: [B, S] int32.
      positions: [B, S] int32 position of each token; default `arange(S)` per row.
      key_mask: [B, S] bool, tokens that may be attended to (full forward only; default all).
      cache: `KVCache` with k, v [L, B, KV, S_max, D] for incremental decoding.
      return_logits: compute the LM head (False for a value-only critic).

    Returns:
      (logits [B, S, V] float32 or None, values [B, S] float32 or None, cache or None).
    """
    cfg = self.config
    b, s = tokens.shape
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    positions = positions.astype(jnp.int32)

    if cache is None:
      if key_mask is None:
        key_mask = jnp.ones((b, s), bool)
      mask = (positions[:, None, :] <= positions[:, :, None]) & key_mask[:, None, :]
    else:
      if key_mask is not None:
        raise ValueError("key_mask is for the full forward; with a cache, pass positions >= "
                         "cache length for tokens that must not be written")
      slots = jnp.arange(cache.max_len, dtype=jnp.int32)
      mask = slots[None, None, :] <= positions[:, :, None]
    mask = mask[:, None, None, :, :]

    embed = nn.Embed(cfg.vocab_size, cfg.d_model, dtype=cfg.jnp_dtype,
                     param_dtype=cfg.jnp_param_dtype,
                     embedding_init=nn.initializers.normal(stddev=0.02), name="embed")
    x = embed(tokens)

    block = nn.remat(Block) if cfg.remat else Block
    new_k, new_v = [], []
    for i in range(cfg.num_layers):
      layer_cache = None if cache is None else (cache.k[i], cache.v[i])
      x, layer_cache = block(cfg, name=f"layers_{i}")(x, layer_cache, positions, mask)
      if layer_cache is not None:
        new_k.append(layer_cache[0])
        new_v.append(layer_cache[1])
    x = RMSNorm(cfg.norm_eps, cfg.jnp_param_dtype, name="final_norm")(x)

    logits = None
    if return_logits:
      if cfg.tie_embeddings:
        logits = embed.attend(x)
      else:
        logits = nn.Dense(cfg.vocab_size, use_bias=False, dtype=cfg.jnp_dtype,
                          param_dtype=cfg.jnp_param_dtype, name="lm_head")(x)
      logits = logits.astype(jnp.float32)
    values = None
    if cfg.value_head:
      values = nn.Dense(1, dtype=jnp.float32, param_dtype=cfg.jnp_param_dtype,
                        kernel_init=nn.initializers.zeros, name="value_head")(x)[..., 0]
    new_cache = None if cache is None else KVCache(k=tuple(new_k), v=tuple(new_v))
    return logits, values, new_cache


def init_params(config: ModelConfig, key: jax.Array, *, lm_head: bool = True):
  """Initialise a `Transformer`'s params pytree (`{'embed': ..., 'layers': ..., ...}`).

  Jitted: eager Linen init dispatches op by op and is several times slower on CPU.
  """
  return _init_params(config, key, lm_head)


@functools.partial(jax.jit, static_argnums=(0, 2))
def _init_params(config: ModelConfig, key: jax.Array, lm_head: bool):
  tokens = jnp.zeros((1, 1), jnp.int32)
  return Transformer(config).init(key, tokens, return_logits=lm_head)["params"]


def apply(config: ModelConfig, params, tokens, positions=None, *, key_mask=None, cache=None,
          return_logits: bool = True):
  """Pure function view of `Transformer.__call__` (see its docstring for shapes)."""
  return Transformer(config).apply({"params": params}, tokens, positions, key_mask=key_mask,
                                   cache=cache, return_logits=return_logits)


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


def apply_actor_critic(config: ModelConfig, params, tokens, positions=None, *, key_mask=None):
  """Full forward of policy and critic: (logits [B, S, V] f32, values [B, S] f32)."""
  separate = "critic" in params
  policy_cfg = dataclasses.replace(config, value_head=not separate)
  logits, values, _ = apply(policy_cfg, params["policy"], tokens, positions, key_mask=key_mask)
  if separate:
    critic_cfg = dataclasses.replace(config, value_head=True)
    _, values, _ = apply(critic_cfg, params["critic"], tokens, positions, key_mask=key_mask,
                         return_logits=False)
  return logits, values
