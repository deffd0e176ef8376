"""Multi-hop search (2 hops), SFT then GRPO."""

from configs import search_ppo


def get_config():
  config = search_ppo.get_config()
  config.rollout.num_envs, config.rollout.group_size = 8, 4
  config.algo.advantage = "grpo"
  config.algo.vf_coef = 0.0
  return config
