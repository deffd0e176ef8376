"""The fused multi-turn rollout: KV-cache sampling and environment steps in one jitted loop.

`make_rollout(env, model_config, config)` validates every budget and returns a `Rollout`, a
pure function of its arguments:

    rollout(params, key, env_params=None) -> Trajectory          # jit it; vmap it; shard it

that plays `num_envs * group_size` episodes at once. Rows are laid out group-contiguously: rows
`g*G .. g*G+G-1` share environment instance g (same reset key) and differ in sampling keys.

How one call runs (all static shapes, nested `lax.while_loop`s, no host round trip, no
`lax.cond` around the KV cache):

1. `env.reset` (vmapped) gives each row its prompt; one chunked prefill call writes the whole
   prompt into the KV cache and yields the logits of the first agent token (the LM head runs
   on each row's last prompt position only, not on every prompt position).
2. The outer loop repeats, until every row is DONE:
   a. *Decode* (inner `while_loop`): every iteration, every generating row (GEN) emits one
      token, in one one-token model call for the whole batch: it samples from the logits of
      its previous token (or takes a forced one, see below) and writes it at its position.
      A row that emits `<eot>` stops (STEP) and waits. The loop hands over once at least
      `config.feed_fraction` of the unfinished rows wait (default half), or none generates.
   b. *Environment*: `env.step` (vmapped) for the rows whose turn ended, once for all of them
      (`lax.cond` on any, over the environment's part of the carry only); its reward goes to
      `turn_reward[k]`, its reply becomes the row's pending reply (FEED), or the row is DONE.
   c. *Feed* (inner `while_loop`, as many trips as the longest pending reply needs): every
      pending reply enters the cache `C = min(env.reply_len, config.feed_chunk)` tokens
      per row per `[B, C]` model call (rows with nothing to feed write out of range: dropped),
      and the LM head runs at each row's last fed token only. A row whose reply is all in
      starts its next turn (GEN).
   Rows move independently: a row waiting for its reply does not block the others until
   enough rows wait. DONE rows write out of range (dropped).

Why this shape (measured on 2 CPU cores, B=64, 4-layer hidden-256 Qwen2-style model, T=192;
`python -m experiments.benchmark rollout` and README): a one-token step costs ~10 ms
(157 us per row), a `[B, 16]` or `[B, 32]` chunk ~74 us per token-row, so reply tokens are
about 2x cheaper fed in chunks (2.8x with the tiny model), and a 128-token tool output costs
four `[B, 32]` calls instead of 128 loop iterations. Alternatives:
* one token per iteration for every row, feeding included (the previous loop): a third of
  the iterations of a 4-turn episode with 16-token replies only fed replies; the fused
  rollout was 1.4x slower on the same benchmark;
* every iteration a `[B, C]` call, C slots of which a generating row uses one and a feeding
  row up to C: a `[B, 4]` call costs 2.4x a one-token call (4-layer model; 1.8x tiny), paid
  on every generating iteration, which are most of them;
* one loop with a `lax.cond` between the decode call and a chunk call: whether XLA copies the
  cache through the cond depends on the program (a standalone test loop copied it on every
  iteration; the rollout's did not), and the cond runs a feed call whenever any row waits;
  nested loops are in place by construction (`tests/test_rollout.py` checks the compiled
  rollout has no cache-sized copy beyond the initial zeros) and feed many rows per call.
`feed_fraction` trades feed calls for waiting: 0 feeds as soon as one row waits (one
`[B, C]` call per turn end), 1 waits for the slowest row of every turn (turn-synchronous).

Sampling (`Policy.sample_uniform`): one uniform per row per token, drawn with
`fold_in(token_key, position)`, and inverse-CDF sampling over the policy's distribution in
two levels (block sums, then one block), with the exact log-prob `x[tok] - logsumexp(x)`:
no `[B, V]` log-softmax and no V Gumbel draws per row (`jax.random.categorical`), which cost
~0.57 ms of the tiny model's ~2 ms step at B=64 against ~0.05 ms now. Per token, two scatters
(the token, and the log-prob of a sampled token); `loss_mask` and `turn` are derived once at
the end from the turn boundaries and a `NOT_SAMPLED` sentinel in the log-prob array.

Budgets (validated in `make_rollout`, errors name the setting):
* `max_len` T: the whole row. A row that runs out of context is `truncated`.
* `turn_budget`: tokens per agent turn; the last one is forced to `<eot>`.
* `think_budget`: tokens inside `<think> ... </think>` per turn; after that many, `</think>` is
  forced (the per-turn reasoning cap). None = no cap.
* `max_turns` K (default `env.max_turns`): after K turns the episode is `truncated`.
Forced tokens are part of the turn (`turn=k`) but are not policy samples: `loss_mask=False`,
`sampler_logprob=0`.

Sampling distribution and RL ratios. Tokens are sampled from the rollout's
`mtrl_jax.policy.Policy` (`rollout.policy`): temperature-scaled logits with the control tokens
the policy must never emit (`<pad>`, `<bos>`, role headers: they are the environment's) masked
out, then top-k / top-p truncation. `sampler_logprob` is the log-probability under exactly that
distribution. The learner scores tokens with `rollout.policy.learner()` (same temperature and
mask, no truncation), so that at top-k = 0 and top-p = 1 the importance ratio is exactly 1
before the first update; with truncation the two differ, which the train step reports as the
sampler/learner agreement.

Expert forcing (`config.force_expert=True`): instead of sampling, every turn replays
`env.expert`'s action token by token (for evaluation of the expert through exactly the same
loop, and for tests). Forced turns have `loss_mask=False`.

Replay and continuation (`rows(..., forced_actions=, num_forced=, stop_after_turn=,
continue_keys=)`): the first `num_forced[b]` agent turns of row b are fed from recorded tokens
(`turn_actions(traj)`) instead of sampled, through the same path as expert forcing; with the
recording's reset and sample keys the environment sees the same actions with the same step
keys (keyed by turn), so the conversation state is reproduced exactly, and the policy then
samples the rest with `continue_keys`, optionally stopped after `stop_after_turn[b]` turns
(truncated). `multiturn_aware_reward` builds CollabLLM's MR(k) on top of it.

Real tokenizers: `env.vocab` is any `vocab.TokenizerAdapter` with `eot_id`, `size`, symbol
lookups (`in`, `id`) and optionally `never_sampled_ids()`; `mtrl_jax.models.chat.ChatTokenizer`
is the Hugging Face one (ids of a real tokenizer, turn ended by `<|im_end|>` / `<|eot_id|>`).
Rows are padded with id 0 whatever the tokenizer.

Determinism: every row carries its own PRNG key, split once into a token key (token t is
drawn with `fold_in(token_key, t)`), an environment key (turn k's step gets
`fold_in(env_key, k)`) and an expert key (`fold_in(expert_key, k)`). Keys depend on positions
and turns, never on loop iterations, so a row's episode depends only on its key: not on the
batch size, the layout, the number of devices, or when its replies were fed (tested under
every `feed_fraction` and chunk size).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from mtrl_jax import vocab as V
from mtrl_jax.envs import base as envs_base
from mtrl_jax.models import transformer as tf
from mtrl_jax.policy import Policy
from mtrl_jax.types import Trajectory

# Row phases: generating a turn; turn ended, waiting for the environment step; reply pending
# (fed in chunks); episode over.
GEN, STEP, FEED, DONE = 0, 1, 2, 3
NOT_SAMPLED = 1.0  # log-prob slot of a token the policy did not sample (a log-prob is <= 0)
# The part of the loop carry the environment step reads or writes (passed through its cond).
_ENV_FIELDS = ("tokens", "pos", "turn_start", "k", "env_state", "info", "turn_end",
               "turn_reward", "turn_valid", "done", "truncated", "phase", "reply", "reply_n",
               "reply_i", "forced")


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
  """Static rollout settings.

  Attributes:
    num_envs: environment instances per call.
    group_size: G rollouts per instance (same reset key), contiguous rows, for GRPO/RLOO.
    max_len: T, tokens per row (prompt + all turns + all replies).
    turn_budget: max tokens of one agent turn, `<eot>` included.
    think_budget: max tokens inside `<think>...</think>` per turn; None = no cap.
    max_turns: K; None = `env.max_turns`.
    temperature: sampling temperature (> 0). Ignored when `greedy`.
    top_k: keep the k most likely tokens (0 = off).
    top_p: nucleus sampling mass (1.0 = off).
    greedy: argmax decoding (evaluation); `sampler_logprob` is then the log-prob under the
      temperature-scaled distribution.
    force_expert: replay `env.expert` instead of sampling.
    feed_fraction: the decode loop hands over to the environment step and the reply feed once
      at least this fraction of the unfinished rows wait for one (0: as soon as one row does;
      1: only when no row is generating). See the module docstring.
    feed_chunk: reply tokens fed per row per model call (a reply longer than this takes
      several calls); at most `env.reply_len` is used.
  """

  num_envs: int = 8
  group_size: int = 1
  max_len: int = 128
  turn_budget: int = 24
  think_budget: int | None = None
  max_turns: int | None = None
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  greedy: bool = False
  force_expert: bool = False
  feed_fraction: float = 0.5
  feed_chunk: int = 32

  @property
  def batch_size(self) -> int:
    return self.num_envs * self.group_size


class BudgetError(ValueError):
  """A rollout budget that cannot work with the environment or the model."""


def validate(env: envs_base.Environment, model_config: tf.ModelConfig, c: RolloutConfig) -> int:
  """Check every static budget; returns K. Raises `BudgetError` naming the setting."""
  for name in ("num_envs", "group_size", "max_len", "turn_budget", "feed_chunk"):
    value = getattr(c, name)
    if not isinstance(value, (int, np.integer)) or value < 1:
      raise BudgetError(f"rollout.{name} must be a positive integer, got {value!r}")
  if c.turn_budget < 2:
    raise BudgetError(f"rollout.turn_budget={c.turn_budget} leaves no room for a token before "
                      "the forced <eot>; use >= 2")
  if c.force_expert and c.turn_budget < env.action_len:
    raise BudgetError(f"rollout.turn_budget={c.turn_budget} is shorter than the expert's "
                      f"longest turn (env.action_len={env.action_len}); force_expert needs it")
  if c.think_budget is not None:
    if c.think_budget < 0 or c.think_budget > c.turn_budget - 2:
      raise BudgetError(f"rollout.think_budget={c.think_budget} must be in [0, turn_budget-2="
                        f"{c.turn_budget - 2}] (room for </think> and <eot>)")
    for s in (V.THINK_OPEN, V.THINK_CLOSE):
      if s not in env.vocab:
        raise BudgetError(f"rollout.think_budget is set but the vocabulary has no {s}")
  k = env.max_turns if c.max_turns is None else c.max_turns
  if not isinstance(k, (int, np.integer)) or k < 1:
    raise BudgetError(f"rollout.max_turns must be a positive integer, got {k!r}")
  if k > env.max_turns:
    raise BudgetError(f"rollout.max_turns={k} exceeds the environment's max_turns="
                      f"{env.max_turns}; the episode ends there")
  need = env.prompt_len + c.turn_budget + env.reply_len
  if c.max_len < need:
    raise BudgetError(
        f"rollout.max_len={c.max_len} cannot hold the prompt, one turn and one reply: "
        f"env.prompt_len={env.prompt_len} + rollout.turn_budget={c.turn_budget} + "
        f"env.reply_len={env.reply_len} = {need}")
  if c.temperature <= 0:
    raise BudgetError(f"rollout.temperature must be > 0 (use greedy=True for argmax), got "
                      f"{c.temperature}")
  if not 0 <= c.feed_fraction <= 1:
    raise BudgetError(f"rollout.feed_fraction must be in [0, 1], got {c.feed_fraction}")
  if not 0 < c.top_p <= 1:
    raise BudgetError(f"rollout.top_p must be in (0, 1], got {c.top_p}")
  if c.top_k < 0 or c.top_k > model_config.vocab_size:
    raise BudgetError(f"rollout.top_k must be in [0, vocab_size={model_config.vocab_size}], "
                      f"got {c.top_k}")
  if model_config.vocab_size < env.vocab.size:
    raise BudgetError(f"model vocab_size={model_config.vocab_size} is smaller than the "
                      f"environment's vocabulary ({env.vocab.size} symbols)")
  return k


def rollout_keys(key: jax.Array, num_envs: int, group_size: int) -> tuple[jax.Array, jax.Array]:
  """Per-row keys: (reset_keys [B], sample_keys [B]); reset keys are shared within a group."""
  k_reset, k_sample = jax.random.split(key)
  reset = jnp.repeat(jax.random.split(k_reset, num_envs), group_size, axis=0)
  return reset, jax.random.split(k_sample, num_envs * group_size)


def make_rollout(env: envs_base.Environment, model_config: tf.ModelConfig,
                 config: RolloutConfig) -> "Rollout":
  """Validate budgets and build the `Rollout` (call it as `rollout(params, key, env_params)`).

  `params` are the policy's Transformer params (`{'embed': ..., 'layers': ...}`).
  """
  K = validate(env, model_config, config)
  c = config
  T, R, P, A = c.max_len, env.reply_len, env.prompt_len, c.turn_budget
  vocab = env.vocab
  eot, think_open, think_close = vocab.eot_id, None, None
  if c.think_budget is not None:
    think_open, think_close = vocab.id(V.THINK_OPEN), vocab.id(V.THINK_CLOSE)
  policy = Policy.for_vocab(vocab, model_config.vocab_size, temperature=c.temperature,
                            top_k=c.top_k, top_p=c.top_p)
  empty_idle_actions = bool(env.empty_idle_actions)
  policy_cfg = dataclasses.replace(model_config, value_head=False)

  def model(params, tokens, positions, cache):
    logits, _, cache = tf.apply(policy_cfg, params, tokens, positions, cache=cache)
    return logits, cache

  def prefill(params, tokens, positions, last, cache):
    """A chunk (prompts, reply chunks) into the cache: logits [B, V] at index `last` [B] of
    each row's chunk only (the LM head never runs on the other positions)."""
    hidden, _, cache = tf.apply(policy_cfg, params, tokens, positions, cache=cache,
                                return_hidden=True)
    h_last = hidden[jnp.arange(tokens.shape[0]), last]
    return tf.lm_logits(policy_cfg, params, h_last), cache

  C = min(R, c.feed_chunk)  # reply tokens per row per feed call

  def rows(params, reset_keys, sample_keys, env_params=None, *, forced_actions=None,
           num_forced=None, stop_after_turn=None, continue_keys=None,
           env_params_per_row=False, return_env_state=False):
    """Play one episode per row from explicit keys (see the module docstring).

    `env_params_per_row=True`: every leaf of `env_params` has a leading [B] axis and row b
    plays with its own slice (e.g. `mtrl_jax.reflexion.WithMemory`'s per-row memory);
    default: one `env_params` broadcast to every row. `return_env_state=True` returns
    `(Trajectory, final env state [B])` (what a reflection is built from).

    Optional replay / continuation arguments (all None: the plain rollout, unchanged):
      forced_actions: [B, K, A'] int32 recorded agent-turn tokens (A' <= turn budget A), e.g.
        from `turn_actions(traj, A)`. Turns `k < num_forced[b]` are fed from the recording
        instead of being sampled (`loss_mask=False`, `sampler_logprob=0`), like expert forcing.
        A recorded turn ends with its own `<eot>`, or at the context end exactly as it did
        when recorded, so no lengths are needed.
      num_forced: [B] int32 number of leading turns to replay (needs `forced_actions`).
      stop_after_turn: [B] int32: the episode is truncated once that many turns happened.
      continue_keys: [B] keys for the tokens sampled after the forced prefix and the
        environment steps of those sampled turns. The loop's own chain (from `sample_keys`)
        still drives the environment steps of the forced turns, so replaying a recording with
        its own `reset_keys` and `sample_keys` reproduces its environment steps exactly
        (forced turns end at the same loop iterations), even for an environment whose `step`
        uses its key; the continuation is then sampled with fresh keys.
    """
    env_params = env.default_params if env_params is None else env_params
    p_axis = 0 if env_params_per_row else None
    B = reset_keys.shape[0]
    b_idx = jnp.arange(B)
    replay = forced_actions is not None
    if replay:
      if num_forced is None:
        raise ValueError("rows: forced_actions needs num_forced")
      fa = jnp.asarray(forced_actions, jnp.int32)
      if fa.shape[:2] != (B, K) or fa.shape[2] > A:
        raise ValueError(f"rows: forced_actions must be [B={B}, K={K}, <= {A}], got {fa.shape}")
      fa = jnp.pad(fa, ((0, 0), (0, 0), (0, A - fa.shape[2])))
      num_forced = jnp.asarray(num_forced, jnp.int32)

    env_state, prompt = jax.vmap(env.reset, in_axes=(0, p_axis))(reset_keys, env_params)
    p_pos = jnp.where(jnp.arange(P) < prompt.length[:, None], jnp.arange(P), T)
    cache = tf.init_cache(model_config, B, T)
    next_logits, cache = prefill(params, prompt.tokens, p_pos, prompt.length - 1, cache)

    tokens = jnp.zeros((B, T), jnp.int32).at[:, :P].set(
        jnp.where(jnp.arange(P) < prompt.length[:, None], prompt.tokens, V.PAD_ID))
    # Info: zeros of the environment's info structure, filled at each row's env steps.
    info_shape = jax.eval_shape(
        lambda: jax.vmap(env.step, in_axes=(0, 0, 0, p_axis))(
            reset_keys, env_state, envs_base.Action(jnp.zeros((B, A), jnp.int32),
                                                     jnp.zeros((B,), jnp.int32)), env_params)[4])
    info = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), info_shape)
    # Per-row key streams, split once: token t of a row is drawn with fold_in(tok_key, t), the
    # environment step of turn k gets fold_in(env_key, k), the expert's turn k
    # fold_in(expert_key, k). A row's episode depends only on its own key.
    keys = jax.vmap(lambda k: jax.random.split(k, 3))(sample_keys)  # [B, 3]
    ckeys = None
    if continue_keys is not None:
      ckeys = jax.vmap(lambda k: jax.random.split(k, 2))(continue_keys)  # (tokens, env)
    forced = jnp.zeros((B, A), jnp.int32)
    if c.force_expert:
      forced = _expert_tokens(env, _fold(keys[:, 2], jnp.zeros((B,), jnp.int32)), env_state,
                              env_params, A, p_axis)

    pos0 = prompt.length.astype(jnp.int32)
    carry = dict(
        cache=cache, next_logits=next_logits, tokens=tokens,
        logprob=jnp.full((B, T), NOT_SAMPLED, jnp.float32),
        pos=pos0, phase=jnp.full((B,), GEN, jnp.int32),
        reply=jnp.zeros((B, R), jnp.int32), reply_n=jnp.zeros((B,), jnp.int32),
        reply_i=jnp.zeros((B,), jnp.int32),
        k=jnp.zeros((B,), jnp.int32), turn_start=pos0,
        in_think=jnp.zeros((B,), bool), think_n=jnp.zeros((B,), jnp.int32), forced=forced,
        env_state=env_state, info=info,
        turn_begin=jnp.zeros((B, K), jnp.int32).at[:, 0].set(pos0),
        turn_end=jnp.zeros((B, K), jnp.int32), turn_reward=jnp.zeros((B, K), jnp.float32),
        turn_valid=jnp.zeros((B, K), bool),
        done=jnp.zeros((B,), bool), truncated=jnp.zeros((B,), bool))

    def waiting_enough(s):
      """Leave the decode loop: enough rows wait for the environment or a reply chunk."""
      live = jnp.sum(s["phase"] != DONE)
      waiting = jnp.sum((s["phase"] == STEP) | (s["phase"] == FEED))
      need = jnp.maximum(1, jnp.ceil(c.feed_fraction * live).astype(jnp.int32))
      return waiting >= need

    def decode_cond(s):
      return jnp.any(s["phase"] == GEN) & ~waiting_enough(s)

    def decode_body(s):
      """Every generating row emits one token; one one-token model call for the batch."""
      s = dict(s)
      # A generating row with no room left is truncated; its partial turn still counts.
      s = _truncate(s, (s["phase"] == GEN) & (s["pos"] >= T))
      gen = s["phase"] == GEN
      n_in_turn = s["pos"] - s["turn_start"]
      sampled = gen
      if c.force_expert:
        tok = s["forced"][b_idx, jnp.clip(n_in_turn, 0, A - 1)]
        sampled = jnp.zeros((B,), bool)
        logp = jnp.zeros((B,), jnp.float32)
      else:
        tok_keys = keys[:, 0] if ckeys is None else ckeys[:, 0]
        u = jax.vmap(lambda k, t: jax.random.uniform(jax.random.fold_in(k, t)))(
            tok_keys, s["pos"])
        tok, logp = policy.sample_uniform(u, s["next_logits"], greedy=c.greedy)
      if replay:
        in_forced_turn = s["k"] < num_forced
        tok = jnp.where(in_forced_turn,
                        fa[b_idx, jnp.clip(s["k"], 0, K - 1), jnp.clip(n_in_turn, 0, A - 1)], tok)
        sampled = sampled & ~in_forced_turn
      force_eot = n_in_turn >= A - 1
      force_think = jnp.zeros((B,), bool)
      if c.think_budget is not None:
        force_think = s["in_think"] & (s["think_n"] >= c.think_budget) & ~force_eot
        tok = jnp.where(force_think, think_close, tok)
      tok = jnp.where(force_eot, eot, tok)
      sampled = sampled & ~force_eot & ~force_think
      if c.think_budget is not None:
        opened = (s["in_think"] | (tok == think_open)) & (tok != think_close)
        s["think_n"] = jnp.where(gen, jnp.where(s["in_think"] & opened, s["think_n"] + 1, 0),
                                 s["think_n"])
        s["in_think"] = jnp.where(gen, opened, s["in_think"])

      # Two scatters per token: the token, and the log-prob of a sampled one (the sentinel
      # NOT_SAMPLED stays on every other position; loss_mask and turn are derived at the end).
      pos_w = jnp.where(gen, s["pos"], T)  # T: out of range, the write is dropped
      s["tokens"] = s["tokens"].at[b_idx, pos_w].set(tok, mode="drop")
      s["logprob"] = s["logprob"].at[b_idx, jnp.where(sampled, pos_w, T)].set(logp, mode="drop")

      logits, s["cache"] = model(params, tok[:, None], pos_w[:, None], s["cache"])
      s["next_logits"] = jnp.where(gen[:, None], logits[:, 0], s["next_logits"])
      s["pos"] = s["pos"] + gen.astype(jnp.int32)
      s["phase"] = jnp.where(gen & (tok == eot), STEP, s["phase"])
      return s

    def feed_body(s):
      """The next chunk of every pending reply into the cache: one [B, C] model call."""
      s = dict(s)
      feed = s["phase"] == FEED
      idx = s["reply_i"][:, None] + jnp.arange(C)
      n = jnp.where(feed, jnp.clip(s["reply_n"] - s["reply_i"], 0, C), 0)
      valid = jnp.arange(C) < n[:, None]
      toks = jnp.where(valid, jnp.take_along_axis(s["reply"], jnp.clip(idx, 0, R - 1), 1),
                       V.PAD_ID)
      cpos = jnp.where(valid, s["pos"][:, None] + jnp.arange(C), T)
      s["tokens"] = s["tokens"].at[b_idx[:, None], cpos].set(toks, mode="drop")
      logits, s["cache"] = prefill(params, toks, cpos, jnp.maximum(n - 1, 0), s["cache"])
      s["next_logits"] = jnp.where((n > 0)[:, None], logits, s["next_logits"])
      s["pos"] = s["pos"] + n
      s["reply_i"] = s["reply_i"] + n
      # A row that fed the last token of its reply starts its next turn.
      fed_all = feed & (s["reply_i"] >= s["reply_n"])
      s["phase"] = jnp.where(fed_all, GEN, s["phase"])
      s["turn_start"] = jnp.where(fed_all, s["pos"], s["turn_start"])
      k_onehot = jax.nn.one_hot(s["k"], K, dtype=bool) & fed_all[:, None]
      s["turn_begin"] = jnp.where(k_onehot, s["pos"][:, None], s["turn_begin"])
      s["in_think"] = jnp.where(fed_all, False, s["in_think"])
      s["think_n"] = jnp.where(fed_all, 0, s["think_n"])
      return s

    def outer_body(s):
      # 1. Decode until enough rows' turns have ended (or none generates).
      s = jax.lax.while_loop(decode_cond, decode_body, s)
      # 2. Step the environment for the rows whose turn ended (only the environment's part of
      #    the carry goes through the cond, so the KV cache is never copied by it).
      ended = s["phase"] == STEP
      env_part = {name: s[name] for name in _ENV_FIELDS}
      env_part = jax.lax.cond(jnp.any(ended), lambda e: _env_step(e, ended), lambda e: e,
                              env_part)
      s = {**s, **env_part}
      # 3. Feed the replies, C tokens per row per call, until none is pending.
      return jax.lax.while_loop(lambda s: jnp.any(s["phase"] == FEED), feed_body, s)

    def _env_step(s, ended):
      s = dict(s)
      k_env = _fold(keys[:, 1], s["k"])
      if ckeys is not None:
        # Environment steps of the forced prefix use the loop's own keys (a replay with the
        # recording's keys steps the environment exactly as it was stepped); later ones the
        # continuation keys.
        in_prefix = s["k"] < num_forced if replay else jnp.zeros((B,), bool)
        k_env = jnp.where(in_prefix[:, None], jax.random.key_data(k_env),
                          jax.random.key_data(_fold(ckeys[:, 1], s["k"])))
        k_env = jax.random.wrap_key_data(k_env, impl=jax.random.key_impl(keys))
      last = s["pos"] - 1
      length = s["pos"] - s["turn_start"]
      if empty_idle_actions:
        # Rows whose turn did not end are stepped too (vmap) and their results discarded; an
        # environment that asks for it gets an empty action for them, so that its host tools
        # can skip them (`env.empty_idle_actions = True`, e.g. `envs.json_tool`).
        length = jnp.where(ended, length, 0)
      window = jax.vmap(lambda row, start: jax.lax.dynamic_slice(row, (start,), (A,)))(
          jnp.pad(s["tokens"], ((0, 0), (0, A))), s["turn_start"])
      action = envs_base.Action(jnp.where(jnp.arange(A) < length[:, None], window, V.PAD_ID),
                                length.astype(jnp.int32))
      new_state, obs, reward, done, info = jax.vmap(env.step, in_axes=(0, 0, 0, p_axis))(
          k_env, s["env_state"], action, env_params)
      sel = lambda new, old: jax.vmap(jnp.where)(ended, new, old)
      s["env_state"] = jax.tree.map(sel, new_state, s["env_state"])
      s["info"] = jax.tree.map(sel, info, s["info"])

      k_onehot = jax.nn.one_hot(s["k"], K, dtype=bool) & ended[:, None]
      s["turn_end"] = jnp.where(k_onehot, last[:, None], s["turn_end"])
      s["turn_reward"] = jnp.where(k_onehot, reward[:, None], s["turn_reward"])
      s["turn_valid"] = s["turn_valid"] | k_onehot
      s["k"] = s["k"] + ended.astype(jnp.int32)

      env_truncated = info["truncated"]
      terminated = ended & done & ~env_truncated
      out_of_turns = ended & ~terminated & (env_truncated | (s["k"] >= K))
      if stop_after_turn is not None:
        out_of_turns = out_of_turns | (ended & ~terminated & (s["k"] >= stop_after_turn))
      no_room = ended & ~terminated & ~out_of_turns & (s["pos"] + obs.length >= T)
      s["done"] = s["done"] | terminated
      s["truncated"] = s["truncated"] | out_of_turns | no_room
      stop = terminated | out_of_turns | no_room
      s["phase"] = jnp.where(ended, jnp.where(stop, DONE, FEED), s["phase"])
      s["reply"] = jnp.where(ended[:, None], obs.tokens, s["reply"])
      s["reply_n"] = jnp.where(ended, obs.length, s["reply_n"])
      s["reply_i"] = jnp.where(ended, 0, s["reply_i"])
      if c.force_expert:
        new_forced = _expert_tokens(env, _fold(keys[:, 2], s["k"]), s["env_state"],
                                    env_params, A, p_axis)
        s["forced"] = jnp.where(ended[:, None], new_forced, s["forced"])
      return s

    s = jax.lax.while_loop(lambda s: jnp.any(s["phase"] != DONE), outer_body, carry)
    # Every outer iteration moves some row forward and a row's position is bounded, so the
    # loop ends with every row DONE; keep the contract regardless.
    s = _truncate(s, s["phase"] != DONE)
    # The per-token fields, derived once: turn k spans [turn_begin[k], turn_end[k]]; a
    # position holds a policy sample iff its log-prob was written.
    t_idx = jnp.arange(T)
    in_turn = ((t_idx[None, None, :] >= s["turn_begin"][:, :, None])
               & (t_idx[None, None, :] <= s["turn_end"][:, :, None])
               & s["turn_valid"][:, :, None])                                  # [B, K, T]
    turn = jnp.where(jnp.any(in_turn, axis=1),
                     jnp.argmax(in_turn, axis=1).astype(jnp.int32), -1)
    loss_mask = ~(s["logprob"] > 0.0)  # NOT_SAMPLED > 0; a sampled log-prob is <= 0
    traj = Trajectory(
        tokens=s["tokens"], loss_mask=loss_mask, turn=turn,
        sampler_logprob=jnp.where(loss_mask, s["logprob"], 0.0), turn_end=s["turn_end"],
        turn_reward=s["turn_reward"], turn_valid=s["turn_valid"], done=s["done"],
        truncated=s["truncated"], info=s["info"])
    return (traj, s["env_state"]) if return_env_state else traj

  return Rollout(rows=rows, config=c, policy=policy, max_turns=K, turn_budget=A)


