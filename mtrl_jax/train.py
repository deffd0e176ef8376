"""Training: `make_train(config)` -> pure functions of a `TrainState`; building from a config.

A config (see `configs/`) has sections `env`, `model`, `rollout`, `algo`, `optim`, `sft`,
`train` (and optionally `reflexion`); each is validated when the trainer is built, and a bad
key or value raises `ValueError` naming `config.<section>.<key>` before anything is compiled.

The RL train step is a pipeline of pure stages from `mtrl_jax.rl` (DESIGN section 7):

    collect     rl.collect     the episodes (a strategy chosen at build time)
    score       rl.scoring     loss mask, shaped per-turn rewards, returns
    advantages  rl.estimators  the named estimator's token advantages and value targets
    update      rl.update      epochs x minibatches of `rl.objective.ppo_loss` in `lax.scan`
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.struct
import jax
import jax.numpy as jnp
import optax

from mtrl_jax import rollout as rollout_lib
from mtrl_jax.envs import base as envs_base
from mtrl_jax.envs import demos as envs_demos
from mtrl_jax.envs import registry
from mtrl_jax.models import transformer as tf
from mtrl_jax.models.partitioning import constrain_rows, local_rows
from mtrl_jax.rl import collect as collect_lib
from mtrl_jax.rl import estimators, losses, objective, scoring
from mtrl_jax.rl.config import AlgoConfig, Checks, ConfigError, from_section, section_dict
from mtrl_jax.rl.update import ppo_update

written_mask = scoring.written_mask  # re-exported: part of the public API since round 1


def build_env(section: Mapping[str, Any]) -> tuple[envs_base.Environment, Any]:
  """`config.env` = {name, **overrides} -> (env, env_params). `name` is a registered name or
  an import path `"pkg.mod:Class"` (`envs.registry.make`)."""
  kwargs = section_dict(section)
  if "name" not in kwargs:
    raise ValueError(f"config.env.name is missing; known environments: {registry.list_envs()}"
                     ", or an import path 'package.module:Class'")
  name = kwargs.pop("name")
  try:
    env, params = registry.make(name, **kwargs)
  except ValueError as e:
    raise ValueError(f"config.env: {e}") from None
  # The parameters every environment shares (envs.base.EnvParams), range-checked here.
  if isinstance(params, envs_base.EnvParams):
    Checks(params, "env").number("noise", 0.0, 1.0)
    Checks(params, "env").number("habit_p", 0.0, 1.0)
    Checks(params, "env").number("format_penalty", 0.0)
  return env, params


def fill_env_section(config, name: str | None = None) -> None:
  """Put every override the environment of `config.env` declares into `config.env` (in place;
  a locked ConfigDict is unlocked for it), with its default, so that a command line can set
  any of them (`--config.env.format_penalty=0.1`) and an unknown key is still an error.

  The environment is `name`, else `config.env.name` (registered or an import path): its
  constructor arguments and `Params` fields (`envs.registry.declared_overrides`) with a number,
  string or boolean default, or a None default of such a type (an `ml_collections` placeholder
  of that type). Keys already set are kept. A factory's environment (`json_tool`), a missing or
  unknown name change nothing (`build_env` reports the latter)."""
  section = config["env"] if isinstance(config, Mapping) else config.env
  name = section.get("name") if name is None else name
  if not isinstance(name, str):
    return
  try:
    declared = registry.declared_overrides(name)
  except ValueError:
    return
  from ml_collections import config_dict
  values = {k: (default if default is not None else config_dict.placeholder(kind))
            for k, (default, kind) in declared.items() if k not in section and kind is not None}
  if hasattr(section, "unlocked"):
    with section.unlocked():
      section.update(values)
  else:
    section.update({k: None if isinstance(v, config_dict.FieldReference) else v
                    for k, v in values.items()})


def build_model_config(section: Mapping[str, Any], vocab_size: int) -> tf.ModelConfig:
  """`config.model` = {preset, **ModelConfig overrides} -> ModelConfig.

  With `checkpoint` (a Hugging Face checkpoint directory, `mtrl_jax.models.hf`) the
  architecture is the checkpoint's: `preset` is ignored, `param_dtype`/`dtype` and other
  ModelConfig fields (e.g. `remat`) still apply, and `Trainer.init` loads its weights."""
  kwargs = section_dict(section)
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
  try:  # a `vocab_size` override may be larger than the environment's (a padded vocabulary)
    return tf.model_config(preset, vocab_size, **kwargs)
  except ValueError as e:  # ModelConfig names its field: say where it is in the config
    raise ConfigError(f"config.model: {e}".replace("config.model: ModelConfig.",
                                                   "config.model.")) from None


def build_rollout_config(section: Mapping[str, Any]) -> rollout_lib.RolloutConfig:
  """`config.rollout` = RolloutConfig fields -> RolloutConfig (unknown keys are errors)."""
  kwargs = section_dict(section)
  fields = {f.name for f in dataclasses.fields(rollout_lib.RolloutConfig)}
  unknown = sorted(set(kwargs) - fields)
  if unknown:
    raise ConfigError(f"config.rollout: unknown keys {unknown}; valid keys: {sorted(fields)}")
  return rollout_lib.RolloutConfig(**kwargs)


def _rollout(env, model_config, rollout_config) -> rollout_lib.Rollout:
  """`make_rollout`, its budget errors naming `config.rollout.<field>`."""
  try:
    return rollout_lib.make_rollout(env, model_config, rollout_config)
  except rollout_lib.BudgetError as e:
    message = str(e)
    raise ConfigError(f"config.{message}" if message.startswith("rollout.") else
                      f"config.rollout: {message}") from None


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """`config.optim`: the RL optimizer (AdamW with global-norm clipping, linear warm-up).

  lr: peak learning rate (> 0); warmup: optimizer updates of linear warm-up (>= 0): update
  i (from 0) uses lr * min(1, (i + 1) / (warmup + 1)), so the first update already moves the
  params (at lr / (warmup + 1)); 0 = the full rate from the first update; b1, b2: Adam
  moments' decay in [0, 1); grad_clip: global-norm clip (> 0); weight_decay: >= 0 (also used by
  the SFT optimizer, with `config.sft.lr`); moments_dtype: "float32" keeps Adam's moments in
  float32 whatever `model.param_dtype` is (`f32_moments`), "param" keeps them in the params'
  dtype (half the optimizer memory with bfloat16 params, at the moments' precision)."""

  lr: float = 1e-4
  warmup: int = 5
  b1: float = 0.9
  b2: float = 0.999
  grad_clip: float = 1.0
  weight_decay: float = 0.0
  moments_dtype: str = "float32"

  def __post_init__(self):
    c = Checks(self, "optim")
    c.choice("moments_dtype", ("float32", "param"))
    c.number("lr", 0.0, low_open=True)
    c.integer("warmup", 0)
    c.number("b1", 0.0, 1.0, high_open=True)
    c.number("b2", 0.0, 1.0, high_open=True)
    c.number("grad_clip", 0.0, low_open=True)
    c.number("weight_decay", 0.0)


@dataclasses.dataclass(frozen=True)
class SFTConfig:
  """`config.sft`: the supervised warm start.

  steps: SFT steps (>= 0; 0 = none); batch_size: demonstrations per step (>= 1); lr: > 0;
  noise: the demonstrator's per-turn mistake rate in [0, 1]; habit_p: the probability in
  [0, 1] that a demonstration follows the environment's habit, a systematic suboptimal
  strategy (`EnvParams.habit_p`; > 0.5 makes the habit the warm start's greedy mode);
  data_dir, dataset: a TFDS demonstration dataset to read instead of generating
  demonstrations ('' = generate)."""

  steps: int = 300
  batch_size: int = 32
  lr: float = 1e-3
  noise: float = 0.3
  habit_p: float = 0.0
  data_dir: str = ""
  dataset: str = ""

  def __post_init__(self):
    c = Checks(self, "sft")
    c.integer("steps", 0)
    c.integer("batch_size", 1)
    c.number("lr", 0.0, low_open=True)
    c.number("noise", 0.0, 1.0)
    c.number("habit_p", 0.0, 1.0)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """`config.train`: the RL run.

  steps: RL steps (>= 0); eval_every: RL steps between greedy evaluations (>= 1); eval_envs:
  evaluation episodes (>= 1; the same fixed episodes every time; 256 by default, so that the
  success rate's standard error, logged as `eval/success_se`, is <= 0.031); log_every,
  checkpoint_every: steps (>= 1); keep_checkpoints: checkpoints kept (>= 1); num_seeds: seeds
  trained at once by vmap (>= 1)."""

  steps: int = 160
  eval_every: int = 20
  eval_envs: int = 256
  log_every: int = 1
  checkpoint_every: int = 40
  keep_checkpoints: int = 2
  num_seeds: int = 1

  def __post_init__(self):
    c = Checks(self, "train")
    c.integer("steps", 0)
    for name in ("eval_every", "eval_envs", "log_every", "checkpoint_every", "keep_checkpoints",
                 "num_seeds"):
      c.integer(name, 1)


def warmup_schedule(lr: float, warmup: int) -> optax.Schedule:
  """Linear warm-up that never gives 0: update i (counted from 0) uses
  lr * min(1, (i + 1) / (warmup + 1)); `warmup = 0` is the constant `lr`."""
  if not warmup:
    return optax.constant_schedule(lr)
  return optax.linear_schedule(lr / (warmup + 1), lr, warmup)  # lr/(w+1) at 0, lr from w


def success_se(rate: jax.Array, n: int) -> jax.Array:
  """[] f32 binomial standard error of a success rate over n episodes: sqrt(p (1 - p) / n)."""
  return jnp.sqrt(rate * (1.0 - rate) / n).astype(jnp.float32)


def f32_moments(inner: optax.GradientTransformation) -> optax.GradientTransformation:
  """`inner` run in float32 on low-precision params: its state (Adam's moments) is initialised
  from float32 copies of the params and updated with float32 gradients; the updates are cast
  back to each param's dtype. A no-op (the same arrays) for float32 params. There are no
  float32 master weights: an update below a bfloat16 param's resolution is rounded away."""
  f32 = lambda tree: jax.tree.map(
      lambda x: x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)

  def update(updates, state, params=None):
    new, state = inner.update(f32(updates), state, None if params is None else f32(params))
    return jax.tree.map(lambda u, g: u.astype(g.dtype), new, updates), state

  return optax.GradientTransformation(lambda params: inner.init(f32(params)), update)


TOP_LEVEL = {"seed": 0, "num_samples": 0}  # integer settings and their minimum


def _check_top_level(config) -> None:
  """`config.seed` (>= 0), `config.num_samples` (>= 0), `config.init_from` (a path)."""
  get = config.get if hasattr(config, "get") else lambda k, d=None: getattr(config, k, d)
  for key, low in TOP_LEVEL.items():
    value = get(key, low)
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
      raise ConfigError(f"config.{key} must be an integer >= {low}, got {value!r}")
  if not isinstance(get("init_from", ""), str):
    raise ConfigError(f"config.init_from must be a path (a string), got {get('init_from')!r}")


@flax.struct.dataclass
class TrainState:
  """Everything a run needs to continue exactly: a pytree (checkpointed as is).

  params: {'policy': ..., ['critic': ...]}; opt_state: optax state of the current phase;
  ref_params: frozen policy params for the KL term (the SFT result), None during SFT and when
  `algo.kl_coef = 0`; step: [] int32 updates done in this phase; rng: PRNG key for the next
  step.
  """

  params: Any
  opt_state: Any
  ref_params: Any
  step: jax.Array
  rng: jax.Array


class Trainer:
  """`make_train(config)`: pure, jittable functions of a `TrainState`.

  * `init(key) -> TrainState` (fresh model, SFT optimizer)
  * `sft_step(state, key) -> (state, metrics)`: behaviour cloning on freshly generated (noisy)
    expert demonstrations, loss on the expert's tokens only.
  * `start_rl(state) -> TrainState`: freeze the reference policy, fresh RL optimizer.
  * `train_step(state, key) -> (state, metrics)`: collect -> score -> advantages -> update (the
    module docstring); no host round trip. What is collected is chosen here, once
    (`self.collect`, `mtrl_jax.rl.collect`): plain rollouts, Reflexion trials
    (`config.reflexion.train_trials > 1`) or rollouts with the multiturn-aware reward
    (`config.algo.mr_window > 0`).
  * `evaluate(params, key) -> metrics`: greedy rollouts.
  * `train(key) -> (state, metrics)`: the whole run (SFT then RL) in one `lax.scan` each;
    `jax.vmap(train)(keys)` trains several seeds at once.

  Tokens are sampled from and scored under one `mtrl_jax.policy.Policy` (`self.policy`, the
  rollout's; the learner, the reference and SFT score with `self.policy.learner()`).

  The functions are written for the global batch. On a device mesh (`mtrl_jax.sharding`) the
  same functions are jitted with the state's shardings and traced under `jax.set_mesh`: the
  rows of the episodes, of the scoring forward and of every minibatch are constrained to the
  mesh's (data, fsdp) axes (`partitioning.constrain_rows`, a no-op off a mesh) and the layers'
  activations by `models.partitioning`; XLA's SPMD partitioner inserts the collectives.
  """

  def __init__(self, config):
    self.config = config
    _check_top_level(config)
    self.algo = AlgoConfig.from_section(config.algo)
    self.optim = from_section(OptimConfig, config.optim, "optim")
    self.sft = from_section(SFTConfig, config.sft, "sft")
    self.train_config = from_section(TrainConfig, config.train, "train")
    self.env, self.env_params = build_env(config.env)
    self.model_config = build_model_config(config.model, self.env.vocab.size)
    self.rollout_config = build_rollout_config(config.rollout)
    rc, algo = self.rollout_config, self.algo
    self.estimator = estimators.ESTIMATORS[algo.advantage]
    if rc.group_size < self.estimator.min_group_size:
      raise ValueError(f"config.algo.advantage={algo.advantage!r} needs "
                       f"config.rollout.group_size >= {self.estimator.min_group_size}, got "
                       f"{rc.group_size}")
    if algo.dynamic_sampling and rc.group_size < 2:
      raise ValueError("config.algo.dynamic_sampling needs config.rollout.group_size >= 2")
    if rc.batch_size % algo.minibatches:
      raise ValueError(f"config.rollout batch ({rc.batch_size} episodes) is not "
                       f"divisible by config.algo.minibatches={algo.minibatches}")
    self.rollout = _rollout(self.env, self.model_config, rc)
    self.collect = collect_lib.make_collector(config, self.env, self.model_config, rc,
                                              self.rollout, algo)
    self.eval_rollout = _rollout(
        self.env, self.model_config,
        dataclasses.replace(rc, num_envs=self.train_config.eval_envs, group_size=1,
                            greedy=True))
    self.policy = self.rollout.policy
    self.learner = self.policy.learner()
    self.demo_params = self.env_params.replace(noise=self.sft.noise, habit_p=self.sft.habit_p)
    need = envs_demos.required_len(self.env)
    if self.sft.steps and need > rc.max_len:
      raise ValueError(f"config.rollout.max_len={rc.max_len} cannot hold an "
                       f"expert episode ({need} tokens) for SFT")
    optim = self.optim
    wrap = f32_moments if optim.moments_dtype == "float32" else (lambda opt: opt)
    self.sft_opt = wrap(optax.chain(optax.clip_by_global_norm(optim.grad_clip),
                                    optax.adamw(self.sft.lr, weight_decay=optim.weight_decay)))
    # Never 0: with optax.linear_schedule(0, lr, w) the first RL update was a no-op.
    schedule = warmup_schedule(optim.lr, optim.warmup)
    self.rl_opt = wrap(optax.chain(optax.clip_by_global_norm(optim.grad_clip),
                                   optax.adamw(schedule, b1=optim.b1, b2=optim.b2,
                                               weight_decay=optim.weight_decay)))

  # --- forward helpers -------------------------------------------------------------------------
  def _score_policy(self, policy_params, hidden, tokens):
    """Token log-probs and entropy [B, T] from the policy's final hidden states [B, T, d], in
    `model.logits_chunk` position chunks (no `[B, T, V]` logits; `Policy.score_hidden`)."""
    head = lambda h: tf.lm_logits(self.model_config, policy_params, h)
    return self.learner.score_hidden(head, hidden, tokens, chunk=self.model_config.logits_chunk)

  def _forward(self, params, tokens):
    """Score `tokens` [B, T] under the learner's distribution: (token log-probs [B, T], 0 on
    tokens the policy cannot emit; entropy [B, T] nats of the distribution each token was
    drawn from; values [B, T] or None)."""
    hidden, values = tf.apply_actor_critic(self.model_config, params, tokens, return_hidden=True)
    logp, entropy = self._score_policy(params["policy"], hidden, tokens)
    return logp, entropy, values

  def _reference_logp(self, ref_params, tokens):
    """[B, T] token log-probs of the frozen reference policy (0 on unsampleable tokens)."""
    hidden, _, _ = tf.apply(dataclasses.replace(self.model_config,
                                                value_head=not self.algo.separate_critic),
                            ref_params, tokens, return_hidden=True)
    return self._score_policy(ref_params, hidden, tokens)[0]

  def _by_minibatch(self, fn, tokens):
    """`fn(tokens [b, T]) -> pytree of [b, ...]` over the batch in `algo.minibatches` row
    blocks (`lax.map`), so the scoring forward holds the activations of one minibatch.

    Block m holds rows m, m + M, m + 2M, ... (strided): with the rows split over a mesh's
    devices in contiguous slices, every block then takes the same number of rows from every
    device, and no row moves between devices."""
    M, B = self.algo.minibatches, tokens.shape[0]
    blocks = tokens.reshape(B // M, M, *tokens.shape[1:]).swapaxes(0, 1)
    out = jax.lax.map(lambda t: fn(constrain_rows(t)), blocks)
    return jax.tree.map(lambda x: x.swapaxes(0, 1).reshape(B, *x.shape[2:]), out)

  # --- init / SFT --------------------------------------------------------------------------
  def init(self, key) -> TrainState:
    k_model, k_rng = jax.random.split(key)
    checkpoint = section_dict(self.config.model).get("checkpoint", "")
    if checkpoint:  # a Hugging Face checkpoint's weights (streamed in by a host callback)
      from mtrl_jax.models import hf
      params = hf.actor_critic_from_checkpoint(self.model_config, checkpoint,
                                               separate_critic=self.algo.separate_critic)
    else:
      params = tf.init_actor_critic(self.model_config, k_model,
                                    separate_critic=self.algo.separate_critic)
    return TrainState(params=params, opt_state=self.sft_opt.init(params), ref_params=None,
                      step=jnp.int32(0), rng=k_rng)

  def sft_step(self, state: TrainState, key=None):
    """Behaviour cloning on `sft.batch_size` freshly generated (noisy) expert episodes."""
    rng, k_demo = jax.random.split(state.rng if key is None else key)
    demos = envs_demos.demonstrations(self.env, self.demo_params, k_demo,
                                      self.sft.batch_size, self.rollout_config.max_len)
    state, metrics = self.sft_update(state.replace(rng=rng), demos.tokens, demos.loss_mask)
    return state, dict(metrics, **{"sft/demo_success": jnp.mean(demos.info["success"])})

  def sft_update(self, state: TrainState, tokens, loss_mask):
    """One behaviour-cloning step on given demonstrations (e.g. a batch of a TFDS dataset from
    `mtrl_jax.data.demos.demo_batches`). tokens: [B, T] int32; loss_mask: [B, T] bool, the expert's
    tokens. Loss: mean negative log-likelihood over those tokens."""

    def loss_fn(params):
      logp, _, _ = self._forward(params, tokens)
      return -losses.aggregate(logp, loss_mask, "token_mean")

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    updates, opt_state = self.sft_opt.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    state = state.replace(params=params, opt_state=opt_state, step=state.step + 1)
    return state, {"sft/loss": loss}

  def start_rl(self, state: TrainState) -> TrainState:
    """Fresh RL optimizer; the KL reference is a copy of the current policy when
    `algo.kl_coef > 0` and None otherwise (no second set of weights in memory; a copy, not the
    same buffers, so that the train step can donate its state)."""
    ref = jax.tree.map(jnp.copy, state.params["policy"]) if self.algo.kl_coef else None
    return state.replace(opt_state=self.rl_opt.init(state.params), ref_params=ref,
                         step=jnp.int32(0))

  # --- RL ------------------------------------------------------------------------------------
  def train_step(self, state: TrainState, key=None):
    """One RL step: collect -> score -> advantages -> update (see the module docstring)."""
    algo, rc = self.algo, self.rollout_config
    rng, k_roll, k_perm = jax.random.split(state.rng if key is None else key, 3)
    reset_keys, sample_keys = constrain_rows(
        rollout_lib.rollout_keys(k_roll, rc.num_envs, rc.group_size))

    # 1. Collect episodes with the current policy (rows stay on the device that sampled them).
    collected = self.collect(state.params["policy"], reset_keys, sample_keys, self.env_params)
    traj = constrain_rows(collected.traj)
    B, T = traj.tokens.shape

    # 2. Score them with the rollout's params (old log-probs, values) and the reference, one
    #    minibatch of rows at a time.
    old_logp, values = self._by_minibatch(
        lambda t: jax.lax.stop_gradient(self._forward(state.params, t)[::2]), traj.tokens)
    values = jnp.zeros((B, T)) if values is None else values
    ref_logp = (self._by_minibatch(lambda t: self._reference_logp(state.ref_params, t),
                                   traj.tokens) if algo.kl_coef else jnp.zeros_like(old_logp))
    kl_tok = losses.kl_estimate(old_logp, ref_logp, algo.kl_kind) if algo.kl_coef else None
    scored = scoring.score(traj, algo, kl_tok=kl_tok,
                           turn_reward_override=collected.turn_reward)
    mask = scored.mask

    # 3. Advantages on tokens, with the named estimator.
    targets = self.estimator.fn(traj, scored, values, algo=algo,
                                group_size=self.rollout_config.group_size)
    adv = targets.adv
    if algo.normalize_adv and self.estimator.uses_critic:
      adv = estimators.normalize(adv, mask)
    weights, frac_kept = estimators.group_weights(
        scored.returns, rc.group_size, dynamic_sampling=algo.dynamic_sampling)
    tis = (losses.truncated_importance_weights(old_logp, traj.sampler_logprob, traj.loss_mask,
                                               algo.tis_cap)
           if algo.tis_cap else jnp.ones((B, T)))
    v_mask = targets.v_mask & scored.kept_rows[:, None]
    batch = objective.Minibatch(
        tokens=traj.tokens, mask=mask, adv=jnp.where(mask, adv * weights[:, None], 0.0),
        old_logp=old_logp, ref_logp=ref_logp, old_values=values, v_mask=v_mask,
        v_target=targets.v_target, tis=tis)

    # 4. Update: epochs x minibatches of the PPO/DAPO loss with global-batch denominators.
    M = algo.minibatches
    denom = objective.Denominators(jnp.maximum(jnp.sum(mask), 1) / M, B // M, T)
    v_denom = objective.Denominators(jnp.maximum(jnp.sum(v_mask), 1) / M, B // M, T)
    loss_fn = lambda p, mb: objective.ppo_loss(p, constrain_rows(mb), forward=self._forward,
                                               algo=algo, denom=denom, v_denom=v_denom)
    params, opt_state, skipped, update_metrics = ppo_update(
        state.params, state.opt_state, batch, k_perm, loss_fn=loss_fn, optimizer=self.rl_opt,
        epochs=algo.epochs, minibatches=M)

    metrics = self._step_metrics(traj, scored.returns, old_logp, frac_kept, skipped,
                                 update_metrics, collected.metrics)
    state = state.replace(params=params, opt_state=opt_state, step=state.step + 1, rng=rng)
    return state, metrics

  def _step_metrics(self, traj, returns, old_logp, frac_kept, skipped, update_metrics,
                    extra) -> dict[str, jax.Array]:
    """`train/*` metrics over the global batch: the update's, the episodes', the collector's."""
    info = traj.info
    n_sampled = jnp.maximum(jnp.sum(traj.loss_mask), 1)
    mean = lambda x: jnp.mean(x.astype(jnp.float32))
    out = {f"train/{k}": v for k, v in update_metrics.items()}
    out.update({
        "train/return": mean(returns),
        "train/success_rate": mean(info["success"]),
        "train/tool_calls": mean(info["num_tool_calls"]),
        "train/format_errors": mean(info["format_errors"]),
        "train/turns": mean(jnp.sum(traj.turn_valid, axis=1)),
        "train/truncated": mean(traj.truncated),
        "train/sampled_tokens": n_sampled.astype(jnp.float32),
        "train/logprob_agreement": jnp.sum(jnp.where(
            traj.loss_mask, jnp.abs(old_logp - traj.sampler_logprob), 0.0)) / n_sampled,
        "train/frac_groups_kept": frac_kept,
        "train/nan_skipped": skipped.astype(jnp.float32),
    })
    out.update(extra)
    out.setdefault("train/kl", jnp.float32(0.0))
    out.setdefault("train/value_loss", jnp.float32(0.0))
    return out

  def evaluate(self, params, key):
    """Greedy rollouts of `train.eval_envs` episodes: success (with its binomial standard
    error `eval/success_se` = sqrt(p (1 - p) / n)), return, tool calls, turns, truncation, and
    the mean of every other numeric `info` entry of the environment (e.g. clarify's
    `num_asks`, `first_turn_ask`) as `eval/<name>`."""
    rc = self.eval_rollout.config
    reset_keys, sample_keys = rollout_lib.rollout_keys(key, rc.num_envs, rc.group_size)
    rows = lambda p, r, s: self.eval_rollout.rows(p, r, s, self.env_params)
    traj = local_rows(rows, (False, True, True))(params["policy"], reset_keys, sample_keys)
    info = traj.info
    mean = lambda x: jnp.mean(x.astype(jnp.float32))
    out = {f"eval/{k}": mean(v) for k, v in info.items()
           if v.ndim == 1 and k not in ("success", "num_tool_calls")}
    out.update({
        "eval/success_rate": mean(info["success"]),
        "eval/success_se": success_se(mean(info["success"]), info["success"].shape[0]),
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
                                      length=self.sft.steps)
    state = self.start_rl(state)
    state, rl_metrics = jax.lax.scan(lambda s, _: self.train_step(s), state, None,
                                     length=self.train_config.steps)
    return state, {"sft": sft_metrics, "rl": rl_metrics}


def make_train(config) -> Trainer:
  """Validate `config` (errors name the key, before any compilation) and build the trainer."""
  return Trainer(config)
