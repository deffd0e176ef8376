"""Clarify with CollabLLM's multiturn-aware reward, window w = 1: each turn k is rewarded with
MR(k), the reward of turn k plus that of one more turn forward-sampled with the current policy
and the simulated user (inside the same jitted train step), credited to turn k alone
(gamma_turn = 0 semantics, turn-level critic). Derived from the myopic baseline, which it
extends by the look-ahead: w = 0 would be clarify_myopic."""

from configs import clarify_myopic


def with_window(window: int):
  """The clarify MR config with look-ahead `window` (>= max turns: full)."""
  config = clarify_myopic.get_config()
  config.algo.advantage = "turn_gae"
  config.algo.mr_window = window
  config.algo.mr_samples = 1
  return config


def get_config():
  return with_window(1)
