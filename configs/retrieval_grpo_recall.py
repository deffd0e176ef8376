"""Query writing (single shot), SFT then GRPO with Recall@10 (+ the format reward) as the
reward instead of NDCG@10. `eval/return` is Recall@10 + 0.1 for valid answers."""

from configs import retrieval_grpo_ndcg


def get_config():
  config = retrieval_grpo_ndcg.get_config()
  config.env.ndcg_weight, config.env.recall_weight = 0.0, 1.0
  return config
