"""Reflexion with a real tokenizer and a Hugging Face-style checkpoint: the memory as chat system
messages (ChatML and Llama 3), templated reflections written as text through `TokenizedEnv`
(checked against the symbol-level loop), and policy-written reflections on the `json_tool`
environment of `configs/hf_calculator_grpo.py` (the option for a loaded checkpoint)."""

import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("tokenizers", reason="needs the hf extra: pip install -e .[hf]")
pytest.importorskip("safetensors", reason="needs the hf extra: pip install -e .[hf]")
pytest.importorskip("jinja2", reason="needs the hf extra: pip install -e .[hf]")

from mtrl_jax import reflexion as RX  # noqa: E402
from mtrl_jax import rollout as R  # noqa: E402
from mtrl_jax import train as train_lib  # noqa: E402
from mtrl_jax import vocab as V  # noqa: E402
from mtrl_jax.envs import json_tool  # noqa: E402
from mtrl_jax.envs.search import Search  # noqa: E402
from mtrl_jax.models import chat  # noqa: E402
from mtrl_jax.models import transformer as tf  # noqa: E402
from test_hf_chat import DATA, make_tokenizer_dir  # noqa: E402
from test_hf_train import ROOT, checkpoint, tiny_config  # noqa: E402,F401 (a fixture)


@pytest.fixture(scope="module", params=["chatml", "llama3"])
def tokenizer(request, tmp_path_factory):
  path = make_tokenizer_dir(tmp_path_factory.mktemp(request.param), request.param)
  return chat.ChatTokenizer.from_dir(path)


def test_memory_is_a_chat_system_message(tokenizer):
  tok, layout = tokenizer, tokenizer.layout
  env = json_tool.TokenizedEnv(Search(hops=1), tok)
  reflection = tok.encode(" <error> e3 colour")
  L = len(reflection) + 3
  wrapped = RX.WithMemory(env, slots=2, reflection_len=L)
  pre, post, at = RX.memory_frame(tok)
  assert wrapped.prompt_len == env.prompt_len + 2 * (L + len(pre) + len(post))
  assert at == (1 if layout.name == "llama3" else 0)
  key, params = jax.random.key(2), env.default_params
  _, plain = env.reset(key, params)
  plain_text = tok.decode(np.asarray(plain.tokens[:int(plain.length)]))
  # Empty memory: the plain prompt, token for token.
  _, empty = wrapped.reset(key, wrapped.empty_memory(params))
  n = int(plain.length)
  assert int(empty.length) == n
  np.testing.assert_array_equal(np.asarray(empty.tokens[:n]), np.asarray(plain.tokens[:n]))
  # One reflection (the other slot empty): a system message of the layout after its
  # begin-of-text, then the plain prompt.
  tokens = np.zeros((2, L), np.int32)
  tokens[1, :len(reflection)] = reflection
  mem = RX.MemoryParams(inner=params, tokens=jnp.asarray(tokens),
                        lengths=jnp.asarray([0, len(reflection)], jnp.int32))
  _, obs = jax.jit(wrapped.reset)(key, mem)
  text = tok.decode(np.asarray(obs.tokens[:int(obs.length)]))
  assert plain_text.startswith(layout.bos)
  want = (layout.bos + layout.message("system", " <error> e3 colour")
          + plain_text[len(layout.bos):])
  assert text == want


@pytest.mark.parametrize("kind", ["reflection", "action_reflection"])
def test_tokenized_reflection_is_the_symbol_reflection_as_text(tokenizer, kind):
  """`TokenizedEnv.reflection` (and `.action_reflection`, the one naming the action to change)
  writes the inner environment's reflection of the same final state as text, symbol by symbol
  (final states of a noisy expert's symbol rollout)."""
  tok, inner = tokenizer, Search(hops=2)
  env = json_tool.TokenizedEnv(inner, tok)
  assert env.names_actions
  assert (getattr(env, f"{kind}_len")
          == getattr(inner, f"{kind}_len") * env._reply_table.shape[1])
  cfg = tf.ModelConfig(vocab_size=inner.vocab.size, d_model=32, num_layers=1, num_heads=2,
                       num_kv_heads=1, mlp_dim=32)
  rc = R.RolloutConfig(num_envs=16, group_size=1, max_len=128, turn_budget=12,
                       force_expert=True)
  reset_keys, sample_keys = R.rollout_keys(jax.random.key(5), 16, 1)
  traj, states = R.make_rollout(inner, cfg, rc).rows(
      tf.init_params(cfg, jax.random.key(0)), reset_keys, sample_keys,
      inner.default_params.replace(noise=0.7), return_env_state=True)
  syms, sym_n = jax.vmap(getattr(inner, kind))(states)
  toks, tok_n = jax.jit(jax.vmap(getattr(env, kind)))(states)
  assert not np.all(np.asarray(traj.info["success"]))
  assert np.any(np.asarray(sym_n) >= 2)
  for b in range(16):
    want = "".join(" " + inner.vocab.symbols[i] for i in np.asarray(syms[b, :int(sym_n[b])]))
    assert tok.decode(np.asarray(toks[b, :int(tok_n[b])])) == want
    assert np.all(np.asarray(toks[b, int(tok_n[b]):]) == 0)


