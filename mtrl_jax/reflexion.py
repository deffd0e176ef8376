"""Reflexion (Shinn et al., 2023): verbal self-reflection in an episodic memory, no weight update.

The loop, for a batch of tasks (one row per task), `trials` times:

    trial n: the actor (any policy `rollout` can run) plays the task with the last `memory`
             (Omega) reflections of its earlier failed trials in its prompt;
    evaluator: the environment's binary `success`;
    self-reflection (rows that failed): a short reflection is added to the row's memory,
             the oldest dropped beyond Omega.

Everything is static-shape JAX: the trials are a `lax.scan` around the ordinary fused rollout
(`rollout.rows`, same reset keys every trial: the same task; fresh sample keys per trial), the
memory is tokens `[B, Omega, L]` carried through the scan and written into each row's prompt
by the `WithMemory` environment wrapper (per-row env params). A row that has succeeded keeps
playing (static batch) but its later trials do not change its memory or its score: Reflexion's
success after trial n is "solved in some trial <= n" (`solved[n]`); `success[n]` is the raw
per-trial rate. With Omega = 0 the trials are independent retries, so `solved` is pass@n: the
baseline that memory has to beat.

Prompt with memory (symbol vocabulary)::

    <bos> <system> reflection 1 <eot> <system> reflection 2 <eot> <user> question <eot> <assistant>

With a real model the environment speaks a chat tokenizer's ids (`envs.json_tool.JsonToolEnv`,
or any symbol environment through `envs.json_tool.TokenizedEnv`) and each reflection is a system
message of the chat layout, after its begin-of-text (`memory_frame`), e.g. ChatML::

    <|im_start|>system\n reflection 1<|im_end|>\n<|im_start|>system\n(the task's system prompt) ...

Reflections (`reflection=`):
* `'template'` (the option for tiny models): built by the environment from its own feedback on
  the failed trial, `env.reflection(final_state) -> (tokens [env.reflection_len], length)`,
  e.g. search: `<error> <the wrong answer> x0 r0 x1 ...` (the answer that was wrong and the
  chain links the agent had found); fix: what `run` reports on the final program.
  Through `TokenizedEnv` the same symbols are written as text (`<error> ...`).
* `'action'`: the template followed by the action the failed episode should change, in the
  agent's own action format (`env.action_reflection`, for environments with `names_actions`),
  e.g. search: `<error> v x0 r0 x1 <call> search x1 </call>` (the search it lacked); fix:
  `fail ... <call> run </call>` when it never ran the tests. A policy only has to copy it.
* `'policy'`: the policy writes it. The failed trajectory's tokens followed by an instruction
  (symbol vocabulary: `<user> <error> <eot> <assistant>`; chat tokenizer: a user message with
  `REFLECT_INSTRUCTION` and the assistant header; `instruction=` changes the content) are the
  prompt of a one-turn generation of at most `reflection_len` tokens (the rollout's sampling
  settings), whose tokens (without the end-of-turn) become the reflection. This is the option
  for a loaded Hugging Face model.

Meta-training (`config.reflexion.train_trials > 1` in `mtrl_jax.train`): every RL step plays
`train_trials` trials of the same tasks with this loop and trains on all of them, so the policy
learns to read its memory. `experiments/reflexion.py` evaluates a trained run's policy.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import flax.struct
import jax
import jax.numpy as jnp

from mtrl_jax import rollout as rollout_lib
from mtrl_jax import vocab as V
from mtrl_jax.envs import base
from mtrl_jax.envs import wrappers
from mtrl_jax.models import transformer as tf
from mtrl_jax.types import Trajectory

REFLECTIONS = ("template", "action", "policy")
REFLECT_INSTRUCTION = ("That attempt failed. In one short sentence, say what went wrong and what "
                       "to do differently next time.")


def _is_chat(vocab) -> bool:
  return not isinstance(vocab, V.Vocab) and hasattr(vocab, "symbol_ids")


def memory_frame(vocab) -> tuple[tuple[int, ...], tuple[int, ...], int]:
  """How a reflection sits in the prompt: (ids before it, ids after it, prompt position of the
  first reflection). Symbol vocabulary: `<system> r <eot>` after `<bos>`; a chat tokenizer
  (`models.chat.ChatTokenizer`): a system message of its layout after its begin-of-text (ChatML
  has none: at the start; Llama 3: after `<|begin_of_text|>`)."""
  if isinstance(vocab, V.Vocab):
    missing = vocab.missing((V.SYSTEM, V.BOS))
    if missing:
      raise ValueError(f"reflexion: the vocabulary has no {missing} (a reflection is a "
                       f"<system> message after <bos>)")
    return (vocab.id(V.SYSTEM),), (vocab.eot_id,), 1
  if not _is_chat(vocab):
    raise ValueError(f"reflexion: cannot write a system message with a {type(vocab).__name__} "
                     f"vocabulary; use a vocab.Vocab or a models.chat.ChatTokenizer")
  return (tuple(vocab.symbol_ids(V.SYSTEM)), tuple(vocab.symbol_ids(V.EOT, eot_sep=True)),
          len(vocab.symbol_ids(V.BOS)))


def instruction_ids(vocab, instruction: str | Sequence[str] | None = None) -> list[int]:
  """The ids appended to a failed trajectory to ask the policy for its reflection: a user
  message with `instruction` (symbols for a symbol vocabulary, default `<error>`; text for a
  chat tokenizer, default `REFLECT_INSTRUCTION`), then the header of the assistant's turn."""
  if isinstance(vocab, V.Vocab):
    symbols = ((V.ERROR,) if instruction is None else
               tuple(instruction.split()) if isinstance(instruction, str) else tuple(instruction))
    missing = vocab.missing((V.USER, V.ASSISTANT, *symbols))
    if missing:
      raise ValueError(f"reflexion.instruction: the vocabulary has no {missing}")
    return [vocab.id(V.USER), *vocab.ids(symbols), vocab.eot_id, vocab.id(V.ASSISTANT)]
  if not _is_chat(vocab):
    raise ValueError(f"reflexion: cannot write an instruction with a {type(vocab).__name__} "
                     f"vocabulary; use a vocab.Vocab or a models.chat.ChatTokenizer")
  text = (REFLECT_INSTRUCTION if instruction is None else
          instruction if isinstance(instruction, str) else " ".join(instruction))
  return vocab.reply_ids("user", [text])