@dataclasses.dataclass(frozen=True, eq=False)
class Rollout:
  """A built rollout (`make_rollout`): `rollout(params, key, env_params=None) -> Trajectory`.

  Attributes:
    rows: `rows(params, reset_keys [B], sample_keys [B], env_params=None, **replay)`, the same
      computation from explicit per-row keys (what sharding, Reflexion and the multiturn-aware
      reward use; see its docstring for the replay arguments).
    config: the validated `RolloutConfig`.
    policy: the `Policy` tokens are sampled from (`policy.learner()` scores them).
    max_turns: K, agent turns per episode.
    turn_budget: A, tokens per agent turn.
  """

  rows: Callable[..., Any]
  config: RolloutConfig
  policy: Policy
  max_turns: int
  turn_budget: int

  def __call__(self, params, key: jax.Array, env_params=None) -> Trajectory:
    """`config.num_envs * config.group_size` episodes from one key (groups contiguous)."""
    reset_keys, sample_keys = rollout_keys(key, self.config.num_envs, self.config.group_size)
    return self.rows(params, reset_keys, sample_keys, env_params)


def turn_actions(traj: Trajectory, width: int) -> tuple[jax.Array, jax.Array]:
  """Each row's agent-turn tokens, as `rows(forced_actions=...)` takes them.

  Args:
    traj: a rollout's `Trajectory` (B rows, K turns).
    width: A, tokens per turn to keep (the rollout's `turn_budget`).

  Returns:
    (tokens [B, K, width] int32, `<pad>` after each turn's end and on invalid turns;
     lengths [B, K] int32, 0 on invalid turns).
  """
  B, T = traj.tokens.shape
  K = traj.turn_end.shape[1]
  lengths = jnp.sum(traj.turn[:, :, None] == jnp.arange(K), axis=1).astype(jnp.int32)  # [B, K]
  start = traj.turn_end - lengths + 1
  pos = start[:, :, None] + jnp.arange(width)                                          # [B, K, A]
  toks = jnp.take_along_axis(traj.tokens[:, None, :], jnp.clip(pos, 0, T - 1), axis=2)
  keep = (jnp.arange(width) < lengths[:, :, None]) & traj.turn_valid[:, :, None]
  return jnp.where(keep, toks, V.PAD_ID).astype(jnp.int32), jnp.where(traj.turn_valid, lengths, 0)


