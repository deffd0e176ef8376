"""Calculator, SFT then GRPO: group-normalised trajectory return, no critic."""

from configs import quickstart


def get_config():
  config = quickstart.get_config()
  config.rollout.num_envs, config.rollout.group_size = 8, 4
  config.algo.advantage = "grpo"
  config.algo.vf_coef = 0.0
  config.train.steps = 200
  return config
