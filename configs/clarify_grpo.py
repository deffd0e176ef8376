"""Clarify, SFT then GRPO on the trajectory return."""

from configs import clarify_ppo


def get_config():
  config = clarify_ppo.get_config()
  config.rollout.num_envs, config.rollout.group_size = 8, 4
  config.algo.advantage = "grpo"
  config.algo.vf_coef = 0.0
  return config
