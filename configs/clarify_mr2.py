"""Clarify with the multiturn-aware reward, window w = 2 (see configs/clarify_mr.py)."""

from configs import clarify_mr


def get_config():
  return clarify_mr.with_window(2)
