"""Clarify, SFT then GRPO on the trajectory return."""

from configs import clarify_ppo
from configs.calculator_grpo import to_grpo


def get_config():
  return to_grpo(clarify_ppo.get_config())
