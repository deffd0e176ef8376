"""Multi-hop search (2 hops), SFT then GRPO."""

from configs import search_ppo
from configs.calculator_grpo import to_grpo


def get_config():
  return to_grpo(search_ppo.get_config())
