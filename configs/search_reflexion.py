"""Meta-training for Reflexion on search (2 hops): PPO with the turn-level critic on episodes of
3 trials of the same task, the failed trials' templated reflections (the wrong answer, the chain
links found) in the next trial's prompt (`mtrl_jax.reflexion`, up to 3 kept). The context grows
by the memory (3 x (5 + 2) tokens) so that memory does not eat the episode's budget.

    python -m experiments.train --config configs/search_reflexion.py --workdir runs/search_rx \\
        --config.init_from=runs/search_sft
    python -m experiments.reflexion --config configs/search_reflexion.py --run runs/search_rx
"""

from ml_collections import config_dict

from configs import search_ppo


def with_meta_training(config, max_len: int):
  """`config` meta-trained on 3-trial episodes keeping up to 3 templated reflections, in a
  context of `max_len` tokens (the episode's budget plus the memory's)."""
  config.rollout.max_len = max_len
  config.reflexion = config_dict.ConfigDict(dict(
      train_trials=3, memory=3, reflection="template", reflection_len=0))
  return config


def get_config():
  return with_meta_training(search_ppo.get_config(), max_len=152)
