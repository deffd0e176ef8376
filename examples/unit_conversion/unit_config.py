"""The base recipe (`quickstart.base_config`: SFT on noisy expert demonstrations, then PPO
with a turn-level critic) on UnitConversion, named by import path: run from this folder,

    python -m experiments.train --config unit_config.py --workdir runs/unit
"""

from configs import quickstart  # the shipped configs are an installed package


def get_config():
  config = quickstart.base_config()
  # Any constructor argument or UnitParams field can be set here or on the command line
  # (--config.env.guess_penalty=0.5); an unknown one is an error that lists them.
  config.env = dict(name="unit_env:UnitConversion", num_digits=2, noise=0.0)
  config.rollout.max_len = 64     # >= prompt 10 + 3 turns * (action 8 + reply 8) = 58 (SFT)
  config.rollout.turn_budget = 10
  config.sft.steps = 200
  config.train.steps = 60
  return config
