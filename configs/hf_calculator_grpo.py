"""Post-train a local Hugging Face checkpoint with GRPO on a JSONL task set, with Python tools.

    python -m experiments.train --config configs/hf_calculator_grpo.py \
        --workdir runs/qwen05_gsm8k \
        --config.model.checkpoint=/ckpt/Qwen2.5-0.5B-Instruct \
        --config.env.tasks=/data/gsm8k_train.jsonl --config.env.data_dir=/data/tfds

`model.checkpoint` is a local directory (config.json, *.safetensors, tokenizer.json and its chat
template: Qwen2 / Qwen2.5, Qwen3, Llama 3); the environment's tokenizer is read from the same
directory (`env.checkpoint` follows `model.checkpoint`). `env.tasks` is a JSONL file of
`{"question": ..., "answer": ...}` rows (GSM8K's "... #### 72" answers work as they are), built
once into a TFDS prompt dataset in `env.data_dir` (or name a built one with `env.dataset`); see
`mtrl_jax.data.prompts`. The policy calls the tools in `env.tools` ("calculator", "search" with
`env.corpus`) as Hermes `<tool_call>` JSON and ends with `<answer>...</answer>`; reward 1 for a
right final answer. docs/HF.md explains every field and the memory needed.

Sizes are meant for one 80 GB GPU and a 0.5B-1.5B model (not yet run on one: see docs/HF.md):
4 prompts x 4 rollouts per step in 1024-token rows, f32 master weights with bf16 matmuls,
rematerialised blocks. The learner scores tokens in `model.logits_chunk` position chunks, so
no batch x max_len x vocab tensor exists; the compiled step of Qwen2.5-1.5B at 64 rollouts of
2048 tokens needs about 50 GB (docs/HF.md, measured with `python -m experiments.benchmark
memory`), so `rollout.num_envs` / `max_len` can grow well beyond these defaults.
"""

import ml_collections

from configs import quickstart


def get_config() -> ml_collections.ConfigDict:
  config = quickstart.base_config()
  checkpoint = ml_collections.FieldReference("", field_type=str)
  config.env = ml_collections.ConfigDict(dict(
      name="json_tool",
      checkpoint=checkpoint,      # tokenizer.json + chat template (follows model.checkpoint)
      data_dir="",                # where TFDS prompt datasets live (written on first use)
      dataset="",                 # a built prompt dataset's name (or the tasks file's stem)
      tasks="",                   # JSONL task file to build the dataset from
      corpus="",                  # JSONL documents for the search tool
      split="train",
      tools="calculator",         # comma-separated built-in tools: calculator, search
      system=("You are a helpful assistant. Use the calculator tool for arithmetic. When you "
              "know the final answer, reply with it inside <answer></answer> tags."),
      layout="auto",              # chatml (Qwen) | llama3 | auto (from the tokenizer)
      prompt_len=0,               # 0: the longest prompt of the dataset
      reply_len=128, max_turns=3, max_calls_per_turn=4,
      format_penalty=0.0, correct_reward=1.0, noise=0.0))
  config.model = ml_collections.ConfigDict(dict(
      preset="hf", checkpoint=checkpoint, param_dtype="float32", dtype="bfloat16", remat=True))
  config.rollout = ml_collections.ConfigDict(dict(
      num_envs=4, group_size=4, max_len=1024, turn_budget=256, think_budget=None,
      max_turns=None, temperature=1.0, top_k=0, top_p=1.0))
  config.algo.update(dict(
      advantage="grpo", scale_by_std=True, vf_coef=0.0, eps_low=0.2, eps_high=0.28,
      loss_agg="token_mean", kl_coef=0.0, epochs=1, minibatches=4))
  config.optim.update(dict(lr=1e-6, warmup=10, grad_clip=1.0, weight_decay=0.0))
  config.sft.steps = 0  # the checkpoint is the warm start (and the KL reference)
  config.train.update(dict(steps=200, eval_every=20, eval_envs=16, checkpoint_every=20,
                           keep_checkpoints=2, num_seeds=1))
  config.num_samples = 2
  return config
