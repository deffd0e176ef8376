"""Clarify: the task is revealed one piece at a time; the agent may ask for more or answer.

After "LLMs Get Lost in Multi-Turn Conversation" (sharded instructions) and CollabLLM (rewarding
the whole conversation makes a model ask before it answers).

Task. A catalog holds every combination of `num_attributes` = k attributes (`colour size
material shape style price`, in that order), each with `num_values` values: `num_values ** k`
items. The user wants one hidden item; its k attribute values are the constraints. They are
revealed in a random order: the first user message gives one (all k with
`fully_specified=True`, the "full" arm of the sharded-vs-full comparison); each `<ask>` makes
the simulated user reveal the next; once everything is told it replies `nothing else`. With
`0 < full_fraction < 1` each episode is fully specified with that probability (drawn at reset,
independently of the task): one environment, and one policy trained on a mix of both
variants.

Tokens (k = 3)::

    prompt : <bos> <user> find the item with size small <eot> <assistant>
    turn 0 : <ask> <eot>
    reply 0: <user> colour red <eot> <assistant>
    turn 1 : <ask> <eot>
    reply 1: <user> material wood <eot> <assistant>
    turn 2 : <answer> red small wood </answer> <eot>                        reward 1, done

Answer. `<answer> v1 ... vk </answer>`: exactly one value for each of the k attributes, in any
order (values are distinct symbols across attributes). A well-formed answer ends the episode;
it is checked against ALL k constraints: reward 1 if every value matches, else 0. Answering
early is a gamble: with j constraints known the best guess succeeds with probability
`num_values ** -(k - j)` (1/16 at the defaults after the first message). A malformed answer
(wrong count, a value missing or repeated, a non-value) is answered `<tool> <error> bad-answer`
and does not end the episode. There are no tools: any `<call>` is `unknown-tool`. Error replies
count in `format_errors`. Reward per turn: `correct - ask_cost * asked - format_penalty *
error`; `ask_cost` defaults to 0 (asking is free; only the trajectory-level reward makes it
worthwhile). Truncated after `max_turns` (default k + 2).

Expert. Asks until every constraint is known, then answers. With probability `params.noise` per
turn it makes one mistake, uniformly among: *premature answer* - answer now, the known values
right and the unknown ones guessed uniformly; *unclosed* - the same guess without `</answer>`
(error reply, episode goes on). Once everything is known its only mistake is forgetting
`</answer>`.

Habit (`params.habit_p`, per episode): the expert never asks - it answers at once with the
constraints the first message told and a uniform guess for the others (a *premature answer*):
right with probability `num_values ** -(k - 1)` (1/16 at the defaults, 0.06 measured;
`num_asks` is 0 and `premature` is set). With `fully_specified=True` there is nothing to ask
and the habit is the expert. With `noise` it may forget `</answer>` (error reply, it retries
with a new guess).

Info extras: `num_asks`, `first_turn_ask` (the first agent turn was `<ask>`), `answered`,
`premature` (answered before all constraints were told), `constraints_known`.

Knobs (constructor, static): `num_attributes`, `num_values`, `fully_specified`,
`full_fraction`, `max_turns`.
EnvParams (dynamic): `noise`, `habit_p`, `ask_cost`, `format_penalty`.
"""

from __future__ import annotations

from typing import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from mtrl_jax import vocab as V
from mtrl_jax.envs import base
from mtrl_jax.envs import tools as T

ATTRIBUTES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("colour", ("red", "blue", "green", "yellow", "purple", "orange")),
    ("size", ("tiny", "small", "medium", "large", "huge", "giant")),
    ("material", ("wood", "metal", "glass", "plastic", "stone", "paper")),
    ("shape", ("round", "square", "oval", "star", "heart", "triangle")),
    ("style", ("modern", "classic", "rustic", "retro", "minimal", "ornate")),
    ("price", ("cheap", "budget", "fair", "premium", "luxury", "priceless")),
)
_INTRO = ("find", "the", "item", "with")
_NOTHING = ("nothing", "else")


@flax.struct.dataclass
class ClarifyParams(base.EnvParams):
  """`EnvParams` plus ask_cost: reward subtracted per `<ask>`."""

  ask_cost: float = 0.0


@flax.struct.dataclass
class ClarifyState(base.EnvState):
  """target: [k] int32 value of each attribute; order: [k] int32 attributes in reveal order;
  told: [] int32 constraints revealed so far; num_asks: [] int32; first_turn_ask, answered,
  premature: [] bool."""

  target: jax.Array
  order: jax.Array
  told: jax.Array
  num_asks: jax.Array
  first_turn_ask: jax.Array
  answered: jax.Array
  premature: jax.Array


