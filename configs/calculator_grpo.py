"""Calculator, SFT then GRPO: group-normalised trajectory return, no critic."""

from configs import quickstart


def to_grpo(config, num_envs: int = 8, group_size: int = 4):
  """Switch a PPO config to GRPO: groups of rollouts per prompt, no critic."""
  config.rollout.num_envs, config.rollout.group_size = num_envs, group_size
  config.algo.advantage = "grpo"
  config.algo.vf_coef = 0.0
  return config


def get_config():
  config = to_grpo(quickstart.base_config())
  config.train.steps = 200
  return config