MR_SALT = 0x4D52  # folded into a row's sample key for its continuations' keys


def multiturn_aware_reward(rollout: Rollout, params, traj: Trajectory,
                           reset_keys: jax.Array, sample_keys: jax.Array, *, window: int,
                           samples: int = 1, env_params=None) -> tuple[jax.Array, Trajectory]:
  """CollabLLM's multiturn-aware reward MR(k), by forward sampling, in one batched rollout.

  For every row b of `traj` and every turn k, the conversation is replayed through turn k
  (recorded tokens, same reset and sample keys: the same state), then `window` more agent turns
  are sampled with the current policy `params` and the environment (the simulated user), with
  fresh keys derived from the row's sample key, the turn and the sample index (so a row's MR
  depends only on its keys, whatever the batch or the device layout); `window >= K` plays the
  conversation to its end. Then

    MR[b, k] = mean over `samples` continuations of the sum of their rewards of turns k ..
               k + window (turn k's own reward included; fewer if the episode ends first).

  All B*K*samples continuations run as one `rollout.rows` call (static shapes; continuations of
  invalid turns are computed and discarded). Cost: about K*samples rollouts of the batch.

  Args:
    rollout: the `Rollout` that produced `traj`.
    params: policy params.
    traj: [B] recorded trajectories, K turns, produced by `rollout.rows(params?, reset_keys,
      sample_keys)` (any params: only the tokens are replayed).
    reset_keys, sample_keys: [B] the keys `traj` was played with.
    window: w >= 1 turns of look-ahead.
    samples: continuations per turn.

  Returns:
    (MR [B, K] float32, 0 on invalid turns; the continuations' `Trajectory`, rows laid out
     [B, K, samples] flattened).
  """
  if window < 1 or samples < 1:
    raise ValueError(f"window and samples must be >= 1, got {window}, {samples}")
  B, K = traj.turn_valid.shape
  A = rollout.turn_budget
  actions, _ = turn_actions(traj, A)
  n_valid = jnp.sum(traj.turn_valid, axis=1).astype(jnp.int32)                          # [B]
  rep = lambda x: jnp.repeat(x, K * samples, axis=0)
  k_of = jnp.tile(jnp.repeat(jnp.arange(K, dtype=jnp.int32), samples), B)                # [N]
  num_forced = jnp.minimum(k_of + 1, rep(n_valid))
  stop = k_of + 1 + window if window < K else None
  row_keys = rep(sample_keys)
  ckeys = jax.vmap(lambda k, i: jax.random.fold_in(jax.random.fold_in(k, MR_SALT), i))(
      row_keys, jnp.tile(jnp.arange(K * samples, dtype=jnp.int32), B))
  cont = rollout.rows(params, rep(reset_keys), row_keys, env_params, forced_actions=rep(actions),
                 num_forced=num_forced, stop_after_turn=stop, continue_keys=ckeys)
  from_k = jnp.arange(K)[None, :] >= k_of[:, None]                                       # [N, K]
  total = jnp.sum(jnp.where(cont.turn_valid & from_k, cont.turn_reward, 0.0), axis=1)
  mr = jnp.mean(total.reshape(B, K, samples), axis=2)
  return jnp.where(traj.turn_valid, mr, 0.0), cont


