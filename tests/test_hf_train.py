"""configs/hf_calculator_grpo.py end to end on CPU: a tiny random Hugging Face checkpoint (saved
in the test with `save_hf_checkpoint`, with a tokenizer built in the test), the tiny JSONL task
file of tests/data, GRPO train steps through `make_train`."""

import os
import subprocess
import sys

import chex
import jax
import numpy as np
import pytest

if os.environ.get("MTRL_REQUIRE_HF_TESTS"):  # CI: a missing extra fails, never skips
  import jinja2, safetensors, tokenizers, torch, transformers  # noqa: F401,E401
pytest.importorskip("tokenizers", reason="needs the hf extra: pip install -e .[hf]")
pytest.importorskip("safetensors", reason="needs the hf extra: pip install -e .[hf]")
pytest.importorskip("jinja2", reason="needs the hf extra: pip install -e .[hf]")

from configs import hf_calculator_grpo  # noqa: E402
from experiments import export  # noqa: E402
from mtrl_jax import train as train_lib  # noqa: E402
from mtrl_jax.models import chat, hf  # noqa: E402
from mtrl_jax.models import transformer as tf  # noqa: E402
from test_hf_chat import DATA, make_tokenizer_dir  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  """A random tiny Qwen2-style checkpoint directory with the test tokenizer and template."""
  tok_dir = make_tokenizer_dir(tmp_path_factory.mktemp("tok"), "chatml")
  size = chat.ChatTokenizer.from_dir(tok_dir).size
  cfg = tf.ModelConfig(vocab_size=size + 3, d_model=32, num_layers=1, num_heads=2,
                       num_kv_heads=1, mlp_dim=32, qkv_bias=True, tie_embeddings=True,
                       value_head=False, rope_theta=1e6)
  params = tf.init_params(cfg, jax.random.key(0))
  path = str(tmp_path_factory.mktemp("ckpt"))
  hf.save_hf_checkpoint(path, cfg, params, tokenizer_from=tok_dir)
  return path, params


def tiny_config(checkpoint_dir, data_dir):
  config = hf_calculator_grpo.get_config()
  config.model.checkpoint = checkpoint_dir  # env.checkpoint follows
  config.model.update(dict(dtype="float32", remat=False))
  config.env.update(dict(data_dir=str(data_dir), tasks=os.path.join(DATA, "arith_tasks.jsonl"),
                         system="Be brief.", reply_len=96, max_turns=2))
  config.rollout.update(dict(num_envs=2, group_size=2, max_len=1000, turn_budget=24))
  config.algo.minibatches = 2
  config.train.update(dict(steps=2, eval_envs=2))
  return config


def test_config_builds_and_trains_from_the_checkpoint(checkpoint, tmp_path):
  path, saved = checkpoint
  config = tiny_config(path, tmp_path)
  # A random policy solves nothing: give the group's rollouts different returns (overlong
  # shaping on their lengths) so that GRPO has something to learn from.
  config.algo.update(dict(overlong_len=40, overlong_cache=30))
  config.optim.update(dict(lr=1e-3, warmup=1))
  assert config.env.checkpoint == path
  trainer = train_lib.make_train(config)
  assert trainer.env.name == "json_tool" and trainer.env.num_tasks == 4
  assert trainer.model_config.qkv_bias and trainer.model_config.value_head
  state = jax.jit(trainer.init)(jax.random.key(0))
  policy = {k: v for k, v in state.params["policy"].items() if k != "value_head"}
  chex.assert_trees_all_equal(policy, saved)  # the checkpoint's weights, bitwise
  np.testing.assert_array_equal(np.asarray(state.params["policy"]["value_head"]["kernel"]), 0)
  state = trainer.start_rl(state)
  step = jax.jit(trainer.train_step)
  for _ in range(2):
    state, metrics = step(state)
  metrics = jax.device_get(metrics)
  for k in ("train/loss", "train/entropy", "train/sampled_tokens", "train/turns"):
    assert np.isfinite(metrics[k]), k
  assert metrics["train/sampled_tokens"] > 0 and int(state.step) == 2
  changed = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))),
                         state.params["policy"]["layers"], saved["layers"])
  assert any(jax.tree.leaves(changed)), "GRPO updated nothing"
  evals = jax.jit(trainer.evaluate)(state.params, jax.random.key(1))
  assert 0.0 <= float(evals["eval/success_rate"]) <= 1.0


