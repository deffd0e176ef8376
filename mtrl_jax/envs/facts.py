"""Facts: a synthetic knowledge base the model cannot know, and questions about it.

Used by `experiments/rlag_study.py` (knowledge internalisation: continued pre-training vs SFT vs
RLAG).
Not a multi-turn environment: every question is one prompt and one answer, so this module gives
pure, vmappable *rendering* functions (knowledge base -> token arrays) rather than
`reset`/`step`; `Facts.score` grades a generated answer.

Knowledge base (`KB`, drawn by `sample_kb(key)`; a fixed seed fixes it). `num_entities`
entities `e0 .. e{N-1}`; four properties: two entity-valued relations (`friend`, `boss`:
targets uniform over the *other* entities) and two attributes (`colour`, `city`: `num_values`
values each, uniform). Names carry no information: a model that has not been trained on this
KB answers at chance (1/(N-1) for relations, 1/num_values for attributes).

Renderings (one token per symbol)::

    fact       : e3 colour red                                    (3 tokens)
    direct     : colour of e3 ?                     -> red
    paraphrased: e3 's hue ?                        -> red         (synonym + other order)
    two-hop    : colour of friend of e3 ?           -> colour(friend(e3))
    explanation: e3 colour red                       (direct / paraphrased: the one fact)
                 e3 friend e7 e7 colour red          (two-hop: the two facts of the chain)
    response   : <think> explanation </think> <answer> red </answer> <eot>

Synonyms: friend/pal, boss/chief, colour/hue, city/town. Explanations always use the canonical
property names (the fact statements' wording).

Prompts (left-padded with `<pad>` to `prompt_len`, so the response always starts at the same
position; positions are counted from the first real token)::

    closed-book: <bos> <user> question <eot> <assistant>
    augmented  : <bos> <system> facts <eot> <user> question <eot> <assistant>

where `facts` are the facts the explanation needs (the relevant facts, put in context).

Grading (`score`): the response is parsed with the shared turn grammar
(`mtrl_jax.envs.tools.parse_turn`); it is correct iff it is a well-formed
`[<think> ... </think>] <answer> X </answer> <eot>` whose answer is exactly the one gold token.
Anything malformed (no answer, unclosed tags, several tokens, trailing tokens) is wrong, never
an exception.

Static shapes: questions are [QUESTION_LEN], explanations/facts [EXPL_LEN], responses
[response_len]; every function is jittable and vmappable over questions and KBs.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from mtrl_jax import vocab as V
from mtrl_jax.envs import base
from mtrl_jax.envs import tools as T

PROPERTIES: tuple[str, ...] = ("friend", "boss", "colour", "city")
SYNONYMS: tuple[str, ...] = ("pal", "chief", "hue", "town")
NUM_RELATIONS = 2  # the first two properties take entities as values
VALUES: tuple[tuple[str, ...], ...] = (
    ("red", "blue", "green", "yellow", "purple", "orange", "black", "white"),
    ("paris", "london", "tokyo", "rome", "cairo", "lima", "oslo", "delhi"),
)
KINDS: tuple[str, ...] = ("direct", "paraphrased", "two_hop")
DIRECT, PARAPHRASED, TWO_HOP = range(3)
QUESTION_LEN = 6  # two-hop: p2 of p1 of e ?
EXPL_LEN = 6      # two facts


@flax.struct.dataclass
class KB:
  """value: [N, 4] int32 index of each property's value (an entity index for the relations
  `friend`, `boss`; a value index in [0, num_values) for `colour`, `city`)."""

  value: jax.Array


@flax.struct.dataclass
class Question:
  """One question. kind: [] int32 (DIRECT, PARAPHRASED, TWO_HOP); entity: [] int32; p1: []
  int32 property asked (direct/paraphrased) or the first hop's relation (two-hop); p2: [] int32
  property asked of the first hop's target (two-hop; ignored otherwise)."""

  kind: jax.Array
  entity: jax.Array
  p1: jax.Array
  p2: jax.Array


