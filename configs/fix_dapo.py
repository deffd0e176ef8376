"""Fix the program, SFT then the SWE-style DAPO recipe: clip-higher (eps 0.2 / 0.28), token-level
loss over the action tokens only (tool replies are masked), the group-normalised trajectory
advantage broadcast to every action token, dynamic sampling (fixed shapes: zero-variance
groups get weight 0), and the turn-based length penalty (0 up to the 5 turns an efficient agent
needs, then linear down to -1 at the 7-turn limit). Overlong (truncated) episodes stay in the
batch - the trainer never filters them (filtering hid looping failures in the SWE-bench work).
The trainer has no option to filter them, so the "filter overlong" ablation has no config yet.

Metrics for the comparison: `eval/success_rate` (pass rate at submit), `eval/turns`,
`eval/loops` (turns repeating the previous action), `eval/noop_edits`, `eval/truncated`, and
`train/grad_norm` for gradient-norm stability.

    python -m experiments.train --config configs/fix_dapo.py --workdir runs/fix_dapo
"""

from configs import fix_grpo


def get_config():
  config = fix_grpo.get_config()
  config.env.turn_penalty = 1.0
  config.algo.eps_low, config.algo.eps_high = 0.2, 0.28
  config.algo.loss_agg = "token_mean"
  config.algo.dynamic_sampling = True
  config.algo.overlong_len, config.algo.overlong_cache = 0, 0  # the turn penalty replaces it
  return config
