"""Clarify with the myopic next-turn objective: PPO with gamma_turn = 0 (CollabLLM's baseline).
Each turn is credited only with its own immediate reward, so asking is never rewarded."""

from configs import clarify_ppo


def get_config():
  config = clarify_ppo.get_config()
  config.algo.gamma_turn = 0.0
  return config
