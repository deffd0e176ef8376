"""Training: `make_train(config)` -> pure functions of a `TrainState`; building from a config.

A config (see `configs/`) has sections `env`, `model`, `rollout`, `algo`, `optim`, `sft`,
`train`; each builder validates its section and raises `ValueError` naming the offending key
before anything is compiled.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.struct
import jax
import jax.numpy as jnp
import optax

from mtrl_jax import reflexion as reflexion_lib
from mtrl_jax import rollout as rollout_lib
from mtrl_jax import vocab as V
from mtrl_jax.envs import base as envs_base
from mtrl_jax.envs import demos as envs_demos
from mtrl_jax.envs import registry
from mtrl_jax.models import transformer as tf
from mtrl_jax.rl import advantages, losses


def _as_dict(section: Any) -> dict[str, Any]:
  return dict(section.to_dict() if hasattr(section, "to_dict") else section)


def build_env(section: Mapping[str, Any]) -> tuple[envs_base.Environment, Any]:
  """`config.env` = {name, **overrides} -> (env, env_params)."""
  kwargs = _as_dict(section)
  if "name" not in kwargs:
    raise ValueError(f"config.env.name is missing; known environments: {registry.list_envs()}")
  name = kwargs.pop("name")
  if name == "json_tool":  # real tokenizer, Python tools (mtrl_jax.envs.json_tool; hf extra)
    from mtrl_jax.envs import json_tool
    try:
      return json_tool.from_config({"name": name, **kwargs})
    except ValueError as e:
      raise ValueError(f"config.env: {e}") from None
  try:
    return registry.make(name, **kwargs)
  except ValueError as e:
    raise ValueError(f"config.env: {e}") from None


def build_model_config(section: Mapping[str, Any], vocab_size: int) -> tf.ModelConfig:
  """`config.model` = {preset, **ModelConfig overrides} -> ModelConfig.

  With `checkpoint` (a Hugging Face checkpoint directory, `mtrl_jax.models.hf`) the
  architecture is the checkpoint's: `preset` is ignored, `param_dtype`/`dtype` and other
  ModelConfig fields (e.g. `remat`) still apply, and `Trainer.init` loads its weights."""
  kwargs = _as_dict(section)
  preset = kwargs.pop("preset", "tiny")
  checkpoint = kwargs.pop("checkpoint", "")
  if checkpoint:
    from mtrl_jax.models import hf
    try:
      return hf.model_config_from_hf(
          hf.load_hf_config(checkpoint), dtype=kwargs.pop("param_dtype", "float32"),
          compute_dtype=kwargs.pop("dtype", None), **{"value_head": True, **kwargs})
    except (ValueError, FileNotFoundError) as e:
      raise ValueError(f"config.model.checkpoint: {e}") from None
  if preset == "hf":
    raise ValueError("config.model.checkpoint is not set (preset 'hf' loads a Hugging Face "
                     "checkpoint directory)")
  try:
    return tf.model_config(preset, vocab_size, **kwargs)
  except ValueError as e:
    raise ValueError(f"config.model: {e}") from None


def build_rollout_config(section: Mapping[str, Any]) -> rollout_lib.RolloutConfig:
  """`config.rollout` = RolloutConfig fields -> RolloutConfig (unknown keys are errors)."""
  kwargs = _as_dict(section)
  fields = {f.name for f in dataclasses.fields(rollout_lib.RolloutConfig)}
  unknown = sorted(set(kwargs) - fields)
  if unknown:
    raise ValueError(f"config.rollout: unknown keys {unknown}; valid keys: {sorted(fields)}")
  return rollout_lib.RolloutConfig(**kwargs)


# --- the trainer ------------------------------------------------------------------------------

ADVANTAGES = ("turn_gae", "token_gae", "grpo", "rloo")


@flax.struct.dataclass
class TrainState:
  """Everything a run needs to continue exactly: a pytree (checkpointed as is).

  params: {'policy': ..., ['critic': ...]}; opt_state: optax state of the current phase;
  ref_params: frozen policy params for the KL term (the SFT result); step: [] int32 updates
  done in this phase; rng: PRNG key for the next step.
  """

  params: Any
  opt_state: Any
  ref_params: Any
  step: jax.Array
  rng: jax.Array


def _check_algo(algo, rollout_config: rollout_lib.RolloutConfig) -> None:
  if algo.advantage not in ADVANTAGES:
    raise ValueError(f"config.algo.advantage={algo.advantage!r}; expected one of {ADVANTAGES}")
  if algo.advantage in ("grpo", "rloo") and rollout_config.group_size < 2:
    raise ValueError(f"config.algo.advantage={algo.advantage!r} needs "
                     f"config.rollout.group_size >= 2, got {rollout_config.group_size}")
  if algo.dynamic_sampling and rollout_config.group_size < 2:
    raise ValueError("config.algo.dynamic_sampling needs config.rollout.group_size >= 2")
  if rollout_config.batch_size % algo.minibatches:
    raise ValueError(f"config.rollout batch ({rollout_config.batch_size} episodes) is not "
                     f"divisible by config.algo.minibatches={algo.minibatches}")
  if algo.loss_agg not in losses.AGGREGATION_MODES:
    raise ValueError(f"config.algo.loss_agg={algo.loss_agg!r}; expected one of "
                     f"{losses.AGGREGATION_MODES}")
  if algo.kl_coef and algo.kl_kind not in losses.KL_KINDS:
    raise ValueError(f"config.algo.kl_kind={algo.kl_kind!r}; expected one of {losses.KL_KINDS}")
  mr_window, mr_samples = algo.get("mr_window", 0), algo.get("mr_samples", 1)
  if not isinstance(mr_window, int) or mr_window < 0:
    raise ValueError(f"config.algo.mr_window must be an integer >= 0 (0 = off), got {mr_window!r}")
  if not isinstance(mr_samples, int) or mr_samples < 1:
    raise ValueError(f"config.algo.mr_samples must be an integer >= 1, got {mr_samples!r}")
  if mr_window and algo.advantage != "turn_gae":
    raise ValueError(f"config.algo.mr_window={mr_window} (multiturn-aware reward) needs "
                     f"config.algo.advantage='turn_gae', got {algo.advantage!r}")


REFLEXION_KEYS = ("train_trials", "memory", "reflection", "reflection_len")


def _check_reflexion(config) -> dict[str, Any] | None:
  """`config.reflexion` (optional) -> `make_reflexion` kwargs, or None when off.

  train_trials: trials per RL episode (1 = off: ordinary episodes); memory: Omega reflections
  kept; reflection: 'template' | 'policy'; reflection_len: tokens per reflection (0 = the
  environment's template length)."""
  section = config.get("reflexion", None)
  if section is None:
    return None
  kwargs = _as_dict(section)
  unknown = sorted(set(kwargs) - set(REFLEXION_KEYS))
  if unknown:
    raise ValueError(f"config.reflexion: unknown keys {unknown}; valid keys: "
                     f"{list(REFLEXION_KEYS)}")
  trials = kwargs.get("train_trials", 1)
  if not isinstance(trials, int) or trials < 1:
    raise ValueError(f"config.reflexion.train_trials must be an integer >= 1, got {trials!r}")
  if trials == 1:
    return None
  return dict(trials=trials, memory=kwargs.get("memory", 1),
              reflection=kwargs.get("reflection", "template"),
              reflection_len=kwargs.get("reflection_len", 0) or None)


def written_mask(tokens: jax.Array) -> jax.Array:
  """[B, T] bool: positions up to each row's last non-pad token (padding only follows it).

  Searched from the end, so that a real token that has the pad id inside the stream (id 0 of a
  real tokenizer) is not taken for padding.
  """
  not_pad = tokens != V.PAD_ID
  return jnp.flip(jnp.cumsum(jnp.flip(not_pad, axis=1), axis=1), axis=1) > 0


class Trainer:
  """`make_train(config)`: pure, jittable functions of a `TrainState`.

  * `init(key) -> TrainState` (fresh model, SFT optimizer)
  * `sft_step(state, key) -> (state, metrics)`: behaviour cloning on freshly generated (noisy)
    expert demonstrations, loss on the expert's tokens only.
  * `start_rl(state) -> TrainState`: freeze the reference policy, fresh RL optimizer.
  * `train_step(state, key) -> (state, metrics)`: rollout -> one forward for old log-probs,
    values and reference log-probs -> advantages -> `epochs` x `minibatches` clipped updates in
    `lax.scan`. No host round trip. With `config.reflexion.train_trials = N > 1` the rollout
    is N Reflexion trials of the same tasks (`mtrl_jax.reflexion`: episodic memory of the
    failed trials' reflections in the prompt) and the update trains on all N*B episodes
    (meta-training a policy to use its memory).

    Multiturn-aware reward (CollabLLM; `algo.mr_window = w > 0`, `algo.mr_samples = S`):
    after the rollout, every turn k of every row is continued `S` times by the current policy
    and the environment for w more turns (w >= K: to the end) from the replayed conversation
    through turn k, in one more batched rollout of B*K*S rows inside the same jitted step
    (`rollout.multiturn_aware_reward`). MR[b, k] = mean over the continuations of their rewards
    of turns k .. k+w. MR replaces the environment's per-turn reward (shaping terms, overlong
    and KL-in-reward, still add) with `gamma_turn = 0` semantics: each turn is credited with its
    MR only, against the turn-level critic (`advantage='turn_gae'`, required): A_k = MR_k - V_k,
    value target MR_k. `train/return` stays the environment's return of the rollout;
    `train/mr_mean` is the mean MR over valid turns. Cost: ~K*S extra rollouts per step.
  * `evaluate(params, key) -> metrics`: greedy rollouts.
  * `train(key) -> (state, metrics)`: the whole run (SFT then RL) in one `lax.scan` each;
    `jax.vmap(train)(keys)` trains several seeds at once.
  """

  def __init__(self, config, *, num_devices: int = 1, axis_name: str | None = None):
    """`num_devices` > 1 with `axis_name`: each device runs `train_step` on its slice of the
    episodes inside `jax.shard_map` (see `mtrl_jax.sharding`); reductions that define the
    loss (token counts, advantage statistics, gradients, metrics) are summed over `axis_name`,
    so the update equals the single-device one."""
    self.config = config
    self.num_devices, self.axis_name = int(num_devices), axis_name
    self.env, self.env_params = build_env(config.env)
    self.model_config = build_model_config(config.model, self.env.vocab.size)
    self.rollout_config = build_rollout_config(config.rollout)
    self.algo = config.algo
    _check_algo(self.algo, self.rollout_config)
    rc = self.rollout_config
    if rc.num_envs % self.num_devices:
      raise ValueError(f"config.rollout.num_envs={rc.num_envs} is not divisible by the "
                       f"{self.num_devices} devices of the data axis")
    local = rc.num_envs // self.num_devices
    if (local * rc.group_size) % self.algo.minibatches:
      raise ValueError(f"per-device batch {local * rc.group_size} is not divisible by "
                       f"config.algo.minibatches={self.algo.minibatches}")
    self.rollout = rollout_lib.make_rollout(self.env, self.model_config,
                                            dataclasses.replace(rc, num_envs=local))
    self.reflexion = None
    meta = _check_reflexion(config)
    if meta:  # meta-training on multi-trial episodes with episodic memory (mtrl_jax.reflexion)
      if self.algo.get("mr_window", 0):
        raise ValueError("config.reflexion.train_trials > 1 cannot be combined with "
                         "config.algo.mr_window (multiturn-aware reward)")
      try:
        self.reflexion = reflexion_lib.make_reflexion(
            self.env, self.model_config, dataclasses.replace(rc, num_envs=local),
            keep_trajectories=True, **meta)
      except ValueError as e:
        raise ValueError(f"config.reflexion: {e}") from None
    self.eval_rollout = rollout_lib.make_rollout(
        self.env, self.model_config,
        dataclasses.replace(self.rollout_config, num_envs=config.train.eval_envs, group_size=1,
                            greedy=True))
    self.banned = jnp.asarray(rollout_lib.never_sampled_mask(self.env.vocab,
                                                             self.model_config.vocab_size))
    self.demo_params = self.env_params.replace(noise=config.sft.noise)
    need = envs_demos.required_len(self.env)
    if config.sft.steps and need > self.rollout_config.max_len:
      raise ValueError(f"config.rollout.max_len={self.rollout_config.max_len} cannot hold an "
                       f"expert episode ({need} tokens) for SFT")
    self.sft_opt = optax.chain(optax.clip_by_global_norm(config.optim.grad_clip),
                               optax.adamw(config.sft.lr, weight_decay=config.optim.weight_decay))
    schedule = optax.linear_schedule(0.0, config.optim.lr, max(1, config.optim.warmup))
    self.rl_opt = optax.chain(optax.clip_by_global_norm(config.optim.grad_clip),
                              optax.adamw(schedule, b1=config.optim.b1, b2=config.optim.b2,
                                          weight_decay=config.optim.weight_decay))

  # --- forward helpers -------------------------------------------------------------------------
  def _sum(self, tree):
    """Sum over the data axis when sharded (identity on one device)."""
    if self.axis_name is None:
      return tree
    return jax.lax.psum(tree, self.axis_name)

  def _log_probs(self, logits):
    """[B, T, V] log-probs of the distribution the rollout samples from (no top-k/p)."""
    return rollout_lib.sampling_log_probs(logits, self.banned,
                                          temperature=self.rollout_config.temperature)

  def _forward(self, params, tokens):
    """(log-probs [B, T, V], token log-probs [B, T], values [B, T] or None).

    Tokens the sampler can never emit (prompt/reply role headers, padding) have log-prob -inf;
    they are set to 0 here, in the forward pass, so that masked-out positions cannot turn into
    NaN gradients (0 * d exp(-inf - -inf)).
    """
    logits, values = tf.apply_actor_critic(self.model_config, params, tokens)
    logp_all = self._log_probs(logits)
    logp = losses.token_log_probs(logp_all, tokens)
    return logp_all, jnp.where(jnp.isfinite(logp), logp, 0.0), values

  # --- init / SFT --------------------------------------------------------------------------
  def init(self, key) -> TrainState:
    k_model, k_rng = jax.random.split(key)
    checkpoint = self.config.model.get("checkpoint", "")
    if checkpoint:  # a Hugging Face checkpoint's weights (streamed in by a host callback)
      from mtrl_jax.models import hf
      params = hf.actor_critic_from_checkpoint(self.model_config, checkpoint,
                                               separate_critic=self.algo.separate_critic)
    else:
      params = tf.init_actor_critic(self.model_config, k_model,
                                    separate_critic=self.algo.separate_critic)
    return TrainState(params=params, opt_state=self.sft_opt.init(params),
                      ref_params=params["policy"], step=jnp.int32(0), rng=k_rng)

  def sft_step(self, state: TrainState, key=None):
    """Behaviour cloning on `sft.batch_size` freshly generated (noisy) expert episodes."""
    rng, k_demo = jax.random.split(state.rng if key is None else key)
    demos = envs_demos.demonstrations(self.env, self.demo_params, k_demo,
                                      self.config.sft.batch_size, self.rollout_config.max_len)
    state, metrics = self.sft_update(state.replace(rng=rng), demos.tokens, demos.loss_mask)
    return state, dict(metrics, **{"sft/demo_success": jnp.mean(demos.info["success"])})

  def sft_update(self, state: TrainState, tokens, loss_mask):
    """One behaviour-cloning step on given demonstrations (e.g. a batch of a TFDS dataset from
    `mtrl_jax.data.demo_batches`). tokens: [B, T] int32; loss_mask: [B, T] bool, the expert's
    tokens. Loss: mean negative log-likelihood over those tokens."""

    def loss_fn(params):
      _, logp, _ = self._forward(params, tokens)
      return -losses.aggregate(logp, loss_mask, "token_mean")

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    updates, opt_state = self.sft_opt.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    state = state.replace(params=params, opt_state=opt_state, step=state.step + 1)
    return state, {"sft/loss": loss}

  def start_rl(self, state: TrainState) -> TrainState:
    return state.replace(opt_state=self.rl_opt.init(state.params),
                         ref_params=state.params["policy"], step=jnp.int32(0))

  # --- RL ------------------------------------------------------------------------------------
  def train_step(self, state: TrainState, key=None):
    algo, rc = self.algo, self.rollout_config
    rng, k_roll, k_perm = jax.random.split(state.rng if key is None else key, 3)
    reset_keys, sample_keys = rollout_lib.rollout_keys(k_roll, rc.num_envs, rc.group_size)
    if self.axis_name is not None:  # this device's rows of the global batch
      n = reset_keys.shape[0] // self.num_devices
      start = jax.lax.axis_index(self.axis_name) * n
      reset_keys = jax.lax.dynamic_slice_in_dim(reset_keys, start, n)
      sample_keys = jax.lax.dynamic_slice_in_dim(sample_keys, start, n)
      k_perm = jax.random.fold_in(k_perm, jax.lax.axis_index(self.axis_name))
    if self.reflexion is None:
      traj = self.rollout.rows(state.params["policy"], reset_keys, sample_keys, self.env_params)
    else:  # N trials of the same tasks with memory; all N*B episodes are trained on
      trials = self.reflexion(state.params["policy"], reset_keys, sample_keys, self.env_params)
      traj = reflexion_lib.flatten_trials(trials.trajs)
    B, T = traj.tokens.shape
    K = traj.turn_end.shape[1]
    mr_window = algo.get("mr_window", 0)
    if mr_window:  # multiturn-aware reward: continuations of every turn (see the class doc)
      mr, _ = rollout_lib.multiturn_aware_reward(
          self.rollout.rows, state.params["policy"], traj, reset_keys, sample_keys,
          window=mr_window, samples=algo.get("mr_samples", 1), env_params=self.env_params)
      mr = jax.lax.stop_gradient(mr)

    # One forward with the rollout's params: old log-probs, values, reference log-probs.
    _, old_logp, values = self._forward(state.params, traj.tokens)
    old_logp = jax.lax.stop_gradient(old_logp)
    values = jnp.zeros((B, T)) if values is None else jax.lax.stop_gradient(values)
    ref_logp = jnp.zeros_like(old_logp)
    if algo.kl_coef:
      ref_logits, _, _ = tf.apply(dataclasses.replace(self.model_config,
                                                      value_head=not algo.separate_critic),
                                  state.ref_params, traj.tokens)
      ref_logp = losses.token_log_probs(self._log_probs(ref_logits), traj.tokens)
      ref_logp = jnp.where(jnp.isfinite(ref_logp), ref_logp, 0.0)

    B_global = B * self.num_devices
    written = written_mask(traj.tokens)
    last_pos = jnp.maximum(jnp.sum(written, axis=1) - 1, 0)                     # [B]
    mask = traj.loss_mask
    if not algo.mask_replies:  # ablation: replies enter the loss too (Search-R1's point)
      started = jnp.cumsum(traj.turn >= 0, axis=1) > 0
      mask = mask | (started & (traj.turn < 0) & written)
    # Ablation: drop truncated (overlong) episodes from the loss. The default keeps them: in RL
    # for SWE agents, filtering them hid looping failures.
    kept_rows = (~traj.truncated if not algo.get("keep_truncated", True)
                 else jnp.ones((B,), bool))
    mask = mask & kept_rows[:, None]

    # Rewards: environment rewards per turn, plus shaping on the last turn.
    turn_len = jnp.sum(traj.turn[:, :, None] == jnp.arange(K), axis=1)  # [B, K]
    turn_start = jnp.maximum(traj.turn_end - turn_len + 1, 1)
    rewards = traj.turn_reward
    last_turn = jnp.maximum(jnp.sum(traj.turn_valid, axis=1) - 1, 0)
    last_onehot = jax.nn.one_hot(last_turn, K) * traj.turn_valid
    if algo.overlong_len:
      penalty = advantages.overlong_penalty(jnp.sum(traj.loss_mask, axis=1), algo.overlong_len,
                                            algo.overlong_cache)
      rewards = rewards + penalty[:, None] * last_onehot
    kl_tok = losses.kl_estimate(old_logp, ref_logp, algo.kl_kind) if algo.kl_coef else 0.0
    if algo.kl_coef and algo.kl_in_reward:
      kl_turn = jnp.sum(jnp.where(mask[:, :, None] & (traj.turn[:, :, None] == jnp.arange(K)),
                                  kl_tok[:, :, None], 0.0), axis=1)
      rewards = rewards - algo.kl_coef * kl_turn
    returns = jnp.sum(rewards * traj.turn_valid, axis=1)  # [B]
    gamma_turn = algo.gamma_turn
    if mr_window:  # MR replaces the environment's reward of each turn; no credit carried over
      rewards = rewards - traj.turn_reward + mr
      gamma_turn = 0.0

    # Advantages and value targets.
    bootstrap = values[jnp.arange(B), last_pos]
    v_mask = jnp.zeros((B, T), bool)
    v_target = jnp.zeros((B, T))
    if algo.advantage == "turn_gae":
      v_pos = turn_start - 1  # the token before a turn: the state the agent acts from
      turn_values = jnp.take_along_axis(values, v_pos, axis=1)
      adv_turn, ret_turn = advantages.turn_gae(rewards, turn_values, traj.turn_valid,
                                               traj.done, bootstrap, gamma_turn, algo.lam)
      # Each trained token takes the advantage of its turn; with mask_replies=False a reply
      # token takes the advantage of the turn it answers (the last turn before it).
      owner = jnp.where(mask, jax.lax.cummax(traj.turn, axis=1), -1)
      adv = advantages.broadcast_to_tokens(adv_turn, owner)
      rows = jnp.broadcast_to(jnp.arange(B)[:, None], (B, K))
      v_pos_w = jnp.where(traj.turn_valid, v_pos, T)
      v_mask = v_mask.at[rows, v_pos_w].set(True, mode="drop")
      v_target = v_target.at[rows, v_pos_w].set(ret_turn, mode="drop")
    elif algo.advantage == "token_gae":
      tok_rewards = jnp.zeros((B, T)).at[
          jnp.broadcast_to(jnp.arange(B)[:, None], (B, K)),
          jnp.where(traj.turn_valid, traj.turn_end, T)].add(rewards, mode="drop")
      prev_values = jnp.concatenate([jnp.zeros((B, 1)), values[:, :-1]], axis=1)
      adv, ret = advantages.token_gae(tok_rewards, prev_values, mask, algo.gamma_turn, algo.lam,
                                      traj.done, bootstrap)
      # The value predicting token t's return sits at t - 1.
      v_mask = jnp.concatenate([mask[:, 1:], jnp.zeros((B, 1), bool)], axis=1)
      v_target = jnp.concatenate([ret[:, 1:], jnp.zeros((B, 1))], axis=1)
    else:
      seq_adv = (advantages.group_advantages(returns, rc.group_size,
                                             scale_by_std=algo.scale_by_std)
                 if algo.advantage == "grpo" else
                 advantages.rloo_advantages(returns, rc.group_size))
      adv = jnp.broadcast_to(seq_adv[:, None], (B, T))
    if algo.normalize_adv and algo.advantage in ("turn_gae", "token_gae"):
      n = jnp.maximum(self._sum(jnp.sum(mask)), 1)
      mean = self._sum(jnp.sum(jnp.where(mask, adv, 0.0))) / n
      std = jnp.sqrt(self._sum(jnp.sum(jnp.where(mask, (adv - mean) ** 2, 0.0))) / n)
      adv = (adv - mean) / (std + 1e-6)
    weights = jnp.ones((B,))
    # Groups whose returns are all equal carry no GRPO/RLOO signal (DAPO's motivation): their
    # fraction is logged always; dynamic sampling also weights them out.
    frac_kept = jnp.float32(1.0)
    if rc.group_size > 1:
      ds_weights, frac_kept = advantages.dynamic_sampling_weights(returns, rc.group_size)
    if algo.dynamic_sampling:
      weights = ds_weights
      if self.axis_name is not None:  # renormalise over the global batch, not this device's
        kept = weights > 0
        num_kept = self._sum(jnp.sum(kept))
        weights = jnp.where(kept, B_global / jnp.maximum(num_kept, 1).astype(jnp.float32), 0.0)
    adv = jnp.where(mask, adv * weights[:, None], 0.0)
    tis = jnp.ones((B, T))
    if algo.tis_cap:
      tis = losses.truncated_importance_weights(old_logp, traj.sampler_logprob,
                                                traj.loss_mask, algo.tis_cap)

    v_mask = v_mask & kept_rows[:, None]
    batch = dict(tokens=traj.tokens, mask=mask, adv=adv, old_logp=old_logp, ref_logp=ref_logp,
                 old_values=values, v_mask=v_mask, v_target=v_target, tis=tis)
    M = algo.minibatches
    # Global-batch denominators: a device's minibatch loss is its share of the global one.
    denom = dict(num_tokens=jnp.maximum(self._sum(jnp.sum(mask)), 1) / M,
                 num_seqs=B_global // M, max_len=T)
    v_denom = dict(num_tokens=jnp.maximum(self._sum(jnp.sum(v_mask)), 1) / M,
                   num_seqs=B_global // M, max_len=T)

    def loss_fn(params, mb):
      logp_all, logp, new_values = self._forward(params, mb["tokens"])
      pg, clipped = losses.clipped_surrogate(
          logp, mb["old_logp"], mb["adv"], eps_low=algo.eps_low, eps_high=algo.eps_high,
          dual_clip=algo.dual_clip or None)
      pg_loss = losses.aggregate(pg * mb["tis"], mb["mask"], algo.loss_agg, **denom)
      entropy = losses.aggregate(losses.entropy_from_logits(logp_all), mb["mask"], "token_mean",
                                 **denom)
      total = pg_loss - algo.ent_coef * entropy
      metrics = {"clip_frac": losses.aggregate(clipped.astype(jnp.float32), mb["mask"],
                                               "token_mean", **denom),
                 "entropy": entropy, "pg_loss": pg_loss}
      if algo.kl_coef:
        kl = losses.aggregate(losses.kl_estimate(logp, mb["ref_logp"], algo.kl_kind),
                              mb["mask"], "token_mean", **denom)
        metrics["kl"] = kl
        if not algo.kl_in_reward:
          total = total + algo.kl_coef * kl
      if new_values is not None and algo.vf_coef:
        vl = losses.value_loss(new_values, mb["old_values"], mb["v_target"],
                               clip_eps=algo.value_clip or None)
        vl = losses.aggregate(vl, mb["v_mask"], "token_mean", **v_denom)
        total = total + algo.vf_coef * vl
        metrics["value_loss"] = vl
      return total, metrics

    def minibatch_step(carry, mb):
      params, opt_state, skipped = carry
      (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, mb)
      loss, metrics, grads = self._sum((loss, metrics, grads))
      finite = jnp.isfinite(loss) & jnp.all(jnp.asarray(
          [jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]))
      updates, new_opt = self.rl_opt.update(grads, opt_state, params)
      new_params = optax.apply_updates(params, updates)
      # A non-finite loss or gradient skips the update (and is counted), never poisons params.
      params = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new_params, params)
      opt_state = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new_opt, opt_state)
      metrics = dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads))
      return (params, opt_state, skipped + (~finite).astype(jnp.int32)), metrics

    def epoch(carry, key):
      perm = jax.random.permutation(key, B).reshape(M, B // M)
      mbs = jax.tree.map(lambda x: x[perm], batch)
      return jax.lax.scan(minibatch_step, carry, mbs)

    (params, opt_state, skipped), metrics = jax.lax.scan(
        epoch, (state.params, state.opt_state, jnp.int32(0)),
        jax.random.split(k_perm, algo.epochs))
    metrics = jax.tree.map(jnp.mean, metrics)

    info = traj.info
    n_sampled = jnp.maximum(self._sum(jnp.sum(traj.loss_mask)), 1)
    mean = lambda x: self._sum(jnp.sum(x.astype(jnp.float32))) / B_global
    out = {f"train/{k}": v for k, v in metrics.items()}
    out.update({
        "train/return": mean(returns),
        "train/success_rate": mean(info["success"]),
        "train/tool_calls": mean(info["num_tool_calls"]),
        "train/format_errors": mean(info["format_errors"]),
        "train/turns": mean(jnp.sum(traj.turn_valid, axis=1)),
        "train/truncated": mean(traj.truncated),
        "train/sampled_tokens": n_sampled.astype(jnp.float32),
        "train/logprob_agreement": self._sum(jnp.sum(jnp.where(
            traj.loss_mask, jnp.abs(old_logp - traj.sampler_logprob), 0.0))) / n_sampled,
        "train/frac_groups_kept": self._sum(frac_kept) / self.num_devices,
        "train/nan_skipped": skipped.astype(jnp.float32),
    })
    if self.reflexion is not None:  # per-trial success of the multi-trial episodes
      n_rows = self.num_devices * trials.success.shape[1]
      out["train/success_first_trial"] = self._sum(jnp.sum(trials.success[0])) / n_rows
      out["train/success_last_trial"] = self._sum(jnp.sum(trials.success[-1])) / n_rows
      out["train/solved_any_trial"] = self._sum(jnp.sum(trials.solved[-1])) / n_rows
    if mr_window:
      out["train/mr_mean"] = (self._sum(jnp.sum(jnp.where(traj.turn_valid, mr, 0.0)))
                              / jnp.maximum(self._sum(jnp.sum(traj.turn_valid)), 1))
    if not algo.kl_coef:
      out["train/kl"] = jnp.float32(0.0)
    if "train/value_loss" not in out:
      out["train/value_loss"] = jnp.float32(0.0)
    state = state.replace(params=params, opt_state=opt_state, step=state.step + 1, rng=rng)
    return state, out

  def evaluate(self, params, key):
    """Greedy rollouts of `train.eval_envs` episodes: success, return, tool calls, turns,
    truncation, and the mean of every other numeric `info` entry of the environment (e.g.
    clarify's `num_asks`, `first_turn_ask`) as `eval/<name>`."""
    traj = self.eval_rollout(params["policy"], key, self.env_params)
    info = traj.info
    mean = lambda x: jnp.mean(x.astype(jnp.float32))
    out = {f"eval/{k}": mean(v) for k, v in info.items()
           if v.ndim == 1 and k not in ("success", "num_tool_calls")}
    out.update({
        "eval/success_rate": mean(info["success"]),
        "eval/return": jnp.mean(traj.returns),
        "eval/tool_calls": mean(info["num_tool_calls"]),
        "eval/turns": mean(jnp.sum(traj.turn_valid, axis=1)),
        "eval/truncated": mean(traj.truncated),
    })
    return out

  def train(self, key):
    """The whole run as one pure function: SFT steps, then RL steps (`lax.scan` each).

    Returns (final state, {'sft': metrics [sft.steps], 'rl': metrics [train.steps]}).
    """
    state = self.init(key)
    state, sft_metrics = jax.lax.scan(lambda s, _: self.sft_step(s), state, None,
                                      length=self.config.sft.steps)
    state = self.start_rl(state)
    state, rl_metrics = jax.lax.scan(lambda s, _: self.train_step(s), state, None,
                                     length=self.config.train.steps)
    return state, {"sft": sft_metrics, "rl": rl_metrics}


def make_train(config) -> Trainer:
  """Validate `config` (errors name the key, before any compilation) and build the trainer."""
  return Trainer(config)

