"""Hugging Face checkpoints: load and save Qwen2 / Qwen2.5, Qwen3 and Llama 3 decoders.

    model_config, params = load_hf_checkpoint("/ckpt/Qwen2.5-0.5B-Instruct", dtype="bfloat16")
    logits, _, _ = transformer.apply(model_config, params, tokens)
    save_hf_checkpoint("/out/policy", model_config, params, hf_config=load_hf_config(src),
                       tokenizer_from=src)            # transformers / vLLM can serve /out/policy

Training from a checkpoint: `config.model.checkpoint` (see `configs/hf_calculator_grpo.py`)
makes `Trainer.init` start from its weights (`actor_critic_from_checkpoint`), and
`experiments.export.export_trained_policy` writes a run's policy back as a checkpoint directory
(with `save_hf_checkpoint`). docs/HF.md is the user guide.

A checkpoint directory is what `save_pretrained` writes: `config.json` plus `model.safetensors`,
or shards listed in `model.safetensors.index.json`. Only local files are read; nothing here
touches the network.

Supported families (`config.json` `model_type` / `architectures`):

* `qwen2` (`Qwen2ForCausalLM`, Qwen2 and Qwen2.5): q/k/v bias.
* `qwen3` (`Qwen3ForCausalLM`): per-head q/k RMSNorm, explicit `head_dim`.
* `llama` (`LlamaForCausalLM`, Llama 3 / 3.1 / 3.2): optional `llama3` RoPE scaling
  (`rope_scaling` in transformers 4 files, `rope_parameters` in transformers 5 files).
Tied and untied embeddings. Anything else - another `model_type`, sliding-window attention,
another RoPE scaling, biases on o_proj or the MLP, an activation other than SiLU, quantized
weights - raises `UnsupportedCheckpointError` naming the setting. Missing or unexpected tensors
and shape mismatches raise `CheckpointMismatchError` naming the tensors.

Name mapping (HF `[out, in]` Linear weights are transposed to Flax `[in, out]` kernels; the
blocks' params are stacked, `L/` below is row i of a leading `[num_layers]` axis under
`layers/block/`, see `mtrl_jax.models.transformer`):

    model.embed_tokens.weight                       embed/embedding
    model.layers.{i}.input_layernorm.weight         L/attn_norm/scale
    model.layers.{i}.self_attn.{q,k,v}_proj.weight  L/{q,k,v}_proj/kernel   (T)
    model.layers.{i}.self_attn.{q,k,v}_proj.bias    L/{q,k,v}_proj/bias     (qwen2)
    model.layers.{i}.self_attn.{q,k}_norm.weight    L/{q,k}_norm/scale      (qwen3)
    model.layers.{i}.self_attn.o_proj.weight        L/o_proj/kernel         (T)
    model.layers.{i}.post_attention_layernorm.weight L/mlp_norm/scale
    model.layers.{i}.mlp.{gate,up,down}_proj.weight L/{gate,up,down}_proj/kernel (T)
    model.norm.weight                               final_norm/scale
    lm_head.weight                                  lm_head/kernel          (T, untied)

The loaded params are the *policy* (no value head: `model_config.value_head` is False);
`with_value_head` adds a zero-initialised one. Saving drops a value head.

Memory: loading streams. Each tensor is read on its own (the safetensors file is opened, the
one tensor copied out, the file closed, so no mapping of the whole file stays resident),
transposed, cast to `dtype` and written into its place; a stacked layer param (all layers'
copies of one weight) goes to the device once its last layer is read, before the next param is
started. Peak host memory is the loaded params (on a CPU backend they *are* host memory) plus
one stacked param (e.g. every layer's `gate_proj`) or about two copies of the embedding. Measured for a Qwen2.5-0.5B-sized checkpoint in docs/HF.md.

Dependencies: `safetensors` (and `tokenizers` for `mtrl_jax.models.chat`) are the `hf` extra,
imported lazily (`mtrl_jax.optional.require`): `import mtrl_jax` never needs them.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import shutil
from typing import Any, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from mtrl_jax.models import transformer as tf
from mtrl_jax.optional import require

SUPPORTED_MODEL_TYPES = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                         "llama": "LlamaForCausalLM"}
CONFIG_NAME = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "chat_template.json", "generation_config.json",
                   "vocab.json", "merges.txt")
_IGNORED = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")


class UnsupportedCheckpointError(ValueError):
  """A checkpoint whose architecture (or a setting of it) this decoder does not implement."""


class CheckpointMismatchError(ValueError):
  """A checkpoint whose tensors do not match its config: missing, unexpected or misshapen."""


# --- config ---------------------------------------------------------------------------------

def load_hf_config(path: str | os.PathLike) -> dict[str, Any]:
  """The `config.json` of checkpoint directory `path` as a dict (FileNotFoundError naming it)."""
  file = os.path.join(os.fspath(path), CONFIG_NAME)
  if not os.path.isfile(file):
    raise FileNotFoundError(f"{file} does not exist: {path!r} is not a Hugging Face checkpoint "
                            "directory (config.json + *.safetensors)")
  with open(file, encoding="utf-8") as f:
    return json.load(f)


def _rope(hf: Mapping[str, Any]) -> dict[str, Any]:
  """ModelConfig RoPE fields from either the transformers-4 or -5 spelling."""
  params = hf.get("rope_parameters") or {}
  scaling = hf.get("rope_scaling") or {}
  theta = hf.get("rope_theta", params.get("rope_theta", 10000.0))
  spec = {**params, **scaling}
  kind = spec.get("rope_type", spec.get("type", "default")) or "default"
  out = dict(rope_theta=float(theta))
  if kind == "default":
    return out
  if kind != "llama3":
    raise UnsupportedCheckpointError(
        f"RoPE scaling rope_type={kind!r} is not supported (supported: default, llama3)")
  need = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
  missing = [k for k in need if k not in spec]
  if missing:
    raise UnsupportedCheckpointError(f"llama3 RoPE scaling lacks {missing}")
  return dict(out, rope_type="llama3", rope_factor=float(spec["factor"]),
              rope_low_freq_factor=float(spec["low_freq_factor"]),
              rope_high_freq_factor=float(spec["high_freq_factor"]),
              rope_original_max_len=int(spec["original_max_position_embeddings"]))


def model_config_from_hf(hf: Mapping[str, Any], *, dtype: str = "float32",
                         compute_dtype: str | None = None, **overrides) -> tf.ModelConfig:
  """`ModelConfig` (no value head) of a HF `config.json` dict; errors name what is unsupported.

  dtype: param dtype; compute_dtype: matmul dtype (default: `dtype`); overrides: any other
  ModelConfig field (e.g. `remat=True`, `value_head=True`).
  """
  model_type = hf.get("model_type")
  if model_type not in SUPPORTED_MODEL_TYPES:
    raise UnsupportedCheckpointError(
        f"model_type={model_type!r} (architectures={hf.get('architectures')}) is not "
        f"supported; supported model types: {sorted(SUPPORTED_MODEL_TYPES)}")
  archs = hf.get("architectures") or [SUPPORTED_MODEL_TYPES[model_type]]
  if any(a != SUPPORTED_MODEL_TYPES[model_type] for a in archs):
    raise UnsupportedCheckpointError(
        f"architectures={archs} is not supported for model_type={model_type!r}; expected "
        f"[{SUPPORTED_MODEL_TYPES[model_type]!r}]")
  act = hf.get("hidden_act", "silu")
  if act != "silu":
    raise UnsupportedCheckpointError(f"hidden_act={act!r} is not supported (only silu)")
  if hf.get("quantization_config"):
    raise UnsupportedCheckpointError("quantized checkpoints (quantization_config) are not "
                                     "supported; use a float16/bfloat16/float32 checkpoint")
  if hf.get("use_sliding_window"):
    raise UnsupportedCheckpointError("use_sliding_window=True (sliding-window attention) is "
                                     "not supported")
  layer_types = hf.get("layer_types") or []
  if any(t != "full_attention" for t in layer_types):
    raise UnsupportedCheckpointError(f"layer_types {sorted(set(layer_types))} are not "
                                     "supported (only full_attention)")
  if model_type in ("llama", "qwen3") and hf.get("attention_bias"):
    raise UnsupportedCheckpointError(f"attention_bias=True for {model_type} (bias on o_proj) "
                                     "is not supported")
  if hf.get("mlp_bias"):
    raise UnsupportedCheckpointError("mlp_bias=True is not supported")
  for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
              "vocab_size"):
    if key not in hf:
      raise UnsupportedCheckpointError(f"config.json lacks {key!r}")
  heads = int(hf["num_attention_heads"])
  fields = dict(
      vocab_size=int(hf["vocab_size"]), d_model=int(hf["hidden_size"]),
      num_layers=int(hf["num_hidden_layers"]), num_heads=heads,
      num_kv_heads=int(hf.get("num_key_value_heads") or heads),
      head_dim=int(hf["head_dim"]) if hf.get("head_dim") else None,
      mlp_dim=int(hf["intermediate_size"]), norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
      qkv_bias=model_type == "qwen2", qk_norm=model_type == "qwen3",
      tie_embeddings=bool(hf.get("tie_word_embeddings", False)), value_head=False,
      param_dtype=dtype, dtype=compute_dtype or dtype, **_rope(hf))
  unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(tf.ModelConfig)})
  if unknown:
    raise ValueError(f"unknown ModelConfig fields {unknown}")
  return tf.ModelConfig(**{**fields, **overrides})


def hf_config_from_model(config: tf.ModelConfig, model_type: str | None = None,
                         base: Mapping[str, Any] | None = None,
                         dtype: str | None = None) -> dict[str, Any]:
  """The `config.json` dict for `config`, written in the transformers-4 spelling (which
  transformers 5 also reads). `model_type` defaults to qwen3 with q/k norm, qwen2 with q/k/v
  bias, llama otherwise; `base` (e.g. the source checkpoint's config) keeps its other keys
  (token ids, max_position_embeddings, ...)."""
  if model_type is None:
    model_type = "qwen3" if config.qk_norm else "qwen2" if config.qkv_bias else "llama"
  if model_type not in SUPPORTED_MODEL_TYPES:
    raise UnsupportedCheckpointError(f"model_type={model_type!r}; supported: "
                                     f"{sorted(SUPPORTED_MODEL_TYPES)}")
  if config.qkv_bias != (model_type == "qwen2") or config.qk_norm != (model_type == "qwen3"):
    raise UnsupportedCheckpointError(
        f"ModelConfig(qkv_bias={config.qkv_bias}, qk_norm={config.qk_norm}) cannot be saved as "
        f"model_type={model_type!r} (qwen2 has q/k/v bias, qwen3 q/k norm, llama neither)")
  if config.rope_type != "default" and model_type != "llama":
    raise UnsupportedCheckpointError(f"rope_type={config.rope_type!r} is only written for "
                                     "model_type='llama'")
  out = {k: v for k, v in dict(base or {}).items()
         if k not in ("rope_parameters", "rope_scaling", "torch_dtype", "dtype",
                      "transformers_version")}
  out.update(
      architectures=[SUPPORTED_MODEL_TYPES[model_type]], model_type=model_type,
      vocab_size=config.vocab_size, hidden_size=config.d_model,
      num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
      num_key_value_heads=config.num_kv_heads, head_dim=config.head_dim,
      intermediate_size=config.mlp_dim, rms_norm_eps=config.norm_eps,
      rope_theta=config.rope_theta, tie_word_embeddings=config.tie_embeddings,
      hidden_act="silu", torch_dtype=dtype or config.param_dtype,
      rope_scaling=None if config.rope_type == "default" else dict(
          rope_type="llama3", factor=config.rope_factor,
          low_freq_factor=config.rope_low_freq_factor,
          high_freq_factor=config.rope_high_freq_factor,
          original_max_position_embeddings=config.rope_original_max_len))
  out.setdefault("max_position_embeddings", 32768)
  if model_type in ("llama", "qwen3"):
    out["attention_bias"] = False
  if model_type == "llama":
    out["mlp_bias"] = False
  if model_type in ("qwen2", "qwen3"):
    out["use_sliding_window"] = False
  return out


# --- name mapping ---------------------------------------------------------------------------

def hf_names(config: tf.ModelConfig) -> dict[str, tuple[tuple[str, ...], bool, int | None]]:
  """HF tensor name -> (path in our params, transpose?, layer index or None) for every tensor
  `config` needs. A layer tensor is row `layer` of the stacked param at `path`."""
  names = {"model.embed_tokens.weight": (("embed", "embedding"), False, None),
           "model.norm.weight": (("final_norm", "scale"), False, None)}
  if not config.tie_embeddings:
    names["lm_head.weight"] = (("lm_head", "kernel"), True, None)
  ours = ("layers", "block")
  for i in range(config.num_layers):
    hf = f"model.layers.{i}."
    names[hf + "input_layernorm.weight"] = (ours + ("attn_norm", "scale"), False, i)
    names[hf + "post_attention_layernorm.weight"] = (ours + ("mlp_norm", "scale"), False, i)
    for p in ("q", "k", "v", "o"):
      names[hf + f"self_attn.{p}_proj.weight"] = (ours + (f"{p}_proj", "kernel"), True, i)
    if config.qkv_bias:
      for p in ("q", "k", "v"):
        names[hf + f"self_attn.{p}_proj.bias"] = (ours + (f"{p}_proj", "bias"), False, i)
    if config.qk_norm:
      for p in ("q", "k"):
        names[hf + f"self_attn.{p}_norm.weight"] = (ours + (f"{p}_norm", "scale"), False, i)
    for p in ("gate", "up", "down"):
      names[hf + f"mlp.{p}_proj.weight"] = (ours + (f"{p}_proj", "kernel"), True, i)
  return names


@functools.lru_cache(maxsize=16)
def param_shapes(config: tf.ModelConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
  """Path -> shape of every policy param (no value head), from `init_params` without running it."""
  cfg = dataclasses.replace(config, value_head=False)
  shapes = jax.eval_shape(lambda k: tf.init_params(cfg, k), jax.random.key(0))
  return {tuple(k.key for k in path): tuple(leaf.shape)
          for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]}


def _tensor_shape(shapes, target, layer) -> tuple[int, ...]:
  """The shape one HF tensor must have (in our orientation): a stacked param's row shape."""
  return shapes[target] if layer is None else shapes[target][1:]


def _set(tree: dict, path: tuple[str, ...], value) -> None:
  for p in path[:-1]:
    tree = tree.setdefault(p, {})
  tree[path[-1]] = value


def _get(tree: Mapping, path: tuple[str, ...]):
  for p in path:
    tree = tree[p]
  return tree


# --- loading --------------------------------------------------------------------------------

def checkpoint_files(path: str | os.PathLike) -> dict[str, str]:
  """Tensor name -> safetensors file (absolute) of the checkpoint at `path`."""
  path = os.fspath(path)
  index = os.path.join(path, INDEX_FILE)
  if os.path.isfile(index):
    with open(index, encoding="utf-8") as f:
      weight_map = json.load(f)["weight_map"]
    files = {n: os.path.join(path, fn) for n, fn in weight_map.items()}
    absent = sorted({f for f in files.values() if not os.path.isfile(f)})
    if absent:
      raise FileNotFoundError(f"{INDEX_FILE} lists shards that do not exist: {absent}")
    return files
  single = os.path.join(path, SINGLE_FILE)
  if os.path.isfile(single):
    safetensors = require("safetensors")
    with safetensors.safe_open(single, framework="numpy") as f:
      return {n: single for n in f.keys()}
  others = sorted(f for f in os.listdir(path) if f.endswith((".bin", ".pt", ".pth", ".gguf")))
  raise FileNotFoundError(f"no {SINGLE_FILE} or {INDEX_FILE} in {path!r}"
                          + (f" (found {others}: only safetensors are read)" if others else ""))


def iter_hf_tensors(path: str | os.PathLike, names=None) -> Iterator[tuple[str, np.ndarray]]:
  """(name, numpy array as stored) for each tensor of the checkpoint, one at a time.

  Each tensor is copied out of a freshly opened file, so at most one tensor's bytes are
  resident beyond what the caller keeps."""
  safetensors = require("safetensors")
  files = checkpoint_files(path)
  for name in (sorted(files) if names is None else names):
    with safetensors.safe_open(files[name], framework="numpy") as f:
      yield name, f.get_tensor(name)


def load_hf_checkpoint(path: str | os.PathLike, dtype: str | None = "float32", *,
                       compute_dtype: str | None = None, as_numpy: bool = False,
                       **overrides) -> tuple[tf.ModelConfig, dict[str, Any]]:
  """Load a local HF checkpoint directory into `(ModelConfig, policy params)`.

  Args:
    path: directory with `config.json` and `model.safetensors` (or sharded with
      `model.safetensors.index.json`).
    dtype: param dtype ("float32" | "bfloat16" | "float16"); None keeps the checkpoint's
      `torch_dtype` / `dtype`.
    compute_dtype: the model's matmul dtype (default: `dtype`).
    as_numpy: return numpy arrays (host memory) instead of device arrays.
    overrides: other ModelConfig fields (e.g. `remat=True`).

  Returns:
    (config with `value_head=False`, params `{'embed': ..., 'layers': ..., ...}` exactly as
    `transformer.init_params(config, key)` lays them out).

  Raises:
    UnsupportedCheckpointError naming an unsupported model type or setting;
    CheckpointMismatchError naming missing/unexpected tensors or a shape mismatch;
    FileNotFoundError for a directory without config.json or safetensors;
    ImportError telling how to install `safetensors` if it is missing.
  """
  hf = load_hf_config(path)
  if dtype is None:
    dtype = hf.get("torch_dtype") or hf.get("dtype") or "float32"
  config = model_config_from_hf(hf, dtype=dtype, compute_dtype=compute_dtype, **overrides)
  names = hf_names(config)
  shapes = param_shapes(config)
  files = checkpoint_files(path)
  missing = [n for n in names if n not in files]
  if missing:
    raise CheckpointMismatchError(
        f"checkpoint {os.fspath(path)!r} lacks {len(missing)} tensor(s) its config needs: "
        f"{missing[:10]}{' ...' if len(missing) > 10 else ''}")
  ignorable = {n for n in files if _IGNORED.fullmatch(n)}
  if config.tie_embeddings:
    ignorable.add("lm_head.weight")  # some exporters write the tied copy; it is the embedding
  unexpected = sorted(set(files) - set(names) - ignorable)
  if unexpected:
    raise CheckpointMismatchError(
        f"checkpoint {os.fspath(path)!r} has {len(unexpected)} tensor(s) that "
        f"{hf.get('model_type')} with this config does not use: {unexpected[:10]}"
        f"{' ...' if len(unexpected) > 10 else ''} (an unsupported architecture variant?)")

  np_dtype = np.dtype(config.jnp_param_dtype)
  params: dict[str, Any] = {}
  # Stream param by param (a stacked param's layers in order), so one stacked param at most is
  # resident on the host before it moves to the device.
  by_target: dict[tuple[str, ...], list[str]] = {}
  for name in sorted(names, key=lambda n: (names[n][0], names[n][2] or 0)):
    by_target.setdefault(names[name][0], []).append(name)
  for target, members in by_target.items():
    stacked = names[members[0]][2] is not None
    out = np.empty(shapes[target], np_dtype) if stacked else None
    for name, array in iter_hf_tensors(path, members):
      _, transpose, layer = names[name]
      want = _tensor_shape(shapes, target, layer)
      got = array.shape[::-1] if transpose else array.shape
      if tuple(got) != want:
        raise CheckpointMismatchError(
            f"tensor {name!r} has shape {list(array.shape)}; the config needs "
            f"{list(want[::-1] if transpose else want)}")
      if transpose:
        array = array.T
      if stacked:
        out[layer] = array
      else:
        out = np.ascontiguousarray(array, dtype=np_dtype)
      del array
    _set(params, target, out if as_numpy else jax.device_put(out))
    del out
  return config, params


def with_value_head(config: tf.ModelConfig, params) -> tuple[tf.ModelConfig, dict[str, Any]]:
  """(config with `value_head=True`, params plus a zero-initialised scalar value head), the
  same init as `transformer.init_params`."""
  head = {"kernel": jnp.zeros((config.d_model, 1), config.jnp_param_dtype),
          "bias": jnp.zeros((1,), config.jnp_param_dtype)}
  return dataclasses.replace(config, value_head=True), {**params, "value_head": head}


# --- saving ---------------------------------------------------------------------------------

def save_hf_checkpoint(path: str | os.PathLike, model_config: tf.ModelConfig, params, *,
                       model_type: str | None = None, dtype: str | None = None,
                       hf_config: Mapping[str, Any] | None = None,
                       tokenizer_from: str | os.PathLike | None = None,
                       max_shard_bytes: int = 5 * 2**30) -> None:
  """Write a checkpoint directory that transformers (and servers built on it) can load.

  Args:
    path: output directory (created; existing checkpoint files in it are overwritten).
    model_config, params: a policy (`{'embed': ...}`) or an actor-critic (`{'policy': ...}`);
      a value head and a critic are not part of a causal-LM checkpoint and are dropped.
    model_type: "qwen2" | "qwen3" | "llama" (default: inferred from q/k norm and q/k/v bias).
    dtype: dtype of the written tensors (default: the params' dtype).
    hf_config: the source checkpoint's config.json, to keep its other keys (token ids,
      max_position_embeddings, ...).
    tokenizer_from: a directory whose tokenizer files (tokenizer.json, tokenizer_config.json,
      chat template, generation_config.json, ...) are copied along.
    max_shard_bytes: above this the tensors are split into shards with an index file.
  """
  safetensors_np = require("safetensors.numpy")
  if "policy" in params:
    params = params["policy"]
  path = os.fspath(path)
  os.makedirs(path, exist_ok=True)
  names = hf_names(model_config)
  shapes = param_shapes(model_config)
  tensors: dict[str, np.ndarray] = {}
  host: dict[tuple[str, ...], np.ndarray] = {}
  for name, (target, transpose, layer) in names.items():
    if target not in host:
      try:
        array = _get(params, target)
      except (KeyError, TypeError):
        raise CheckpointMismatchError(f"params lack {'/'.join(target)} (for {name!r})") from None
      if tuple(array.shape) != shapes[target]:
        raise CheckpointMismatchError(f"params {'/'.join(target)} has shape "
                                      f"{list(array.shape)}; the config needs "
                                      f"{list(shapes[target])}")
      host[target] = np.asarray(jax.device_get(array))
    array = host[target] if layer is None else host[target][layer]
    if dtype is not None:
      array = array.astype(np.dtype(tf._DTYPES[dtype]))
    tensors[name] = np.ascontiguousarray(array.T if transpose else array)
  written_dtype = dtype or str(np.dtype(model_config.jnp_param_dtype))
  config = hf_config_from_model(model_config, model_type, hf_config, written_dtype)

  for old in os.listdir(path):  # stale shards of an earlier save would confuse loaders
    if re.fullmatch(r"model(-\d+-of-\d+)?\.safetensors(\.index\.json)?", old):
      os.remove(os.path.join(path, old))
  shards: list[dict[str, np.ndarray]] = [{}]
  size = 0
  for name in sorted(tensors):
    nbytes = tensors[name].nbytes
    if shards[-1] and size + nbytes > max_shard_bytes:
      shards.append({})
      size = 0
    shards[-1][name] = tensors[name]
    size += nbytes
  meta = {"format": "pt"}
  if len(shards) == 1:
    safetensors_np.save_file(shards[0], os.path.join(path, SINGLE_FILE), metadata=meta)
  else:
    weight_map = {}
    for i, shard in enumerate(shards):
      fn = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
      safetensors_np.save_file(shard, os.path.join(path, fn), metadata=meta)
      weight_map.update({n: fn for n in shard})
    with open(os.path.join(path, INDEX_FILE), "w", encoding="utf-8") as f:
      json.dump({"metadata": {"total_size": int(sum(t.nbytes for t in tensors.values()))},
                 "weight_map": dict(sorted(weight_map.items()))}, f, indent=2)
  with open(os.path.join(path, CONFIG_NAME), "w", encoding="utf-8") as f:
    json.dump(config, f, indent=2, sort_keys=True)
  if tokenizer_from is not None:
    for fn in TOKENIZER_FILES:
      src = os.path.join(os.fspath(tokenizer_from), fn)
      if os.path.isfile(src) and os.path.abspath(src) != os.path.abspath(os.path.join(path, fn)):
        shutil.copyfile(src, os.path.join(path, fn))


# --- a sanity-check decoder ------------------------------------------------------------------

@functools.partial(jax.jit, static_argnums=(0, 4))
def greedy_generate(config: tf.ModelConfig, params, tokens: jax.Array, lengths: jax.Array,
                    max_new_tokens: int) -> jax.Array:
  """Greedy continuation with the KV cache (e.g. to check a loaded checkpoint against
  `transformers`' `generate`).

  tokens: [B, P] int32 right-padded prompts; lengths: [B] int32 prompt lengths (>= 1).
  Returns [B, max_new_tokens] int32 argmax tokens (no stopping at end-of-sequence).
  """
  cfg = dataclasses.replace(config, value_head=False)
  B, P = tokens.shape
  T = P + max_new_tokens
  pos = jnp.where(jnp.arange(P) < lengths[:, None], jnp.arange(P), T)  # pads: write dropped
  cache = tf.init_cache(cfg, B, T)
  hidden, _, cache = tf.apply(cfg, params, tokens, pos, cache=cache, return_hidden=True)
  last = tf.lm_logits(cfg, params, hidden[jnp.arange(B), lengths - 1])
  first = jnp.argmax(last, -1).astype(jnp.int32)

  def step(carry, _):
    tok, p, cache = carry
    logits, _, cache = tf.apply(cfg, params, tok[:, None], p[:, None], cache=cache)
    nxt = jnp.argmax(logits[:, 0], -1).astype(jnp.int32)
    return (nxt, p + 1, cache), tok

  _, out = jax.lax.scan(step, (first, lengths.astype(jnp.int32), cache), None,
                        length=max_new_tokens)
  return out.T


# --- initial params for training -------------------------------------------------------------

def actor_critic_from_checkpoint(config: tf.ModelConfig, path: str | os.PathLike, *,
                                 separate_critic: bool = False) -> dict[str, Any]:
  """`transformer.init_actor_critic`'s params, with the weights of checkpoint `path`.

  Works inside `jax.jit` / `jax.vmap` (a trainer's `init`): the tensors come in through one
  `jax.pure_callback` that streams the checkpoint from disk when the computation runs, so they
  are never baked into the compiled program as constants. The policy (and a separate critic,
  which starts from the same weights without the LM head) get a zero-initialised value head
  where the config has one. `config` must describe the checkpoint (`model_config_from_hf`);
  its `param_dtype` is the dtype the tensors are cast to.
  """
  path = os.fspath(path)
  shapes = param_shapes(config)
  dtype = config.jnp_param_dtype
  struct: dict[str, Any] = {}
  for target, shape in shapes.items():
    _set(struct, target, jax.ShapeDtypeStruct(shape, dtype))

  def host():
    _, params = load_hf_checkpoint(path, dtype=config.param_dtype, as_numpy=True)
    return params

  weights = jax.pure_callback(host, struct)
  policy_cfg = dataclasses.replace(config, value_head=not separate_critic)
  policy = with_value_head(config, weights)[1] if policy_cfg.value_head else weights
  out = {"policy": policy}
  if separate_critic:
    critic = {k: v for k, v in weights.items() if k != "lm_head"}
    out["critic"] = with_value_head(config, critic)[1]
  return out
