"""Export a trained run's policy as a Hugging Face checkpoint (transformers, vLLM, TGI load it).

    from configs import hf_calculator_grpo
    from experiments.export import export_trained_policy
    config = hf_calculator_grpo.get_config()
    config.model.checkpoint = "/ckpt/Qwen2.5-0.5B-Instruct"      # the run's config
    config.env.update(dict(tasks="/data/gsm8k_train.jsonl", data_dir="/data/tfds"))
    export_trained_policy(config, "runs/qwen05/checkpoints", "/ckpt/qwen05-grpo")

It rebuilds the run's trainer (`mtrl_jax.train.make_train`) to restore the checkpoint, so it
lives here, above `mtrl_jax.train`, not in `mtrl_jax.models.hf` (models do not import the
trainer); the writing itself is `mtrl_jax.models.hf.save_hf_checkpoint`. docs/HF.md is the
user guide.
"""

from __future__ import annotations

import os

import jax

from mtrl_jax import checkpoint as ckpt_lib
from mtrl_jax import train as train_lib
from mtrl_jax.models import hf


def export_trained_policy(config, checkpoint_dir: str | os.PathLike, out: str | os.PathLike, *,
                          step: int | None = None, seed: int = 0) -> int:
  """Write the policy of an `experiments.train` checkpoint as a Hugging Face checkpoint.

  config: the run's config (`config.model.checkpoint` the source checkpoint: its config.json
  keys and tokenizer files are carried over); checkpoint_dir: the run's `checkpoints/`
  directory; step: which checkpoint (default: the latest); seed: which seed of a
  `num_seeds > 1` run. Returns the step exported. The output directory can be loaded with
  `transformers.AutoModelForCausalLM.from_pretrained` or served by vLLM / TGI.
  """
  source = config.model.get("checkpoint", "")
  if not source:
    raise ValueError("config.model.checkpoint (the source checkpoint) is not set")
  trainer = train_lib.make_train(config)
  ckpt = ckpt_lib.Checkpointer(checkpoint_dir, save_every=1, keep=1 << 30, async_save=False)
  step = ckpt.latest_step() if step is None else int(step)
  if step is None:
    raise ValueError(f"no checkpoint in {os.fspath(checkpoint_dir)!r}")
  seeds = int(config.train.get("num_seeds", 1))

  def template(key):
    state = trainer.init(key)
    return trainer.start_rl(state) if step >= int(config.sft.steps) else state

  keys = jax.random.split(jax.random.key(0), seeds) if seeds > 1 else jax.random.key(0)
  shapes = jax.eval_shape(jax.vmap(template) if seeds > 1 else template, keys)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  shapes = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device), shapes)
  state, _ = ckpt.restore(shapes, step)
  ckpt.close()
  policy = state.params["policy"]
  if seeds > 1:
    policy = jax.tree.map(lambda x: x[seed], policy)
  hf.save_hf_checkpoint(out, trainer.model_config, policy, hf_config=hf.load_hf_config(source),
                        tokenizer_from=source)
  return step