@flax.struct.dataclass
class MemoryParams:
  """`WithMemory`'s params. inner: the wrapped environment's params; tokens: [Omega, L] int32
  reflections, oldest first, each padded; lengths: [Omega] int32 (0 = empty slot)."""

  inner: Any
  tokens: jax.Array
  lengths: jax.Array


class WithMemory(wrappers.Wrapper):
  """`env` with up to `slots` reflections (each <= `reflection_len` tokens) in its prompt.

  A `Wrapper` whose params are `MemoryParams` (the wrapped environment's inside, as `.inner`):
  the prompt (`reset_env`, `prompt_len`) is its own, and `step_env` / `expert` pass the inner
  params on; everything else (steps, replies, info, vocabulary, name, capabilities) is the
  wrapped environment's. The reflections go right after the prompt's begin-of-text, each as a
  system message (`memory_frame`: `<system> ... <eot>` for a symbol vocabulary, the chat
  layout's system message for a real tokenizer). Empty memory gives the wrapped environment's
  prompt exactly (the prompt buffer is longer: `prompt_len = env.prompt_len + slots *
  (reflection_len + frame)`, frame = 2 for symbols).

  The memory's slot length is `slot_len` (the constructor's `reflection_len`);
  `.reflection_len` is, as for any wrapper, the wrapped environment's templated reflection.
  """

  Params = MemoryParams

  def __init__(self, env: base.Environment, slots: int, reflection_len: int):
    if not isinstance(slots, int) or slots < 0:
      raise ValueError(f"reflexion.memory must be an integer >= 0, got {slots!r}")
    if not isinstance(reflection_len, int) or reflection_len < 1:
      raise ValueError(f"reflexion.reflection_len must be an integer >= 1, got "
                       f"{reflection_len!r}")
    self._frame = memory_frame(env.vocab)
    super().__init__(env)
    self.slots, self.slot_len = slots, reflection_len

  @property
  def default_params(self) -> MemoryParams:
    return self.empty_memory(self.env.default_params)

  def empty_memory(self, inner) -> MemoryParams:
    return MemoryParams(inner=inner,
                        tokens=jnp.zeros((self.slots, self.slot_len), jnp.int32),
                        lengths=jnp.zeros((self.slots,), jnp.int32))

  @property
  def prompt_len(self) -> int:
    pre, post, _ = self._frame
    return self.env.prompt_len + self.slots * (self.slot_len + len(pre) + len(post))

  def reset_env(self, key, params: MemoryParams):
    state, prompt = self.env.reset_env(key, params.inner)
    pre, post, at = self._frame
    segments = [(prompt.tokens[:at], jnp.int32(at))] if at else []  # the begin-of-text
    for i in range(self.slots):
      n = params.lengths[i]
      segments += [(jnp.asarray(pre, jnp.int32), jnp.where(n > 0, len(pre), 0)),
                   (params.tokens[i], n),
                   (jnp.asarray(post, jnp.int32), jnp.where(n > 0, len(post), 0))]
    segments.append((prompt.tokens[at:], prompt.length - at))
    tokens, length = base.concat_segments(segments, self.prompt_len)
    return state, prompt.replace(tokens=tokens, length=length)

  def step_env(self, key, state, action, params: MemoryParams):
    return self.env.step_env(key, state, action, params.inner)

  def expert(self, key, state, params: MemoryParams):
    return self.env.expert(key, state, params.inner)