def test_config_errors_name_the_key(tmp_path):
  config = hf_calculator_grpo.get_config()
  with pytest.raises(ValueError, match="config.env.*checkpoint"):
    train_lib.make_train(config)
  config = hf_calculator_grpo.get_config()
  with pytest.raises(ValueError, match="config.model.checkpoint is not set"):
    train_lib.build_model_config(config.model, 10)
  config.model.checkpoint = str(tmp_path)
  with pytest.raises(ValueError, match="config.model.checkpoint: .*config.json"):
    train_lib.build_model_config(config.model, 10)


@pytest.mark.slow
def test_cli_runs_the_config(checkpoint, tmp_path):
  """`python -m experiments.train --config configs/hf_calculator_grpo.py` with the README's
  overrides, on the tiny checkpoint: trains, checkpoints, writes samples."""
  path, _ = checkpoint
  workdir = tmp_path / "run"
  cmd = [sys.executable, "-m", "experiments.train", "--config", "configs/hf_calculator_grpo.py",
         f"--workdir={workdir}", f"--config.model.checkpoint={path}",
         f"--config.env.tasks={os.path.join(DATA, 'arith_tasks.jsonl')}",
         f"--config.env.data_dir={tmp_path / 'tfds'}", "--config.env.system=Be brief.",
         "--config.env.reply_len=96", "--config.env.max_turns=2", "--config.model.dtype=float32",
         "--config.model.remat=False", "--config.rollout.num_envs=2",
         "--config.rollout.group_size=2", "--config.rollout.max_len=1000",
         "--config.rollout.turn_budget=24", "--config.algo.minibatches=2",
         "--config.train.steps=2", "--config.train.eval_envs=2", "--config.train.eval_every=1",
         # something to learn from for a random policy (see the test above)
         "--config.algo.overlong_len=40", "--config.algo.overlong_cache=30",
         "--config.optim.lr=1e-3", "--config.optim.warmup=1"]
  out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  assert (workdir / "samples.txt").exists() and (workdir / "metrics.jsonl").exists()
  assert "<|im_start|>assistant" in (workdir / "samples.txt").read_text()
  # The trained policy exports as a Hugging Face checkpoint (for transformers / vLLM).
  config = tiny_config(path, tmp_path / "tfds")
  out = str(tmp_path / "export")
  assert export.export_trained_policy(config, workdir / "checkpoints", out) == 2
  cfg, params = hf.load_hf_checkpoint(out)
  assert cfg.qkv_bias and sorted(os.listdir(out)) == sorted(os.listdir(path))
  _, original = hf.load_hf_checkpoint(path)
  assert jax.tree.structure(params) == jax.tree.structure(original)
  assert not all(jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.all(a == b)), params,
                                              original))), "the export is the untrained model"


def test_checkpoint_loads_and_trains_on_a_mesh(checkpoint, tmp_path):
  """On a (data=1, fsdp=2, tensor=2) mesh of 4 simulated CPU devices (why 4: test_mesh.py's
  MESHES): `init` streams the
  checkpoint into FSDP/tensor-sharded params (bitwise the checkpoint's), and a train step with
  the JSON tool environment (its parser and tools are host callbacks, played per device inside
  the rollout) equals the single-device step."""
  from mtrl_jax import sharding
  path, saved = checkpoint
  config = tiny_config(path, tmp_path)
  config.rollout.update(dict(num_envs=4, group_size=2))
  config.algo.update(dict(overlong_len=40, overlong_cache=30, minibatches=1))
  config.optim.update(dict(lr=1e-3, warmup=0))
  trainer = train_lib.make_train(config)
  steps = sharding.MeshSteps(trainer, sharding.make_mesh(1, 2, 2, devices=jax.devices()[:4]))
  state = steps.start_rl(steps.init(jax.random.key(0)))
  embedding = state.params["policy"]["embed"]["embedding"]
  assert len(embedding.sharding.device_set) == 4 and embedding.sharding.spec != (None, None)
  policy = {k: v for k, v in state.params["policy"].items() if k != "value_head"}
  chex.assert_trees_all_equal(jax.device_get(policy), saved)
  single = jax.jit(trainer.start_rl)(jax.jit(trainer.init)(jax.random.key(0)))
  ref_state, ref_m = jax.jit(trainer.train_step)(single)
  new_state, m = steps.train_step(state)
  for k in ("train/return", "train/loss", "train/sampled_tokens", "train/entropy"):
    np.testing.assert_allclose(m[k], ref_m[k], rtol=1e-5, atol=1e-5, err_msg=k)
  assert float(ref_m["train/sampled_tokens"]) > 0
  chex.assert_trees_all_close(jax.device_get(new_state.params), jax.device_get(ref_state.params),
                              atol=config.optim.lr, rtol=0)
