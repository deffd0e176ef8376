"""Hugging Face checkpoints: parity with transformers, save/load round trips, clear errors.

Tiny random Qwen2, Qwen3 and Llama-3 models are built with transformers (CPU torch) in the
test and saved with `save_pretrained`; nothing is downloaded.
"""

import dataclasses
import json
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

if os.environ.get("MTRL_REQUIRE_HF_TESTS"):  # CI: a missing extra fails, never skips
  import jinja2, safetensors, tokenizers, torch, transformers  # noqa: F401,E401
torch = pytest.importorskip("torch", reason="torch is a test extra: pip install -e .[test]")
transformers = pytest.importorskip("transformers",
                                   reason="transformers is a test extra: pip install -e .[test]")
pytest.importorskip("safetensors", reason="needs the hf extra: pip install -e .[hf]")

from mtrl_jax.models import hf  # noqa: E402
from mtrl_jax.models import transformer as tf  # noqa: E402

VOCAB = 97
BASE = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
FAMILIES = {
    "qwen2_tied": lambda: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        **BASE, tie_word_embeddings=True, rope_theta=10000.0)),
    "qwen3_untied": lambda: transformers.Qwen3ForCausalLM(transformers.Qwen3Config(
        **BASE, head_dim=16, tie_word_embeddings=False, rms_norm_eps=1e-5)),
    "llama3_scaled_rope": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(
        **BASE, tie_word_embeddings=False, rope_theta=500000.0, rope_scaling=dict(
            rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
            original_max_position_embeddings=16))),
}


def torch_model(family, seed=0):
  """A tiny random model in eval mode, weights perturbed so no norm scale is exactly 1."""
  torch.manual_seed(seed)
  model = FAMILIES[family]().eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.05 * torch.randn_like(p))
  return model


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def saved(request, tmp_path_factory):
  model = torch_model(request.param)
  path = str(tmp_path_factory.mktemp(request.param))
  model.save_pretrained(path)
  return request.param, model, path


def padded_batch(seed=0, B=4, S=24):
  """Left-padded token batch: (ids [B, S], attention mask [B, S], positions [B, S])."""
  g = torch.Generator().manual_seed(seed)
  ids = torch.randint(0, VOCAB, (B, S), generator=g)
  mask = torch.ones(B, S, dtype=torch.long)
  for b, pad in enumerate((0, 5, 11, 17)[:B]):
    mask[b, :pad] = 0
  positions = (mask.cumsum(-1) - 1).clamp(min=0)
  return ids, mask, positions


def our_logits(cfg, params, ids, mask, positions):
  fn = jax.jit(lambda p, t, pos, m: tf.apply(cfg, p, t, pos, key_mask=m)[0])
  return np.asarray(fn(params, jnp.asarray(ids.numpy()), jnp.asarray(positions.numpy()),
                       jnp.asarray(mask.numpy().astype(bool))))


def test_logits_match_transformers_on_a_padded_batch(saved):
  family, model, path = saved
  cfg, params = hf.load_hf_checkpoint(path)
  assert cfg.value_head is False and "value_head" not in params
  assert cfg.qkv_bias == family.startswith("qwen2")
  assert cfg.qk_norm == family.startswith("qwen3")
  assert cfg.tie_embeddings == family.endswith("_tied")
  assert ("lm_head" in params) != cfg.tie_embeddings
  assert cfg.rope_type == ("llama3" if family.startswith("llama") else "default")
  ids, mask, positions = padded_batch()
  with torch.no_grad():
    want = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits.numpy()
  got = our_logits(cfg, params, ids, mask, positions)
  chex.assert_shape(got, want.shape)
  real = mask.numpy().astype(bool)
  np.testing.assert_allclose(got[real], want[real], atol=1e-4, rtol=0)
  assert np.abs(want[real]).max() > 0.1  # not a trivially small comparison


def test_cached_greedy_decoding_matches_generate(saved):
  family, model, path = saved
  cfg, params = hf.load_hf_checkpoint(path)
  ids, _, _ = padded_batch(seed=1, B=3, S=10)
  model.generation_config.eos_token_id = None  # greedy for the full length, as ours
  with torch.no_grad():
    want = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                          max_new_tokens=12, pad_token_id=0)[:, 10:].numpy()
  got = hf.greedy_generate(cfg, params, jnp.asarray(ids.numpy()), jnp.full((3,), 10, jnp.int32),
                           12)
  np.testing.assert_array_equal(np.asarray(got), want)


def test_save_load_round_trip_is_bitwise_and_transformers_loads_it(saved, tmp_path):
  family, model, path = saved
  cfg, params = hf.load_hf_checkpoint(path)
  out = str(tmp_path / "ours")
  hf.save_hf_checkpoint(out, cfg, params, hf_config=hf.load_hf_config(path))
  cfg2, params2 = hf.load_hf_checkpoint(out)
  assert cfg2 == cfg
  chex.assert_trees_all_equal(params2, params)  # bitwise
  # transformers reads our directory and computes the same logits as the original.
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  assert type(reloaded) is type(model)
  ids, mask, positions = padded_batch(seed=2)
  with torch.no_grad():
    a = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits.numpy()
    b = reloaded(input_ids=ids, attention_mask=mask, position_ids=positions).logits.numpy()
  np.testing.assert_array_equal(a, b)


