"""Clarify (3 hidden constraints revealed one per ask), SFT then PPO with the trajectory-level
critic (gamma_turn = 1): asking first pays off only through the final answer."""

from configs import quickstart


def get_config():
  config = quickstart.base_config()
  config.env = dict(name="clarify", num_attributes=3, fully_specified=False,
                    full_fraction=0.0, noise=0.0)
  config.rollout.max_len = 96
  config.rollout.turn_budget = 10
  config.sft.noise = 0.5
  config.train.steps = 200
  return config
