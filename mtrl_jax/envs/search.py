"""Search: multi-hop questions over a fresh, random knowledge base, answered with a search tool.

Knowledge base. Every episode samples its own from the reset key: `num_entities` entities named
`e0 .. e{N-1}`; each entity has one target for each of `num_relations` relations (from
`sister pet friend boss teacher neighbour`; targets uniform over the other entities) and one
value for each of `num_attributes` attributes (`colour`, `city`, `job`, each with `num_values`
values, uniform).

Question. With `hops = h`, a chain of h *distinct* entities x0 -> x1 -> ... -> x_{h-1} is drawn
uniformly (x0 is named in the question, the others are the rest of the chain; the remaining
N - h entities are distractors), relations r_i uniform, and the KB is set so that
`r_i(x_i) = x_{i+1}`. The question asks one attribute of x_{h-1} through the h - 1 relations::

    h = 1:  colour of e3 ?
    h = 3:  colour of pet of sister of e3 ?      # x1 = sister(e3), x2 = pet(x1), answer colour(x2)

Why the hops are necessary. The answer is attribute(x_{h-1}): uniform over `num_values`
values and independent of everything but that entity's own record. Which entity x_{h-1} is
appears only in x_{h-2}'s record, which entity x_{h-2} is only in x_{h-3}'s, and so on back to
x0 (facts list an entity's *outgoing* relations only; names carry no information because the
KB is resampled every episode). So a correct answer needs the h searches x0 .. x_{h-1}, in that
order; stopping early or guessing succeeds with probability 1 / num_values (1/8 by default).

Tokens::

    prompt : <bos> <user> colour of pet of e3 ? <eot> <assistant>
    turn 0 : <call> search e3 </call> <eot>
    reply 0: <tool> e3 sister e7 pet e2 friend e5 boss e1 colour red city oslo <eot> <assistant>
    turn 1 : <call> search e2 </call> <eot>
    reply 1: <tool> e2 sister e0 pet e9 friend e3 boss e3 colour blue city lima <eot> <assistant>
    turn 2 : <answer> blue </answer> <eot>                                  reward 1, done

Tool. `<call> search <entity> </call>` (exactly one entity name) returns the entity's record:
its name, `relation target` for each relation, `attribute value` for each attribute. Errors:
`unknown-tool`, `bad-argument` (not exactly one entity name), grammar errors (`format`,
`unclosed`; `<ask>` is `format`), each counted in `format_errors`; calls naming `search` count
in `num_tool_calls`.

Answer. `<answer> value </answer>` with one attribute value (of any attribute) ends the episode:
reward 1 if it is the asked attribute's value of x_{h-1}, else 0. A malformed answer (empty,
not a value, several tokens) is answered `<error> bad-answer`, costs the turn and does not end
the episode. Reward per turn: `correct - format_penalty * (error this turn)`. Truncated after
`max_turns` (default hops + 2).

Expert. Searches x0, x1, ... in order (the next unsearched chain entity it has learned from the
replies), then answers. With probability `params.noise` per turn it makes one mistake, uniformly
among: *stop early* - answer now with the asked attribute of the last chain entity it has
searched (a random value if none); *typo* - search a wrong entity (uniform among the others);
*unclosed* - forget `</call>` (error reply, retries). Once it knows the answer its only mistake
is forgetting `</answer>`.

Habit (`params.habit_p`, per episode): the expert stops one hop short - it searches x0 ..
x_{h-2} and then answers the asked attribute of x_{h-2}, the last entity it has searched (a
random value if h = 1), as if that entity were the answer: right with probability ~1 /
num_values (0.12 measured at the defaults; `hops_found` and `num_tool_calls` are h - 1). With
`noise` it makes the expert's mistakes on the way (stop even earlier, typo, unclosed) and may
forget `</answer>` on its answer (error reply, it retries). Its think block (`think_len`) is
the expert's, over the chain entities it has found.

Verbose thinking (`think_len = N > 0`, default 0 = none). Every expert turn then starts with a
think block of exactly N content tokens, `<think> c_1 .. c_N </think>`, before its call or answer
(the turn grammar skips a leading think block, so the environment's answers are unchanged). The
content is plausible reasoning from the env's own symbols: the question restated, then for each
chain entity found so far its step of the chain (`e3 sister e7`; for the last one `e2 colour
blue`), cycled to fill N tokens::

    N = 12, found 1:  <think> colour of pet of sister of e3 ? e3 sister e7 colour of </think>

It carries no information the context does not already hold; it only costs context, which is the
point (issue 9: the per-turn think budget of the rollout vs a fixed total context). The expert's
mistakes and their probabilities are the same as without it (same random bits).
`action_len = 5 + (N + 2 if N else 0)`.

Knobs (constructor, static): `hops`, `num_entities`, `num_relations`, `num_attributes`,
`num_values`, `max_turns`, `think_len`. EnvParams (dynamic): `noise`, `habit_p`,
`format_penalty`.
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

RELATIONS: tuple[str, ...] = ("sister", "pet", "friend", "boss", "teacher", "neighbour")
ATTRIBUTES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("colour", ("red", "blue", "green", "yellow", "purple", "orange", "black", "white")),
    ("city", ("paris", "london", "tokyo", "rome", "cairo", "lima", "oslo", "delhi")),
    ("job", ("doctor", "chef", "pilot", "farmer", "singer", "judge", "nurse", "baker")),
)


SearchParams = base.EnvParams
_BODY_LEN = 5  # tokens of the longest call / answer: <call> search e3 </call> <eot>


@flax.struct.dataclass
class SearchState(base.EnvState):
  """rel: [N, R] int32 relation targets; attr: [N, NA] int32 attribute values; chain: [H] int32
  the question's entities x0..x_{H-1}; qrel: [max(H-1, 1)] int32 relations of the chain;
  qattr: [] int32 asked attribute; answer: [] int32 global value index (attr * NV + value);
  searched: [N] bool entities whose record was returned; answered: [] bool; given: [] int32
  the global value index of the last well-formed answer (-1 if none)."""

  rel: jax.Array
  attr: jax.Array
  chain: jax.Array
  qrel: jax.Array
  qattr: jax.Array
  answer: jax.Array
  searched: jax.Array
  answered: jax.Array
  given: jax.Array


class Search(base.Environment):
  """Multi-hop questions over a per-episode knowledge base. See the module docstring."""

  name = "search"
  Params = SearchParams

  def __init__(self, hops: int = 2, num_entities: int = 10, num_relations: int = 4,
               num_attributes: int = 2, num_values: int = 8, max_turns: int | None = None,
               think_len: int = 0, vocab: V.Vocab | None = None):
    if not 1 <= hops <= 8:
      raise ValueError(f"hops must be in [1, 8], got {hops}")
    if num_entities < hops + 1:
      raise ValueError(f"num_entities={num_entities} must be >= hops + 1 = {hops + 1} (distinct "
                       f"chain entities plus at least one distractor)")
    if num_entities > 1000:
      raise ValueError(f"num_entities must be <= 1000, got {num_entities}")
    if not 1 <= num_relations <= len(RELATIONS):
      raise ValueError(f"num_relations must be in [1, {len(RELATIONS)}], got {num_relations}")
    if not 1 <= num_attributes <= len(ATTRIBUTES):
      raise ValueError(f"num_attributes must be in [1, {len(ATTRIBUTES)}], got {num_attributes}")
    max_values = min(len(v) for _, v in ATTRIBUTES)
    if not 2 <= num_values <= max_values:
      raise ValueError(f"num_values must be in [2, {max_values}], got {num_values}")
    if not isinstance(think_len, (int, np.integer)) or not 0 <= think_len <= 1000:
      raise ValueError(f"think_len must be an integer in [0, 1000] (content tokens of the "
                       f"expert's think block; 0 = no think block), got {think_len!r}")
    max_turns = hops + 2 if max_turns is None else max_turns
    if max_turns < hops + 1:
      raise ValueError(f"max_turns={max_turns} must be >= hops + 1 = {hops + 1} (one search per "
                       f"hop, then the answer)")
    self.hops, self.num_entities, self.num_relations = hops, num_entities, num_relations
    self.num_attributes, self.num_values, self._max_turns = num_attributes, num_values, max_turns
    self.think_len = int(think_len)
    self.entity_names = tuple(f"e{i}" for i in range(num_entities))
    self.relation_names = RELATIONS[:num_relations]
    self.attribute_names = tuple(a for a, _ in ATTRIBUTES[:num_attributes])
    self.value_names = tuple(v for _, vs in ATTRIBUTES[:num_attributes] for v in vs[:num_values])
    super().__init__(vocab)
    voc = self.vocab
    self._entity_of = T.table(voc, self.entity_names)
    self._value_of = T.table(voc, self.value_names)
    self._entity_ids = np.asarray(voc.ids(self.entity_names), np.int32)
    self._relation_ids = np.asarray(voc.ids(self.relation_names), np.int32)
    self._attribute_ids = np.asarray(voc.ids(self.attribute_names), np.int32)
    self._value_ids = np.asarray(voc.ids(self.value_names), np.int32)
    self._search = voc.id("search")

  # --- static description ---------------------------------------------------------------
  def symbols(self) -> Sequence[str]:
    return ("search", "of", "?", *self.entity_names, *self.relation_names,
            *self.attribute_names, *self.value_names, *T.ERROR_CODES)

  @property
  def default_params(self) -> SearchParams:
    return SearchParams()

  @property
  def record_len(self) -> int:
    """Tokens of one entity record: name, (relation target) * R, (attribute value) * NA."""
    return 1 + 2 * self.num_relations + 2 * self.num_attributes

  @property
  def prompt_len(self) -> int:
    return 2 * self.hops + 6  # <bos> <user> attr (of rel)*(h-1) of x0 ? <eot> <assistant>

  @property
  def reply_len(self) -> int:
    return max(self.record_len, 2) + 3

  @property
  def action_len(self) -> int:
    # <call> search e3 </call> <eot>  (an answer is 4), after the expert's think block if any.
    return _BODY_LEN + (self.think_len + 2 if self.think_len else 0)

  @property
  def max_turns(self) -> int:
    return self._max_turns

  # --- dynamics ---------------------------------------------------------------------------
  def reset_env(self, key, params):
    N, R, NA, NV, H = (self.num_entities, self.num_relations, self.num_attributes,
                       self.num_values, self.hops)
    Q = max(H - 1, 1)
    bits = T.random_bits(key, N * R + N * NA + N + Q + 1)
    b_rel, b_attr, b_chain, b_qrel, b_qattr = jnp.split(
        bits, np.cumsum([N * R, N * NA, N, Q]))
    # Relation targets uniform over the *other* entities.
    rel = (jnp.arange(N, dtype=jnp.int32)[:, None] + 1 + T.below(b_rel, N - 1).reshape(N, R)) % N
    attr = T.below(b_attr, NV).reshape(N, NA)
    chain = jnp.argsort(b_chain)[:H].astype(jnp.int32)  # H distinct entities, uniform
    qrel = T.below(b_qrel, R)
    if H > 1:
      rel = rel.at[chain[:-1], qrel].set(chain[1:])  # distinct rows: no write conflicts
    qattr = T.below(b_qattr[0], NA)
    answer = qattr * NV + attr[chain[-1], qattr]
    state = SearchState(**base.initial_counters(), rel=rel, attr=attr, chain=chain, qrel=qrel,
                        qattr=qattr, answer=answer, searched=jnp.zeros((N,), bool),
                        answered=jnp.bool_(False), given=jnp.int32(-1))
    of = self.id("of")
    parts = [jnp.asarray(self._attribute_ids)[qattr]]
    for i in reversed(range(H - 1)):
      parts += [of, jnp.asarray(self._relation_ids)[qrel[i]]]
    parts += [of, jnp.asarray(self._entity_ids)[chain[0]], self.id("?")]
    content = jnp.stack([jnp.asarray(p, jnp.int32) for p in parts])
    return state, self.make_prompt(content, jnp.int32(content.shape[0]))

  def record(self, state: SearchState, entity: jax.Array) -> jax.Array:
    """The tool's reply content for one entity: [record_len] int32."""
    e = jnp.clip(entity, 0, self.num_entities - 1)
    rel_pairs = jnp.stack([jnp.asarray(self._relation_ids),
                           jnp.asarray(self._entity_ids)[state.rel[e]]], axis=1)
    attr_pairs = jnp.stack([
        jnp.asarray(self._attribute_ids),
        jnp.asarray(self._value_ids)[jnp.arange(self.num_attributes) * self.num_values
                                     + state.attr[e]]], axis=1)
    return jnp.concatenate([jnp.asarray(self._entity_ids)[e][None], rel_pairs.reshape(-1),
                            attr_pairs.reshape(-1)]).astype(jnp.int32)

  def step_env(self, key, state, action, params):
    tokens = jnp.asarray(action.tokens, jnp.int32)
    size = tokens.shape[-1]
    t = T.parse_turn(tokens, action.length, self.vocab)
    is_call, is_answer = t.kind == T.KIND_CALL, t.kind == T.KIND_ANSWER
    first = tokens[jnp.clip(t.start, 0, size - 1)]
    second = tokens[jnp.clip(t.start + 1, 0, size - 1)]
    known = is_call & (t.start < t.end) & (first == self._search)
    entity = T.lookup(self._entity_of, second)
    arg_ok = (t.end - t.start == 2) & (entity >= 0)
    value = T.lookup(self._value_of, first)
    answer_ok = (t.end - t.start == 1) & (value >= 0)
    error = jnp.select(
        [t.kind == T.KIND_INVALID, t.kind == T.KIND_ASK, is_call & ~known,
         known & ~arg_ok, is_answer & ~answer_ok],
        [t.error, T.E_FORMAT, T.E_UNKNOWN_TOOL, T.E_ARGUMENT, T.E_ANSWER],
        T.NO_ERROR)
    failed = error != T.NO_ERROR
    tool_ok = known & arg_ok
    answered = is_answer & answer_ok
    correct = answered & (value == state.answer)

    width = self.reply_len - 3
    err_ids, err_len = T.error_content(self.vocab, error, width)
    content = jnp.where(failed, err_ids, T.pad_to(self.record(state, entity), width))
    obs = self.make_reply(base.ROLE_TOOL, content, jnp.where(failed, err_len, self.record_len))

    reward = correct.astype(jnp.float32) - params.format_penalty * failed
    searched = state.searched | (tool_ok & (jnp.arange(self.num_entities) == entity))
    state = state.replace(
        success=state.success | correct,
        num_tool_calls=state.num_tool_calls + known,
        format_errors=state.format_errors + failed,
        searched=searched,
        answered=state.answered | answered,
        given=jnp.where(answered, value, state.given).astype(jnp.int32))
    return state, obs, reward, answered

  def hops_found(self, state: SearchState) -> jax.Array:
    """[] int32 chain entities searched in order: x0..x_{k-1} all searched (what is known)."""
    return jnp.sum(jnp.cumprod(state.searched[state.chain].astype(jnp.int32))).astype(jnp.int32)

  # --- actions (the expert's vocabulary; handy for scripted policies and tests) -------------
  def _tagged(self, open_tag: str, body: jax.Array, close_tag: str, closed: bool) -> base.Action:
    ids = lambda *s: jnp.asarray(self.vocab.ids(s), jnp.int32)
    tail = ids(close_tag, V.EOT) if closed else ids(V.EOT)
    toks = jnp.concatenate([ids(open_tag), body, tail])
    return base.Action(T.pad_to(toks, _BODY_LEN), jnp.int32(toks.shape[0]))

  def search_action(self, entity: jax.Array, closed: bool = True) -> base.Action:
    """`<call> search <name> </call> <eot>`; entity: [] int32 index. tokens: [5] (no think
    block; the expert adds it, see `think_tokens`)."""
    body = jnp.stack([jnp.int32(self._search), jnp.asarray(self._entity_ids)[entity]])
    return self._tagged(V.CALL_OPEN, body, V.CALL_CLOSE, closed)

  def answer_action(self, value: jax.Array, closed: bool = True) -> base.Action:
    """`<answer> <value> </answer> <eot>`; value: [] int32 global value index
    (attribute * num_values + value). tokens: [5] (no think block)."""
    body = jnp.asarray(self._value_ids)[value][None]
    return self._tagged(V.ANSWER_OPEN, body, V.ANSWER_CLOSE, closed)

  def expert(self, key, state, params) -> base.Action:
    N, NV, H = self.num_entities, self.num_values, self.hops
    bits = T.random_bits(key, 4)
    mistake = T.unit(bits[0]) < params.noise
    kind = T.below(bits[1], 3)
    found = self.hops_found(state)

    target = state.chain[jnp.minimum(found, H - 1)]
    last = state.chain[jnp.maximum(found - 1, 0)]
    early = jnp.where(found > 0, state.attr[last, state.qattr], T.below(bits[2], NV))
    wrong = (target + 1 + T.below(bits[3], N - 1)) % N
    options = [self.search_action(target), self.answer_action(state.answer),        # 0, 1
               self.answer_action(state.qattr * NV + early),                       # 2: early
               self.search_action(wrong), self.search_action(target, closed=False),  # 3, 4
               self.answer_action(state.answer, closed=False),                     # 5
               self.answer_action(state.qattr * NV + early, closed=False)]         # 6
    index = jnp.where(found >= H, jnp.where(mistake, 5, 1), jnp.where(mistake, 2 + kind, 0))
    # Habit: one hop short, answer the last searched entity's attribute (`early`).
    index = jnp.where(state.habit & (found >= H - 1), jnp.where(mistake, 6, 2), index)
    action = T.choose_action(index, options)
    if not self.think_len:
      return action
    think = self.think_tokens(state)
    ids = lambda *s: jnp.asarray(self.vocab.ids(s), jnp.int32)
    tokens = jnp.concatenate([ids(V.THINK_OPEN), think, ids(V.THINK_CLOSE), action.tokens])
    return base.Action(tokens, action.length + self.think_len + 2)

  def think_tokens(self, state: SearchState) -> jax.Array:
    """The expert's think content, [think_len] int32 (module docstring): the question, then
    `x_i rel_i x_{i+1}` for each found chain entity (`x_{h-1} attr value` for the last), cycled."""
    H = self.hops
    of, q = self.id("of"), self.id("?")
    ent, rel_ids = jnp.asarray(self._entity_ids), jnp.asarray(self._relation_ids)
    question = [jnp.asarray(self._attribute_ids)[state.qattr]]
    for i in reversed(range(H - 1)):
      question += [of, rel_ids[state.qrel[i]]]
    question += [of, ent[state.chain[0]], q]
    steps = []
    for i in range(H):
      if i < H - 1:
        steps += [ent[state.chain[i]], rel_ids[state.qrel[i]], ent[state.chain[i + 1]]]
      else:
        steps += [ent[state.chain[i]], jnp.asarray(self._attribute_ids)[state.qattr],
                  jnp.asarray(self._value_ids)[state.answer]]
    stream = jnp.stack([jnp.asarray(t, jnp.int32) for t in question + steps])       # [L]
    found = self.hops_found(state)
    known = jnp.concatenate([jnp.ones((len(question),), bool),
                             jnp.repeat(jnp.arange(H) < found, 3)])                # [L]
    order = jnp.argsort(~known, stable=True)          # known tokens first, in their order
    n = jnp.sum(known)
    return stream[order][jnp.arange(self.think_len) % n].astype(jnp.int32)

  def extra_info(self, state):
    return {"answered": state.answered, "hops_found": self.hops_found(state)}

  # --- Reflexion ----------------------------------------------------------------------------
  names_actions = True

  def reflection_action(self, state: SearchState) -> base.Action:
    """The search the failed episode lacked: `<call> search x_k </call> <eot>` for the first
    chain entity x_k whose record it had not read (k = hops found; all read: the last one,
    whose record holds the answer)."""
    k = jnp.minimum(self.hops_found(state), self.hops - 1)
    return self.search_action(state.chain[k])

  @property
  def reflection_len(self) -> int:
    return 2 + 3 * (self.hops - 1)

  def reflection(self, state: SearchState):
    """`<error> v` if the answer v was wrong, then the chain links found, `x_i r_i x_{i+1}`
    for every hop whose record the agent had read (in chain order): [reflection_len], []."""
    H = self.hops
    wrong = state.answered & ~state.success & (state.given >= 0)
    value = jnp.asarray(self._value_ids)[jnp.clip(state.given, 0, self._value_ids.shape[0] - 1)]
    head = jnp.stack([jnp.int32(self.id(V.ERROR)), value]).astype(jnp.int32)
    segments = [(head, jnp.where(wrong, 2, 0))]
    found = self.hops_found(state)
    ent, rel = jnp.asarray(self._entity_ids), jnp.asarray(self._relation_ids)
    for i in range(H - 1):
      link = jnp.stack([ent[state.chain[i]], rel[state.qrel[i]], ent[state.chain[i + 1]]])
      segments.append((link.astype(jnp.int32), jnp.where(found > i, 3, 0)))
    return base.concat_segments(segments, self.reflection_len)
