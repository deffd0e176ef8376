"""Multi-hop search (3 hops), SFT then DAPO: clip-higher, token-level loss, overlong shaping,
dynamic sampling (fixed shapes: zero-variance groups get weight 0)."""

from configs import search_grpo


def get_config():
  config = search_grpo.get_config()
  config.env.hops = 3
  config.rollout.max_len = 144
  config.algo.eps_low, config.algo.eps_high = 0.2, 0.28
  config.algo.loss_agg = "token_mean"
  config.algo.overlong_len, config.algo.overlong_cache = 40, 10
  config.algo.dynamic_sampling = True
  return config
