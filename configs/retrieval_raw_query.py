"""Baseline row: the user's own text as the query (no model in the loop: `raw_query=True` makes
the environment score the user's text whatever the policy writes). No training steps: the run
only evaluates; read `eval/ndcg` and `eval/recall` at step 0 (every run also logs `eval/raw_ndcg`,
`eval/raw_recall`: the same numbers for its own evaluation episodes).

    python -m experiments.train --config configs/retrieval_raw_query.py \
        --workdir runs/retrieval_raw_query
"""

from configs import retrieval_grpo_ndcg


def get_config():
  config = retrieval_grpo_ndcg.get_config()
  config.env.raw_query = True
  config.sft.steps = 0
  config.train.steps = 0
  return config