def test_bfloat16_sharded_round_trip_and_actor_critic(tmp_path):
  model = torch_model("qwen3_untied", seed=3)
  src = str(tmp_path / "src")
  model.save_pretrained(src)
  cfg, params = hf.load_hf_checkpoint(src, dtype="bfloat16")
  assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
  # An actor-critic params tree saves as its policy; shards plus an index when large.
  cfg_v, policy = hf.with_value_head(cfg, params)
  out = str(tmp_path / "sharded")
  hf.save_hf_checkpoint(out, cfg_v, {"policy": policy}, max_shard_bytes=20_000)
  files = sorted(os.listdir(out))
  assert hf.INDEX_FILE in files and sum(f.endswith(".safetensors") for f in files) > 2
  cfg2, params2 = hf.load_hf_checkpoint(out, dtype=None)
  assert cfg2.param_dtype == "bfloat16"
  chex.assert_trees_all_equal(params2, params)
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
  ids, mask, positions = padded_batch(seed=4)
  with torch.no_grad():
    want = reloaded(input_ids=ids, attention_mask=mask, position_ids=positions).logits.numpy()
  got = our_logits(dataclasses.replace(cfg2, param_dtype="float32", dtype="float32"),
                   jax.tree.map(lambda x: x.astype(jnp.float32), params2), ids, mask, positions)
  real = mask.numpy().astype(bool)
  np.testing.assert_allclose(got[real], want[real], atol=1e-4, rtol=0)


# --- errors -----------------------------------------------------------------------------------

def edit_config(path, **changes):
  config = hf.load_hf_config(path)
  config.update(changes)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(config, f)


@pytest.mark.parametrize("changes, match", [
    (dict(model_type="mistral", architectures=["MistralForCausalLM"]), "model_type='mistral'"),
    (dict(architectures=["Qwen2ForSequenceClassification"]), "architectures"),
    (dict(use_sliding_window=True), "use_sliding_window"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "rope_type='yarn'"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(quantization_config={"quant_method": "gptq"}), "quantiz"),
])
def test_unsupported_architectures_are_named(tmp_path, changes, match):
  path = str(tmp_path)
  torch_model("qwen2_tied").save_pretrained(path)
  edit_config(path, **changes)
  with pytest.raises(hf.UnsupportedCheckpointError, match=match):
    hf.load_hf_checkpoint(path)


def test_missing_unexpected_and_misshapen_tensors_are_named(tmp_path):
  from safetensors.numpy import load_file, save_file
  path = str(tmp_path)
  torch_model("qwen2_tied").save_pretrained(path)
  file = os.path.join(path, hf.SINGLE_FILE)
  tensors = load_file(file)
  edit = dict(tensors)
  del edit["model.layers.1.self_attn.k_proj.bias"]
  save_file(edit, file)
  with pytest.raises(hf.CheckpointMismatchError, match=r"model.layers.1.self_attn.k_proj.bias"):
    hf.load_hf_checkpoint(path)
  save_file({**tensors, "model.layers.0.mlp.experts.0.weight": np.zeros(3, np.float32)}, file)
  with pytest.raises(hf.CheckpointMismatchError, match="mlp.experts.0.weight"):
    hf.load_hf_checkpoint(path)
  save_file({**tensors, "model.norm.weight": np.zeros(31, np.float32)}, file)
  with pytest.raises(hf.CheckpointMismatchError, match=r"'model.norm.weight' has shape \[31\]"):
    hf.load_hf_checkpoint(path)
  os.remove(file)
  with pytest.raises(FileNotFoundError, match="model.safetensors"):
    hf.load_hf_checkpoint(path)
  with pytest.raises(FileNotFoundError, match="config.json"):
    hf.load_hf_checkpoint(str(tmp_path / "elsewhere"))


def test_config_mapping_reads_both_transformers_spellings():
  v4 = dict(model_type="llama", hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
            num_key_value_heads=1, intermediate_size=128, vocab_size=10, rope_theta=5e5,
            rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0,
                              high_freq_factor=4.0, original_max_position_embeddings=8192))
  v5 = {k: v for k, v in v4.items() if k not in ("rope_theta", "rope_scaling")}
  v5["rope_parameters"] = dict(v4["rope_scaling"], rope_theta=5e5)
  a, b = hf.model_config_from_hf(v4), hf.model_config_from_hf(v5)
  assert a == b and a.rope_factor == 32.0 and a.rope_theta == 5e5 and a.head_dim == 16
  # Our config.json round-trips through the mapping.
  assert hf.model_config_from_hf(hf.hf_config_from_model(a)) == a
  with pytest.raises(hf.UnsupportedCheckpointError, match="model_type='qwen2'"):
    hf.hf_config_from_model(a, model_type="qwen2")
