"""Ablation of configs/fix_dapo.py: the same DAPO recipe without the turn-based length penalty."""

from configs import fix_dapo


def get_config():
  config = fix_dapo.get_config()
  config.env.turn_penalty = 0.0
  return config
