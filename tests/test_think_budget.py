"""Issue 9, part 2: the per-turn think budget against a fixed total context.

The verbose-thinking search expert (`Search(think_len=N)`), the rollout's think cap checked
against a plain Python scan of the tokens, the `think_tokens` evaluation metric, the budgets of
`configs/search_think.py`, and the experiment's arms, table and plot.
"""

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import search_think
from experiments import evaluate
from experiments import report
from experiments import results as R
from mtrl_jax import metrics as metrics_lib
from mtrl_jax import rollout as rollout_lib
from mtrl_jax import train as train_lib
from mtrl_jax import types
from mtrl_jax import vocab as V
from mtrl_jax.envs import demos, registry
from mtrl_jax.envs.search import Search
from mtrl_jax.models import transformer as tf

CONTROL = (V.THINK_OPEN, V.THINK_CLOSE, V.CALL_OPEN, V.CALL_CLOSE, V.ANSWER_OPEN, V.ANSWER_CLOSE,
           V.EOT, V.PAD, V.BOS, V.USER, V.ASSISTANT, V.TOOL)


def _turns(traj, b):
  """[(start, end)] inclusive spans of row b's agent turns (plain Python)."""
  turn = np.asarray(traj.turn[b])
  return [(int(np.flatnonzero(turn == k)[0]), int(np.flatnonzero(turn == k)[-1]))
          for k in range(int(turn.max()) + 1) if np.any(turn == k)]


# --- the verbose expert ------------------------------------------------------------------------

def _reference_think(env, prompt_words, found_steps, n):
  """Plain Python: the question (prompt content), then the found chain steps, cycled to n."""
  stream = list(prompt_words) + [w for step in found_steps for w in step]
  return [stream[i % len(stream)] for i in range(n)]


@pytest.mark.parametrize("hops,think_len", [(3, 12), pytest.param(2, 40, marks=pytest.mark.slow)])
def test_verbose_expert_thinks_exactly_n_tokens_and_acts_like_the_plain_expert(hops, think_len):
  verbose, params = registry.make("search", hops=hops, think_len=think_len, noise=0.3)
  plain, _ = registry.make("search", hops=hops, noise=0.3)
  assert verbose.action_len == 5 + think_len + 2 and plain.action_len == 5
  key, n = jax.random.key(7), 32
  dv = demos.demonstrations(verbose, params, key, n, demos.required_len(verbose))
  dp = demos.demonstrations(plain, params, key, n, demos.required_len(plain))
  # Same keys, same mistakes: the verbose expert's episodes are the plain ones, turn by turn.
  for k in ("success", "hops_found", "format_errors", "num_tool_calls", "num_turns"):
    np.testing.assert_array_equal(dv.info[k], dp.info[k], err_msg=k)
  np.testing.assert_array_equal(dv.turn_reward, dp.turn_reward)
  assert 0.3 < float(np.mean(dv.info["success"])) < 1.0   # noisy, yet mostly right
  voc = verbose.vocab
  for b in range(n):
    words = voc.decode(np.asarray(dv.tokens[b]).tolist()).split()
    plain_words = voc.decode(np.asarray(dp.tokens[b]).tolist()).split()
    question = words[words.index(V.USER) + 1:words.index(V.EOT)]
    vt, pt = _turns(dv, b), _turns(dp, b)
    assert len(vt) == len(pt)
    records = {}   # entity -> its record (words), from the tool replies read so far
    rels = question[2:-2:2][::-1]   # the question's relations, x0's first
    for (s, e), (ps, pe) in zip(vt, pt):
      # The chain steps found so far: follow the question from x0 through the records read.
      steps, entity = [], question[-2]
      while entity in records and len(steps) < hops:
        rec = records[entity]
        key = rels[len(steps)] if len(steps) < hops - 1 else question[0]
        steps.append([entity, key, rec[rec.index(key) + 1]])
        entity = steps[-1][2]
      turn = words[s:e + 1]
      assert turn[0] == V.THINK_OPEN and turn[think_len + 1] == V.THINK_CLOSE, turn
      think = turn[1:think_len + 1]
      assert not set(think) & set(CONTROL), think
      assert think == _reference_think(verbose, question, steps, think_len), (b, turn)
      assert turn[think_len + 2:] == plain_words[ps:pe + 1]   # the body: the plain expert's
      reply = words[e + 1:]
      if reply and reply[0] == V.TOOL and reply[1] != "<error>":
        records[reply[1]] = reply[:reply.index(V.EOT)]


