"""Knowledge internalisation on synthetic facts: continued pre-training vs SFT vs RLAG.

    python -m experiments.rlag --config configs/rlag.py [--config.<key>=<value> ...]

See `experiments/rlag_study.py` for the arms, the warm start and the RLAG loss;
docs/RESULTS.md section 9 for the results. Unknown keys are errors that name the key.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.num_seeds = 5           # vmapped; each seed draws its own knowledge base
  config.workdir = "runs/rlag"
  # Knowledge base: entities x (friend, boss, colour, city); num_values per attribute.
  config.env = ml_collections.ConfigDict(dict(num_entities=12, num_values=8))
  # A preset of mtrl_jax.models.transformer plus field overrides.
  config.model = ml_collections.ConfigDict(dict(preset="tiny"))
  # Shared warm start: open-book reading SFT on fresh random KBs (never the evaluation KB).
  config.warm = ml_collections.ConfigDict(dict(steps=300, batch_size=64, lr=1e-3,
                                               closed_frac=0.25))
  # Every arm: same optimizer (Adam + clipping), steps and batch size, from the warm start;
  # `replay` weighs a batch of the warm start's data added to every arm's loss (0 = none).
  config.train = ml_collections.ConfigDict(dict(steps=40, batch_size=32, lr=1e-3,
                                                grad_clip=1.0, eval_every=20, replay=1.0,
                                                arms="cpt,sft,rlag"))
  # RLAG (weights and clips of the paper's released code; its training config uses gamma=8,
  # the loss class defaults to 0.1: see experiments/rlag_study.py).
  config.rlag = ml_collections.ConfigDict(dict(
      beta_d_pair=0.2, beta_a=0.5,      # knowledge / preference weights when the pair differs
      beta_d_same=0.5,                  # knowledge weight when it does not (beta_a = 0)
      gamma=0.1, clip_chosen=-0.2, clip_rejected=-5.0,
      rationality_coef=0.5,             # reward = accuracy + coef * p(gold | explanation)
      temperature=1.0,                  # sampling temperature of both generations
      chosen_in_context=False))         # True: score the augmented answer with the facts
  return config
