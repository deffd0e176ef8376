"""Supervised warm start only: `python -m experiments.sft --config configs/<name>.py
[--workdir DIR] [--config.<key>=<value> ...]`.

Behaviour cloning on the environment's (noisy) expert demonstrations - generated on the fly, or
read from a TFDS dataset with `--config.sft.data_dir=... --config.sft.dataset=...` - for
`config.sft.steps` steps: `experiments.train` with `config.train.steps=0`, so it writes the same
metrics, checkpoints (resumable), greedy evaluation of the result, samples and curves (default
workdir `runs/<config name>_sft`). Start RL from it, with it as the KL reference:

    python -m experiments.sft   --config configs/search_ppo.py --workdir runs/search_sft
    python -m experiments.train --config configs/search_ppo.py --workdir runs/search_ppo \\
        --config.init_from=runs/search_sft --config.sft.steps=0
"""

from __future__ import annotations

import functools

from absl import app

from experiments import cli
from experiments import train

if __name__ == "__main__":
  app.run(functools.partial(train.main, sft_only=True), flags_parser=cli.parse_flags)