class Facts:
  """Vocabulary, knowledge bases and renderings. See the module docstring."""

  name = "facts"

  def __init__(self, num_entities: int = 12, num_values: int = 8, vocab: V.Vocab | None = None):
    if not 3 <= num_entities <= 100:
      raise ValueError(f"num_entities must be in [3, 100], got {num_entities}")
    if not 2 <= num_values <= len(VALUES[0]):
      raise ValueError(f"num_values must be in [2, {len(VALUES[0])}], got {num_values}")
    self.num_entities, self.num_values = num_entities, num_values
    self.entity_names = tuple(f"e{i}" for i in range(num_entities))
    self.value_names = tuple(v for vs in VALUES for v in vs[:num_values])
    vocab = V.Vocab.build(self.symbols()) if vocab is None else vocab
    missing = vocab.missing(self.symbols())
    if missing:
      raise ValueError(f"Facts: the vocabulary lacks symbols {missing[:20]}")
    self.vocab = vocab
    self._entity_ids = np.asarray(vocab.ids(self.entity_names), np.int32)
    self._value_ids = np.asarray(vocab.ids(self.value_names), np.int32)
    self._prop_ids = np.asarray(vocab.ids(PROPERTIES), np.int32)
    self._syn_ids = np.asarray(vocab.ids(SYNONYMS), np.int32)
    self._answer_table = T.table(vocab, (*self.entity_names, *self.value_names))

  def symbols(self) -> tuple[str, ...]:
    return ("of", "?", "'s", *PROPERTIES, *SYNONYMS, *self.entity_names, *self.value_names)

  # --- sizes ----------------------------------------------------------------------------------
  @property
  def prompt_len(self) -> int:
    """Augmented prompt: <bos> <system> facts(6) <eot> <user> question(6) <eot> <assistant>."""
    return EXPL_LEN + QUESTION_LEN + 6

  @property
  def response_len(self) -> int:
    """<think> explanation(6) </think> <answer> x </answer> <eot>."""
    return EXPL_LEN + 6

  @property
  def num_facts(self) -> int:
    return self.num_entities * len(PROPERTIES)

  # --- knowledge bases ------------------------------------------------------------------------
  def sample_kb(self, key: jax.Array) -> KB:
    """A fresh knowledge base: relation targets uniform over the other entities, attribute
    values uniform. key: PRNG key -> KB with value [N, 4] int32."""
    N = self.num_entities
    k_rel, k_attr = jax.random.split(key)
    rel = (jnp.arange(N)[:, None] + 1
           + jax.random.randint(k_rel, (N, NUM_RELATIONS), 0, N - 1)) % N
    attr = jax.random.randint(k_attr, (N, len(PROPERTIES) - NUM_RELATIONS), 0, self.num_values)
    return KB(value=jnp.concatenate([rel, attr], axis=1).astype(jnp.int32))

  def value_token(self, kb: KB, entity: jax.Array, prop: jax.Array) -> jax.Array:
    """[] int32 token id of property `prop` of `entity` (an entity name or a value name)."""
    v = kb.value[entity, prop]
    is_rel = prop < NUM_RELATIONS
    attr_index = (prop - NUM_RELATIONS) * self.num_values + v
    return jnp.where(is_rel, jnp.asarray(self._entity_ids)[jnp.clip(v, 0, self.num_entities - 1)],
                     jnp.asarray(self._value_ids)[jnp.clip(attr_index, 0,
                                                           len(self.value_names) - 1)])

  def fact(self, kb: KB, entity: jax.Array, prop: jax.Array) -> jax.Array:
    """`e prop value`: [3] int32."""
    return jnp.stack([jnp.asarray(self._entity_ids)[entity], jnp.asarray(self._prop_ids)[prop],
                      self.value_token(kb, entity, prop)]).astype(jnp.int32)

  # --- questions ------------------------------------------------------------------------------
  def all_questions(self, kind: int) -> Question:
    """Every question of one kind, in a fixed order (numpy, static). Direct and paraphrased:
    N * 4 (every fact); two-hop: N * 2 * 4 (every relation, then every property)."""
    N, P = self.num_entities, len(PROPERTIES)
    if kind in (DIRECT, PARAPHRASED):
      e, p1 = np.meshgrid(np.arange(N), np.arange(P), indexing="ij")
      p2 = np.zeros_like(e)
    elif kind == TWO_HOP:
      e, p1, p2 = np.meshgrid(np.arange(N), np.arange(NUM_RELATIONS), np.arange(P),
                              indexing="ij")
    else:
      raise ValueError(f"kind must be one of {list(range(len(KINDS)))} ({KINDS}), got {kind}")
    e, p1, p2 = (np.asarray(x, np.int32).reshape(-1) for x in (e, p1, p2))
    return Question(kind=np.full(e.shape, kind, np.int32), entity=e, p1=p1, p2=p2)

  def answer(self, kb: KB, q: Question) -> jax.Array:
    """[] int32 gold answer token."""
    hop = kb.value[q.entity, jnp.clip(q.p1, 0, NUM_RELATIONS - 1)]
    return jnp.where(q.kind == TWO_HOP, self.value_token(kb, hop, q.p2),
                     self.value_token(kb, q.entity, q.p1)).astype(jnp.int32)

  def question(self, q: Question) -> tuple[jax.Array, jax.Array]:
    """Question tokens (ids [QUESTION_LEN] int32 right-padded, length [] int32)."""
    of, mark, poss = self.vocab.id("of"), self.vocab.id("?"), self.vocab.id("'s")
    ent = jnp.asarray(self._entity_ids)[q.entity]
    prop, syn = jnp.asarray(self._prop_ids), jnp.asarray(self._syn_ids)
    pad = V.PAD_ID
    direct = jnp.stack([prop[q.p1], of, ent, mark, pad, pad])
    para = jnp.stack([ent, poss, syn[q.p1], mark, pad, pad])
    two = jnp.stack([prop[q.p2], of, prop[jnp.clip(q.p1, 0, NUM_RELATIONS - 1)], of, ent, mark])
    toks = jnp.select([q.kind == DIRECT, q.kind == PARAPHRASED], [direct, para], two)
    return toks.astype(jnp.int32), jnp.where(q.kind == TWO_HOP, 6, 4).astype(jnp.int32)

  def explanation(self, kb: KB, q: Question) -> tuple[jax.Array, jax.Array]:
    """The relevant facts, canonical wording (ids [EXPL_LEN] int32 right-padded, length [])."""
    r1 = jnp.clip(q.p1, 0, NUM_RELATIONS - 1)
    hop = kb.value[q.entity, r1]
    one = jnp.concatenate([self.fact(kb, q.entity, q.p1), jnp.zeros((3,), jnp.int32)])
    two = jnp.concatenate([self.fact(kb, q.entity, r1), self.fact(kb, hop, q.p2)])
    two_hop = q.kind == TWO_HOP
    return jnp.where(two_hop, two, one), jnp.where(two_hop, 6, 3).astype(jnp.int32)

  # --- prompts and responses ------------------------------------------------------------------
  def prompt(self, kb: KB, q: Question, augmented: bool) -> tuple[jax.Array, jax.Array]:
    """Left-padded prompt (ids [prompt_len] int32, length [] int32). `augmented` (static):
    the relevant facts in a `<system>` block before the question."""
    ids = lambda *s: (jnp.asarray(self.vocab.ids(s), jnp.int32), len(s))
    qt, ql = self.question(q)
    segs = [ids(V.BOS)]
    if augmented:
      ft, fl = self.explanation(kb, q)
      segs += [ids(V.SYSTEM), (ft, fl), ids(V.EOT)]
    segs += [ids(V.USER), (qt, ql), ids(V.EOT, V.ASSISTANT)]
    toks, n = base.concat_segments(segs, self.prompt_len)
    return left_align(toks, n), n

  def response(self, kb: KB, q: Question) -> tuple[jax.Array, jax.Array]:
    """The gold response `<think> explanation </think> <answer> x </answer> <eot>`
    (ids [response_len] int32 right-padded, length [] int32)."""
    ids = lambda *s: (jnp.asarray(self.vocab.ids(s), jnp.int32), len(s))
    et, el = self.explanation(kb, q)
    segs = [ids(V.THINK_OPEN), (et, el), ids(V.THINK_CLOSE, V.ANSWER_OPEN),
            (self.answer(kb, q)[None], 1), ids(V.ANSWER_CLOSE, V.EOT)]
    return base.concat_segments(segs, self.response_len)

  def fact_row(self, kb: KB, entity: jax.Array, prop: jax.Array) -> tuple[jax.Array, jax.Array]:
    """A fact statement for continued pre-training: `fact <eot>` (ids [response_len] int32
    right-padded, length [] int32), to follow a `<bos>` prompt."""
    toks = jnp.concatenate([self.fact(kb, entity, prop), jnp.asarray([self.vocab.eot_id])])
    return T.pad_to(toks.astype(jnp.int32), self.response_len), jnp.int32(4)

  def facts_row(self, kb: KB, q: Question) -> tuple[jax.Array, jax.Array]:
    """The question's relevant facts as a statement `facts <eot>` (ids [response_len], length
    []): the knowledge the augmented prompt adds, scored by RLAG's knowledge term."""
    et, el = self.explanation(kb, q)
    return base.concat_segments([(et, el), (jnp.asarray([self.vocab.eot_id]), 1)],
                                self.response_len)

  def bos_prompt(self) -> tuple[jax.Array, jax.Array]:
    """`<bos>` left-padded to prompt_len (the prompt of a fact statement)."""
    toks = jnp.full((self.prompt_len,), V.PAD_ID, jnp.int32).at[-1].set(self.vocab.bos_id)
    return toks, jnp.int32(1)

  # --- grading --------------------------------------------------------------------------------
  def score(self, tokens: jax.Array, gold: jax.Array) -> jax.Array:
    """Exact match of a generated response. tokens: [G] int32 (everything after the first
    `<eot>` is ignored); gold: [] int32 answer token. Returns [] bool."""
    t = T.parse_turn(tokens, tokens.shape[-1], self.vocab)
    size = tokens.shape[-1]
    x = tokens[jnp.clip(t.start, 0, size - 1)]
    return ((t.kind == T.KIND_ANSWER) & (t.error == T.NO_ERROR) & (t.end - t.start == 1)
            & (x == gold))


def left_align(tokens: jax.Array, length: jax.Array) -> jax.Array:
  """Move a right-padded row's `length` tokens to the end: [n] -> [n] (pads first)."""
  size = tokens.shape[-1]
  src = jnp.arange(size) - (size - length)
  return jnp.where(src >= 0, tokens[jnp.clip(src, 0, size - 1)], V.PAD_ID).astype(jnp.int32)


def reference_answer(kb_value: np.ndarray, kind: int, entity: int, p1: int, p2: int) -> tuple[int, int]:
  """Plain-Python reference: (property, entity) whose value answers the question, read off the
  KB table `kb_value` [N, 4] (for tests)."""
  if kind == TWO_HOP:
    return p2, int(kb_value[entity][p1])
  return p1, entity