def test_default_search_is_unchanged():
  env, params = registry.make("search", hops=3, noise=0.3)
  assert Search().action_len == 5 and env.think_len == 0
  keys = jax.random.split(jax.random.key(3), 64)
  states, _ = jax.vmap(env.reset, in_axes=(0, None))(keys, params)
  actions = jax.jit(jax.vmap(env.expert, in_axes=(0, 0, None)))(keys, states, params)
  assert actions.tokens.shape == (64, 5)
  assert not np.any(np.asarray(actions.tokens) == env.vocab.id(V.THINK_OPEN))
  # Every action is one of the plain expert's five-token calls / answers.
  first = set(np.asarray(actions.tokens)[:, 0].tolist())
  assert first <= {env.vocab.id(V.CALL_OPEN), env.vocab.id(V.ANSWER_OPEN)}


def test_budget_errors_name_the_setting():
  with pytest.raises(ValueError, match="think_len"):
    Search(think_len=-1)
  env, params = registry.make("search", hops=3, think_len=search_think.THINK_LEN)
  cfg = tf.model_config("tiny", env.vocab.size)
  # force_expert needs a turn budget that holds the verbose turn (51 tokens).
  with pytest.raises(rollout_lib.BudgetError, match=r"turn_budget=24.*action_len=51"):
    rollout_lib.make_rollout(env, cfg, rollout_lib.RolloutConfig(
        max_len=192, turn_budget=24, force_expert=True))
  with pytest.raises(rollout_lib.BudgetError, match="think_budget=71"):
    rollout_lib.make_rollout(env, cfg, rollout_lib.RolloutConfig(
        max_len=192, turn_budget=72, think_budget=71))
  with pytest.raises(ValueError, match=r"max_len=192 .* = 347"):
    demos.demonstrations(env, params, jax.random.key(0), 2, 192)
  # The experiment's config: SFT at the 192-token context is refused with the key named; the
  # SFT arm's max_len holds the demonstrations exactly.
  config = search_think.get_config()
  with pytest.raises(ValueError, match=r"config.rollout.max_len=192 .*347"):
    train_lib.make_train(config)
  assert search_think.SFT_MAX_LEN >= demos.required_len(env) == 347


@pytest.mark.slow
def test_the_verbose_expert_runs_out_of_the_experiments_context():
  """The premise of the experiment: thinking like the demonstrations, 3 hops do not fit in 192
  tokens (the third search is cut off); in the SFT length they all fit."""
  config = search_think.get_config()
  env, params = registry.make("search", hops=3, think_len=search_think.THINK_LEN, noise=0.0)
  cfg = tf.ModelConfig(vocab_size=env.vocab.size, d_model=16, num_layers=1, num_heads=2,
                       num_kv_heads=1, mlp_dim=16)
  weights = tf.init_params(cfg, jax.random.key(0))
  for max_len, success, hops in ((config.rollout.max_len, 0.0, 2),
                                 (search_think.SFT_MAX_LEN, 1.0, 3)):
    play = rollout_lib.make_rollout(env, cfg, rollout_lib.RolloutConfig(
        num_envs=4, max_len=max_len, turn_budget=config.rollout.turn_budget, force_expert=True))
    traj = jax.jit(play)(weights, jax.random.key(1), params)
    np.testing.assert_array_equal(traj.info["success"], success)
    np.testing.assert_array_equal(traj.info["hops_found"], hops)
    np.testing.assert_array_equal(traj.truncated, success == 0)


# --- the rollout's think cap -------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _sampled(think_budget):
  """A random policy at high temperature on search with a loose turn budget: think blocks open
  often and run long, so the cap is exercised. Returns (env, traj as numpy)."""
  env, params = registry.make("search", hops=2)
  cfg = tf.ModelConfig(vocab_size=env.vocab.size, d_model=16, num_layers=1, num_heads=2,
                       num_kv_heads=1, mlp_dim=16)
  weights = tf.init_params(cfg, jax.random.key(0))
  play = rollout_lib.make_rollout(env, cfg, rollout_lib.RolloutConfig(
      num_envs=64, max_len=96, turn_budget=24, think_budget=think_budget, temperature=20.0))
  traj = jax.jit(play)(weights, jax.random.key(2), params)
  types.check_trajectory(traj)
  return env, jax.tree.map(np.asarray, traj)


