"""Knowledge internalisation: continued pre-training vs SFT vs RLAG, on synthetic facts.

The question (issue 9, part 3; DESIGN.md section 1): does rewarding reasoning quality, not only
the answer, internalise knowledge better than SFT? RLAG = "Reinforcement Learning from Augmented
Generation" (Nie et al., 2025, "Embedding Domain Knowledge for Large Language Models via
Reinforcement Learning from Augmented Generation", arXiv:2509.20162; code
github.com/ChaojunNie/RLAG).

Setup (`mtrl_jax.envs.facts`). Each seed draws its own knowledge base (12 entities x 4
properties = 48 facts, no information in the names). One shared warm start, then three arms with
the same model, optimizer, batch size and number of steps, each from the warm start's params:

* warm start (shared, fair for all arms): *open-book reading* SFT on fresh random knowledge
  bases every batch (never the evaluation KB): the relevant facts are in the prompt (75% of
  rows; 25% closed-book rows teach the response format on unknowable answers), questions of all
  three kinds (direct, paraphrased, two-hop), target = the templated explanation and answer.
  It teaches the format, the synonyms and chaining two facts; it cannot teach any fact of the
  evaluation KB. The warm start alone is the "no knowledge" baseline (chance level).
* (a) `cpt`: continued pre-training, next-token loss on the KB's fact statements
  (`<bos> e3 colour red <eot>`, all tokens after `<bos>`).
* (b) `sft`: closed-book direct question -> gold response
  (`<think> e3 colour red </think> <answer> red </answer> <eot>`), loss on the response only.
* (c) `rlag`: closed-book and augmented generations of direct questions (the SFT arm's
  questions), rewards, and the RLAG preference loss below.

Every arm adds the same replay term, `train.replay` x the warm start's loss on a fresh batch:
in a first run without it (after a 40-step warm start), continued pre-training on bare fact
statements forgot the response format within 20 steps (closed- and open-book accuracy both fell
to 0), which measures forgetting rather than knowledge.

Evaluation (`evaluate`): greedy, closed-book, exact match of the answer on every direct,
paraphrased and two-hop question of the KB (48 / 48 / 96), plus open-book direct accuracy (the
reading skill, a sanity ceiling). Paraphrased and two-hop questions are never trained on the
evaluation KB by any arm: they measure whether the knowledge is usable beyond the trained form.

RLAG loss, as implemented (per question; mean over the batch)::

    y_w ~ pi(. | facts + question)        augmented generation (sampled, temperature 1)
    y_l ~ pi(. | question)                closed-book ("naive") generation
    r(y) = correct(y) + rationality_coef * p(gold | question, explanation of y)   [no grad]
    pair = r(y_w) > r(y_l)
    beta_A = beta_a if pair else 0;  beta_D = beta_d_pair if pair else beta_d_same
    z = beta_D * I + beta_A * (min(l_w, clip_chosen) - max(l_l, clip_rejected)) - gamma
    loss = -log sigmoid(z)

with mean per-token log-probs (nats) under the current policy, no reference model:
`I` = log-likelihood of the knowledge (the relevant facts as a statement `facts <eot>` after
`<bos>`), `l_w` = of y_w given the *closed-book* prompt, `l_l` = of y_l given the closed-book
prompt. Rationality = probability of the gold answer token after the generated explanation:
the closed-book prompt, y's `<think> ... </think>` block (an empty one if y has none), then
`<answer>`.

What matches the paper's released code (`RLAGLoss`, `compute_rlag_batch_loss`,
`RLAGDataset`): the loss form `-logsigmoid(beta_D*I + beta_A*l_w - beta_A*l_l - gamma)` with
mean token log-probs and no reference model; the knowledge term I on the context passages; the
clips (l_w capped at -0.2 so a chosen response stops being pushed once likely; l_l floored at -5
so a rejected one stops being pushed down); the per-pair weights (beta_D, beta_A) = (0.2, 0.5)
when the two generations differ and (0.5, 0) when they agree.

Where it differs, and why:
1. The paper samples by scoring the multiple-choice options (it keeps the highest-log-prob
   option, with and without the context) and builds pairs offline, once per iteration; here
   both generations are *sampled* free-form online, every step, inside the jitted step.
2. The paper's pair weight switches on whether chosen == rejected; here on whether the
   augmented generation's reward (accuracy + rationality, the brief's reward) is strictly
   higher. If the closed-book generation is as good or better, only the knowledge term trains.
3. The released code scores the chosen (augmented) generation *with* the context in the prompt;
   here l_w is scored closed-book (`chosen_in_context=False`, the default), so that the
   preference moves the closed-book policy toward the augmented answer - the internalisation
   the brief asks for. `rlag.chosen_in_context=True` gives the code's variant.
4. Rationality enters the pair selection (reward), not the loss, and is the model's own
   p(gold | explanation) rather than the paper's evaluation by a judge.
5. gamma = 0.1 here, the `RLAGLoss` class default; the released training config
   (`configs/config.yaml`) passes gamma = 8, which puts z far below 0 so that
   -log sigmoid(z) ~ -z: every pair's terms get full weight, instead of sigma(-z) ~ 0.5-0.7 here.
   `--config.rlag.gamma=8` runs that variant (RESULTS.md section 9 reports both).

Generation (`Model.generate`) is the project's fused rollout (`mtrl_jax.rollout`) on a one-turn
environment whose prompt comes in per-row params (`mtrl_jax.reflexion.PromptEnv`): KV-cache
sampling, a response of at most `response_len` tokens whose last is forced to `<eot>`. Scoring
keeps its own layout (prompts left-padded so every response starts at the same position) and
uses the same `mtrl_jax.policy.Policy` as the rollout (banned tokens, temperature), so sampled
and scored distributions agree by construction. Masks gate every loss: prompt and fact tokens
never enter a response's loss, only the response tokens (up to its `<eot>`) do.

This study lives in experiments/ (its runner is `python -m experiments.rlag`): it is one
experiment with its own training loop, not part of the library.

Everything is a pure function of params and keys; `Runner` jits the phases and vmaps them over
seeds (`jax.vmap` over keys, the PureJaxRL idiom).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from mtrl_jax import reflexion as reflexion_lib
from mtrl_jax import rollout as rollout_lib
from mtrl_jax import vocab as V
from mtrl_jax.envs import facts as facts_lib
from mtrl_jax.envs.facts import Facts, Question
from mtrl_jax.models import transformer as tf
from mtrl_jax.policy import Policy
from mtrl_jax.rl import losses

ARMS = ("cpt", "sft", "rlag")
SECTIONS: dict[str, tuple[str, ...]] = {
    "env": ("num_entities", "num_values"),
    "model": ("preset", "d_model", "num_layers", "num_heads", "num_kv_heads", "mlp_dim",
              "dtype"),
    "warm": ("steps", "batch_size", "lr", "closed_frac"),
    "train": ("steps", "batch_size", "lr", "grad_clip", "eval_every", "arms", "replay"),
    "rlag": ("beta_d_pair", "beta_a", "beta_d_same", "gamma", "clip_chosen", "clip_rejected",
             "rationality_coef", "temperature", "chosen_in_context"),
}
TOP_LEVEL = ("seed", "num_seeds", "workdir", *SECTIONS)


def check_config(config) -> None:
  """Raise ValueError naming the first unknown or invalid key (before anything compiles)."""
  keys = set(config.keys())
  for k in sorted(keys - set(TOP_LEVEL)):
    raise ValueError(f"unknown config key {k!r}; valid keys: {sorted(TOP_LEVEL)}")
  for section, valid in SECTIONS.items():
    if section not in keys:
      raise ValueError(f"config.{section} is missing")
    for k in sorted(set(config[section].keys()) - set(valid)):
      raise ValueError(f"unknown config key 'config.{section}.{k}'; valid keys there: "
                       f"{sorted(valid)}")
  arms = parse_arms(config.train.arms)
  if not arms:
    raise ValueError(f"config.train.arms is empty; choose from {ARMS}")
  for name in ("steps", "batch_size", "eval_every"):
    if int(config.train[name]) < (0 if name == "steps" else 1):
      raise ValueError(f"config.train.{name} must be positive, got {config.train[name]}")
  if config.train.steps % config.train.eval_every:
    raise ValueError(f"config.train.steps={config.train.steps} must be a multiple of "
                     f"config.train.eval_every={config.train.eval_every}")
  if not 0.0 <= config.warm.closed_frac <= 1.0:
    raise ValueError(f"config.warm.closed_frac must be in [0, 1], got {config.warm.closed_frac}")
  if config.rlag.temperature <= 0:
    raise ValueError(f"config.rlag.temperature must be > 0, got {config.rlag.temperature}")
  if int(config.num_seeds) < 1:
    raise ValueError(f"config.num_seeds must be >= 1, got {config.num_seeds}")


def parse_arms(arms: str | tuple) -> tuple[str, ...]:
  out = tuple(a.strip() for a in (arms.split(",") if isinstance(arms, str) else arms) if a)
  bad = [a for a in out if a not in ARMS]
  if bad:
    raise ValueError(f"config.train.arms: unknown arm(s) {bad}; choose from {ARMS}")
  return out


# --- pure pieces --------------------------------------------------------------------------------

def rlag_loss(info_lp: jax.Array, chosen_lp: jax.Array, rejected_lp: jax.Array,
              beta_d: jax.Array, beta_a: jax.Array, *, gamma: float, clip_chosen: float,
              clip_rejected: float) -> jax.Array:
  """The RLAG preference loss, mean over the batch: [] float32.

  info_lp, chosen_lp, rejected_lp: [B] mean per-token log-probs (nats) of the knowledge, the
  preferred (augmented) and the rejected (closed-book) generation. beta_d, beta_a: [B] per-pair
  weights. `-log sigmoid(beta_d*I + beta_a*(min(l_w, clip_chosen) - max(l_l, clip_rejected))
  - gamma)`.
  """
  z = (beta_d * info_lp + beta_a * (jnp.minimum(chosen_lp, clip_chosen)
                                    - jnp.maximum(rejected_lp, clip_rejected)) - gamma)
  return jnp.mean(-jax.nn.log_sigmoid(z))


def mean_logp(token_logp: jax.Array, mask: jax.Array) -> jax.Array:
  """[B, G], [B, G] bool -> [B] mean log-prob over the masked tokens (0 for an empty row)."""
  n = jnp.sum(mask, axis=-1)
  return jnp.sum(jnp.where(mask, token_logp, 0.0), axis=-1) / jnp.maximum(n, 1)


def lengths_to_mask(lengths: jax.Array, width: int) -> jax.Array:
  """[B] -> [B, width] bool, True on the first `lengths[b]` positions."""
  return jnp.arange(width)[None, :] < lengths[:, None]


class Model:
  """The policy's forward passes over left-padded prompt + right-padded response rows.

  Row layout: `[pad .. pad, prompt (plen tokens)] [response (rlen tokens), pad ..]`, prompt
  width P, response width G. Positions count from the first real token; pads are masked out
  of attention.
  """

  def __init__(self, config: tf.ModelConfig, vocab: V.Vocab, prompt_width: int,
               response_width: int, temperature: float = 1.0):
    self.config = config
    self.vocab = vocab
    self.temperature = float(temperature)
    self.policy = Policy.for_vocab(vocab, config.vocab_size, temperature=self.temperature)
    self.banned = self.policy.banned
    self.P, self.G = prompt_width, response_width
    # One agent turn of G tokens after the prompt (the reply slot of 1 is never used).
    env = reflexion_lib.PromptEnv(vocab, prompt_width, reply_len=1)
    rc = rollout_lib.RolloutConfig(num_envs=1, max_len=prompt_width + response_width + 1,
                                   turn_budget=response_width, max_turns=1,
                                   temperature=self.temperature)
    self.rollouts = {greedy: rollout_lib.make_rollout(env, config,
                                                      dataclasses.replace(rc, greedy=greedy))
                     for greedy in (False, True)}

  def log_probs(self, params, tokens: jax.Array, plen: jax.Array, prompt_width: int):
    """tokens [B, L] -> [B, L, V] log-probs of the sampling distribution."""
    B, L = tokens.shape
    n_pad = prompt_width - plen                                           # [B]
    idx = jnp.arange(L)[None, :]
    positions = jnp.maximum(idx - n_pad[:, None], 0)
    key_mask = idx >= n_pad[:, None]
    logits, _, _ = tf.apply(self.config, params, tokens, positions, key_mask=key_mask)
    return self.policy.log_probs(logits)

  def response_logp(self, params, prompt: jax.Array, plen: jax.Array, response: jax.Array):
    """Token log-probs of a response given its prompt: [B, G] (log p(response[:, g] | prompt,
    response[:, :g])); -inf (banned tokens) is set to 0 so masked positions stay finite."""
    P = prompt.shape[1]
    tokens = jnp.concatenate([prompt, response], axis=1)
    lp = losses.token_log_probs(self.log_probs(params, tokens, plen, P), tokens)[:, P:]
    return jnp.where(jnp.isfinite(lp), lp, 0.0)

  def generate(self, params, prompt: jax.Array, plen: jax.Array, key: jax.Array, width: int,
               greedy: bool = False):
    """Sample responses with the fused rollout: (tokens [B, width] int32, right-padded after
    the response's `<eot>`; lengths [B] int32, up to and including that `<eot>`, which is
    forced at the last of the `width` tokens if the policy has not emitted it before).

    prompt: [B, P] int32 left-padded, plen: [B] its lengths; key: one PRNG key (row b samples
    with `split(key, B)[b]`); greedy (static): argmax decoding."""
    if width != self.G:
      raise ValueError(f"generate: width={width}, but the rollout was built for {self.G}")
    B, P = prompt.shape
    right = jax.vmap(lambda p, n: jnp.roll(p, n - P))(prompt, plen)   # [prompt, pad ..]
    keys = jax.random.split(key, B)
    traj = self.rollouts[bool(greedy)].rows(
        params, keys, keys, reflexion_lib.PromptParams(right, plen), env_params_per_row=True)
    lengths = jnp.sum(traj.turn == 0, axis=1).astype(jnp.int32)
    resp = jax.vmap(lambda row, n: jax.lax.dynamic_slice(row, (n,), (width,)))(traj.tokens, plen)
    return jnp.where(jnp.arange(width) < lengths[:, None], resp, V.PAD_ID), lengths


def explanation_then_answer(vocab: V.Vocab, response: jax.Array, gold: jax.Array, width: int):
  """The rationality probe for one response: `<think> explanation </think> <answer> gold`.

  response: [G] int32 generated tokens; gold: [] int32. The explanation is the response's think
  block up to its first `</think>` when the response starts with `<think>` and closes it;
  otherwise it is empty. Returns (tokens [width] int32, length [], gold position [] int32)."""
  from mtrl_jax.envs import base, tools as T
  G = response.shape[-1]
  think, close = vocab.id(V.THINK_OPEN), vocab.id(V.THINK_CLOSE)
  pos, found = T.find_first(response, close, 1, G)
  ok = (response[0] == think) & found
  k = jnp.where(ok, pos, 1).astype(jnp.int32)          # tokens of `<think> explanation`
  head = jnp.where(ok, response, jnp.full((G,), think, jnp.int32).at[1:].set(V.PAD_ID))
  tail = jnp.stack([jnp.int32(close), jnp.int32(vocab.id(V.ANSWER_OPEN)),
                    jnp.asarray(gold, jnp.int32)])
  toks, n = base.concat_segments([(head, k), (tail, 3)], width)
  return toks, n, k + 2


# --- the runner -----------------------------------------------------------------------------------

@flax.struct.dataclass
class ArmState:
  params: Any
  opt_state: Any
  kb: facts_lib.KB
  rng: jax.Array


class Runner:
  """`make_train(config)`: the warm start, the three arms and the evaluation as pure functions.

  * `init(key) -> (params, kb)`: fresh tiny model, this seed's knowledge base.
  * `warm_start(params, key) -> (params, metrics)`: open-book reading SFT (`warm.steps` steps).
  * `start_arm(params, kb, key) -> ArmState` (fresh optimizer), `arm_steps(arm, state, n)`.
  * `evaluate(params, kb) -> metrics`: closed-book accuracy by question type.
  Each is vmappable over seeds; `jitted()` gives the jit(vmap(...)) versions.
  """

  def __init__(self, config):
    check_config(config)
    self.config = config
    self.facts = Facts(**dict(config.env))
    model = dict(config.model)
    preset = model.pop("preset", "tiny")
    mc = tf.model_config(preset, self.facts.vocab.size, value_head=False, **model)
    self.P, self.G = self.facts.prompt_len, self.facts.response_len
    self.model = Model(mc, self.facts.vocab, self.P, self.G,
                       temperature=config.rlag.temperature)
    self.greedy_model = Model(mc, self.facts.vocab, self.P, self.G)
    self.arms = parse_arms(config.train.arms)
    opt = lambda lr: optax.chain(optax.clip_by_global_norm(config.train.grad_clip),
                                 optax.adam(lr))
    self.warm_opt = opt(config.warm.lr)
    self.arm_opt = opt(config.train.lr)
    self.eval_questions = {k: self.facts.all_questions(i)
                           for i, k in enumerate(facts_lib.KINDS)}

  # --- data -------------------------------------------------------------------------------------
  def _render(self, kb, q: Question):
    f = self.facts
    cp, cl = jax.vmap(lambda q: f.prompt(kb, q, False))(q)
    ap, al = jax.vmap(lambda q: f.prompt(kb, q, True))(q)
    resp, rl = jax.vmap(lambda q: f.response(kb, q))(q)
    gold = jax.vmap(lambda q: f.answer(kb, q))(q)
    return dict(closed=cp, closed_len=cl, aug=ap, aug_len=al, resp=resp, resp_len=rl, gold=gold)

  def direct_questions(self, key, n: int) -> Question:
    """n direct questions drawn uniformly (with replacement) from the KB's facts."""
    k_e, k_p = jax.random.split(key)
    e = jax.random.randint(k_e, (n,), 0, self.facts.num_entities)
    p = jax.random.randint(k_p, (n,), 0, len(facts_lib.PROPERTIES))
    return Question(kind=jnp.zeros((n,), jnp.int32), entity=e, p1=p, p2=jnp.zeros_like(p))

  def random_questions(self, key, n: int) -> Question:
    """n questions of uniformly random kind, entity and properties."""
    k = jax.random.split(key, 4)
    kind = jax.random.randint(k[0], (n,), 0, len(facts_lib.KINDS))
    e = jax.random.randint(k[1], (n,), 0, self.facts.num_entities)
    nprop = jnp.where(kind == facts_lib.TWO_HOP, facts_lib.NUM_RELATIONS,
                      len(facts_lib.PROPERTIES))
    p1 = (jax.random.uniform(k[2], (n,)) * nprop).astype(jnp.int32)
    p2 = jax.random.randint(k[3], (n,), 0, len(facts_lib.PROPERTIES))
    return Question(kind=kind, entity=e, p1=p1, p2=p2)

  # --- losses -------------------------------------------------------------------------------------
  def nll(self, params, prompt, plen, resp, rlen):
    """Mean next-token NLL over the response tokens only (prompt tokens never count)."""
    lp = self.model.response_logp(params, prompt, plen, resp)
    return -losses.aggregate(lp, lengths_to_mask(rlen, resp.shape[1]), "token_mean")

  def _update(self, opt, params, opt_state, loss_fn, *args):
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, *args)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, dict(aux, loss=loss,
                                                                  grad_norm=optax.tree.norm(grads))

  # --- phases -------------------------------------------------------------------------------------
  def init(self, key):
    k_model, k_kb = jax.random.split(key)
    return tf.init_params(self.model.config, k_model), self.facts.sample_kb(k_kb)

  def reading_loss(self, params, key, B: int):
    """Open-book reading SFT on a fresh random KB (the warm start's data): [] NLL of the gold
    responses; `warm.closed_frac` of the rows are closed-book (format only)."""
    k_kb, k_q, k_c = jax.random.split(key, 3)
    kb = self.facts.sample_kb(k_kb)
    d = self._render(kb, self.random_questions(k_q, B))
    closed = jax.random.uniform(k_c, (B,)) < self.config.warm.closed_frac
    prompt = jnp.where(closed[:, None], d["closed"], d["aug"])
    plen = jnp.where(closed, d["closed_len"], d["aug_len"])
    return self.nll(params, prompt, plen, d["resp"], d["resp_len"])

  def warm_start(self, params, key):
    """`warm.steps` steps of `reading_loss`. Returns (params, metrics [steps])."""
    c = self.config.warm

    def step(carry, key):
      params, opt_state = carry
      loss_fn = lambda p: (self.reading_loss(p, key, int(c.batch_size)), {})
      params, opt_state, m = self._update(self.warm_opt, params, opt_state, loss_fn)
      return (params, opt_state), m

    (params, _), metrics = jax.lax.scan(step, (params, self.warm_opt.init(params)),
                                        jax.random.split(key, int(c.steps)))
    return params, metrics

  def start_arm(self, params, kb, key) -> ArmState:
    return ArmState(params=params, opt_state=self.arm_opt.init(params), kb=kb, rng=key)

  def cpt_loss(self, params, kb, key, B):
    f = self.facts
    k_e, k_p = jax.random.split(key)
    e = jax.random.randint(k_e, (B,), 0, f.num_entities)
    p = jax.random.randint(k_p, (B,), 0, len(facts_lib.PROPERTIES))
    rows, rlen = jax.vmap(lambda e, p: f.fact_row(kb, e, p))(e, p)
    bos, blen = f.bos_prompt()
    prompt = jnp.broadcast_to(bos, (B, self.P))
    return self.nll(params, prompt, jnp.full((B,), blen), rows, rlen), {}

  def sft_loss(self, params, kb, key, B):
    d = self._render(kb, self.direct_questions(key, B))
    return self.nll(params, d["closed"], d["closed_len"], d["resp"], d["resp_len"]), {}

  def rlag_batch(self, params, kb, key, B):
    """Sample the augmented and closed-book generations and their rewards (no gradient)."""
    c = self.config.rlag
    k_q, k_w, k_l = jax.random.split(key, 3)
    q = self.direct_questions(k_q, B)
    d = self._render(kb, q)
    params = jax.lax.stop_gradient(params)
    yw, wlen = self.model.generate(params, d["aug"], d["aug_len"], k_w, self.G)
    yl, llen = self.model.generate(params, d["closed"], d["closed_len"], k_l, self.G)
    acc_w = jax.vmap(self.facts.score)(yw, d["gold"])
    acc_l = jax.vmap(self.facts.score)(yl, d["gold"])
    rat_w = self.rationality(params, d["closed"], d["closed_len"], yw, d["gold"])
    rat_l = self.rationality(params, d["closed"], d["closed_len"], yl, d["gold"])
    r_w = acc_w + c.rationality_coef * jnp.exp(rat_w)
    r_l = acc_l + c.rationality_coef * jnp.exp(rat_l)
    pair = r_w > r_l
    facts_rows, facts_len = jax.vmap(lambda q: self.facts.facts_row(kb, q))(q)
    return dict(d, yw=yw, wlen=wlen, yl=yl, llen=llen, pair=pair, facts=facts_rows,
                facts_len=facts_len, acc_w=acc_w, acc_l=acc_l, rat_w=rat_w, rat_l=rat_l,
                r_w=r_w, r_l=r_l)

  def rlag_objective(self, params, b):
    """RLAG loss of a sampled batch `b` (from `rlag_batch`); see the module docstring."""
    c = self.config.rlag
    B = b["yw"].shape[0]
    bos, blen = self.facts.bos_prompt()
    info = mean_logp(self.model.response_logp(params, jnp.broadcast_to(bos, (B, self.P)),
                                              jnp.full((B,), blen), b["facts"]),
                     lengths_to_mask(b["facts_len"], self.G))
    w_prompt, w_plen = ((b["aug"], b["aug_len"]) if c.chosen_in_context
                        else (b["closed"], b["closed_len"]))
    lw = mean_logp(self.model.response_logp(params, w_prompt, w_plen, b["yw"]),
                   lengths_to_mask(b["wlen"], self.G))
    ll = mean_logp(self.model.response_logp(params, b["closed"], b["closed_len"], b["yl"]),
                   lengths_to_mask(b["llen"], self.G))
    beta_a = jnp.where(b["pair"], c.beta_a, 0.0)
    beta_d = jnp.where(b["pair"], c.beta_d_pair, c.beta_d_same)
    loss = rlag_loss(info, lw, ll, beta_d, beta_a, gamma=c.gamma, clip_chosen=c.clip_chosen,
                     clip_rejected=c.clip_rejected)
    return loss, {"info_logp": jnp.mean(info), "chosen_logp": jnp.mean(lw),
                  "rejected_logp": jnp.mean(ll)}

  def rlag_loss_fn(self, params, kb, key, B):
    b = self.rlag_batch(params, kb, key, B)
    loss, aux = self.rlag_objective(params, b)
    f32 = lambda x: jnp.mean(x.astype(jnp.float32))
    return loss, dict(aux, pair_frac=f32(b["pair"]), aug_acc=f32(b["acc_w"]),
                      closed_acc=f32(b["acc_l"]), aug_rationality=f32(jnp.exp(b["rat_w"])),
                      closed_rationality=f32(jnp.exp(b["rat_l"])))

  def rationality(self, params, prompt, plen, response, gold):
    """[B] log p(gold | closed-book prompt, response's explanation, `<answer>`)."""
    width = self.G + 3
    toks, _, gpos = jax.vmap(lambda r, g: explanation_then_answer(
        self.facts.vocab, r, g, width))(response, gold)
    lp = self.greedy_model.response_logp(params, prompt, plen, toks)       # [B, width]
    return jnp.take_along_axis(lp, gpos[:, None], axis=1)[:, 0]

  def arm_steps(self, arm: str, state: ArmState, n: int):
    """`n` updates of one arm: (state, metrics [n])."""
    loss = {"cpt": self.cpt_loss, "sft": self.sft_loss, "rlag": self.rlag_loss_fn}[arm]
    B = int(self.config.train.batch_size)

    replay = float(self.config.train.replay)

    def step(state, _):
      rng, k, k_replay = jax.random.split(state.rng, 3)

      def fn(p):
        value, aux = loss(p, state.kb, k, B)
        if replay:  # the same replay of the warm start's data in every arm
          r = self.reading_loss(p, k_replay, B)
          return value + replay * r, dict(aux, arm_loss=value, replay_loss=r)
        return value, aux

      params, opt_state, m = self._update(self.arm_opt, state.params, state.opt_state, fn)
      return state.replace(params=params, opt_state=opt_state, rng=rng), m

    return jax.lax.scan(step, state, None, length=n)

  def evaluate(self, params, kb, with_outputs: bool = False):
    """Greedy closed-book exact match on every question of each kind, and open-book direct
    accuracy: {'eval/<kind>': [], 'eval/open_book_direct': []}. With `with_outputs` (static)
    also the generations and gold answers, {'<kind>': (tokens [Q, G], gold [Q])}, for checks."""
    out, outputs = {}, {}
    for kind, q in self.eval_questions.items():
      q = jax.tree.map(jnp.asarray, q)
      d = self._render(kb, q)
      y, _ = self.greedy_model.generate(params, d["closed"], d["closed_len"],
                                        jax.random.PRNGKey(0), self.G, greedy=True)
      outputs[kind] = (y, d["gold"])
      out[f"eval/{kind}"] = jnp.mean(jax.vmap(self.facts.score)(y, d["gold"]).astype(jnp.float32))
      if kind == "direct":
        y, _ = self.greedy_model.generate(params, d["aug"], d["aug_len"],
                                          jax.random.PRNGKey(0), self.G, greedy=True)
        out["eval/open_book_direct"] = jnp.mean(
            jax.vmap(self.facts.score)(y, d["gold"]).astype(jnp.float32))
    return (out, outputs) if with_outputs else out

  def jitted(self):
    """jit(vmap(...)) of every phase over a leading seed axis."""
    v = jax.vmap
    chunk = int(self.config.train.eval_every)
    return dict(
        init=jax.jit(v(self.init)),
        warm_start=jax.jit(v(self.warm_start)),
        start_arm=jax.jit(v(self.start_arm)),
        evaluate=jax.jit(v(self.evaluate)),
        arm_steps={arm: jax.jit(v(lambda s, arm=arm: self.arm_steps(arm, s, chunk)))
                   for arm in self.arms},
    )


def make_train(config) -> Runner:
  """Validate `config` (errors name the key) and build the runner."""
  return Runner(config)
