"""A trained run loaded back: its policy's conversation and evaluation after SFT and at the end.

    python show_run.py runs/unit
"""

import sys

import jax

from mtrl_jax import runs, vocab

workdir = sys.argv[1]
trainer, final = runs.load_run(workdir)  # the latest checkpoint, with the config it was run with
_, warm = runs.load_run(workdir, step=trainer.config.sft.steps)  # the end of SFT: always kept
rollout = jax.jit(trainer.eval_rollout)  # greedy episodes; it takes the policy's params
evaluate = jax.jit(trainer.evaluate)     # eval/* metrics; it takes all params (and the critic)
for title, state in ((f"after SFT, step {trainer.config.sft.steps}", warm), ("final", final)):
  traj = rollout(state.params["policy"], jax.random.key(0), trainer.env_params)
  print(f"--- {title} ---")
  print(vocab.render_trajectory(traj, trainer.env.vocab, row=0))
  metrics = evaluate(state.params, jax.random.key(1))
  print({k: round(float(v), 3) for k, v in sorted(metrics.items())})