def _scan_think(env, traj, b_cap):
  """Plain Python scan of every agent turn: longest run of tokens inside a think block, and per
  `</think>` whether it came right after b_cap inside tokens (so must be forced) and its mask."""
  open_id, close_id = env.vocab.id(V.THINK_OPEN), env.vocab.id(V.THINK_CLOSE)
  longest, closes = 0, []
  for b in range(traj.tokens.shape[0]):
    for s, e in _turns(traj, b):
      inside = None
      for t in range(s, e + 1):
        tok = int(traj.tokens[b, t])
        if inside is None:
          inside = 0 if tok == open_id else None
          continue
        if tok == close_id:
          closes.append((inside == b_cap, bool(traj.loss_mask[b, t]),
                         float(traj.sampler_logprob[b, t])))
          inside = None
        elif tok == env.vocab.eot_id and t == e:
          break
        else:
          inside += 1
          longest = max(longest, inside)
          if b_cap is not None and inside == b_cap and t < e:
            assert int(traj.tokens[b, t + 1]) in (close_id, env.vocab.eot_id), (b, t)
  return longest, closes


@pytest.mark.parametrize("cap", [0, 3])
def test_think_budget_caps_every_block_and_forced_closes_are_not_trained(cap):
  env, traj = _sampled(cap)
  longest, closes = _scan_think(env, traj, cap)
  assert longest <= cap
  forced = [c for c in closes if c[0]]
  assert len(forced) >= 5, "the cap was never reached: the test would not see a violation"
  for _, in_loss, logp in forced:
    assert not in_loss and logp == 0.0
  # Sampled closes (before the cap) are policy tokens, in the loss.
  assert all(in_loss for at_cap, in_loss, _ in closes if not at_cap)
  # Every other agent token outside a forced position was sampled: the mask is not all-False.
  assert traj.loss_mask.sum() > 0


@pytest.mark.slow
def test_without_a_cap_blocks_run_past_it():
  """The same policy uncapped thinks longer than 3 tokens: the scan above would catch it."""
  env, traj = _sampled(None)
  longest, closes = _scan_think(env, traj, None)
  assert longest > 3
  assert all(in_loss for _, in_loss, _ in closes)


@pytest.mark.parametrize("cap", [3, pytest.param(None, marks=pytest.mark.slow)])
def test_think_tokens_metric_matches_a_plain_count(cap):
  env, traj = _sampled(cap)
  got = np.asarray(evaluate.think_tokens(jax.tree.map(jnp.asarray, traj), env.vocab))
  open_id, close_id = env.vocab.id(V.THINK_OPEN), env.vocab.id(V.THINK_CLOSE)
  want = np.zeros(traj.tokens.shape[0])
  for b in range(traj.tokens.shape[0]):
    for s, e in _turns(traj, b):
      inside = False
      for t in range(s, e + 1):
        tok = int(traj.tokens[b, t])
        if inside and tok == close_id:
          inside = False
        elif inside:
          want[b] += 1
        elif tok == open_id:
          inside = True
  np.testing.assert_array_equal(got, want)
  assert want.sum() > 0


# --- the experiment: arms, table, plot ---------------------------------------------------------

@pytest.mark.parametrize("experiment,hops,context", [("think_budget", 3, None),
                                                      ("think_budget_2hop", 2, 160)])
