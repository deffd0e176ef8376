"""Quick start: calculator tool use with the tiny model, SFT then PPO with a turn-level critic.

    python -m experiments.train --config configs/quickstart.py --workdir runs/quickstart
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0
  # Environment: registry name plus constructor / EnvParams overrides (see mtrl_jax.envs).
  config.env = ml_collections.ConfigDict(dict(name="calculator", noise=0.0))
  # Model: a named preset from mtrl_jax.models.transformer.PRESETS plus field overrides.
  config.model = ml_collections.ConfigDict(dict(preset="tiny", dtype="float32"))
  # Rollout budgets and sampling (mtrl_jax.rollout.RolloutConfig).
  config.rollout = ml_collections.ConfigDict(dict(
      num_envs=32, group_size=1, max_len=144, turn_budget=20, think_budget=None,
      max_turns=None, temperature=1.0, top_k=0, top_p=1.0))
  # The RL algorithm (mtrl_jax.train.Trainer.train_step).
  config.algo = ml_collections.ConfigDict(dict(
      advantage="turn_gae",      # turn_gae | token_gae | grpo | rloo
      gamma_turn=1.0, lam=0.95,  # gamma_turn = 0: myopic next-turn reward
      scale_by_std=True,         # GRPO std normalisation (False: Dr.GRPO)
      normalize_adv=True,        # batch-normalise GAE advantages
      eps_low=0.2, eps_high=0.2, dual_clip=0.0,
      loss_agg="token_mean",     # token_mean | seq_mean_token_mean | seq_mean_token_sum_norm
      vf_coef=0.5, value_clip=0.0, ent_coef=0.0,
      kl_coef=0.0, kl_kind="k3", kl_in_reward=False,
      tis_cap=0.0,               # truncated importance correction vs the sampler (0 = off)
      dynamic_sampling=False, overlong_len=0, overlong_cache=0,
      mask_replies=True,         # False: tool replies enter the loss (masking ablation)
      keep_truncated=True,       # False: truncated episodes are dropped from the loss (ablation)
      separate_critic=False,
      mr_window=0,               # CollabLLM multiturn-aware reward: w turns of look-ahead
      mr_samples=1,              #   (0 = off; >= max turns = full); continuations per turn
      epochs=2, minibatches=2))
  config.optim = ml_collections.ConfigDict(dict(
      lr=1e-4, warmup=5, b1=0.9, b2=0.999, grad_clip=1.0, weight_decay=0.0))
  # Supervised warm start on (noisy) expert demonstrations, generated on the fly or, with
  # `dataset` set, read from a TFDS dataset in `data_dir` built by
  # mtrl_jax.data.demos.build_demo_dataset (for the same environment settings).
  config.sft = ml_collections.ConfigDict(dict(steps=300, batch_size=32, lr=1e-3, noise=0.3,
                                              data_dir="", dataset=""))
  config.train = ml_collections.ConfigDict(dict(
      steps=160, eval_every=20, eval_envs=64, log_every=1, checkpoint_every=40,
      keep_checkpoints=2, num_seeds=1))
  config.num_samples = 3  # conversations written to samples.txt
  # Start from the params of another run's latest checkpoint (its workdir), e.g. an SFT-only run
  # of `python -m experiments.sft`; they are also the KL reference. Same model settings needed.
  config.init_from = ""
  return config