def remember(tokens: jax.Array, lengths: jax.Array, new: jax.Array, new_length: jax.Array,
             write: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Append one reflection per row to its memory (keep the last Omega) where `write`.

  tokens: [B, Omega, L]; lengths: [B, Omega]; new: [B, L'] (L' <= L: padded; longer: cut);
  new_length: [B]; write: [B] bool. Returns the updated (tokens, lengths).
  """
  B, slots, L = tokens.shape
  if slots == 0:
    return tokens, lengths
  new = jnp.asarray(new, jnp.int32)[:, :L]
  new = jnp.pad(new, ((0, 0), (0, L - new.shape[1])))
  new_length = jnp.minimum(jnp.asarray(new_length, jnp.int32), L)
  new = jnp.where(jnp.arange(L) < new_length[:, None], new, V.PAD_ID)
  shifted = jnp.concatenate([tokens[:, 1:], new[:, None]], axis=1)
  shifted_len = jnp.concatenate([lengths[:, 1:], new_length[:, None]], axis=1)
  w = write & (new_length > 0)
  return (jnp.where(w[:, None, None], shifted, tokens),
          jnp.where(w[:, None], shifted_len, lengths))


@flax.struct.dataclass
class ReflexionResult:
  """success, solved: [N, B] bool per trial (this trial / some trial so far); memory: [N, B,
  Omega, L] int32 and memory_len [N, B, Omega] the memory each trial was played with; trajs:
  the trials' `Trajectory`, leaves [N, B, ...] (None unless `keep_trajectories`)."""

  success: jax.Array
  solved: jax.Array
  memory: jax.Array
  memory_len: jax.Array
  trajs: Trajectory | None = None


@flax.struct.dataclass
class PromptParams:
  """`PromptEnv`'s params. tokens: [prompt_len] int32 the prompt (right-padded); length: []."""

  tokens: jax.Array
  length: jax.Array


class PromptEnv(base.Environment):
  """A one-turn environment whose prompt is given in its (per-row) params: the reflection
  generator. params: `PromptParams(tokens [prompt_len], length [])`."""

  name = "prompt"
  Params = PromptParams

  def __init__(self, vocab, prompt_len: int, reply_len: int = 2):
    self.vocab, self._prompt_len, self._reply_len = vocab, prompt_len, reply_len

  def symbols(self):
    return ()

  @property
  def default_params(self):
    return PromptParams(tokens=jnp.zeros((self._prompt_len,), jnp.int32), length=jnp.int32(1))

  @property
  def prompt_len(self):
    return self._prompt_len

  @property
  def reply_len(self):
    return self._reply_len

  @property
  def action_len(self):
    return 1

  @property
  def max_turns(self):
    return 1

  def reset_env(self, key, params):
    return (base.EnvState(**base.initial_counters()),
            base.Observation(params.tokens, params.length, jnp.int32(base.ROLE_USER)))

  def step_env(self, key, state, action, params):
    obs = base.Observation(jnp.zeros((self._reply_len,), jnp.int32), jnp.int32(0),
                           jnp.int32(base.ROLE_NONE))
    return state, obs, jnp.float32(0.0), jnp.bool_(True)

  def expert(self, key, state, params):
    return base.Action(jnp.asarray([self.vocab.eot_id], jnp.int32), jnp.int32(1))


def make_reflexion(env: base.Environment, model_config: tf.ModelConfig,
                   rollout_config: rollout_lib.RolloutConfig, *, trials: int, memory: int,
                   reflection: str = "template", reflection_len: int | None = None,
                   instruction: str | Sequence[str] | None = None,
                   keep_trajectories: bool = False
                   ) -> Callable[..., ReflexionResult]:
  """Validate and build `run(params, reset_keys [B], sample_keys [B], env_params=None)`.

  `env` is the plain environment (it is wrapped in `WithMemory(env, memory, L)` here; use
  `.env` of the returned function for the wrapped one). `rollout_config.max_len` must hold the
  longer prompt. `params` are the policy's Transformer params. Trial n samples with
  `fold_in(sample_key, n)`; its environment draws the same task from `reset_keys` each trial.
  L = `reflection_len` (default `env.reflection_len` for templates, `env.action_reflection_len`
  for 'action', 8 for the policy).
  Returns a `ReflexionResult` (jit it; vmap it over seeds' params).
  """
  if not isinstance(trials, int) or trials < 1:
    raise ValueError(f"reflexion.trials must be an integer >= 1, got {trials!r}")
  if reflection not in REFLECTIONS:
    raise ValueError(f"reflexion.reflection={reflection!r}; expected one of {REFLECTIONS}")
  if reflection in ("template", "action"):
    if not env.reflection_len:
      raise ValueError(f"reflexion.reflection={reflection!r}: environment {env.name!r} has no "
                       f"templated reflection (env.reflection); use reflection='policy'")
    if reflection == "action" and not env.names_actions:
      raise ValueError(f"reflexion.reflection='action': environment {env.name!r} names no action "
                       f"to change (env.names_actions); use reflection='template' or 'policy'")
    native = env.reflection_len if reflection == "template" else env.action_reflection_len
    L = native if reflection_len is None else reflection_len
  else:
    L = 8 if reflection_len is None else reflection_len
  wrapped = WithMemory(env, memory, L)
  try:
    play = rollout_lib.make_rollout(wrapped, model_config, rollout_config)
  except ValueError as e:
    raise ValueError(f"{e} (the prompt holds {memory} reflections of {L} tokens: "
                     f"prompt_len={wrapped.prompt_len})") from None
  T = rollout_config.max_len
  if reflection == "policy" and memory:
    instr = instruction_ids(env.vocab, instruction)
    prompt_env = PromptEnv(env.vocab, T + len(instr))
    writer = rollout_lib.make_rollout(prompt_env, model_config, dataclasses.replace(
        rollout_config, max_len=prompt_env.prompt_len + L + 1 + prompt_env.reply_len,
        turn_budget=L + 1, max_turns=1, think_budget=None, force_expert=False))

  def reflect(params, traj: Trajectory, final_state, keys):
    """[B, L] reflection tokens and [B] lengths of every row (used only where it failed)."""
    if reflection == "template":
      return jax.vmap(env.reflection)(final_state)
    if reflection == "action":
      return jax.vmap(env.action_reflection)(final_state)
    # Each row's length: up to its last non-pad token (a real tokenizer's id 0 may occur inside).
    written = jnp.max(jnp.where(traj.tokens != V.PAD_ID, jnp.arange(T) + 1, 0), axis=1)
    prompt, n = jax.vmap(lambda row, w: base.concat_segments(
        [(row, w), (jnp.asarray(instr, jnp.int32), len(instr))], T + len(instr)))(
            traj.tokens, written)
    out = writer.rows(params, keys, keys, PromptParams(prompt, n), env_params_per_row=True)
    acts, lens = rollout_lib.turn_actions(out, L + 1)
    toks, n = acts[:, 0, :L], lens[:, 0]
    ends = toks[jnp.arange(toks.shape[0]), jnp.clip(n - 1, 0, L - 1)] == env.vocab.eot_id
    return toks, jnp.minimum(n - ends.astype(jnp.int32), L)

  def run(params, reset_keys, sample_keys, env_params=None) -> ReflexionResult:
    inner = env.default_params if env_params is None else env_params
    B = reset_keys.shape[0]
    mem = jnp.zeros((B, memory, L), jnp.int32)
    mem_len = jnp.zeros((B, memory), jnp.int32)
    per_row = jax.tree.map(lambda x: jnp.broadcast_to(x, (B, *jnp.shape(x))), inner)

    def trial(carry, n):
      mem, mem_len, solved = carry
      keys = jax.vmap(lambda k: jax.random.fold_in(k, n))(sample_keys)
      p = MemoryParams(inner=per_row, tokens=mem, lengths=mem_len)
      traj, final = play.rows(params, reset_keys, keys, p, env_params_per_row=True,
                              return_env_state=True)
      success = traj.info["success"].astype(bool)
      if memory:
        def write(_):
          rkeys = jax.vmap(lambda k: jax.random.fold_in(k, 0x5245))(keys)
          toks, lens = reflect(params, traj, final, rkeys)
          return remember(mem, mem_len, toks, lens, ~success & ~solved)
        # No trial reads the last trial's reflection: skip it (with reflection='policy' it is a
        # whole generation). `n` is the scan counter, unbatched even under a vmap over seeds,
        # so this stays a real branch.
        new_mem, new_len = jax.lax.cond(n < trials - 1, write, lambda _: (mem, mem_len), None)
      else:
        new_mem, new_len = mem, mem_len
      out = dict(success=success, solved=solved | success, memory=mem, memory_len=mem_len)
      if keep_trajectories:
        out["trajs"] = traj
      return (new_mem, new_len, solved | success), out

    _, out = jax.lax.scan(trial, (mem, mem_len, jnp.zeros((B,), bool)),
                          jnp.arange(trials, dtype=jnp.int32))
    return ReflexionResult(**out)

  run.env = wrapped
  run.rollout = play
  run.reflection_len = L
  return run


def flatten_trials(trajs: Trajectory) -> Trajectory:
  """[N, B, ...] trial trajectories -> [N*B, ...] rows (trial-major: a GRPO group of G
  contiguous rows stays within one trial)."""
  return jax.tree.map(lambda x: x.reshape((-1, *x.shape[2:])), trajs)