def test_think_budget_arms(experiment, hops, context):
  arms = {a.name: a for a in R.EXPERIMENTS[experiment]}
  sft = arms["sft"]
  # The SFT row holds exactly the longest demonstration of the experiment's task.
  env, _ = registry.make("search", hops=hops, think_len=search_think.THINK_LEN)
  sft_len = [int(o.split("=")[1]) for o in sft.overrides if "max_len" in o]
  assert sft.program == "sft" and len(sft_len) == 1
  assert demos.required_len(env) <= sft_len[0] <= demos.required_len(env) + 1
  ctx = [] if context is None else [f"--config.rollout.max_len={context}"]
  hop = [] if hops == 3 else [f"--config.env.hops={hops}"]
  assert [o for o in sft.overrides if "hops" in o] == hop
  # The 2-hop rerun (issue 18): clean demonstrations, the habit setting's KL term, its own
  # SFT / RL lengths and GRPO arms for some b only.
  clean = ["--config.sft.noise=0.0", "--config.algo.kl_coef=0.05"] if hops == 2 else []
  rl_names = R.THINK_2HOP_RL if hops == 2 else [name for name, _ in R.THINK_BUDGETS]
  rl_steps = 40 if hops == 2 else 60
  assert sorted(n for n in arms if n.startswith("grpo_") and not n.endswith("_eval")) == sorted(
      f"grpo_{n}" for n in rl_names)
  cmd, _ = R.command("runs/results", experiment, sft, seeds=5, sft_steps=200, rl_steps=60)
  assert f"--config.sft.steps={300 if hops == 2 else 200}" in cmd
  for name, b in R.THINK_BUDGETS:
    want = () if b is None else (f"--config.rollout.think_budget={b}",)
    ev = arms[f"sft_eval_{name}"]
    assert [o for o in ev.overrides if o in clean] == clean
    if name not in rl_names:
      assert f"grpo_{name}_eval" not in arms
      continue
    rl, rl_ev = arms[f"grpo_{name}"], arms[f"grpo_{name}_eval"]
    assert ev.program == rl_ev.program == "evaluate" and rl.program == "train"
    assert ev.init_from == rl.init_from == "sft" and rl_ev.init_from == f"grpo_{name}"
    for arm in (ev, rl, rl_ev):  # the same total context (and task) everywhere
      assert [o for o in arm.overrides if "think_budget" in o] == list(want)
      assert [o for o in arm.overrides if "max_len" in o] == ctx
      assert [o for o in arm.overrides if "hops" in o] == hop
    cmd, done = R.command("runs/results", experiment, rl_ev, seeds=5, sft_steps=200,
                          rl_steps=60)
    assert "--samples=4" in cmd and "--instances=64" in cmd  # 256 sampled episodes per seed
    assert done.endswith(f"{experiment}/grpo_{name}/eval.json")
    cmd, _ = R.command("runs/results", experiment, rl, seeds=5, sft_steps=200, rl_steps=60)
    assert "--config.sft.steps=0" in cmd and f"--config.train.steps={rl_steps}" in cmd
    assert [o for o in rl.overrides if o in clean] == clean
  assert [b for _, b in R.THINK_BUDGETS] == [0, 4, 16, 64, None]


def test_think_budget_arms_reject_an_unknown_budget_name():
  with pytest.raises(ValueError, match="b8"):
    R._think_budget_arms(rl_budgets=("b0", "b8"))


def _fake_eval(path, rows, size=None):
  path.parent.mkdir(parents=True, exist_ok=True)
  extra = {} if size is None else {"instances": size[0], "samples": size[1]}
  path.write_text(json.dumps({"per_seed": rows, **extra}))


@pytest.mark.parametrize("experiment,title", [("think_budget", "Search, 3 hops"),
                                              ("think_budget_2hop", "Search, 2 hops")])