def test_templated_reflexion_through_a_tokenizer(tokenizer):
  """The trial loop on a symbol environment spoken in real tokens: failed rows remember their
  templated reflection as text, solved rows nothing, and the next trial's prompt opens with it
  as a system message."""
  tok, inner = tokenizer, Search(hops=2)
  env = json_tool.TokenizedEnv(inner, tok)
  W = env._turn_table.shape[1]
  cfg = tf.ModelConfig(vocab_size=tok.size, d_model=32, num_layers=1, num_heads=2,
                       num_kv_heads=1, mlp_dim=32)
  rc = R.RolloutConfig(num_envs=8, group_size=1, turn_budget=12 * W, force_expert=True,
                       max_len=env.prompt_len + 64 + env.reflection_len
                       + inner.max_turns * (12 * W + env.reply_len))
  run = RX.make_reflexion(env, cfg, rc, trials=2, memory=1, keep_trajectories=True)
  reset_keys, sample_keys = R.rollout_keys(jax.random.key(5), 8, 1)
  got = jax.jit(run)(tf.init_params(cfg, jax.random.key(0)), reset_keys, sample_keys,
                     inner.default_params.replace(noise=0.7))
  failed = ~np.asarray(got.success[0])
  lens = np.asarray(got.memory_len[1, :, 0])
  assert np.any(failed) and np.all(lens[~failed] == 0) and np.any(lens[failed] > 0)
  for b in range(8):
    text = tok.decode(np.asarray(got.memory[1, b, 0, :lens[b]]))
    assert all(w in inner.vocab.symbols for w in text.split()), text
    prompt = tok.decode(np.asarray(got.trajs.tokens[1, b]))
    head = tok.layout.bos + (tok.layout.message("system", text) if lens[b] else "")
    assert prompt.startswith(head + tok.layout.header.format(role="user")), prompt[:120]


def test_policy_reflections_with_a_hugging_face_checkpoint(checkpoint, tmp_path):  # noqa: F811
  """The json_tool environment of configs/hf_calculator_grpo.py on a tiny random checkpoint:
  the policy writes its reflection after a ChatML instruction, and the next trial's prompt
  starts with it as a system message."""
  path, _ = checkpoint
  config = tiny_config(path, tmp_path)
  trainer = train_lib.make_train(config)
  env, tok = trainer.env, trainer.env.vocab
  with pytest.raises(ValueError, match="reflection='policy'"):
    RX.make_reflexion(env, trainer.model_config, trainer.rollout_config, trials=2, memory=1)
  L = 6
  rc = dataclasses.replace(trainer.rollout_config, num_envs=4, group_size=1)
  run = RX.make_reflexion(env, trainer.model_config, rc, trials=2, memory=1,
                          reflection="policy", reflection_len=L, keep_trajectories=True)
  params = jax.jit(trainer.init)(jax.random.key(0)).params["policy"]
  reset_keys, sample_keys = R.rollout_keys(jax.random.key(3), 4, 1)
  got = jax.jit(run)(params, reset_keys, sample_keys, trainer.env_params)
  assert not np.any(np.asarray(got.success[0]))  # a random policy fails: every row reflects
  lens = np.asarray(got.memory_len[1, :, 0])
  mem = np.asarray(got.memory[1, :, 0])
  assert np.all(lens <= L) and np.any(lens > 0)
  assert not np.any((mem == tok.eot_id) & (np.arange(L) < lens[:, None]))
  tokens = np.asarray(got.trajs.tokens[1])
  for b in range(4):
    reflection = tok.decode(mem[b, :lens[b]])
    head = tok.layout.message("system", reflection) if lens[b] else ""
    text = tok.decode(tokens[b])
    assert text.startswith(head + "<|im_start|>system\nBe brief."), text[:200]
  # The instruction the policy answered: a user message, then the assistant header.
  assert tok.decode(RX.instruction_ids(tok)) == (
      "\n<|im_start|>user\n" + RX.REFLECT_INSTRUCTION + "<|im_end|>\n<|im_start|>assistant\n")
  assert RX.instruction_ids(env.vocab, "Try again.") == tok.reply_ids("user", ["Try again."])


def test_symbol_instruction_errors_name_the_symbol():
  vocab = Search(hops=1).vocab
  assert RX.instruction_ids(vocab) == vocab.ids([V.USER, V.ERROR, V.EOT, V.ASSISTANT])
  with pytest.raises(ValueError, match="instruction.*'reflect'"):
    RX.instruction_ids(vocab, "reflect now")
  with pytest.raises(ValueError, match="cannot write a system message with a dict"):
    RX.memory_frame({})


def test_reflexion_cli_on_a_checkpoint_without_a_run(checkpoint, tmp_path):  # noqa: F811
  """`python -m experiments.reflexion --config configs/hf_calculator_grpo.py` with no trained
  run: the loaded checkpoint is the actor and writes its own reflections."""
  path, _ = checkpoint
  out = tmp_path / "reflexion.json"
  common = ["--config", "configs/hf_calculator_grpo.py", f"--config.model.checkpoint={path}",
            f"--config.env.tasks={os.path.join(DATA, 'arith_tasks.jsonl')}",
            f"--config.env.data_dir={tmp_path / 'tfds'}", "--config.env.system=Be brief.",
            "--config.env.reply_len=96", "--config.env.max_turns=2",
            "--config.model.dtype=float32", "--config.model.remat=False",
            "--config.rollout.max_len=1000", "--config.rollout.turn_budget=24"]
  cmd = [sys.executable, "-m", "experiments.reflexion", *common, "--trials=2", "--memory=0,1",
         "--instances=2", "--reflection=policy"]
  bad = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert bad.returncode != 0 and "without --run, name the output file with --out" in bad.stderr
  done = subprocess.run(cmd + [f"--out={out}"], cwd=ROOT, capture_output=True, text=True,
                        timeout=900)
  assert done.returncode == 0, done.stderr[-3000:]
  assert f"no --run: the config's initial params (the checkpoint {path})" in done.stdout
  result = json.loads(out.read_text())
  assert result["run"] is None and result["reflection"] == "policy"
  assert sorted(result["memory"]) == ["0", "1"]
  assert len(result["memory"]["1"]["solved"][0]) == 2