class Clarify(base.Environment):
  """A hidden item revealed one constraint per `<ask>`. See the module docstring."""

  name = "clarify"
  Params = ClarifyParams

  def __init__(self, num_attributes: int = 3, num_values: int = 4, fully_specified: bool = False,
               full_fraction: float = 0.0, max_turns: int | None = None,
               vocab: V.Vocab | None = None):
    if not 1 <= num_attributes <= len(ATTRIBUTES):
      raise ValueError(f"num_attributes must be in [1, {len(ATTRIBUTES)}], got {num_attributes}")
    max_values = min(len(v) for _, v in ATTRIBUTES)
    if not 2 <= num_values <= max_values:
      raise ValueError(f"num_values must be in [2, {max_values}], got {num_values}")
    if not 0.0 <= full_fraction <= 1.0:
      raise ValueError(f"full_fraction must be in [0, 1], got {full_fraction}")
    if fully_specified and full_fraction not in (0.0, 1.0):
      raise ValueError(f"fully_specified=True makes every episode fully specified; "
                       f"full_fraction={full_fraction} contradicts it (use one of the two)")
    fully_specified = bool(fully_specified) or full_fraction == 1.0
    self.full_fraction = 1.0 if fully_specified else float(full_fraction)
    needed = 1 if fully_specified else num_attributes
    max_turns = num_attributes + 2 if max_turns is None else max_turns
    if max_turns < needed:
      raise ValueError(f"max_turns={max_turns} must be >= {needed} (k - 1 asks, then the answer)")
    self.num_attributes, self.num_values = num_attributes, num_values
    self.fully_specified, self._max_turns = bool(fully_specified), max_turns
    self.attribute_names = tuple(a for a, _ in ATTRIBUTES[:num_attributes])
    self.value_names = tuple(v for _, vs in ATTRIBUTES[:num_attributes] for v in vs[:num_values])
    super().__init__(vocab)
    voc = self.vocab
    self._value_of = T.table(voc, self.value_names)  # global index a * nv + v
    self._attribute_ids = np.asarray(voc.ids(self.attribute_names), np.int32)
    self._value_ids = np.asarray(voc.ids(self.value_names), np.int32)

  # --- static description ---------------------------------------------------------------
  def symbols(self) -> Sequence[str]:
    return (*_INTRO, *_NOTHING, *self.attribute_names, *self.value_names, *T.ERROR_CODES)

  @property
  def default_params(self) -> ClarifyParams:
    return ClarifyParams()

  @property
  def prompt_len(self) -> int:
    told = self.num_attributes if self.full_fraction > 0 else 1
    return 4 + len(_INTRO) + 2 * told

  @property
  def reply_len(self) -> int:
    return 2 + 3  # <user> attr value <eot> <assistant>  |  <tool> <error> code <eot> <assistant>

  @property
  def action_len(self) -> int:
    return self.num_attributes + 3  # <answer> v1 .. vk </answer> <eot>

  @property
  def max_turns(self) -> int:
    return self._max_turns

  # --- dynamics ---------------------------------------------------------------------------
  def constraint(self, state: ClarifyState, i: jax.Array) -> jax.Array:
    """Tokens `attribute value` of the i-th revealed constraint: [2] int32."""
    a = state.order[jnp.clip(i, 0, self.num_attributes - 1)]
    return jnp.stack([jnp.asarray(self._attribute_ids)[a],
                      jnp.asarray(self._value_ids)[a * self.num_values + state.target[a]]])

  def reset_env(self, key, params):
    k = self.num_attributes
    bits = T.random_bits(key, 2 * k)
    target = T.below(bits[:k], self.num_values)
    order = jnp.argsort(bits[k:]).astype(jnp.int32)  # uniform reveal order
    if 0 < self.full_fraction < 1:  # a mix: this episode's variant from its own key
      full = T.unit(T.random_bits(jax.random.fold_in(key, 1), 1)[0]) < self.full_fraction
      told, shown = jnp.where(full, k, 1).astype(jnp.int32), k
    else:
      told = shown = k if self.fully_specified else 1
    state = ClarifyState(**base.initial_counters(), target=target, order=order,
                         told=jnp.int32(told), num_asks=jnp.int32(0),
                         first_turn_ask=jnp.bool_(False), answered=jnp.bool_(False),
                         premature=jnp.bool_(False))
    parts = [jnp.asarray(self.vocab.ids(_INTRO), jnp.int32)]
    parts += [self.constraint(state, jnp.int32(i)) for i in range(shown)]
    content = jnp.concatenate(parts)  # the first `told` constraints are shown
    return state, self.make_prompt(content, jnp.int32(len(_INTRO)) + 2 * jnp.int32(told))

  def step_env(self, key, state, action, params):
    k, nv = self.num_attributes, self.num_values
    tokens = jnp.asarray(action.tokens, jnp.int32)
    size = tokens.shape[-1]
    t = T.parse_turn(tokens, action.length, self.vocab)
    asked, is_answer = t.kind == T.KIND_ASK, t.kind == T.KIND_ANSWER
    # Answer: exactly k values, each attribute exactly once.
    idx = jnp.arange(size)
    span = (idx >= t.start) & (idx < t.end)
    value = T.lookup(self._value_of, tokens)                      # [A] global value index
    attr = jnp.where(value >= 0, value // nv, -1)
    per_attr = jnp.sum(span[:, None] & (attr[:, None] == jnp.arange(k)[None, :]), axis=0)
    answer_ok = (t.end - t.start == k) & jnp.all(~span | (value >= 0)) & jnp.all(per_attr == 1)
    right = value == attr * nv + state.target[jnp.clip(attr, 0, k - 1)]
    error = jnp.select(
        [t.kind == T.KIND_INVALID, t.kind == T.KIND_CALL, is_answer & ~answer_ok],
        [t.error, T.E_UNKNOWN_TOOL, T.E_ANSWER], T.NO_ERROR)
    failed = error != T.NO_ERROR
    answered = is_answer & answer_ok
    correct = answered & jnp.all(~span | right)

    more = state.told < k
    told_ids = jnp.where(more, self.constraint(state, state.told),
                         jnp.asarray(self.vocab.ids(_NOTHING), jnp.int32))
    user = self.make_reply(base.ROLE_USER, told_ids, jnp.int32(2))
    err_ids, err_len = T.error_content(self.vocab, error, 2)
    tool = self.make_reply(base.ROLE_TOOL, err_ids, err_len)
    obs = jax.tree.map(lambda a, b: jnp.where(failed, a, b), tool, user)

    reward = (correct.astype(jnp.float32) - params.ask_cost * asked
              - params.format_penalty * failed)
    state = state.replace(
        success=state.success | correct,
        format_errors=state.format_errors + failed,
        told=state.told + (asked & more),
        num_asks=state.num_asks + asked,
        first_turn_ask=state.first_turn_ask | (asked & (state.turn == 0)),
        answered=state.answered | answered,
        premature=state.premature | (answered & more))
    return state, obs, reward, answered

  # --- actions (the expert's vocabulary; handy for scripted policies and tests) -------------
  def ask_action(self) -> base.Action:
    """`<ask> <eot>`. tokens: [action_len]."""
    return base.Action(T.pad_to(self.vocab.ids([V.ASK, V.EOT]), self.action_len), jnp.int32(2))

  def answer_action(self, values: jax.Array, closed: bool = True) -> base.Action:
    """`<answer> v_0 .. v_{k-1} </answer> <eot>`; values: [k] int32 value of each attribute
    (in attribute order). tokens: [action_len]."""
    ids = lambda *s: jnp.asarray(self.vocab.ids(s), jnp.int32)
    k, nv = self.num_attributes, self.num_values
    body = jnp.asarray(self._value_ids)[jnp.arange(k) * nv + jnp.asarray(values, jnp.int32)]
    tail = ids(V.ANSWER_CLOSE, V.EOT) if closed else ids(V.EOT)
    toks = jnp.concatenate([ids(V.ANSWER_OPEN), body, tail])
    return base.Action(T.pad_to(toks, self.action_len), jnp.int32(toks.shape[0]))

  def known(self, state: ClarifyState) -> jax.Array:
    """[k] bool: attribute a's constraint has been told."""
    return jnp.argsort(state.order) < state.told

  def expert(self, key, state, params) -> base.Action:
    k, nv = self.num_attributes, self.num_values
    bits = T.random_bits(key, 2 + k)
    mistake = T.unit(bits[0]) < params.noise
    kind = T.below(bits[1], 2)
    guess = jnp.where(self.known(state), state.target, T.below(bits[2:], nv))
    options = [self.ask_action(), self.answer_action(guess),
               self.answer_action(guess, closed=False)]
    all_known = state.told >= k
    answers = all_known | state.habit  # habit: answer without asking (what it knows + guesses)
    index = jnp.where(answers, jnp.where(mistake, 2, 1), jnp.where(mistake, 1 + kind, 0))
    return T.choose_action(index, options)

  def extra_info(self, state):
    return {"num_asks": state.num_asks, "first_turn_ask": state.first_turn_ask,
            "answered": state.answered, "premature": state.premature,
            "constraints_known": state.told}
