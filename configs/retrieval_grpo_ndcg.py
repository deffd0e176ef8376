"""Query writing (single shot) over a BM25-ranked catalog, SFT then GRPO with NDCG@10 as the
reward plus Rec-R1's format reward (+0.1 valid query, -0.1 per error reply).

    python -m experiments.train --config configs/retrieval_grpo_ndcg.py \
        --workdir runs/retrieval_grpo_ndcg

The evaluation logs the environment's metrics of the greedy policy: `eval/ndcg`, `eval/recall`
(NDCG@10, Recall@10 of the answered query; 0 for an episode without a valid answer),
`eval/raw_ndcg` / `eval/raw_recall` (the user's own text on the same episodes),
`eval/refinements`; `eval/success_rate` is the fraction ranked perfectly at 10 and
`eval/return` NDCG@10 + 0.1 for a valid answer. The raw-query row is
configs/retrieval_raw_query.py.

Warm start. GRPO starts from a short SFT (60 steps: greedy eval return 0.57, success 0.29 on
256 episodes, measured on 2 CPU cores) so that the reward has room to act. SFT to convergence
is its own row, `--config.sft.steps=300 --config.train.steps=0` (measured: return 0.89,
success 0.77), which is about the single-shot ceiling: when the user's words do not reveal
the catalog's dialect (49% of episodes) a single query can only guess it (success ~0.75);
configs/retrieval_multiturn.py can look it up (300 SFT steps: success 1.0).
"""

from configs import quickstart
from configs.calculator_grpo import to_grpo


def get_config():
  config = quickstart.base_config()
  config.env = dict(name="retrieval", num_items=48, num_attributes=3, num_values=6,
                    num_forms=2, need=2, k=10, multi_turn=False, noise=0.0,
                    ndcg_weight=1.0, recall_weight=0.0)
  config.rollout.max_len = 32
  config.rollout.turn_budget = 8
  config.sft.steps, config.sft.noise = 60, 0.2
  config.train.steps = 200
  config.train.eval_envs = 256
  return to_grpo(config)