def test_think_budget_table_and_plot(tmp_path, experiment, title):
  root, docs = tmp_path / "runs", tmp_path / "docs"
  rows = lambda s: [{"success": s + 0.1 * i, "hops_found": 2.0 + i, "out_of_context": 0.5,
                     "think_tokens": 4.0} for i in range(3)]
  _fake_eval(root / experiment / "sft" / "eval_b16.json", rows(0.2), size=(32, 4))
  _fake_eval(root / experiment / "grpo_b0" / "eval.json", rows(0.6))
  w = metrics_lib.MetricsWriter(str(root / experiment / "grpo_unlimited"))
  for step, succ in ((0, [0.1, 0.3]), (5, [0.0, 0.0]), (10, [0.5, 0.9])):
    rec = {}
    for key, vals in (("eval/success_rate", succ), ("eval/hops_found", [2.0, 2.0]),
                      ("eval/truncated", [1.0, 0.5])):
      rec.update({f"{key}/seed{i}": v for i, v in enumerate(vals)}, **{key: float(np.mean(vals))})
    w.write(step, rec if step != 5 else {"train/loss": 1.0})
  w.close()
  w = metrics_lib.MetricsWriter(str(root / experiment / "grpo_b4"))  # only the step-0 eval
  w.write(0, {"eval/success_rate": 0.25, "eval/hops_found": 1.0, "eval/truncated": 0.0})
  w.close()
  docs.mkdir()
  (docs / "RESULTS.md").write_text("a\n<!-- report:tool_use -->\nkept\n<!-- /report:tool_use -->\n"
                                   f"<!-- report:{experiment} -->\nold\n"
                                   f"<!-- /report:{experiment} -->\n<!-- report:compute -->\n"
                                   "kept too\n<!-- /report:compute -->\nz\n")
  report.write_report(str(root), str(docs), only=[experiment])
  text = (docs / "RESULTS.md").read_text()
  assert "old" not in text and text.startswith("a\n") and text.endswith("z\n")
  assert "\nkept\n" in text and "\nkept too\n" in text   # --only leaves the rest alone
  m, h = report.mean_ci([0.2, 0.3, 0.4])
  hm, hh = report.mean_ci([2.0, 3.0, 4.0])
  assert (f"| 16 | SFT, capped at eval | 3 | {m:.2f} ± {h:.2f} | {hm:.2f} ± {hh:.2f} | "
          f"0.50 ± 0.00 | 4.00 ± 0.00 |") in text
  m, h = report.mean_ci([0.6, 0.7, 0.8])
  assert f"| 0 | GRPO, trained with the cap | 3 | {m:.2f} ± {h:.2f} |" in text
  assert "| none | SFT, capped at eval | not run |" in text
  grpo_4_row = "| 4 | GRPO, trained with the cap | not run |" in text
  assert grpo_4_row == (experiment == "think_budget")  # the 2-hop rerun defines no b = 4 arm
  # Greedy in-training evaluations: the first (the SFT policy with the cap) and the last.
  m0, h0 = report.mean_ci([0.1, 0.3])
  m1, h1 = report.mean_ci([0.5, 0.9])
  t1 = report.mean_ci([1.0, 0.5])
  g, gh = report.mean_ci([0.4, 0.6])  # GRPO - SFT per seed: 0.5 - 0.1, 0.9 - 0.3
  assert (f"| none | 2 | 10 | {m0:.2f} ± {h0:.2f} | 2.00 ± 0.00 | {t1[0]:.2f} ± {t1[1]:.2f} | "
          f"{m1:.2f} ± {h1:.2f} | 2.00 ± 0.00 | {t1[0]:.2f} ± {t1[1]:.2f} | "
          f"{g:.2f} ± {gh:.2f} | - |") in text
  assert "32 instances x 4 samples per seed" in text  # read from the evaluation files
  if experiment == "think_budget":
    assert "| 64 | not run |" in text
    assert "| 4 | 1 | 0 | 0.25 ± 0.00 | 1.00 ± 0.00 | 0.00 ± 0.00 | - | - | - | - | - |" in text
  else:  # GRPO arms the 2-hop rerun does not define are not rows (its b4 record is ignored)
    assert "| 64 | not run |" not in text and "| 4 | 1 | 0 |" not in text
    assert "| 16 | not run |" in text
  assert f"![{title}" in text
  assert (docs / f"results_{experiment}.png").stat().st_size > 1000


def test_full_report_with_no_runs_does_not_fail(tmp_path):
  """A checkout with none of the runs (runs/ is not committed): every table says "not run"."""
  (tmp_path / "runs").mkdir()
  (tmp_path / "docs").mkdir()
  (tmp_path / "docs" / "RESULTS.md").write_text("<!-- report:think_budget -->\n"
                                                "<!-- /report:think_budget -->\n")
  report.write_report(str(tmp_path / "runs"), str(tmp_path / "docs"))
  text = (tmp_path / "docs" / "RESULTS.md").read_text()
  assert text.count("not run") == 3 * len(R.THINK_BUDGETS) and "![" not in text
  assert "instances x samples per seed" in text
