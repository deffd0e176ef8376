"""Throughput benchmarks. One JSON object per line on stdout.

    python -m experiments.benchmark envs [--batch 1024] [--steps 200] [--env NAME ...]

    python -m experiments.benchmark rollout [--env NAME ...] [--model tiny small]
        [--batch 8 64 256] [--repeats 3] [--no-host-loop] [--no-context-sweep]

`envs`: vmapped, jitted environment steps per second for every registered environment (or the
ones named). Timing runs `--steps` steps inside one `lax.scan` in one jitted call (so Python
dispatch is excluded), after a warm-up call that compiles it; `block_until_ready` ends the
clock. Two numbers per environment:

* `steps_per_s`: `env.step` alone, on a fixed pool of actions cycled through (expert actions
  from several points of an episode, a fifth of them cut short so they are malformed). No
  resets: under `vmap` a finished episode costs exactly what a live one does (no
  data-dependent control flow), so this is the cost of `step` itself. Every output of `step`
  (reply tokens, reward, info) is reduced into a checksum so none of it is dead code.
* `loop_steps_per_s`: the expert picks every action (`env.expert` + `env.step` + auto-reset):
  a full scripted-rollout step.

    python -m experiments.benchmark train [--model tiny small] [--num-envs 32 64 256]
        [--seeds 8]

`rollout`: tokens/s and episodes/s of the fused rollout (`mtrl_jax.rollout`, one jitted call,
compile excluded, best of `--repeats`) and of baselines built from the same pieces (model,
sampler, budgets, environment): `per_token`, the way host-side frameworks run multi-turn
rollouts (a jitted decode step per token called from Python, the environment stepped per row
per turn in Python), and `per_turn`, the way JAX frameworks run multi-turn sampling (per turn,
one jitted prefill of the whole history so far and a jitted `while_loop` decode, the
environment stepped on the host between turns); `speedup_vs_<baseline>` is fused tokens/s over
the baseline's. `--env reply` has fixed shapes (32-token prompt, 4 turns of up to 24 tokens,
`--reply-len` tool replies); `--model qwen2-4l` is a 4-layer, hidden-256, 4-head, 2-kv-head,
vocabulary-512 Qwen2-style decoder. Then
`decode` rows: the time of one one-token decode call vs the cache size (`max_len`) and the
filled length (`filled`).

    python -m experiments.benchmark decode [--model tiny qwen2.5-0.5b] [--max_len 512 2048 8192]

`decode`: ms per one-token decode call with 16 slots filled and with the cache full, for
blockwise decode attention (blocks of `decode_block` up to the filled length) and for dense
attention over the whole static cache; `decode_ratio` is 16-filled over full, blockwise.

    python -m experiments.benchmark memory [--model qwen2.5-0.5b ...] [--batch 64]
        [--max_len 2048] [--minibatches 4] [--extrapolate_from 2 4]
        [--devices 8 --mesh data=1,fsdp=8,tensor=1]
    python -m experiments.benchmark compile [--model qwen2.5-0.5b] [--layers 2 8 24 28]

`memory`: compiles (does not run) the real train step (quickstart algorithm: calculator, PPO
with the turn-level critic, rematerialised blocks) for a published model shape
(`transformer.REAL_SHAPES`, random weights as `jax.ShapeDtypeStruct`, nothing allocated) and
prints `compiled.memory_analysis()`: `peak_bytes_per_device`, `argument_bytes`, `temp_bytes`,
`output_bytes`, `alias_bytes` (the donated state reused for the new one), `compile_s`. With
`--extrapolate_from` it compiles at those depths and extrapolates linearly (blocks are scanned,
so memory is affine in depth), saying so in `extrapolated_from`. With `--devices N` (simulated
CPU devices where there is no accelerator) and `--mesh`, the step is compiled partitioned on that
mesh (`mtrl_jax.sharding`) and the figures are per device. `compile`: compile seconds and
HLO instruction count of the same step at several depths.

`train`: the full jitted train step of `configs/quickstart.base_config` (three-operand
calculator; rollout, scoring, PPO updates): RL
episodes/s, sampled tokens/s and approximate model FLOP/s as a fraction of a measured f32
matmul peak, for each model preset and each `--num-envs` (episodes/s vs batch size); then the
tiny model vmapped over several seeds (compare `step_s` with 1 seed; `--seeds` alone skips it).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import sys
import time

import jax
import jax.numpy as jnp

from mtrl_jax import policy as policy_lib
from mtrl_jax.envs import registry


def _device() -> str:
  d = jax.devices()[0]
  kind = getattr(d, "device_kind", "") or ""
  return d.platform if kind.lower() in ("", d.platform) else f"{d.platform}:{kind}"


def _action_pool(env, params, key, batch: int, pool: int):
  """[pool, batch] actions: expert turns from the first turns of episodes, some made malformed
  by truncating them (drops the closing tag)."""
  reset = jax.vmap(env.reset, in_axes=(0, None))
  expert = jax.vmap(env.expert, in_axes=(0, 0, None))
  step = jax.vmap(env.step, in_axes=(0, 0, 0, None))

  @jax.jit
  def collect(key):
    k_reset, k_loop = jax.random.split(key)
    state, _ = reset(jax.random.split(k_reset, batch), params)

    def body(state, key):
      k_exp, k_step, k_cut = jax.random.split(key, 3)
      action = expert(jax.random.split(k_exp, batch), state, params)
      cut = jax.random.uniform(k_cut, (batch,)) < 0.2
      action = action.replace(length=jnp.where(cut, jnp.maximum(action.length - 2, 1),
                                               action.length))
      state, *_ = step(jax.random.split(k_step, batch), state, action, params)
      return state, action

    _, actions = jax.lax.scan(body, state, jax.random.split(k_loop, pool))
    return actions

  return collect(key)


def _checksum(obs, reward, info):
  """Consume every output of `step` so that XLA cannot drop any of its work as dead code."""
  leaves = [obs.tokens, obs.length, reward] + jax.tree.leaves(info)
  return sum(jnp.sum(x.astype(jnp.float32)) for x in leaves)


def _autoreset(env, params, keys, state, done):
  fresh, _ = jax.vmap(env.reset, in_axes=(0, None))(keys, params)
  return jax.tree.map(lambda f, s: jnp.where(
      done.reshape(done.shape + (1,) * (s.ndim - 1)), f, s), fresh, state)


def bench_env(name: str, batch: int, steps: int, seed: int = 0) -> dict:
  env, params = registry.make(name)
  key = jax.random.PRNGKey(seed)
  k_pool, k_reset, k_run = jax.random.split(key, 3)
  pool = _action_pool(env, params, k_pool, batch, pool=max(env.max_turns, 4))
  step = jax.vmap(env.step, in_axes=(0, 0, 0, None))
  expert = jax.vmap(env.expert, in_axes=(0, 0, None))

  @jax.jit
  def run_steps(state, key):
    def body(carry, i):
      state, key, total = carry
      key, k_step = jax.random.split(key)
      action = jax.tree.map(lambda x: x[i % pool.length.shape[0]], pool)
      state, obs, reward, _, info = step(jax.random.split(k_step, batch), state, action, params)
      return (state, key, total + _checksum(obs, reward, info)), None
    return jax.lax.scan(body, (state, key, jnp.float32(0)), jnp.arange(steps))[0]

  @jax.jit
  def run_loop(state, key):
    def body(carry, _):
      state, key, total = carry
      key, k_exp, k_step, k_reset = jax.random.split(key, 4)
      action = expert(jax.random.split(k_exp, batch), state, params)
      state, obs, reward, done, info = step(jax.random.split(k_step, batch), state, action,
                                            params)
      state = _autoreset(env, params, jax.random.split(k_reset, batch), state, done)
      return (state, key, total + _checksum(obs, reward, info)), None
    return jax.lax.scan(body, (state, key, jnp.float32(0)), None, length=steps)[0]

  state, _ = jax.jit(jax.vmap(env.reset, in_axes=(0, None)))(jax.random.split(k_reset, batch),
                                                              params)
  out = {"bench": "envs", "env": name, "batch": batch, "steps": steps}
  for label, fn in (("steps_per_s", run_steps), ("loop_steps_per_s", run_loop)):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(state, k_run))  # compile + warm up
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    jax.block_until_ready(fn(state, k_run))
    elapsed = time.perf_counter() - t0
    out[label] = round(batch * steps / elapsed, 1)
    out[label.replace("steps_per_s", "compile_s")] = round(compile_s, 2)
  out["device"] = _device()
  return out


# --- rollout ---------------------------------------------------------------------------------

# Benchmark-only model shapes (not presets of the package): a Qwen2-style decoder of the size
# the issue-21 comparison used.
BENCH_MODELS = {
    "qwen2-4l": dict(d_model=256, num_layers=4, num_heads=4, num_kv_heads=2, mlp_dim=1024,
                     qkv_bias=True, vocab_size=512),
}


def bench_model_config(preset: str, vocab_size: int):
  from mtrl_jax.models import transformer as tf
  if preset in BENCH_MODELS:
    fields = dict(BENCH_MODELS[preset])
    return tf.ModelConfig(**{**fields, "vocab_size": max(fields["vocab_size"], vocab_size)})
  return tf.model_config(preset, vocab_size)


def reply_env(prompt_tokens: int = 32, reply_tokens: int = 16, turns: int = 4):
  """An environment of fixed shapes for rollout benchmarks (`--env reply`).

  A prompt of `prompt_tokens` tokens, `turns` agent turns, each answered by a tool reply of
  exactly `reply_tokens` tokens (random digits), no reward; the episode is truncated at the
  turn limit. 400 filler symbols make a random policy's `<eot>` rare, so turns use most of
  their budget (the shape of the issue-21 comparison: 4 turns of 24 tokens)."""
  from mtrl_jax import vocab as V
  from mtrl_jax.envs import base as eb

  class _ReplyEnv(eb.Environment):
    name = "reply"

    def symbols(self):
      return list(V.DIGITS) + [f"w{i}" for i in range(400)]

    @property
    def default_params(self):
      return eb.EnvParams()

    prompt_len = property(lambda self: prompt_tokens)
    reply_len = property(lambda self: reply_tokens)
    action_len = property(lambda self: 2)
    max_turns = property(lambda self: turns)

    def _digits(self, key, n):
      digits = jnp.asarray([self.id(d) for d in V.DIGITS], jnp.int32)
      return digits[jax.random.randint(key, (n,), 0, 10)]

    def reset_env(self, key, params):
      n = prompt_tokens - 4
      state = eb.EnvState(**eb.initial_counters())
      return state, self.make_prompt(self._digits(key, n), jnp.int32(n))

    def step_env(self, key, state, action, params):
      n = reply_tokens - 3
      reply = self.make_reply(eb.ROLE_TOOL, self._digits(key, n), jnp.int32(n))
      return state, reply, jnp.float32(0.0), jnp.bool_(False)

    def expert(self, key, state, params):
      return eb.Action(jnp.asarray([self.id("0"), self.vocab.eot_id], jnp.int32), jnp.int32(2))

  return _ReplyEnv()


def _make_env(env_name: str, reply_len: int):
  if env_name == "reply":
    env = reply_env(reply_tokens=reply_len)
    return env, env.default_params
  return registry.make(env_name)


def _host_loop_rollout(env, model_config, rc, params, key, env_params):
  """The per-token baseline: how host-side frameworks run multi-turn rollouts.

  A jitted one-token decode step (model + the rollout's sampler) is called from Python for
  every token and its result copied to the host; per-row bookkeeping is numpy; when a row's
  turn ends, the environment is stepped for that row alone (a jitted single-episode
  `env.step`), and the replies of all rows that need one are fed to the model in one jitted
  chunk call. Budgets and forcing rules are the fused rollout's (minus thinking budgets), so
  both produce episodes of the same kind; only where the loop runs differs.
  """
  import numpy as np

  from mtrl_jax import rollout as R
  from mtrl_jax.envs.base import Action
  from mtrl_jax.models import transformer as tf

  B, T, A = rc.batch_size, rc.max_len, rc.turn_budget
  K = env.max_turns if rc.max_turns is None else rc.max_turns
  eot = env.vocab.eot_id
  cfg = dataclasses.replace(model_config, value_head=False)
  fns = _host_loop_fns(env, cfg, rc.temperature)
  reset_keys, sample_keys = R.rollout_keys(key, rc.num_envs, rc.group_size)
  state, prompt = fns["reset"](reset_keys, env_params)
  states = [jax.tree.map(lambda x: x[b], state) for b in range(B)]
  lengths = np.asarray(prompt.length)
  rows = [list(np.asarray(prompt.tokens[b, :lengths[b]])) for b in range(B)]
  P = prompt.tokens.shape[1]
  cache = tf.init_cache(cfg, B, T)
  pos = jnp.where(jnp.arange(P) < prompt.length[:, None], jnp.arange(P), T)
  last_logits, cache = fns["feed"](params, prompt.tokens, pos, cache)
  pos = lengths.copy()
  turn_start = pos.copy()
  turns = np.zeros(B, np.int32)
  active = np.ones(B, bool)
  while active.any():
    tok, cache, last_logits = fns["decode"](params, last_logits,
                                            jnp.asarray(np.where(active, pos, T)), cache,
                                            sample_keys)
    tok = np.asarray(tok)
    ended = []
    for b in np.nonzero(active)[0]:
      t = int(tok[b]) if pos[b] - turn_start[b] < A - 1 else eot
      rows[b].append(t)
      pos[b] += 1
      if t == eot:
        ended.append(b)
      elif pos[b] >= T:
        active[b] = False
    replies = {}
    for b in ended:
      n = pos[b] - turn_start[b]
      action = Action(jnp.asarray(np.pad(rows[b][-n:], (0, A - n))), jnp.int32(n))
      states[b], obs, reward, done, _ = fns["step"](jax.random.key(b), states[b], action, env_params)
      turns[b] += 1
      m = int(obs.length)
      if bool(done) or turns[b] >= K or pos[b] + m >= T:
        active[b] = False
      else:
        replies[b] = np.asarray(obs.tokens[:m])
    if replies:
      R_ = env.reply_len
      chunk = np.zeros((B, R_), np.int32)
      cpos = np.full((B, R_), T, np.int32)
      for b, r in replies.items():
        chunk[b, :len(r)] = r
        cpos[b, :len(r)] = np.arange(pos[b], pos[b] + len(r))
        rows[b].extend(r.tolist())
        pos[b] += len(r)
        turn_start[b] = pos[b]
      logits, cache = fns["feed"](params, jnp.asarray(chunk), jnp.asarray(cpos), cache)
      fed = np.zeros(B, bool)
      fed[list(replies)] = True
      last_logits = jnp.where(jnp.asarray(fed)[:, None], logits, last_logits)
  return sum(len(r) for r in rows)


_HOST_FNS = {}


def _policy_for(env, cfg, temperature):
  return policy_lib.Policy.for_vocab(env.vocab, cfg.vocab_size, temperature=temperature)


def _host_loop_fns(env, cfg, temperature):
  from mtrl_jax.models import transformer as tf
  key = (id(env), cfg, temperature)
  if key in _HOST_FNS:
    return _HOST_FNS[key]
  policy = _policy_for(env, cfg, temperature)

  @jax.jit
  def feed(params, tokens, pos, cache):
    logits, _, cache = tf.apply(cfg, params, tokens, pos, cache=cache)
    n = jnp.sum(pos < cache.max_len, axis=1)
    return logits[jnp.arange(tokens.shape[0]), jnp.maximum(n - 1, 0)], cache

  @jax.jit
  def decode(params, last_logits, pos, cache, keys):
    # The fused rollout's sampler: one uniform per row from fold_in(row key, position).
    u = jax.vmap(lambda k, p: jax.random.uniform(jax.random.fold_in(k, p)))(keys, pos)
    tok, _ = policy.sample_uniform(u, last_logits)
    logits, _, cache = tf.apply(cfg, params, tok[:, None], pos[:, None], cache=cache)
    return tok, cache, logits[:, 0]

  fns = dict(feed=feed, decode=decode, step=jax.jit(env.step),
             reset=jax.jit(jax.vmap(env.reset, in_axes=(0, None))))
  _HOST_FNS[key] = fns
  return fns


_PER_TURN_FNS = {}


def _per_turn_fns(env, cfg, rc):
  """Jitted pieces of the per-turn baseline (cached per environment, model and budgets)."""
  from mtrl_jax.models import transformer as tf
  key = (id(env), cfg, rc)
  if key in _PER_TURN_FNS:
    return _PER_TURN_FNS[key]
  policy = _policy_for(env, cfg, rc.temperature)
  A, eot = rc.turn_budget, env.vocab.eot_id

  @jax.jit
  def generate(params, hist, hist_len, active, keys):
    """One sampler call: prefill the whole history [B, L], then a while_loop decode of one
    turn (until every active row emitted <eot> or used its budget). Returns tokens [B, A],
    turn lengths [B]."""
    B, L = hist.shape
    S = L + A
    cache = tf.init_cache(cfg, B, S)
    pos = jnp.where(jnp.arange(L) < hist_len[:, None], jnp.arange(L), S)
    hidden, _, cache = tf.apply(cfg, params, hist, pos, cache=cache, return_hidden=True)
    logits = tf.lm_logits(cfg, params, hidden[jnp.arange(B), jnp.maximum(hist_len - 1, 0)])

    def cond(c):
      return jnp.any(c[4]) & (c[0] < A)

    def body(c):
      i, cache, logits, out, live = c
      p = hist_len + i
      u = jax.vmap(lambda k, t: jax.random.uniform(jax.random.fold_in(k, t)))(keys, p)
      tok, _ = policy.sample_uniform(u, logits)
      tok = jnp.where(i >= A - 1, eot, tok)
      out = out.at[:, i].set(jnp.where(live, tok, 0))
      lg, _, cache = tf.apply(cfg, params, tok[:, None], jnp.where(live, p, S)[:, None],
                              cache=cache)
      return i + 1, cache, lg[:, 0], out, live & (tok != eot)

    c = (jnp.int32(0), cache, logits, jnp.zeros((B, A), jnp.int32), active)
    _, _, _, out, _ = jax.lax.while_loop(cond, body, c)
    n = jnp.where(active, jnp.minimum(jnp.argmax(out == eot, axis=1) + 1, A), 0)
    return out, n

  step = jax.jit(jax.vmap(env.step, in_axes=(0, 0, 0, None)))
  reset = jax.jit(jax.vmap(env.reset, in_axes=(0, None)))
  _PER_TURN_FNS[key] = fns = dict(generate=generate, step=step, reset=reset)
  return fns


def _per_turn_rollout(env, model_config, rc, params, key, env_params, bucket: int = 32):
  """The per-turn baseline: how JAX frameworks run multi-turn sampling today.

  Every agent turn is one sampler call on the whole history so far: a jitted prefill of the
  history (right-padded to a multiple of `bucket` tokens, so a handful of shapes compile),
  then a jitted `while_loop` that decodes the turn with a KV cache. Between turns the history
  goes to the host, the environment is stepped there (one jitted vmapped `env.step` for the
  batch) and its replies are appended; the next call re-prefills everything. Same model,
  sampler, budgets and environment as the fused rollout. Returns the tokens produced.
  """
  import numpy as np

  from mtrl_jax import rollout as R
  from mtrl_jax.envs.base import Action

  B, T, A = rc.batch_size, rc.max_len, rc.turn_budget
  K = env.max_turns if rc.max_turns is None else rc.max_turns
  cfg = dataclasses.replace(model_config, value_head=False)
  fns = _per_turn_fns(env, cfg, rc)
  reset_keys, sample_keys = R.rollout_keys(key, rc.num_envs, rc.group_size)
  state, prompt = fns["reset"](reset_keys, env_params)
  hist = np.zeros((B, T), np.int32)
  hist[:, :prompt.tokens.shape[1]] = np.asarray(prompt.tokens)
  length = np.asarray(prompt.length).astype(np.int32)
  active = np.ones(B, bool)
  for k in range(K):
    if not active.any():
      break
    L = min(-(-int(length.max()) // bucket) * bucket, T)
    out, n = fns["generate"](params, jnp.asarray(hist[:, :L]), jnp.asarray(length),
                             jnp.asarray(active), sample_keys)
    out, n = np.asarray(out), np.asarray(n)
    n = np.minimum(n, T - length)  # the context ends the turn
    action = Action(jnp.asarray(np.where(np.arange(A) < n[:, None], out, 0)), jnp.asarray(n))
    new_state, obs, _, done, _ = fns["step"](jax.random.split(jax.random.fold_in(key, k), B),
                                             state, action, env_params)
    state = jax.tree.map(lambda a, b: jnp.where(
        jnp.asarray(active).reshape((B,) + (1,) * (a.ndim - 1)), a, b), new_state, state)
    obs_tokens, obs_len, done = (np.asarray(obs.tokens), np.asarray(obs.length),
                                 np.asarray(done))
    for b in np.nonzero(active)[0]:
      hist[b, length[b]:length[b] + n[b]] = out[b, :n[b]]
      length[b] += n[b]
      m = int(obs_len[b])
      if done[b] or k + 1 >= K or length[b] + m >= T:
        active[b] = False
        continue
      hist[b, length[b]:length[b] + m] = obs_tokens[b, :m]
      length[b] += m
  return int(length.sum())


def bench_rollout(env_name: str, preset: str, batch: int, repeats: int, baselines=("per_token",),
                  reply_len: int = 16, seed: int = 0, **rollout_fields) -> dict:
  from mtrl_jax import rollout as R
  from mtrl_jax import vocab as V
  from mtrl_jax.models import transformer as tf

  env, env_params = _make_env(env_name, reply_len)
  cfg = bench_model_config(preset, env.vocab.size)
  params = tf.init_params(cfg, jax.random.key(seed))
  A = 24
  max_len = 160 if env_name != "reply" else env.prompt_len + env.max_turns * (A + env.reply_len)
  rc = R.RolloutConfig(num_envs=batch, group_size=1, max_len=max_len, turn_budget=A,
                       **rollout_fields)
  fused = jax.jit(R.make_rollout(env, cfg, rc))
  key = jax.random.key(seed + 1)
  t0 = time.perf_counter()
  jax.block_until_ready(fused(params, key, env_params))
  compile_s = time.perf_counter() - t0

  def run_fused(k):
    traj = jax.block_until_ready(fused(params, k, env_params))
    return int((traj.tokens != V.PAD_ID).sum())

  runners = {"fused": run_fused}
  labels = {"per_token": ("host", _host_loop_rollout), "per_turn": ("per_turn", _per_turn_rollout)}
  for name in baselines:
    fn = labels[name][1]
    runners[name] = functools.partial(fn, env, cfg, rc, params, env_params=env_params)
    runners[name](key=key)  # compile its pieces
  # Repeats interleave the methods (the machine is shared: a burst of load hits all of them),
  # and each method's fastest repeat is reported.
  best = {}
  for i in range(repeats):
    for name, fn in runners.items():
      t0 = time.perf_counter()
      n_tok = fn(key=jax.random.fold_in(key, i)) if name != "fused" else fn(
          jax.random.fold_in(key, i))
      best[name] = min(best.get(name, (float("inf"), 0)), (time.perf_counter() - t0, n_tok))
  fused_s, tokens = best["fused"]
  out = {"bench": "rollout", "env": env_name, "model": preset, "params": cfg.num_params(),
         "batch": batch, "max_len": rc.max_len, "reply_len": env.reply_len,
         "feed_fraction": getattr(rc, "feed_fraction", None),
         "feed_chunk": getattr(rc, "feed_chunk", None),
         "compile_s": round(compile_s, 2),
         "fused_tokens_per_s": round(tokens / fused_s, 1),
         "fused_episodes_per_s": round(batch / fused_s, 2), "repeats": repeats}
  for name in baselines:
    label = labels[name][0]
    dt, n_tokens = best[name]
    out.update({f"{label}_tokens_per_s": round(n_tokens / dt, 1),
                f"{label}_episodes_per_s": round(batch / dt, 2),
                f"speedup_vs_{name}": round((tokens / fused_s) / (n_tokens / dt), 2)})
  out["device"] = _device()
  return out


def cmd_rollout(args) -> int:
  baselines = [b for b in args.baseline if b != "none"]
  if args.no_host_loop:
    baselines = [b for b in baselines if b != "per_token"]
  fields = {}
  if args.feed_fraction is not None:
    fields["feed_fraction"] = args.feed_fraction
  if args.feed_chunk is not None:
    fields["feed_chunk"] = args.feed_chunk
  for env_name in args.env or ["calculator", "search", "fix", "retrieval"]:
    for preset in args.model:
      for reply_len in (args.reply_len if env_name == "reply" else [None]):
        for batch in args.batch:
          print(json.dumps(bench_rollout(env_name, preset, batch, args.repeats, baselines,
                                         reply_len=reply_len, **fields)), flush=True)
  if not args.no_context_sweep:
    for max_len in (128, 256, 512, 1024):
      for filled in sorted({16, max_len // 2, max_len - 1}):
        print(json.dumps(bench_decode("tiny", 64, max_len, filled, iters=50)), flush=True)
  return 0


# --- train -----------------------------------------------------------------------------------

def matmul_peak(n: int = 1024, iters: int = 20) -> float:
  """Measured f32 matmul FLOP/s on this device: the reference for the train step's fraction."""
  a = jax.random.normal(jax.random.key(0), (n, n))

  @jax.jit
  def chain(a):
    return jax.lax.fori_loop(0, iters, lambda i, x: (x @ a) * (1.0 / n), a)

  jax.block_until_ready(chain(a))
  t0 = time.perf_counter()
  jax.block_until_ready(chain(a))
  return 2 * n**3 * iters / (time.perf_counter() - t0)


def bench_train(preset: str, num_envs: int, repeats: int, seeds: int, peak: float) -> dict:
  """Tokens/s and approximate model FLOP/s of the full jitted train step (base config).

  FLOPs are counted analytically from the parameter count P (attention scores excluded):
  rollout 2*P per decoded token slot (every live row decodes once per loop iteration, over
  at most T - prompt iterations), one scoring forward 2*P*B*T, and `epochs` updates of
  6*P*B*T. With several seeds the step is vmapped over seeds.
  """
  from configs.quickstart import base_config
  from mtrl_jax import train as train_lib

  config = base_config()
  config.model.preset = preset
  config.rollout.num_envs = num_envs
  trainer = train_lib.make_train(config)
  P = trainer.model_config.num_params()
  rc = trainer.rollout_config
  B, T = rc.batch_size, rc.max_len
  init = jax.jit(jax.vmap(lambda k: trainer.start_rl(trainer.init(k))))
  step = jax.jit(jax.vmap(trainer.train_step))
  state = init(jax.random.split(jax.random.key(0), seeds))
  t0 = time.perf_counter()
  state, m = jax.block_until_ready(step(state))
  compile_s = time.perf_counter() - t0
  times, tokens = [], 0.0
  for _ in range(repeats):
    t0 = time.perf_counter()
    state, m = jax.block_until_ready(step(state))
    times.append(time.perf_counter() - t0)
    tokens += float(jnp.sum(m["train/sampled_tokens"]))
  dt = sum(times) / repeats
  decode_slots = B * (T - trainer.env.prompt_len)
  flops = seeds * (2 * P * decode_slots + 2 * P * B * T + 6 * P * B * T * config.algo.epochs)
  return {"bench": "train", "model": preset, "params": P, "batch": B, "max_len": T,
          "seeds": seeds, "compile_s": round(compile_s, 1), "step_s": round(dt, 3),
          "episodes_per_s": round(seeds * B / dt, 1),
          "sampled_tokens_per_s": round(tokens / repeats / dt, 1),
          "approx_flops_per_s": round(flops / dt / 1e9, 2) * 1e9,
          "matmul_peak_flops_per_s": round(peak / 1e9, 2) * 1e9,
          "fraction_of_peak": round(flops / dt / peak, 4), "device": _device()}


def cmd_train(args) -> int:
  peak = matmul_peak()
  print(json.dumps({"bench": "matmul_peak", "flops_per_s": round(peak / 1e9, 2) * 1e9,
                    "device": _device()}), flush=True)
  for preset in args.model:
    for num_envs in args.num_envs:
      print(json.dumps(bench_train(preset, num_envs, args.repeats, 1, peak)), flush=True)
  for seeds in args.seeds:
    print(json.dumps(bench_train("tiny", args.num_envs[0], args.repeats, seeds, peak)),
          flush=True)
  return 0


# --- memory / compile -------------------------------------------------------------------------

def real_shape_config(model: str, batch: int, max_len: int, minibatches: int, *,
                      layers: int | None = None, kl_coef: float = 0.0, **model_fields):
  """The base config (calculator, PPO with the turn-level critic) on a real model shape
  (`transformer.REAL_SHAPES`), `batch` episodes of `max_len` tokens, `minibatches` updates per
  epoch, rematerialised blocks; `layers` overrides the depth."""
  from configs.quickstart import base_config
  config = base_config()
  config.model = dict(preset=model, remat="full", **model_fields)
  if layers is not None:
    config.model["num_layers"] = layers
  config.rollout.num_envs = batch
  config.rollout.max_len = max_len
  config.algo.minibatches = minibatches
  config.algo.kl_coef = kl_coef
  return config


def compile_train_step(config, mesh=None):
  """(trainer, compiled train step, compile seconds): `Trainer.train_step` lowered with
  abstract `jax.ShapeDtypeStruct` state (no weights, nothing allocated), state donated; on
  `mesh` (`mtrl_jax.sharding.make_mesh`) the mesh step (`sharding.MeshSteps`), whose
  `memory_analysis()` is per device."""
  from mtrl_jax import train as train_lib
  trainer = train_lib.make_train(config)
  state = jax.eval_shape(lambda k: trainer.start_rl(trainer.init(k)), jax.random.key(0))
  t0 = time.perf_counter()
  if mesh is None:
    compiled = jax.jit(trainer.train_step, donate_argnums=0).lower(state).compile()
  else:
    from mtrl_jax import sharding
    compiled = sharding.MeshSteps(trainer, mesh)._train_step.lower(state).compile()
  return trainer, compiled, time.perf_counter() - t0


def _memory_fields(compiled) -> dict:
  m = compiled.memory_analysis()
  fields = {"argument_bytes": m.argument_size_in_bytes, "temp_bytes": m.temp_size_in_bytes,
            "output_bytes": m.output_size_in_bytes, "alias_bytes": m.alias_size_in_bytes}
  # Live at once at worst: the arguments, XLA's temporary allocation and the outputs that do
  # not reuse a donated argument. (The CPU backend's `peak_memory_in_bytes` leaves the temps
  # out, so it is not used.)
  peak = (fields["argument_bytes"] + fields["temp_bytes"] + fields["output_bytes"]
          - fields["alias_bytes"])
  return {"peak_bytes_per_device": int(peak), **{k: int(v) for k, v in fields.items()}}


def bench_memory(model: str, batch: int, max_len: int, minibatches: int, *,
                 extrapolate_from: list[int] | None = None, kl_coef: float = 0.0,
                 mesh=None, **model_fields) -> dict:
  """Buffer sizes of the compiled real-shape train step (`compiled.memory_analysis()`), per
  device: on `mesh`, the partitioned step (`mesh` field: the axis sizes).

  With `extrapolate_from` (e.g. [2, 4]) the step is compiled at those depths and every byte
  count is extrapolated linearly to the model's depth (the per-layer cost is the slope: blocks
  are scanned, so memory is affine in depth), for shapes that do not compile here in
  reasonable time or memory."""
  from mtrl_jax.models import transformer as tf
  depth = tf.REAL_SHAPES[model]["num_layers"]
  devices = 1 if mesh is None else mesh.size
  base = {"bench": "memory", "model": model, "devices": devices, "batch": batch,
          "max_len": max_len, "minibatches": minibatches, "layers": depth, "kl_coef": kl_coef,
          **({} if mesh is None else {"mesh": dict(mesh.shape)}), **model_fields}
  compile_step = functools.partial(compile_train_step, mesh=mesh)
  if not extrapolate_from:
    trainer, compiled, dt = compile_step(real_shape_config(
        model, batch, max_len, minibatches, kl_coef=kl_coef, **model_fields))
    return {**base, "params": trainer.model_config.num_params(), **_memory_fields(compiled),
            "compile_s": round(dt, 1), "device": _device()}
  points = []
  for layers in extrapolate_from:
    trainer, compiled, dt = compile_step(real_shape_config(
        model, batch, max_len, minibatches, layers=layers, kl_coef=kl_coef, **model_fields))
    points.append((layers, _memory_fields(compiled), dt))
  (l0, m0, _), (l1, m1, _) = points[0], points[-1]
  fields = {k: int(m0[k] + (m1[k] - m0[k]) * (depth - l0) / (l1 - l0)) for k in m0}
  cfg = dataclasses.replace(trainer.model_config, num_layers=depth)
  return {**base, "params": cfg.num_params(), **fields,
          "compile_s": round(sum(p[2] for p in points), 1),
          "extrapolated_from": [p[0] for p in points], "device": _device()}


def _bench_mesh(args):
  """The `--devices` / `--mesh` mesh of `memory` (None: one device, no mesh)."""
  if args.devices is None and args.mesh is None:
    return None
  from mtrl_jax import sharding
  settings = sharding.parse_mesh(args.mesh) if args.mesh else {"data": -1}
  devices = jax.devices()
  n = args.devices or len(devices)
  if n > len(devices):
    sys.exit(f"error: --devices {n}, but {len(devices)} are visible")
  try:
    return sharding.make_mesh(**settings, devices=devices[:n], where="--mesh")
  except ValueError as e:
    sys.exit(f"error: {e}")


def cmd_memory(args) -> int:
  mesh = _bench_mesh(args)
  fields = {}
  if args.param_dtype:
    fields["param_dtype"] = args.param_dtype
  if args.dtype:
    fields["dtype"] = args.dtype
  if args.logits_chunk:
    fields["logits_chunk"] = args.logits_chunk
  for model in args.model:
    print(json.dumps(bench_memory(model, args.batch, args.max_len, args.minibatches,
                                  extrapolate_from=args.extrapolate_from,
                                  kl_coef=args.kl_coef, mesh=mesh, **fields)), flush=True)
  return 0


def bench_compile(model: str, layers: int, batch: int, max_len: int, minibatches: int) -> dict:
  """Compile time and HLO size of the real-shape train step at a given depth."""
  _, compiled, dt = compile_train_step(real_shape_config(model, batch, max_len, minibatches,
                                                         layers=layers))
  return {"bench": "compile", "model": model, "layers": layers, "batch": batch,
          "max_len": max_len, "compile_s": round(dt, 1),
          "hlo_ops": sum(1 for line in compiled.as_text().splitlines() if " = " in line),
          "device": _device()}


def cmd_compile(args) -> int:
  for layers in args.layers:
    print(json.dumps(bench_compile(args.model, layers, args.batch, args.max_len,
                                   args.minibatches)), flush=True)
  return 0


def bench_decode(model: str, batch: int, max_len: int, filled: int, *, iters: int,
                 blockwise: bool = True, layers: int | None = None,
                 decode_block: int | None = None, vocab_size: int | None = None) -> dict:
  """ms per one-token decode call at cache size `max_len` with `filled` slots in use.
  `blockwise=False` attends densely over the whole static cache (the cost before blockwise
  decode): the same model with `decode_block = max_len`."""
  from mtrl_jax.models import transformer as tf
  overrides = {} if layers is None else {"num_layers": layers}
  if decode_block is not None:
    overrides["decode_block"] = decode_block
  if vocab_size is not None:  # e.g. a small one, to see attention without the LM head's cost
    overrides["vocab_size"] = vocab_size
  cfg = tf.model_config(model, 128, value_head=False, **overrides)
  if not blockwise:
    cfg = dataclasses.replace(cfg, decode_block=max_len)
  params = tf.init_params(cfg, jax.random.key(0))
  cache = tf.init_cache(cfg, batch, max_len)

  # The position is an argument (as in the rollout), so XLA cannot specialise the step to it,
  # and each step's argmax is the next token, so no part of the step is dead code.
  @functools.partial(jax.jit, donate_argnums=1)
  def steps(params, cache, pos):
    def body(i, carry):
      tok, c = carry
      logits, _, c = tf.apply(cfg, params, tok, pos, cache=c)
      return jnp.argmax(logits, -1).astype(jnp.int32), c
    return jax.lax.fori_loop(0, iters, body, (jnp.ones((batch, 1), jnp.int32), cache))[1]

  pos = jnp.full((batch, 1), filled - 1, jnp.int32)
  cache = jax.block_until_ready(steps(params, cache, pos))
  t0 = time.perf_counter()
  jax.block_until_ready(steps(params, cache, pos))
  per = (time.perf_counter() - t0) / iters
  return {"bench": "decode", "model": model, "layers": cfg.num_layers,
          "vocab_size": cfg.vocab_size, "batch": batch, "max_len": max_len, "filled": filled,
          "decode_block": cfg.decode_block,
          "attention": "blockwise" if blockwise and max_len > cfg.decode_block else "dense",
          "ms_per_step": round(per * 1e3, 3), "device": _device()}


def cmd_decode(args) -> int:
  for model in args.model:
    for max_len in args.max_len:
      ms = {}
      for filled in (16, max_len):
        for blockwise in (True, False):
          row = bench_decode(model, args.batch, max_len, filled, iters=args.iters,
                             blockwise=blockwise, layers=args.layers,
                             decode_block=args.decode_block, vocab_size=args.vocab_size)
          ms[filled, blockwise] = row["ms_per_step"]
          print(json.dumps(row), flush=True)
      # Against the full cache with blockwise attention and with dense attention (the cost of
      # every step before blockwise decode, whatever the filled length).
      print(json.dumps({"bench": "decode_ratio", "model": model, "max_len": max_len,
                        "filled": 16,
                        "ratio_to_full": round(ms[16, True] / ms[max_len, True], 3),
                        "ratio_to_dense_full": round(ms[16, True] / ms[max_len, False], 3),
                        "device": _device()}), flush=True)
  return 0


def cmd_envs(args) -> int:
  names = args.env or registry.list_envs()
  for name in names:
    print(json.dumps(bench_env(name, args.batch, args.steps, args.seed)), flush=True)
  return 0


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m experiments.benchmark", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command", required=True)
  p = sub.add_parser("envs", help="vmapped, jitted environment steps per second")
  p.add_argument("--batch", type=int, default=1024, help="parallel episodes (default 1024)")
  p.add_argument("--steps", type=int, default=200, help="timed steps per call (default 200)")
  p.add_argument("--env", action="append", choices=registry.list_envs(),
                 help="environment to benchmark (repeatable; default all)")
  p.add_argument("--seed", type=int, default=0)
  p.set_defaults(fn=cmd_envs)
  p = sub.add_parser("rollout", help="fused rollout vs a host-loop baseline; decode step vs "
                                     "context length")
  p.add_argument("--env", action="append", choices=registry.list_envs() + ["reply"],
                 help="environment (repeatable; default calculator, search, fix, retrieval); "
                      "'reply': fixed shapes, 32-token prompt, 4 turns, --reply-len replies")
  p.add_argument("--model", nargs="+", default=["tiny", "small"],
                 help="model presets, or qwen2-4l (4 layers, hidden 256, vocab 512)")
  p.add_argument("--reply-len", type=int, nargs="+", default=[16, 128],
                 help="reply tokens of the 'reply' environment")
  p.add_argument("--baseline", nargs="+", default=["per_token", "per_turn"],
                 choices=["per_token", "per_turn", "none"],
                 help="per_token: jitted decode step per token from Python; per_turn: jitted "
                      "prefill of the whole history + jitted while_loop decode per turn")
  p.add_argument("--feed_fraction", type=float, default=None,
                 help="override RolloutConfig.feed_fraction")
  p.add_argument("--feed_chunk", type=int, default=None, help="override RolloutConfig.feed_chunk")
  p.add_argument("--batch", type=int, nargs="+", default=[8, 64, 256])
  p.add_argument("--repeats", type=int, default=3, help="timed rollouts per setting")
  p.add_argument("--no-host-loop", action="store_true",
                 help="skip the per-token host-loop baseline")
  p.add_argument("--no-context-sweep", action="store_true", help="skip the decode-step sweep")
  p.set_defaults(fn=cmd_rollout)
  p = sub.add_parser("train", help="full train step: tokens/s, FLOP/s vs matmul peak, seeds")
  p.add_argument("--model", nargs="+", default=["tiny", "small"])
  p.add_argument("--num-envs", type=int, nargs="+", default=[32],
                 help="episodes per step (several: episodes/s vs batch size)")
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--seeds", type=int, nargs="*", default=[8],
                 help="also time the tiny model vmapped over this many seeds (at the first "
                      "--num-envs; none: skip)")
  p.set_defaults(fn=cmd_train)
  from mtrl_jax.models import transformer as tf
  shapes = sorted(tf.REAL_SHAPES)
  p = sub.add_parser("memory", help="buffer sizes of the compiled real-shape train step "
                                    "(compiled, not run; no weights)")
  p.add_argument("--model", nargs="+", default=["qwen2.5-0.5b"], choices=shapes)
  p.add_argument("--batch", type=int, default=64, help="episodes per step (default 64)")
  p.add_argument("--max_len", type=int, default=2048, help="tokens per episode (default 2048)")
  p.add_argument("--minibatches", type=int, default=4)
  p.add_argument("--kl_coef", type=float, default=0.0, help="> 0 keeps a reference policy")
  p.add_argument("--param_dtype", choices=["float32", "bfloat16"], default=None)
  p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                 help="compute dtype")
  p.add_argument("--logits_chunk", type=int, default=None)
  p.add_argument("--extrapolate_from", type=int, nargs="+", default=None,
                 help="compile at these depths and extrapolate to the model's (e.g. 2 4)")
  p.add_argument("--devices", type=int, default=None,
                 help="compile for a mesh of this many devices (on a CPU-only machine they "
                      "are simulated: jax_num_cpu_devices)")
  p.add_argument("--mesh", default=None,
                 help="mesh axis sizes, e.g. data=1,fsdp=8,tensor=1 (default: all on data)")
  p.set_defaults(fn=cmd_memory)
  p = sub.add_parser("compile", help="compile time and HLO size of the train step vs depth")
  p.add_argument("--model", default="qwen2.5-0.5b", choices=shapes)
  p.add_argument("--layers", type=int, nargs="+", default=[2, 8, 24, 28])
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--max_len", type=int, default=1024)
  p.add_argument("--minibatches", type=int, default=2)
  p.set_defaults(fn=cmd_compile)
  p = sub.add_parser("decode", help="ms per decode step: 16 filled vs full cache, blockwise "
                                    "vs dense attention over the static cache")
  p.add_argument("--model", nargs="+", default=["tiny", "qwen2.5-0.5b"])
  p.add_argument("--max_len", type=int, nargs="+", default=[512, 2048, 8192])
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--iters", type=int, default=10)
  p.add_argument("--layers", type=int, default=None, help="override the depth")
  p.add_argument("--decode_block", type=int, default=None,
                 help="override ModelConfig.decode_block")
  p.add_argument("--vocab_size", type=int, default=None,
                 help="override the vocabulary (a small one leaves the LM head's cost out)")
  p.set_defaults(fn=cmd_decode)
  args = parser.parse_args(argv)
  if getattr(args, "devices", None):  # before JAX starts its backends: simulated CPU devices
    jax.config.update("jax_num_cpu_devices", args.devices)
  return args.fn(args)


if __name__ == "__main__":
  sys.exit(main())
