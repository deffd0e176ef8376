"""Clarify with the multiturn-aware reward, full window: every continuation is played to the end
of the conversation (w >= max turns; see configs/clarify_mr.py). With gamma_turn = 0 semantics
this credits each turn with a fresh sample of the whole remaining conversation's outcome."""

from configs import clarify_mr


def get_config():
  return clarify_mr.with_window(99)
