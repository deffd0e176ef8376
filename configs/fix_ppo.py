"""Fix the program (4 lines, one bug: a flipped sign or a wrong operand; `run` names the failing
line), SFT on noisy experts then PPO with the turn-level critic. The critic-based arm of the
comparison with configs/fix_dapo.py.

Measured on 2 CPU cores: 400 SFT steps alone (`--config.train.steps=0`) give greedy success
0.39 on 128 evaluation episodes (sign bugs are learned; operand bugs need mod-10 arithmetic
from `got`/`want` or retrying), so RL has room. With `--config.env.bug_kind=sign` SFT alone
already reaches 1.0.

    python -m experiments.train --config configs/fix_ppo.py --workdir runs/fix_ppo
"""

from configs import quickstart


def get_config():
  config = quickstart.base_config()
  config.env = dict(name="fix", num_lines=4, num_bugs=1, bug_kind="mixed", noise=0.0,
                    report_line=True, turn_penalty=0.0)
  # An expert episode is ~60 tokens; the budget check needs prompt + max_turns * (longest
  # turn + longest reply) = 8 + 7 * (7 + 15) = 162.
  config.rollout.max_len = 168
  config.rollout.turn_budget = 10
  config.sft.steps, config.sft.noise = 400, 0.2
  config.train.steps = 200
  return config
