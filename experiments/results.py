"""The experiments behind docs/RESULTS.md, one command each:

    python -m experiments.results list                 # experiments, arms and their commands
    python -m experiments.results run tool_use         # train every arm (resumable; done arms skipped)
    python -m experiments.results run all
    python -m experiments.results run tool_use --arms=search2_sft,search2_ppo   # some arms only
    python -m experiments.report                       # tables + plots from the runs' metrics

Every arm is an ordinary `experiments.sft` / `experiments.train` / `experiments.evaluate`
command on a config in `configs/` plus overrides, run in `runs/results/<experiment>/<arm>`,
with `num_seeds` seeds trained at once (`jax.vmap`). RL arms start from their experiment's SFT
arm (`config.init_from`), so "SFT only" and each RL method share the same warm start, seed by
seed. Wall time per arm is appended to `runs/results/timing.jsonl` (the compute statement of
RESULTS.md). `--seeds`, `--rl_steps` and `--sft_steps` scale everything down or up.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from typing import Sequence

from absl import app, flags

_ROOT = flags.DEFINE_string("root", "runs/results", "Where the runs go.")
_SEEDS = flags.DEFINE_integer("seeds", 5, "Seeds per arm (vmapped).")
_SFT_STEPS = flags.DEFINE_integer("sft_steps", 200, "SFT steps of the warm starts.")
_RL_STEPS = flags.DEFINE_integer("rl_steps", 60, "RL steps of every RL arm.")
_DRY = flags.DEFINE_bool("dry_run", False, "Print the commands, run nothing.")
_ARMS = flags.DEFINE_list("arms", [],
                          "Run only these arms of the named experiments (default: all).")


@dataclasses.dataclass(frozen=True)
class Arm:
  """One run: `program` (sft | train | evaluate | reflexion) on `config` with `overrides`.

  `init_from`: the arm (same experiment unless it contains a '/') whose checkpoint starts this
  one. For `evaluate` and `reflexion` arms, `init_from` is the run evaluated and `out` the JSON
  file written (in that run's directory).
  """
  name: str
  program: str
  config: str
  overrides: tuple[str, ...] = ()
  init_from: str | None = None
  out: str | None = None
  sft_steps: int | None = None  # this warm start's own SFT length (default: --sft_steps)
  rl_steps: int | None = None  # this RL arm's own length (default: --rl_steps)
  flags: tuple[str, ...] = ()  # program flags other than --config.* (e.g. evaluate's --samples)


def _warm_start(name: str, config: str, *overrides: str, sft_steps: int | None = None) -> Arm:
  return Arm(name, "sft", config, overrides, sft_steps=sft_steps)


def _rl(name: str, config: str, sft: str, *overrides: str) -> Arm:
  return Arm(name, "train", config, overrides, init_from=sft)


def _rl_steps(name: str, config: str, sft: str, rl_steps: int, *overrides: str) -> Arm:
  return Arm(name, "train", config, overrides, init_from=sft, rl_steps=rl_steps)


# Reflexion evaluations: 256 tasks x 5 trials per seed, without memory (Omega = 0: independent
# retries, the baseline) and with the last 3 reflections.
REFLEXION_EVAL = ("--instances=256", "--memory=0,3")


def _reflexion(name: str, config: str, policy: str, *overrides: str,
               reflection: str = "template") -> Arm:
  if reflection == "template":
    return Arm(name, "reflexion", config, overrides, init_from=policy, out="reflexion.json",
               flags=REFLEXION_EVAL)
  return Arm(name, "reflexion", config, overrides, init_from=policy,
             out=f"reflexion_{reflection}.json",
             flags=(*REFLEXION_EVAL, f"--reflection={reflection}"))


SEARCH3 = ("--config.env.hops=3", "--config.rollout.max_len=144")
GRPO_SEQ = ("--config.algo.loss_agg=seq_mean_token_mean",)  # the original GRPO aggregation
# The habit warm start (issue 18): 60% of the demonstrations follow the environment's habit
# (`EnvParams.habit_p`; > 0.5 makes it the SFT policy's greedy mode), no per-turn noise; RL keeps
# a KL term to the warm start (0.05, as the quick start: it stops the greedy policy drifting
# once the habit is gone).
HABIT = ("--config.sft.habit_p=0.6", "--config.sft.noise=0.0", "--config.algo.kl_coef=0.05")
QUICKSTART = "configs/quickstart.py"  # calculator with the habit settings above built in
QUICKSTART_SFT_STEPS = 600  # the quick start's own SFT length
SEARCH_SFT_STEPS = 400
GRPO = ("--config.rollout.num_envs=8", "--config.rollout.group_size=4",
        "--config.algo.advantage=grpo", "--config.algo.vf_coef=0.0")  # calculator_grpo.to_grpo

# Reflexion with the reflection that names the action (`reflection='action'`): a longer memory
# slot (template + the action: search 10 tokens, fix 15), so a longer context.
RX_ACTION_SEARCH = ("--config.reflexion.reflection=action", "--config.rollout.max_len=168")
RX_ACTION_FIX = ("--config.reflexion.reflection=action", "--config.rollout.max_len=224")

# 8. Per-turn think budget (issue 9, part 2): configs/search_think.py (3 hops, 192-token context,
#    demonstrations that think 44 tokens per turn). b = None: no per-turn cap, only the context.
#    think_budget_2hop: 2 hops in a 160-token context from a warm start that succeeds by
#    searching (issue 18): clean demonstrations (no noise), 300 SFT steps, GRPO 40 steps with
#    the KL term of the habit setting, GRPO arms for b in {0, 16, none} only (time).
THINK = "configs/search_think.py"
THINK_BUDGETS: tuple[tuple[str, int | None], ...] = (
    ("b0", 0), ("b4", 4), ("b16", 16), ("b64", 64), ("unlimited", None))
THINK_EVAL = ("--instances=64", "--samples=4")  # 256 sampled episodes per seed
THINK_2HOP = ("--config.env.hops=2", "--config.sft.noise=0.0", "--config.algo.kl_coef=0.05")
THINK_2HOP_CONTEXT = 160  # 2 searches thinking like the demonstrations fit, the answer does not
THINK_2HOP_SFT_MAX_LEN = 278  # the longest 2-hop demonstration: 10 + 4 turns * (44 + 7 + 16)
THINK_2HOP_RL = ("b0", "b16", "unlimited")


def _think(b: int | None) -> tuple[str, ...]:
  return () if b is None else (f"--config.rollout.think_budget={b}",)


def _think_budget_arms(env: tuple[str, ...] = (), context: int | None = None,
                       sft_max_len: int | None = None, sft_steps: int | None = None,
                       rl_steps: int | None = None,
                       rl_budgets: Sequence[str] | None = None) -> list[Arm]:
  """SFT (at the demonstrations' length `sft_max_len`), its evaluation under every b, then per
  b in `rl_budgets` (names of THINK_BUDGETS; None: all) a GRPO run trained with b and its
  evaluation with the same b, all in `context` tokens (None: the config's). `env`: overrides of
  every arm (the task); `sft_steps` / `rl_steps`: the arms' own lengths (None: the flags')."""
  from configs import search_think
  unknown = set(rl_budgets or ()) - {name for name, _ in THINK_BUDGETS}
  if unknown:
    raise ValueError(f"rl_budgets {sorted(unknown)} are not THINK_BUDGETS names "
                     f"{[name for name, _ in THINK_BUDGETS]}")
  sft_max_len = search_think.SFT_MAX_LEN if sft_max_len is None else sft_max_len
  ctx = () if context is None else (f"--config.rollout.max_len={context}",)
  arms = [_warm_start("sft", THINK, *env, f"--config.rollout.max_len={sft_max_len}",
                      sft_steps=sft_steps)]
  arms += [Arm(f"sft_eval_{name}", "evaluate", THINK,
               ("--config.sft.steps=0", *env, *ctx, *_think(b)),
               init_from="sft", out=f"eval_{name}.json", flags=THINK_EVAL)
           for name, b in THINK_BUDGETS]
  for name, b in THINK_BUDGETS:
    if rl_budgets is not None and name not in rl_budgets:
      continue
    arms += [_rl_steps(f"grpo_{name}", THINK, "sft", rl_steps, *env, *ctx, *_think(b)),
             Arm(f"grpo_{name}_eval", "evaluate", THINK,
                 ("--config.sft.steps=0", *env, *ctx, *_think(b)),
                 init_from=f"grpo_{name}", out="eval.json", flags=THINK_EVAL)]
  return arms


EXPERIMENTS: dict[str, list[Arm]] = {
    # 1. Multi-turn RL improves tool use: SFT only vs SFT + PPO (turn-level critic) vs SFT + GRPO,
    #    from habit warm starts (HABIT: 60% of the demonstrations follow the environment's habit,
    #    so the SFT policy's greedy mode is the habit RL has to fix). Calculator: the quick start
    #    (two 3-digit operands, habit = answer a guess without the tool); search: the expert
    #    stops one hop short.
    "tool_use": [
        _warm_start("calculator_sft", QUICKSTART, sft_steps=QUICKSTART_SFT_STEPS),
        _rl("calculator_ppo", QUICKSTART, "calculator_sft"),
        _rl("calculator_grpo", QUICKSTART, "calculator_sft", *GRPO),
        _warm_start("search2_sft", "configs/search_ppo.py", *HABIT, sft_steps=SEARCH_SFT_STEPS),
        _rl("search2_ppo", "configs/search_ppo.py", "search2_sft", *HABIT),
        _rl("search2_grpo", "configs/search_grpo.py", "search2_sft", *HABIT),
        _warm_start("search3_sft", "configs/search_ppo.py", *SEARCH3, *HABIT,
                    sft_steps=SEARCH_SFT_STEPS),
        _rl("search3_ppo", "configs/search_ppo.py", "search3_sft", *SEARCH3, *HABIT),
        _rl("search3_grpo", "configs/search_grpo.py", "search3_sft", *SEARCH3, *HABIT),
    ],
    # 2. Trajectory-level vs next-turn reward on clarify (k = 3 hidden constraints), from the
    #    habit warm start (the demonstrator answers at once, without asking).
    "clarify": [
        _warm_start("sft", "configs/clarify_ppo.py", *HABIT),
        _rl("ppo_trajectory", "configs/clarify_ppo.py", "sft", *HABIT),
        _rl("ppo_myopic", "configs/clarify_myopic.py", "sft", *HABIT),
        _rl("grpo", "configs/clarify_grpo.py", "sft", *HABIT),
        _rl("mr_w1", "configs/clarify_mr.py", "sft", *HABIT),
        _rl("mr_w2", "configs/clarify_mr2.py", "sft", *HABIT),
        _rl("mr_full", "configs/clarify_mr_full.py", "sft", *HABIT),
        # Section 3's proposal: trajectory-level PPO on a mix of sharded and fully specified
        # episodes (each fully specified with probability 1/2).
        _rl("ppo_mixed", "configs/clarify_ppo.py", "sft", *HABIT,
            "--config.env.full_fraction=0.5"),
    ],
    # 3. Lost in conversation: the clarify policies on the sharded vs fully specified task,
    #    10 samples per instance at temperature 1.
    "lost_in_conversation": [
        Arm(f"{policy}_{variant}", "evaluate", "configs/clarify_ppo.py",
            (f"--config.env.fully_specified={variant == 'full'}", *HABIT),
            init_from=f"clarify/{policy}", out=f"lic_{variant}.json")
        for policy in ("sft", "ppo_trajectory", "ppo_myopic", "grpo", "ppo_mixed")
        for variant in ("sharded", "full")
    ],
    # 4. Masking ablation on search (2 hops): tool replies in the loss. The masked arm (the
    #    default) is tool_use/search2_ppo; both start from its habit warm start.
    "masking": [
        _rl("unmasked", "configs/search_ppo.py", "tool_use/search2_sft",
            *HABIT, "--config.algo.mask_replies=False"),
    ],
    # 5. DAPO ladder on search with 3 hops, from the habit warm start of tool_use/search3_sft.
    "dapo_ladder": [
        _rl("1_grpo", "configs/search_grpo.py", "tool_use/search3_sft", *SEARCH3, *HABIT,
            *GRPO_SEQ),
        _rl("2_clip_higher", "configs/search_grpo.py", "tool_use/search3_sft", *SEARCH3, *HABIT,
            *GRPO_SEQ, "--config.algo.eps_high=0.28"),
        _rl("3_token_loss", "configs/search_grpo.py", "tool_use/search3_sft", *SEARCH3, *HABIT,
            "--config.algo.eps_high=0.28", "--config.algo.loss_agg=token_mean"),
        _rl("4_overlong", "configs/search_grpo.py", "tool_use/search3_sft", *SEARCH3, *HABIT,
            "--config.algo.eps_high=0.28", "--config.algo.loss_agg=token_mean",
            "--config.algo.overlong_len=40", "--config.algo.overlong_cache=10"),
        _rl("5_dynamic_sampling", "configs/search_dapo.py", "tool_use/search3_sft", *HABIT),
    ],
    # 6. Fix the program (issue 8): the SWE-style DAPO recipe vs GRPO vs PPO, and two ablations,
    #    from the habit warm start (the demonstrator never runs the tests: it edits a guessed
    #    line and submits unverified, 0.25 success).
    "fix": [
        _warm_start("sft", "configs/fix_ppo.py", *HABIT, sft_steps=400),
        _rl("dapo", "configs/fix_dapo.py", "sft", *HABIT),
        _rl("grpo", "configs/fix_grpo.py", "sft", *HABIT),
        _rl("ppo", "configs/fix_ppo.py", "sft", *HABIT),
        _rl("dapo_no_penalty", "configs/fix_dapo_no_penalty.py", "sft", *HABIT),
        _rl("dapo_filter_truncated", "configs/fix_dapo.py", "sft", *HABIT,
            "--config.algo.keep_truncated=False"),
    ],
    # 7. Retrieval (issue 8): NDCG / Recall as rewards; the raw-user-text row is every run's
    #    eval/raw_ndcg. From the habit warm start (the demonstrator sends the user's raw text;
    #    in multi-turn mode it answers with it without searching).
    "retrieval": [
        _warm_start("sft", "configs/retrieval_grpo_ndcg.py", *HABIT),
        _rl("grpo_ndcg", "configs/retrieval_grpo_ndcg.py", "sft", *HABIT),
        _rl("grpo_recall", "configs/retrieval_grpo_recall.py", "sft", *HABIT),
        _warm_start("multiturn_sft", "configs/retrieval_multiturn.py", *HABIT),
        _rl("multiturn_grpo", "configs/retrieval_multiturn.py", "multiturn_sft", *HABIT),
    ],
    # 8. Per-turn think budget b vs a fixed total context (see _think_budget_arms).
    "think_budget": _think_budget_arms(),
    "think_budget_2hop": _think_budget_arms(THINK_2HOP, THINK_2HOP_CONTEXT,
                                            THINK_2HOP_SFT_MAX_LEN, sft_steps=300, rl_steps=40,
                                            rl_budgets=THINK_2HOP_RL),
    # 10. Reflexion (issue 9): solved vs trial with Omega in {0, 3} reflections in memory
    #    (REFLEXION_EVAL), for the SFT policy, the multi-turn RL policy (60 steps x 32
    #    episodes) and a policy meta-trained on 3-trial episodes with the same episode budget
    #    (20 steps x 3 x 32), with the templated reflection and with the one that names the
    #    action to change (`--reflection action`: the template, then the search the episode
    #    lacked / `run` when it never ran the tests; meta-trained with it as well). All from
    #    the habit warm starts of sections 1 / 6. (`--reflection policy`, the SFT policy
    #    writing its own, is `experiments.reflexion`'s option for a pretrained model.)
    "reflexion": [
        _rl_steps("search_meta", "configs/search_reflexion.py", "tool_use/search2_sft", 20,
                  *HABIT),
        _rl_steps("search_meta_action", "configs/search_reflexion.py", "tool_use/search2_sft",
                  20, *HABIT, *RX_ACTION_SEARCH),
        _reflexion("eval_search_sft", "configs/search_reflexion.py", "tool_use/search2_sft",
                   *HABIT),
        _reflexion("eval_search_rl", "configs/search_reflexion.py", "tool_use/search2_ppo",
                   *HABIT),
        _reflexion("eval_search_meta", "configs/search_reflexion.py", "search_meta", *HABIT),
        _reflexion("eval_search_sft_action", "configs/search_reflexion.py",
                   "tool_use/search2_sft", *HABIT, *RX_ACTION_SEARCH, reflection="action"),
        _reflexion("eval_search_rl_action", "configs/search_reflexion.py",
                   "tool_use/search2_ppo", *HABIT, *RX_ACTION_SEARCH, reflection="action"),
        _reflexion("eval_search_meta_action", "configs/search_reflexion.py",
                   "search_meta_action", *HABIT, *RX_ACTION_SEARCH, reflection="action"),
        _rl_steps("fix_meta", "configs/fix_reflexion.py", "fix/sft", 20, *HABIT),
        _rl_steps("fix_meta_action", "configs/fix_reflexion.py", "fix/sft", 20, *HABIT,
                  *RX_ACTION_FIX),
        _reflexion("eval_fix_sft", "configs/fix_reflexion.py", "fix/sft", *HABIT),
        _reflexion("eval_fix_rl", "configs/fix_reflexion.py", "fix/ppo", *HABIT),
        _reflexion("eval_fix_meta", "configs/fix_reflexion.py", "fix_meta", *HABIT),
        _reflexion("eval_fix_sft_action", "configs/fix_reflexion.py", "fix/sft", *HABIT,
                   *RX_ACTION_FIX, reflection="action"),
        _reflexion("eval_fix_rl_action", "configs/fix_reflexion.py", "fix/ppo", *HABIT,
                   *RX_ACTION_FIX, reflection="action"),
        _reflexion("eval_fix_meta_action", "configs/fix_reflexion.py", "fix_meta_action",
                   *HABIT, *RX_ACTION_FIX, reflection="action"),
    ],
}


def arm_dir(root: str, experiment: str, name: str) -> str:
  return os.path.join(root, *(name.split("/") if "/" in name else (experiment, name)))


def arm_steps(arm: Arm, *, sft_steps: int, rl_steps: int) -> tuple[int, int]:
  """(SFT steps, RL steps) the arm trains, given the command line's defaults: an RL arm starts
  from its warm start's checkpoint and trains no SFT; an arm's own lengths win."""
  rl_steps = rl_steps if arm.rl_steps is None else arm.rl_steps
  if arm.init_from:
    return 0, rl_steps
  return (sft_steps if arm.sft_steps is None else arm.sft_steps), rl_steps


def command(root: str, experiment: str, arm: Arm, *, seeds: int, sft_steps: int,
            rl_steps: int) -> tuple[list[str], str]:
  """(argv, the file whose existence means the arm is done)."""
  cmd = [sys.executable, "-m", f"experiments.{arm.program}", "--config", arm.config,
         f"--config.train.num_seeds={seeds}"]
  if arm.program in ("evaluate", "reflexion"):
    source = arm_dir(root, experiment, arm.init_from)
    out = os.path.join(source, arm.out)
    return cmd + ["--run", source, "--out", out, *arm.flags, *arm.overrides], out
  workdir = arm_dir(root, experiment, arm.name)
  sft_steps, rl_steps = arm_steps(arm, sft_steps=sft_steps, rl_steps=rl_steps)
  cmd += ["--workdir", workdir, f"--config.sft.steps={sft_steps}",
          f"--config.train.steps={rl_steps}", "--config.train.eval_every=10",
          "--config.train.checkpoint_every=20"]
  if arm.init_from:
    cmd.append(f"--config.init_from={arm_dir(root, experiment, arm.init_from)}")
  return cmd + list(arm.flags) + list(arm.overrides), os.path.join(workdir, "samples.txt")


def _source_done(root: str, experiment: str, arm: Arm) -> str | None:
  """None if the run `arm` starts from (or evaluates) is finished, else that run's name."""
  if not arm.init_from:
    return None
  source = arm_dir(root, experiment, arm.init_from)
  return None if os.path.exists(os.path.join(source, "samples.txt")) else source


def run(experiment: str, root: str, arms: Sequence[str] = (), **scale) -> None:
  for arm in EXPERIMENTS[experiment]:
    if arms and arm.name not in arms:
      continue
    cmd, done = command(root, experiment, arm, **scale)
    if os.path.exists(done):
      print(f"[{experiment}/{arm.name}] done ({done})")
      continue
    missing = _source_done(root, experiment, arm)
    if missing and not _DRY.value:  # never start from a half-trained checkpoint
      sys.exit(f"error: {experiment}/{arm.name} starts from {missing}, which has not finished "
               f"(no samples.txt); run its experiment first")
    print(f"[{experiment}/{arm.name}] {' '.join(cmd[1:])}", flush=True)
    if _DRY.value:
      continue
    t0 = time.time()
    result = subprocess.run(cmd)
    if result.returncode:
      sys.exit(f"error: {experiment}/{arm.name} failed (exit {result.returncode})")
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, "timing.jsonl"), "a") as f:
      steps = {}
      if arm.program not in ("evaluate", "reflexion"):
        sft, rl = arm_steps(arm, sft_steps=scale["sft_steps"], rl_steps=scale["rl_steps"])
        steps = dict(sft_steps=sft, rl_steps=rl)
      f.write(json.dumps({"experiment": experiment, "arm": arm.name, "wall_s": time.time() - t0,
                          **scale, **steps}) + "\n")


def main(argv):
  if len(argv) < 2 or argv[1] not in ("list", "run"):
    sys.exit("usage: python -m experiments.results list | run <experiment>|all")
  scale = dict(seeds=_SEEDS.value, sft_steps=_SFT_STEPS.value, rl_steps=_RL_STEPS.value)
  if argv[1] == "list":
    for name, arms in EXPERIMENTS.items():
      print(f"{name}:")
      for arm in arms:
        print(f"  {arm.name}: {' '.join(command(_ROOT.value, name, arm, **scale)[0][1:])}")
    return
  names = list(EXPERIMENTS) if argv[2:] == ["all"] else argv[2:]
  unknown = [n for n in names if n not in EXPERIMENTS]
  if unknown or not names:
    sys.exit(f"error: unknown experiment(s) {unknown}; choose from {list(EXPERIMENTS)} or all")
  known = {arm.name for n in names for arm in EXPERIMENTS[n]}
  bad = sorted(set(_ARMS.value) - known)
  if bad:
    sys.exit(f"error: --arms {bad} are not arms of {names}; `list` shows them")
  for name in names:
    run(name, _ROOT.value, _ARMS.value, **scale)


if __name__ == "__main__":
  app.run(main)
