"""Multi-hop search (3 hops) in a fixed 192-token context with verbosely thinking demonstrations,
SFT then GRPO; the rollout's per-turn think budget is the knob (issue 9, part 2).

    python -m experiments.sft   --config configs/search_think.py --workdir runs/think_sft \
        --config.rollout.max_len=348
    python -m experiments.train --config configs/search_think.py --workdir runs/think_b16 \
        --config.init_from=runs/think_sft --config.sft.steps=0 --config.rollout.think_budget=16

Budgets (tokens). The expert (`Search(think_len=44)`) opens every turn with a 44-token think
block (`<think>` + 44 + `</think>`, then a 5-token call/answer): a search turn plus its 16-token
reply is 67 tokens, so the clean 3-hop episode is 12 (prompt) + 3 * 67 + 50 (answer turn) = 263
tokens. The context `rollout.max_len = 192` cannot hold it: thinking like the demonstrations,
the third search turn itself does not fit (12 + 2 * 67 = 146; + 51 > 192), so at most 2 hops
are completed. With a per-turn cap of b think tokens the clean episode is 87 + 4b tokens
(b = 16: 151, room for one extra mistaken turn; b = 0: 87, a `<think>` closed at once).

Supervised warm start: a demonstration row must hold the longest expert episode,
`prompt + max_turns * (action_len + reply_len) = 12 + 5 * (51 + 16) = 347` tokens, more than the
192-token context; the SFT run therefore overrides `--config.rollout.max_len=348` (the model has
no learned positions: the same params run at 192). Everything after SFT - evaluation and RL -
uses the fixed 192.

The 2-hop variant (`experiments.results` experiment `think_budget_2hop`, a task the tiny model
learns better): `--config.env.hops=2 --config.rollout.max_len=160`, SFT at 278 (10 + 4 turns *
67). Thinking like the demonstrations, both searches fit (10 + 2 * 67 = 144) but the answer turn
does not (+ 51 > 160); with a cap b the clean episode is 65 + 3b tokens (b = 16: 113).

`rollout.think_budget` is an int placeholder (None = no per-turn cap, only the total context):
a plain `None` field could not be set from the command line (ml_collections refuses to override
a None-typed field), so `--config.rollout.think_budget=16` works here but not on configs whose
default is a literal None. It must be <= `turn_budget - 2 = 70`.
"""

from ml_collections import config_dict

from configs import search_ppo
from configs.calculator_grpo import to_grpo

THINK_LEN = 44
CONTEXT = 192
SFT_MAX_LEN = 348  # 12 + 5 * (THINK_LEN + 7 + 16) + 1


def get_config():
  config = to_grpo(search_ppo.get_config())
  config.env = dict(name="search", hops=3, think_len=THINK_LEN, noise=0.0)
  config.rollout.max_len = CONTEXT
  config.rollout.turn_budget = 72  # a verbose turn (51) fits; so does think_budget = 64
  config.rollout.think_budget = config_dict.placeholder(int)
  config.sft.noise = 0.3
  config.sft.batch_size = 16  # demonstration rows are 348 tokens: half the usual batch (CPU time)
  config.train.steps = 60
  return config
