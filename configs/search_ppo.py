"""Multi-hop search (2 hops), SFT on noisy experts then PPO with the turn-level critic."""

from configs import quickstart


def get_config():
  config = quickstart.base_config()
  config.env = dict(name="search", hops=2, noise=0.0)
  config.rollout.max_len = 128
  config.rollout.turn_budget = 12
  config.sft.noise = 0.3
  config.train.steps = 200
  return config