def _truncate(s: dict[str, Any], which: jax.Array) -> dict[str, Any]:
  """End rows `which` [B] as truncated; a started, unfinished turn becomes a valid turn."""
  s = dict(s)
  K = s["turn_valid"].shape[1]
  started = which & (s["pos"] > s["turn_start"]) & (s["phase"] == GEN) & (s["k"] < K)
  k_onehot = jax.nn.one_hot(s["k"], K, dtype=bool) & started[:, None]
  s["turn_end"] = jnp.where(k_onehot, (s["pos"] - 1)[:, None], s["turn_end"])
  s["turn_valid"] = s["turn_valid"] | k_onehot
  s["k"] = s["k"] + started.astype(jnp.int32)
  s["truncated"] = s["truncated"] | (which & (s["phase"] != DONE))
  s["phase"] = jnp.where(which, DONE, s["phase"])
  return s


def _fold(keys: jax.Array, data: jax.Array) -> jax.Array:
  """[B] keys, [B] int32 -> [B] keys `fold_in(keys[b], data[b])`."""
  return jax.vmap(jax.random.fold_in)(keys, data)


def _expert_tokens(env, keys, env_state, env_params, width: int, params_axis=None) -> jax.Array:
  """[B, width] expert action tokens, padded (the budget check guarantees they fit)."""
  action = jax.vmap(env.expert, in_axes=(0, 0, params_axis))(keys, env_state, env_params)
  toks = action.tokens[:, :width]
  pad = width - toks.shape[1]
  return jnp.pad(toks, ((0, 0), (0, pad))) if pad > 0 else toks
