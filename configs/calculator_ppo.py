"""Calculator, SFT then PPO with the turn-level (trajectory) critic: the quickstart, longer."""

from configs import quickstart


def get_config():
  config = quickstart.base_config()
  config.train.steps = 200
  return config
