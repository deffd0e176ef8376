"""Retrieval: write a search query for a user's need, rewarded by NDCG / Recall (after Rec-R1).

The environment's own ranking metric is the reward: the agent's query is run through a BM25
ranker over a catalog and scored by NDCG@k (or Recall@k) against the items that meet the
user's need, plus a small format reward for a valid query.

Catalog. Every episode samples `num_items` = N items (default 48). An item has one value for
each of `num_attributes` attributes (`kind colour material size`, first A of them) with
`num_values` values each, plus 0-2 filler words (`new sale classic ...`, so documents differ in
length and some terms repeat). Each value has `num_forms` catalog wordings (e.g. colour red:
`red` / `scarlet`) and one user wording (`crimson`); an episode's catalog is written in one
*dialect* (wording 0 or 1 for every value: two shops describing the same products), drawn per
episode. An item's text is its attribute words in the dialect, then its fillers::

    item 17: seat scarlet timber sale sale         (dialect 1)

Need. The user wants `need` attributes (a random subset, random order) with given values; the
relevant items are those that have all of them (at least one: an item is planted). The user
says each value in their own words: the user wording with probability `params.synonym_prob`,
else the catalog's (so the raw text is a partly working query, and a catalog word in it
reveals the dialect)::

    prompt : <bos> <user> i need crimson timber <eot> <assistant>
    turn 0 : <answer> scarlet timber </answer> <eot>            reward ndcg@k + 0.1, done

Ranker. BM25 (Okapi, `bm25_scores`) over the catalog's term matrix, the same formula as
`rank_bm25.BM25Okapi` (k1, b, and its idf floor: a term in more than half of the documents has
a negative idf `log((N - df + 0.5) / (df + 0.5))`, which is replaced by `epsilon` times the
mean idf of the corpus's terms); query terms count with multiplicity; words that are not in
any document score 0. Ties are ranked by item index (items are i.i.d., so the index carries no
information). Tests check it against `rank_bm25` on the same corpora.

Turns. Single-shot (default, `multi_turn=False`, `max_turns` 1): the agent answers with its
query, `<answer> t1 .. tm </answer>` (1 <= m <= `max_query_terms`, default `need`; terms are
words - digits, `:` and control tokens are not), which ends the episode. Multi-turn
(`multi_turn=True`, `max_turns` default 3): it may first run draft queries with the search
tool, `<call> search t1 .. tm </call>`, which replies with each term's document frequency and
the top-ranked item's text, then refine and answer::

    prompt : <bos> <user> i need crimson wooden <eot> <assistant>
    turn 0 : <call> search red wood </call> <eot>
    reply 0: <tool> red 0 wood 0 : light scarlet crystal basic <eot> <assistant>
    turn 1 : <answer> scarlet timber </answer> <eot>            reward ndcg@k + 0.1, done

Rewards. A valid answer ends the episode with `ndcg_weight * NDCG@k + recall_weight * Recall@k
+ format_bonus` (defaults 1, 0, 0.1: Rec-R1's NDCG reward with its +0.1 format reward); every
error reply costs `format_penalty` (default 0.1 here). Relevance is binary; `NDCG@k =
DCG@k / IDCG@k` with `DCG@k = sum_{i<k} rel_i / log2(i + 2)`; `Recall@k = |relevant in top k|
/ |relevant|`. `success`: the answer's ranking is perfect at k (NDCG@k = 1). Errors:
`bad-answer` (empty, too many terms, a non-word), `bad-argument` (the same for `search`),
`unknown-tool` (any tool but `search`; `search` too when single-shot), `format` / `unclosed`
(grammar; `<ask>` is `format`). A malformed answer does not end the episode (it costs the turn).

Baseline. `params.raw_query=True` scores the user's own text as the query instead of the
agent's: the first turn, whatever it is, ends the episode as a valid answer of that text (the
"raw query" row). Every episode also reports `raw_ndcg` / `raw_recall` in `info`.

Expert. Answers with the catalog wording of each wanted value, in the user's order. In
multi-turn mode, when the dialect is not revealed by the user's text, it first searches with
wording 0 of every value (a term that does not occur has document frequency 0: the dialect is
the other one) and then answers. With probability `params.noise` per turn it instead makes one
mistake, uniformly among: *raw* - answer with the user's own words; *wrong value* (answering)
- the last term is another value of its attribute / *guess* (before searching) - answer
wording 0 without searching; *unclosed* - forget the closing tag (error reply; retries if turns
are left). Its query ranks perfectly in ~99.8% of episodes (BM25's length normalisation can put
a short item with one very common matching term above a long item that matches both). In
single-shot mode the expert is privileged - it knows the dialect even when the user's words do
not show it (49% of episodes at the defaults), where a policy can only guess: a single query's
success is bounded near 0.75, which is what refinement (`multi_turn`) recovers.

Habit (`params.habit_p`, per episode): the expert does not reformulate - it answers at once
with the user's own words as the query (the *raw* mistake, every turn; in multi-turn mode
without searching), so its `ndcg` / `recall` are `raw_ndcg` / `raw_recall`. A user wording is
in no document, so the query ranks perfectly mostly when the user used the catalog's words for
every value: 0.12 measured at the defaults (`synonym_prob` 0.7, need 2; ~(1 -
synonym_prob)**need plus luck; mean NDCG@k 0.41). With `noise` it may forget `</answer>`
(error reply; it retries if turns are left).

Info extras: `ndcg`, `recall` (of the answered query; 0 before), `raw_ndcg`, `raw_recall`,
`refinements` (search calls), `answered`, `num_relevant`, `query_terms`.

Knobs. Constructor (static): `num_items`, `num_attributes`, `num_values`, `num_forms`,
`need`, `k`, `max_query_terms`, `multi_turn`, `max_turns`. Params (dynamic): `noise`,
`habit_p`, `format_penalty`, `synonym_prob`, `ndcg_weight`, `recall_weight`, `format_bonus`,
`raw_query`, `k1`, `b`, `epsilon`.
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

# attribute -> values, each (catalog wording 0, catalog wording 1, user wording).
ATTRIBUTES: tuple[tuple[str, tuple[tuple[str, str, str], ...]], ...] = (
    ("kind", (("chair", "seat", "sitting"), ("lamp", "light", "glowing"),
              ("table", "desk", "surface"), ("bag", "tote", "carrying"),
              ("shoe", "boot", "walking"), ("clock", "timer", "ticking"))),
    ("colour", (("red", "scarlet", "crimson"), ("blue", "azure", "navy"),
                ("green", "olive", "leafy"), ("black", "ebony", "dark"),
                ("white", "ivory", "pale"), ("yellow", "golden", "sunny"))),
    ("material", (("wood", "timber", "wooden"), ("metal", "steel", "metallic"),
                  ("glass", "crystal", "glassy"), ("leather", "hide", "leathery"),
                  ("cotton", "linen", "fabric"), ("plastic", "vinyl", "synthetic"))),
    ("size", (("small", "mini", "little"), ("large", "big", "huge"),
              ("medium", "mid", "average"), ("tall", "high", "towering"),
              ("flat", "slim", "thin"), ("round", "circular", "curved"))),
)
FILLERS: tuple[str, ...] = ("new", "sale", "classic", "deluxe", "basic", "premium")
FILLER_SLOTS = 2  # per item, each present with probability 1/2 (repeats allowed)
_PROMPT = ("i", "need")
_SEARCH, _SEP = "search", ":"


@flax.struct.dataclass
class RetrievalParams(base.EnvParams):
  """`EnvParams` plus:

  synonym_prob: [] probability the user says a value in its user wording (else the catalog's).
  ndcg_weight, recall_weight: [] reward = ndcg_weight * NDCG@k + recall_weight * Recall@k
    (+ format_bonus) for a valid answer.
  format_bonus: [] reward for a valid answer (Rec-R1's +0.1).
  raw_query: [] bool, score the user's text instead of the agent's query (baseline).
  k1, b, epsilon: [] BM25 parameters (rank_bm25's defaults).
  """

  synonym_prob: float = 0.7
  ndcg_weight: float = 1.0
  recall_weight: float = 0.0
  format_bonus: float = 0.1
  raw_query: bool = False
  k1: float = 1.5
  b: float = 0.75
  epsilon: float = 0.25


@flax.struct.dataclass
class RetrievalState(base.EnvState):
  """docs: [N, D] int32 term index of each item's words (-1 = absent filler); relevant: [N]
  bool; want_attr, want_value: [need] int32 the need, in the user's order; user: [need] int32
  the user's word (token id) for each; dialect: [] int32; answered: [] bool; refinements: []
  int32 search calls; ndcg, recall: [] float32 of the answered query; raw_ndcg, raw_recall:
  [] float32 of the user's text; query_terms: [] int32 terms of the answered query."""

  docs: jax.Array
  relevant: jax.Array
  want_attr: jax.Array
  want_value: jax.Array
  user: jax.Array
  dialect: jax.Array
  answered: jax.Array
  refinements: jax.Array
  ndcg: jax.Array
  recall: jax.Array
  raw_ndcg: jax.Array
  raw_recall: jax.Array
  query_terms: jax.Array


# --- the ranker and the metrics (pure functions; the tests check them against references) ------

def bm25_scores(tf: jax.Array, query: jax.Array, k1=1.5, b=0.75, epsilon=0.25) -> jax.Array:
  """Okapi BM25 scores of every document, `rank_bm25.BM25Okapi.get_scores` in JAX.

  tf: [N, M] term counts of N documents over M terms (every word of a document is a term, so
  a document's length is its row sum; terms absent from every document are ignored, as in
  rank_bm25's corpus vocabulary); query: [M] count of each term in the query (a repeated term
  counts twice); k1, b, epsilon: [] floats. Returns [N] float32.

  idf(t) = log(N - df + 0.5) - log(df + 0.5) over the terms present in the corpus; a negative
  idf (df > N / 2) is replaced by `epsilon * mean idf` (the mean over present terms, taken
  before flooring: rank_bm25's ATIRE-style floor).
  """
  tf = jnp.asarray(tf, jnp.float32)
  n = tf.shape[0]
  dl = jnp.sum(tf, axis=1)
  avgdl = jnp.maximum(jnp.mean(dl), 1e-9)
  df = jnp.sum(tf > 0, axis=0).astype(jnp.float32)
  present = df > 0
  idf = jnp.log(n - df + 0.5) - jnp.log(df + 0.5)
  mean_idf = jnp.sum(jnp.where(present, idf, 0.0)) / jnp.maximum(jnp.sum(present), 1)
  idf = jnp.where(present, jnp.where(idf < 0, epsilon * mean_idf, idf), 0.0)
  norm = k1 * (1.0 - b + b * dl / avgdl)                                   # [N]
  weight = idf[None, :] * tf * (k1 + 1.0) / (tf + norm[:, None])          # [N, M]
  return weight @ jnp.asarray(query, jnp.float32)


def ranking(scores: jax.Array) -> jax.Array:
  """[N] int32 document indices by decreasing score, ties by increasing index."""
  return jnp.argsort(-jnp.asarray(scores, jnp.float32), stable=True).astype(jnp.int32)


def ranks(scores: jax.Array) -> jax.Array:
  """[N] int32 position of each document in `ranking(scores)` (0 = first), without a sort:
  the number of documents with a higher score, or an equal one and a lower index. O(N^2)
  compares, which on CPU under vmap is several times faster than a stable sort for N ~ 50."""
  s = jnp.asarray(scores, jnp.float32)
  idx = jnp.arange(s.shape[-1])
  before = (s[None, :] > s[:, None]) | ((s[None, :] == s[:, None]) & (idx[None, :] < idx[:, None]))
  return jnp.sum(before, axis=1).astype(jnp.int32)


def ndcg_at_k(scores: jax.Array, relevant: jax.Array, k: int, rank: jax.Array | None = None
              ) -> jax.Array:
  """NDCG@k of the ranking of `scores` [N] for binary relevance `relevant` [N] bool (static k
  <= N; `rank`: `ranks(scores)` if already computed). Returns [] float32 in [0, 1]; 0 when
  nothing is relevant."""
  rank = ranks(scores) if rank is None else rank
  rel = jnp.asarray(relevant, bool)
  gain = jnp.where(rel & (rank < k), 1.0 / jnp.log2(rank.astype(jnp.float32) + 2.0), 0.0)
  n_rel = jnp.sum(rel.astype(jnp.int32))
  disc = 1.0 / jnp.log2(jnp.arange(k, dtype=jnp.float32) + 2.0)
  ideal = jnp.sum(jnp.where(jnp.arange(k) < n_rel, disc, 0.0))
  return jnp.where(n_rel > 0, jnp.sum(gain) / jnp.maximum(ideal, 1e-9), 0.0)


def recall_at_k(scores: jax.Array, relevant: jax.Array, k: int, rank: jax.Array | None = None
                ) -> jax.Array:
  """Recall@k: relevant documents in the top k of `scores` [N] over all relevant [N] bool
  (`rank` as in `ndcg_at_k`). Returns [] float32 in [0, 1]; 0 when nothing is relevant."""
  rank = ranks(scores) if rank is None else rank
  rel = jnp.asarray(relevant, bool)
  hits = jnp.sum((rel & (rank < k)).astype(jnp.float32))
  n_rel = jnp.sum(rel.astype(jnp.float32))
  return jnp.where(n_rel > 0, hits / jnp.maximum(n_rel, 1.0), 0.0)


class Retrieval(base.Environment):
  """Query writing over a BM25-ranked catalog, rewarded by NDCG/Recall. See the module
  docstring."""

  name = "retrieval"
  Params = RetrievalParams

  def __init__(self, num_items: int = 48, num_attributes: int = 3, num_values: int = 6,
               num_forms: int = 2, need: int = 2, k: int = 10,
               max_query_terms: int | None = None, multi_turn: bool = False,
               max_turns: int | None = None, vocab: V.Vocab | None = None):
    if not 1 <= num_attributes <= len(ATTRIBUTES):
      raise ValueError(f"num_attributes must be in [1, {len(ATTRIBUTES)}], got {num_attributes}")
    max_values = min(len(v) for _, v in ATTRIBUTES)
    if not 2 <= num_values <= max_values:
      raise ValueError(f"num_values must be in [2, {max_values}], got {num_values}")
    if num_forms not in (1, 2):
      raise ValueError(f"num_forms must be 1 or 2 (catalog wordings per value), got {num_forms}")
    if not 1 <= need <= num_attributes:
      raise ValueError(f"need must be in [1, num_attributes={num_attributes}], got {need}")
    if not 2 <= num_items <= 999:
      raise ValueError(f"num_items must be in [2, 999], got {num_items}")
    if not 1 <= k <= num_items:
      raise ValueError(f"k must be in [1, num_items={num_items}], got {k}")
    max_query_terms = need if max_query_terms is None else max_query_terms
    if max_query_terms < need:
      raise ValueError(f"max_query_terms={max_query_terms} must be >= need={need} (one term "
                       f"per wanted value)")
    default_turns = 3 if multi_turn else 1
    max_turns = default_turns if max_turns is None else max_turns
    if max_turns < 1 or (multi_turn and max_turns < 2):
      raise ValueError(f"max_turns={max_turns} must be >= {2 if multi_turn else 1} "
                       f"({'a search, then ' if multi_turn else ''}the answer)")
    self.num_items, self.num_attributes, self.num_values = num_items, num_attributes, num_values
    self.num_forms, self.need, self.k = num_forms, need, k
    self.max_query_terms, self.multi_turn = max_query_terms, bool(multi_turn)
    self._max_turns = max_turns
    attrs = ATTRIBUTES[:num_attributes]
    # Index terms: (attribute, value, wording) for every catalog wording, then the fillers.
    self.term_names = tuple(vals[v][f] for _, vals in attrs for v in range(num_values)
                            for f in range(num_forms)) + FILLERS
    self.user_names = tuple(vals[v][2] for _, vals in attrs for v in range(num_values))
    self.num_terms = len(self.term_names)
    self.doc_len = num_attributes + FILLER_SLOTS
    self.df_width = T.int_width(num_items, negative=False)
    super().__init__(vocab)
    voc = self.vocab
    self._term_of = T.table(voc, self.term_names)                        # token -> term
    self._word_of = T.table(voc, (*self.term_names, *self.user_names, *_PROMPT))
    self._term_ids = np.asarray(voc.ids(self.term_names), np.int32)      # term -> token
    self._user_ids = np.asarray(voc.ids(self.user_names), np.int32)      # a * NV + v -> token
    self._digit_ids = np.asarray(voc.ids(V.DIGITS), np.int32)

  # --- static description ---------------------------------------------------------------
  def symbols(self) -> Sequence[str]:
    return (*_PROMPT, _SEARCH, _SEP, *self.term_names, *self.user_names, *V.DIGITS,
            *T.ERROR_CODES)

  @property
  def default_params(self) -> RetrievalParams:
    return RetrievalParams(format_penalty=0.1)

  @property
  def prompt_len(self) -> int:
    return 4 + len(_PROMPT) + self.need  # <bos> <user> i need w1 .. wn <eot> <assistant>

  @property
  def reply_len(self) -> int:
    if not self.multi_turn:
      return 2 + 3  # <tool> <error> code <eot> <assistant>
    # t1 df1 .. tm dfm : top item's words
    return self.max_query_terms * (1 + self.df_width) + 1 + self.doc_len + 3

  @property
  def action_len(self) -> int:
    # <call> search t1 .. tm </call> <eot>  |  <answer> t1 .. tm </answer> <eot>
    return self.need + (4 if self.multi_turn else 3)

  @property
  def max_turns(self) -> int:
    return self._max_turns

  # --- terms ------------------------------------------------------------------------------
  def term(self, attr: jax.Array, value: jax.Array, form: jax.Array) -> jax.Array:
    """Term index of a catalog wording ([...] int32 each; broadcast)."""
    return ((attr * self.num_values + value) * self.num_forms + form).astype(jnp.int32)

  def term_matrix(self, docs: jax.Array) -> jax.Array:
    """docs: [N, D] int32 term indices (-1 = none) -> tf [N, M] float32 counts. (A sum of D
    [N, M] compares: a one-hot [N, D, M] summed over D was 60x slower on CPU under vmap.)"""
    terms = jnp.arange(self.num_terms)
    out = jnp.zeros((docs.shape[0], self.num_terms), jnp.float32)
    for d in range(docs.shape[1]):
      out = out + (docs[:, d, None] == terms).astype(jnp.float32)
    return out

  def query_counts(self, tokens: jax.Array, start, end) -> jax.Array:
    """[M] float32 count of each index term among `tokens[start:end]` (other words: none)."""
    idx = jnp.arange(tokens.shape[-1])
    span = (idx >= start) & (idx < end)
    terms = jnp.where(span, T.lookup(self._term_of, tokens), -1)
    return self.term_matrix(terms[None, :])[0]

  def scores(self, state: RetrievalState, query: jax.Array, params) -> jax.Array:
    """BM25 scores [N] float32 of the catalog for query term counts [M]."""
    return bm25_scores(self.term_matrix(state.docs), query, params.k1, params.b, params.epsilon)

  def metrics(self, state: RetrievalState, query: jax.Array, params):
    """(NDCG@k, Recall@k) [] float32 of a query [M] against the episode's relevant items."""
    rank = ranks(self.scores(state, query, params))
    return (ndcg_at_k(None, state.relevant, self.k, rank),
            recall_at_k(None, state.relevant, self.k, rank))

  def user_counts(self, state: RetrievalState) -> jax.Array:
    """[M] term counts of the user's text (its words that are catalog words)."""
    return self.query_counts(state.user, 0, self.need)

  def catalog_words(self, state: RetrievalState, form=None) -> jax.Array:
    """[need] int32 token ids of the wanted values in the catalog's dialect (or `form`)."""
    form = state.dialect if form is None else form
    return jnp.asarray(self._term_ids)[self.term(state.want_attr, state.want_value, form)]

  # --- dynamics ---------------------------------------------------------------------------
  def reset_env(self, key, params):
    N, A, NV, F, n = self.num_items, self.num_attributes, self.num_values, self.num_forms, self.need
    S = FILLER_SLOTS
    bits = T.random_bits(key, N * A + 2 * N * S + A + 2 * n + 2)
    b_val, b_fpres, b_fill, b_attr, b_want, b_syn, b_dial, b_plant = jnp.split(
        bits, np.cumsum([N * A, N * S, N * S, A, n, n, 1]))
    dialect = T.below(b_dial[0], F)
    values = T.below(b_val, NV).reshape(N, A)
    want_attr = jnp.argsort(b_attr)[:n].astype(jnp.int32)     # distinct, random order
    want_value = T.below(b_want, NV)
    plant = T.below(b_plant[0], N)
    values = values.at[plant, want_attr].set(want_value)
    relevant = jnp.all(values[:, want_attr] == want_value[None, :], axis=1)
    fillers = jnp.where(T.unit(b_fpres) < 0.5, -1, self.num_terms - len(FILLERS)
                        + T.below(b_fill, len(FILLERS))).reshape(N, S)
    docs = jnp.concatenate([self.term(jnp.arange(A)[None, :], values, dialect), fillers],
                           axis=1).astype(jnp.int32)
    synonym = T.unit(b_syn) < params.synonym_prob
    catalog = jnp.asarray(self._term_ids)[self.term(want_attr, want_value, dialect)]
    user = jnp.where(synonym, jnp.asarray(self._user_ids)[want_attr * NV + want_value], catalog)
    zero = jnp.float32(0.0)
    state = RetrievalState(
        **base.initial_counters(), docs=docs, relevant=relevant, want_attr=want_attr,
        want_value=want_value.astype(jnp.int32), user=user.astype(jnp.int32),
        dialect=dialect.astype(jnp.int32), answered=jnp.bool_(False),
        refinements=jnp.int32(0), ndcg=zero, recall=zero, raw_ndcg=zero, raw_recall=zero,
        query_terms=jnp.int32(0))
    raw_ndcg, raw_recall = self.metrics(state, self.user_counts(state), params)
    state = state.replace(raw_ndcg=raw_ndcg, raw_recall=raw_recall)
    content = jnp.concatenate([jnp.asarray(self.vocab.ids(_PROMPT), jnp.int32), state.user])
    return state, self.make_prompt(content, jnp.int32(content.shape[0]))

  def step_env(self, key, state, action, params):
    tokens = jnp.asarray(action.tokens, jnp.int32)
    size = tokens.shape[-1]
    idx = jnp.arange(size)
    t = T.parse_turn(tokens, action.length, self.vocab)
    is_call, is_answer = t.kind == T.KIND_CALL, t.kind == T.KIND_ANSWER
    first = tokens[jnp.clip(t.start, 0, size - 1)]
    search_ok = self.multi_turn & (first == self.id(_SEARCH))
    known = is_call & (t.start < t.end) & search_ok
    q_start = jnp.where(is_call, t.start + 1, t.start)
    m = t.end - q_start
    words_ok = jnp.all(~((idx >= q_start) & (idx < t.end)) | (T.lookup(self._word_of, tokens) >= 0))
    query_ok = (m >= 1) & (m <= self.max_query_terms) & words_ok
    error = jnp.select(
        [t.kind == T.KIND_INVALID, t.kind == T.KIND_ASK, is_call & ~known,
         known & ~query_ok, is_answer & ~query_ok],
        [t.error, T.E_FORMAT, T.E_UNKNOWN_TOOL, T.E_ARGUMENT, T.E_ANSWER], T.NO_ERROR)
    raw = jnp.asarray(params.raw_query, bool)
    failed = (error != T.NO_ERROR) & ~raw
    searched = known & query_ok & ~raw
    answered = (is_answer & query_ok) | raw

    query = jnp.where(raw, self.user_counts(state), self.query_counts(tokens, q_start, t.end))
    s = self.scores(state, query, params)
    rank = ranks(s)
    ndcg = ndcg_at_k(s, state.relevant, self.k, rank)
    recall = recall_at_k(s, state.relevant, self.k, rank)

    # The search reply: `t df` per query term, `:`, the top item's words.
    W = self.reply_len - 3
    err_ids, err_len = T.error_content(self.vocab, error, W)
    if self.multi_turn:
      df = jnp.sum(self.term_matrix(state.docs) > 0, axis=0).astype(jnp.int32)  # [M]
      segments = []
      for j in range(self.max_query_terms):
        tok = tokens[jnp.clip(q_start + j, 0, size - 1)]
        term = T.lookup(self._term_of, tok)
        count = jnp.where(term >= 0, df[jnp.clip(term, 0, self.num_terms - 1)], 0)
        digits, n_digits = T.encode_int(count, jnp.asarray(self._digit_ids), V.PAD_ID,
                                        self.df_width)  # counts are >= 0: no minus sign
        present = j < m
        segments += [(tok[None], present.astype(jnp.int32)),
                     (digits, jnp.where(present, n_digits, 0))]
      top = state.docs[jnp.argmin(rank)]  # the first-ranked item
      segments.append((jnp.asarray([self.id(_SEP)], jnp.int32), jnp.int32(1)))
      for d in range(self.doc_len):
        segments.append((jnp.asarray(self._term_ids)[jnp.clip(top[d], 0, self.num_terms - 1)][None],
                         (top[d] >= 0).astype(jnp.int32)))
      found, found_len = base.concat_segments(segments, W)
      content = jnp.where(failed, err_ids, found)
      length = jnp.where(failed, err_len, found_len)
    else:
      content, length = err_ids, err_len
    obs = self.make_reply(base.ROLE_TOOL, content, length)

    reward = jnp.where(answered, params.ndcg_weight * ndcg + params.recall_weight * recall
                       + params.format_bonus, 0.0) - params.format_penalty * failed
    correct = answered & (ndcg >= 1.0 - 1e-6)
    state = state.replace(
        success=state.success | correct,
        num_tool_calls=state.num_tool_calls + known,
        format_errors=state.format_errors + failed,
        answered=state.answered | answered,
        refinements=state.refinements + searched,
        ndcg=jnp.where(answered, ndcg, state.ndcg).astype(jnp.float32),
        recall=jnp.where(answered, recall, state.recall).astype(jnp.float32),
        query_terms=jnp.where(answered, jnp.where(raw, self.need, m), state.query_terms
                              ).astype(jnp.int32))
    return state, obs, reward, answered

  # --- actions (the expert's vocabulary; handy for scripted policies and tests) -------------
  def _tagged(self, open_ids: Sequence[int], body: jax.Array, close: str, closed) -> base.Action:
    closed = jnp.asarray(closed)
    tail = jnp.stack([jnp.where(closed, self.id(close), self.id(V.EOT)),
                      jnp.where(closed, self.id(V.EOT), V.PAD_ID)]).astype(jnp.int32)
    toks = jnp.concatenate([jnp.asarray(open_ids, jnp.int32), jnp.asarray(body, jnp.int32), tail])
    n = len(open_ids) + body.shape[0] + 1 + closed.astype(jnp.int32)
    return base.Action(T.pad_to(toks, self.action_len), n.astype(jnp.int32))

  def answer_action(self, words: jax.Array, closed=True) -> base.Action:
    """`<answer> w1 .. wn </answer> <eot>`; words: [need] int32 token ids. tokens:
    [action_len]."""
    return self._tagged([self.id(V.ANSWER_OPEN)], words, V.ANSWER_CLOSE, closed)

  def search_action(self, words: jax.Array, closed=True) -> base.Action:
    """`<call> search w1 .. wn </call> <eot>`; words: [need] int32 token ids (multi-turn
    only). tokens: [action_len]."""
    return self._tagged([self.id(V.CALL_OPEN), self.id(_SEARCH)], words, V.CALL_CLOSE, closed)

  def revealed(self, state: RetrievalState) -> jax.Array:
    """[] bool: the user's text shows the dialect (one of its words is a catalog word), or
    there is only one."""
    if self.num_forms == 1:
      return jnp.bool_(True)
    return jnp.any(T.lookup(self._term_of, state.user) >= 0)

  def expert(self, key, state, params) -> base.Action:
    n, NV = self.need, self.num_values
    bits = T.random_bits(key, 3)
    mistake = T.unit(bits[0]) < params.noise
    kind = T.below(bits[1], 3)
    right = self.catalog_words(state)
    guess = self.catalog_words(state, form=jnp.zeros((), jnp.int32))
    # Wrong value: the last term becomes another value of its attribute (same dialect).
    a, v = state.want_attr[n - 1], state.want_value[n - 1]
    other = (v + 1 + T.below(bits[2], NV - 1)) % NV
    wrong = right.at[n - 1].set(jnp.asarray(self._term_ids)[self.term(a, other, state.dialect)])
    options = [self.answer_action(right), self.answer_action(state.user),        # 0, 1 (raw)
               self.answer_action(wrong), self.answer_action(right, closed=False)]  # 2, 3
    if self.multi_turn:
      options += [self.search_action(guess), self.answer_action(guess),           # 4, 5
                  self.search_action(guess, closed=False)]                        # 6
      probe = ~self.revealed(state) & (state.refinements == 0)
      index = jnp.where(probe, jnp.where(mistake, jnp.asarray([1, 5, 6])[kind], 4),
                        jnp.where(mistake, jnp.asarray([1, 2, 3])[kind], 0))
    else:
      index = jnp.where(mistake, jnp.asarray([1, 2, 3])[kind], 0)
    # Habit: the user's raw text as the query, at once (unclosed with noise).
    options.append(self.answer_action(state.user, closed=False))
    index = jnp.where(state.habit, jnp.where(mistake, len(options) - 1, 1), index)
    return T.choose_action(index, options)

  def extra_info(self, state):
    return {"ndcg": state.ndcg, "recall": state.recall, "raw_ndcg": state.raw_ndcg,
            "raw_recall": state.raw_recall, "refinements": state.refinements,
            "answered": state.answered, "num_relevant": jnp.sum(state.relevant).astype(jnp.int32),
            "query_terms": state.query_terms}
