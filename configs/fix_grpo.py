"""Fix the program, SFT then GRPO: group-normalised trajectory return, no critic, symmetric
clip, no turn penalty."""

from configs import fix_ppo
from configs.calculator_grpo import to_grpo


def get_config():
  return to_grpo(fix_ppo.get_config())
