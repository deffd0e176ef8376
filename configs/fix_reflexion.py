"""Meta-training for Reflexion on fix: PPO with the turn-level critic on episodes of 3 trials of
the same task, each failed trial's templated reflection (what `run` reports on its final
program) in the next trial's prompt (`mtrl_jax.reflexion`, up to 3 kept). The context grows by
the memory (3 x (8 + 2) tokens).

    python -m experiments.train --config configs/fix_reflexion.py --workdir runs/fix_rx \\
        --config.init_from=runs/fix_sft
    python -m experiments.reflexion --config configs/fix_reflexion.py --run runs/fix_rx
"""

from configs import fix_ppo
from configs.search_reflexion import with_meta_training


def get_config():
  return with_meta_training(fix_ppo.get_config(), max_len=200)
