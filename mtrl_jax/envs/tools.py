"""Tools as pure JAX functions, and the parsing helpers every pure-JAX environment shares.

Everything here is a small pure function over static-shape int32 token arrays: jittable,
vmappable, no Python control flow on traced values, no host callbacks, and total: malformed
input yields an `ok=False` flag, never an exception or a NaN. Token ids outside the vocabulary
(negative or too large) are treated as "not this kind of symbol".

Conventions:

* A *span* is `[start, end)` over a token array `[A]`; `start`/`end` are [] int32 and may lie
  anywhere (they are clipped).
* A *table* maps token id -> small index: `table(vocab, symbols)` is a numpy `[V]` int32 array
  with `i` at `vocab.id(symbols[i])` and -1 elsewhere; `lookup(table, tokens)` applies it.
  Tables are static (built once per environment from its vocabulary) and become constants.
* Integers are written one digit symbol per token, most significant first, with a leading `-`
  for negatives: `-408 -> ["-", "4", "0", "8"]`. They are int32; the representable range is
  `[-INT_MAX, INT_MAX]` (so negation never overflows).

The agent-turn grammar (`parse_turn`) is shared by all environments::

    turn   := [<think> ... </think>] body [<eot> ...]
    body   := <call> tool args... </call>  |  <answer> content... </answer>  |  <ask>

The turn's content is its tokens up to the first `<eot>` (or `length` when there is none);
anything after that `<eot>` is ignored. An optional leading think block is skipped (its
content is free). Nothing may follow the closing tag. Violations give an error code (see
`ERROR_CODES`) that environments answer with `<tool> <error> code <eot> <assistant>`.

Building turns and replies: `tagged_action` writes one agent turn (`<call> tool args </call>
<eot>`, `<answer> ... </answer> <eot>`, optionally without its closing tag via `closing`, the
noisy expert's mistake), `choose_action` selects among such actions by a traced index,
`error_content` is the `<error> code` reply content, `pad_to` pads static-length ids.

Arithmetic (`eval_expression`) uses the usual precedence: `*` binds tighter than `+` and `-`,
which associate left to right (what Python or a pocket calculator does), and a `-` that does
not follow a digit is a unary minus on the next operand: `2 * - 3 + 4 -> -2`.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from mtrl_jax import vocab as V
from mtrl_jax.envs import base

INT_MAX = 2**31 - 1
MAX_INT_DIGITS = 10  # digits of INT_MAX
_POW10 = np.array([10**i for i in range(MAX_INT_DIGITS)], np.int32)  # [10]

OPERATORS: tuple[str, ...] = ("+", "-", "*")
OP_ADD, OP_SUB, OP_MUL = 0, 1, 2

# Error codes, one symbol each; every environment declares all of them.
ERROR_CODES: tuple[str, ...] = (
    "format",        # not `<call>..</call>`, `<answer>..</answer>` or `<ask>`; trailing tokens
    "unclosed",      # `<call>` / `<answer>` / `<think>` without its closing tag
    "unknown-tool",  # `<call>` of a tool the environment does not have (or no tool name)
    "bad-argument",  # the tool's arguments do not parse
    "bad-answer",    # the answer's content does not parse (empty, wrong symbols, wrong count)
    "overflow",      # the calculator's result is outside int32
)
E_FORMAT, E_UNCLOSED, E_UNKNOWN_TOOL, E_ARGUMENT, E_ANSWER, E_OVERFLOW = range(len(ERROR_CODES))
NO_ERROR = -1

KIND_INVALID, KIND_CALL, KIND_ANSWER, KIND_ASK = 0, 1, 2, 3


# --- tables -------------------------------------------------------------------------------

def table(vocab: V.Vocab, symbols: Sequence[str]) -> np.ndarray:
  """`[V]` int32 numpy array: `i` at `vocab.id(symbols[i])`, -1 for every other token id."""
  out = np.full((vocab.size,), -1, np.int32)
  for i, s in enumerate(symbols):
    out[vocab.id(s)] = i
  return out


def lookup(tab: np.ndarray | jax.Array, tokens: jax.Array) -> jax.Array:
  """Apply a token table. tab: [V] int32; tokens: [...] int -> [...] int32, -1 for ids outside
  [0, V) and for tokens the table does not list."""
  tokens = jnp.asarray(tokens, jnp.int32)
  size = tab.shape[0]
  inside = (tokens >= 0) & (tokens < size)
  return jnp.where(inside, jnp.asarray(tab, jnp.int32)[jnp.clip(tokens, 0, size - 1)], -1)


def find_first(tokens: jax.Array, token_id, start=0, end=None) -> tuple[jax.Array, jax.Array]:
  """First position of `token_id` in `tokens[start:end]`.

  tokens: [A] int; token_id, start, end: [] int (end defaults to A).
  Returns (pos [] int32, found [] bool); pos is `end` (clipped to [0, A]) when not found.
  """
  size = tokens.shape[-1]
  end = size if end is None else end
  start = jnp.clip(jnp.asarray(start, jnp.int32), 0, size)
  end = jnp.clip(jnp.asarray(end, jnp.int32), 0, size)
  idx = jnp.arange(size, dtype=jnp.int32)
  hit = (tokens == token_id) & (idx >= start) & (idx < end)
  pos = jnp.min(jnp.where(hit, idx, end))
  return pos, pos < end


# --- integers -----------------------------------------------------------------------------

def int_width(max_abs: int, negative: bool) -> int:
  """Tokens needed to write any integer with |x| <= max_abs (static, Python)."""
  return len(str(int(max_abs))) + int(bool(negative))


def encode_int(value: jax.Array, digit_ids: jax.Array, minus_id: int, width: int
               ) -> tuple[jax.Array, jax.Array]:
  """Write an integer as digit tokens.

  value: [] int32 (clipped to [-INT_MAX, INT_MAX]); digit_ids: [10] int32 token id of each
  digit; minus_id: token id of `-`; width: static W.
  Returns (ids [W] int32 right-padded with `<pad>`, length [] int32). A number that needs more
  than W tokens is cut to its first W tokens (size W with `int_width`).
  """
  value = jnp.asarray(value, jnp.int32)
  neg = value < 0
  mag = jnp.where(neg, -jnp.maximum(value, -INT_MAX), value)
  ndig = 1 + jnp.sum(mag >= jnp.asarray(_POW10[1:])).astype(jnp.int32)
  sign = neg.astype(jnp.int32)
  j = jnp.arange(width, dtype=jnp.int32)
  power = ndig - 1 - (j - sign)
  digit = jax.lax.rem(jax.lax.div(mag, jnp.asarray(_POW10)[jnp.clip(power, 0, MAX_INT_DIGITS - 1)]),
                      jnp.int32(10))
  ids = jnp.where(j < sign, minus_id, jnp.asarray(digit_ids, jnp.int32)[digit])
  total = sign + ndig
  ids = jnp.where(j < total, ids, V.PAD_ID).astype(jnp.int32)
  return ids, jnp.minimum(total, width).astype(jnp.int32)


def _digits_value(d: jax.Array, power: jax.Array, mask: jax.Array, axis=None
                  ) -> tuple[jax.Array, jax.Array]:
  """Sum of d * 10**power over `mask` without int32 overflow: (value, overflow).

  Assumes power < 10 where mask (callers reject longer numbers), so value <= 9_999_999_999 is
  split as high * 10**9 + low with low < 10**9.
  """
  d = jnp.where(mask, jnp.maximum(d, 0), 0)
  low_terms = jnp.where(power < 9, d * jnp.asarray(_POW10)[jnp.clip(power, 0, 8)], 0)
  low = jnp.sum(low_terms, axis=axis)
  high = jnp.sum(jnp.where(power == 9, d, 0), axis=axis)
  overflow = (high > 2) | ((high == 2) & (low > INT_MAX - 2 * 10**9))
  value = jnp.where(overflow, 0, high) * 10**9 + jnp.where(overflow, 0, low)
  return value.astype(jnp.int32), overflow


def parse_int(tokens: jax.Array, start, end, digit_of: np.ndarray, minus_id: int,
              max_digits: int = MAX_INT_DIGITS) -> tuple[jax.Array, jax.Array]:
  """Read `[-] d d ...` from `tokens[start:end]`.

  tokens: [A] int; start, end: [] int; digit_of: [V] table (digit value or -1); minus_id: id of
  `-`; max_digits: static, at most 10 (leading zeros count).
  Returns (value [] int32, ok [] bool). Not ok (value 0) if the span is empty or only `-`,
  holds a non-digit (or out-of-vocabulary id), has more than `max_digits` digits, or the value
  exceeds INT_MAX in magnitude.
  """
  size = tokens.shape[-1]
  max_digits = min(max_digits, MAX_INT_DIGITS)
  start = jnp.clip(jnp.asarray(start, jnp.int32), 0, size)
  end = jnp.clip(jnp.asarray(end, jnp.int32), start, size)
  idx = jnp.arange(size, dtype=jnp.int32)
  neg = (start < end) & (tokens[jnp.clip(start, 0, size - 1)] == minus_id)
  first = start + neg.astype(jnp.int32)
  span = (idx >= first) & (idx < end)
  d = lookup(digit_of, tokens)
  n = end - first
  ok = (n >= 1) & (n <= max_digits) & jnp.all(~span | (d >= 0))
  value, overflow = _digits_value(d, end - 1 - idx, span & ok)
  ok = ok & ~overflow
  value = jnp.where(ok, jnp.where(neg, -value, value), 0)
  return value.astype(jnp.int32), ok


def safe_add(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
  """a + b for int32 in [-INT_MAX, INT_MAX]: (sum, overflow); sum is 0 on overflow."""
  overflow = ((a > 0) & (b > INT_MAX - a)) | ((a < 0) & (b < -INT_MAX - a))
  return jnp.where(overflow, 0, a + b).astype(jnp.int32), overflow


def safe_mul(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
  """a * b for int32 in [-INT_MAX, INT_MAX]: (product, overflow); product is 0 on overflow."""
  abs_a, abs_b = jnp.abs(a), jnp.abs(b)
  overflow = (abs_a > 0) & (abs_b > jax.lax.div(jnp.int32(INT_MAX), jnp.maximum(abs_a, 1)))
  return jnp.where(overflow, 0, a * b).astype(jnp.int32), overflow


def eval_expression(tokens: jax.Array, start, end, digit_of: np.ndarray, op_of: np.ndarray,
                    max_operands: int, max_digits: int = MAX_INT_DIGITS
                    ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Evaluate `x op x op ... x` in `tokens[start:end]`, op in `+ - *`, x = `[-] digits`.

  `*` binds tighter than `+`/`-`, which associate left to right; a `-` that does not follow a
  digit is a unary minus (at most one per operand).

  tokens: [A] int; start, end: [] int; digit_of, op_of: [V] tables (digit value / operator
  index `OP_ADD, OP_SUB, OP_MUL` or -1); max_operands: static M; max_digits: static, <= 10.
  Returns (value [] int32, ok [] bool, overflow [] bool). ok is False (value 0) on any syntax
  error (empty, stray symbol, two operators in a row, trailing operator, more than M operands
  or `max_digits` digits in an operand) or overflow; `overflow` is True only for a well-formed
  expression where an operand, a partial product or a partial sum (evaluated left to right)
  leaves [-INT_MAX, INT_MAX] - so `99999 * 99999 * 0` overflows although its value is 0.
  Cost O(A * M) elementwise plus a length-M scan.
  """
  size = tokens.shape[-1]
  max_digits = min(max_digits, MAX_INT_DIGITS)
  start = jnp.clip(jnp.asarray(start, jnp.int32), 0, size)
  end = jnp.clip(jnp.asarray(end, jnp.int32), start, size)
  idx = jnp.arange(size, dtype=jnp.int32)
  span = (idx >= start) & (idx < end)
  d = lookup(digit_of, tokens)
  o = lookup(op_of, tokens)
  is_digit = span & (d >= 0)
  is_op = span & (o >= 0)
  prev_digit = jnp.concatenate([jnp.zeros((1,), bool), is_digit[:-1]])
  next_digit = jnp.concatenate([is_digit[1:], jnp.zeros((1,), bool)])
  binop = is_op & prev_digit
  unary = is_op & ~prev_digit & (o == OP_SUB)
  # Place value of each digit: digits of an operand are contiguous, so it is the distance to
  # the next non-digit position.
  power = jax.lax.cummin(jnp.where(is_digit, size, idx), reverse=True) - idx - 1
  token_ok = ~span | ((is_digit & (power < max_digits))       # digits, not too many
                      | binop                                  # an operator after a digit
                      | (unary & next_digit))                  # a sign before a digit
  operand = jnp.cumsum(binop.astype(jnp.int32))  # [A] operand index of each token
  num_operands = operand[size - 1] + 1
  syntax = ((end > start) & is_digit[jnp.clip(end - 1, 0, size - 1)]
            & (num_operands <= max_operands) & jnp.all(token_ok))

  # Per operand m (one reduction over A): low digits, the 10th digit, its sign, the operator
  # before it. [A, M, 4] -> [M, 4].
  m = jnp.arange(max_operands, dtype=jnp.int32)
  member = operand[:, None] == m[None, :]                                   # [A, M]
  dd = jnp.where(is_digit, d, 0)
  low = jnp.where(power < 9, dd * jnp.asarray(_POW10)[jnp.clip(power, 0, 8)], 0)
  high = jnp.where(power == 9, dd, 0)
  parts = jnp.stack([low, high, unary.astype(jnp.int32), jnp.where(binop, o, 0)], axis=-1)
  per = jnp.sum(jnp.where(member[:, :, None], parts[:, None, :], 0), axis=0)  # [M, 4]
  low, high, neg, kinds = per[:, 0], per[:, 1], per[:, 2] > 0, per[:, 3]
  too_big = (high > 2) | ((high == 2) & (low > INT_MAX - 2 * 10**9))
  mags = jnp.where(too_big, 0, high) * 10**9 + jnp.where(too_big, 0, low)
  vals = jnp.where(neg, -mags, mags)
  overflow = jnp.any(too_big & (m < num_operands))

  def combine(carry, x):
    total, term, overflow = carry
    k, val, op = x
    active = k < num_operands
    prod, ovf_mul = safe_mul(term, val)
    acc, ovf_add = safe_add(total, term)
    is_mul = op == OP_MUL
    new_term = jnp.where(is_mul, prod, jnp.where(op == OP_ADD, val, -val))
    total = jnp.where(active & ~is_mul, acc, total)
    term = jnp.where(active, new_term, term)
    overflow = overflow | (active & jnp.where(is_mul, ovf_mul, ovf_add))
    return (total, term, overflow), None

  (total, term, overflow), _ = jax.lax.scan(
      combine, (jnp.int32(0), vals[0], overflow), (m[1:], vals[1:], kinds[1:]))
  value, ovf_end = safe_add(total, term)
  overflow = syntax & (overflow | ovf_end)
  ok = syntax & ~overflow
  return jnp.where(ok, value, 0).astype(jnp.int32), ok, overflow


# --- randomness ---------------------------------------------------------------------------
# One threefry call per function: `random_bits` draws every random word a reset or an expert
# turn needs at once, and `below` / `unit` turn words into numbers. (Each `jax.random` call is
# a separate unrolled threefry in the compiled program, which dominates compile time here.)

def random_bits(key: jax.Array, n: int) -> jax.Array:
  """[n] uint32 random words from one key (static n)."""
  return jax.random.bits(key, (n,), jnp.uint32)


def below(bits: jax.Array, high) -> jax.Array:
  """Integers uniform in [0, high) from uint32 words (bias < high / 2**31). bits: [...] uint32;
  high: [] or [...] int >= 1. Returns [...] int32."""
  return jax.lax.rem((bits >> 1).astype(jnp.int32), jnp.maximum(jnp.asarray(high, jnp.int32), 1))


def unit(bits: jax.Array) -> jax.Array:
  """Floats uniform in [0, 1) from uint32 words: [...] float32."""
  return (bits >> 8).astype(jnp.float32) * (1.0 / (1 << 24))


# --- agent turns --------------------------------------------------------------------------

@flax.struct.dataclass
class Turn:
  """A parsed agent turn (all [] int32).

  kind: `KIND_CALL | KIND_ANSWER | KIND_ASK`, or `KIND_INVALID` with `error` set.
  start, end: the content span `[start, end)` between the tags; for a call `tokens[start]` is
  the tool name and `[start + 1, end)` its arguments; empty for `<ask>`.
  error: index into `ERROR_CODES`, or `NO_ERROR`.
  """

  kind: jax.Array
  start: jax.Array
  end: jax.Array
  error: jax.Array


def parse_turn(tokens: jax.Array, length: jax.Array, vocab: V.Vocab) -> Turn:
  """Parse one agent turn against the shared grammar (see the module docstring).

  tokens: [A] int (any ids; out-of-vocabulary ids are just not control tokens); length: []
  int, clipped to [0, A]; vocab: static. Returns a `Turn` of [] int32 fields.
  """
  tokens = jnp.asarray(tokens, jnp.int32)
  size = tokens.shape[-1]
  n = jnp.clip(jnp.asarray(length, jnp.int32), 0, size)
  end, _ = find_first(tokens, vocab.id(V.EOT), 0, n)

  think = (end > 0) & (tokens[0] == vocab.id(V.THINK_OPEN))
  think_close, think_closed = find_first(tokens, vocab.id(V.THINK_CLOSE), 1, end)
  s = jnp.where(think, think_close + 1, 0).astype(jnp.int32)
  opener = jnp.where(s < end, tokens[jnp.clip(s, 0, size - 1)], -1)
  is_call = opener == vocab.id(V.CALL_OPEN)
  is_answer = opener == vocab.id(V.ANSWER_OPEN)
  is_ask = opener == vocab.id(V.ASK)
  close_id = jnp.where(is_call, vocab.id(V.CALL_CLOSE), vocab.id(V.ANSWER_CLOSE))
  close, closed = find_first(tokens, close_id, s + 1, end)

  tagged = is_call | is_answer
  error = jnp.select(
      [think & ~think_closed,
       s >= end,
       is_ask & (end != s + 1),
       tagged & ~closed,
       tagged & (close != end - 1),
       ~(tagged | is_ask)],
      [E_UNCLOSED, E_FORMAT, E_FORMAT, E_UNCLOSED, E_FORMAT, E_FORMAT],
      NO_ERROR).astype(jnp.int32)
  kind = jnp.where(is_call, KIND_CALL, jnp.where(is_answer, KIND_ANSWER, KIND_ASK))
  kind = jnp.where(error == NO_ERROR, kind, KIND_INVALID).astype(jnp.int32)
  start = jnp.where(error == NO_ERROR, s + 1, 0).astype(jnp.int32)
  stop = jnp.where(error == NO_ERROR, jnp.where(tagged, close, s + 1), 0).astype(jnp.int32)
  return Turn(kind=kind, start=start, end=stop, error=error)


# --- building replies and actions ----------------------------------------------------------

def error_content(vocab: V.Vocab, code: jax.Array, width: int) -> tuple[jax.Array, jax.Array]:
  """Reply content `<error> code` as (ids [width] int32, length [] int32 = 2). code: [] int32
  index into `ERROR_CODES` (clipped)."""
  code_ids = jnp.asarray(vocab.ids(ERROR_CODES), jnp.int32)
  code_id = code_ids[jnp.clip(code, 0, len(ERROR_CODES) - 1)]
  idx = jnp.arange(width)
  ids = jnp.where(idx == 0, vocab.id(V.ERROR), jnp.where(idx == 1, code_id, V.PAD_ID))
  return ids.astype(jnp.int32), jnp.int32(2)


def pad_to(ids: Sequence[int] | jax.Array, width: int) -> jax.Array:
  """Right-pad a static-length id array to [width] int32 with `<pad>` (static: len <= width)."""
  ids = jnp.asarray(ids, jnp.int32)
  if ids.shape[0] > width:
    raise ValueError(f"{ids.shape[0]} tokens do not fit in width {width}")
  return jnp.concatenate([ids, jnp.full((width - ids.shape[0],), V.PAD_ID, jnp.int32)])


def closing(vocab: V.Vocab, tag: str, closed) -> tuple[jax.Array, jax.Array]:
  """The end of a tagged turn: (tail [2] int32, its length [] int32) = `tag <eot>` (2) if
  `closed`, else `<eot> <pad>` (1), the "forgot the closing tag" mistake of a noisy expert.
  tag: e.g. `V.CALL_CLOSE`; closed: bool or [] bool (traced)."""
  closed = jnp.asarray(closed)
  tail = jnp.stack([jnp.where(closed, vocab.id(tag), vocab.id(V.EOT)),
                    jnp.where(closed, vocab.id(V.EOT), V.PAD_ID)]).astype(jnp.int32)
  return tail, (1 + closed.astype(jnp.int32)).astype(jnp.int32)


def tagged_action(vocab: V.Vocab, head: Sequence[str], body: jax.Array, body_len, close: str,
                  width: int, closed=True) -> base.Action:
  """One agent turn `head... body[:body_len] close <eot>` as an `envs.base.Action` (tokens
  [width] int32 right-padded, length [] int32): what an expert or a scripted policy plays.

  head: opening symbols, e.g. `(V.CALL_OPEN, "convert")` or `(V.ANSWER_OPEN,)`; body: [n]
  int32 token ids; body_len: [] int (<= n) of them used (e.g. the digits `encode_int`
  wrote); close: the closing tag (`V.CALL_CLOSE`, `V.ANSWER_CLOSE`); closed: bool or [] bool,
  False leaves the tag out (`closing`). Raises ValueError if `len(head) + n + 2 > width`.
  """
  body = jnp.asarray(body, jnp.int32)
  need = len(head) + body.shape[0] + 2
  if need > width:
    raise ValueError(f"a turn of {len(head)} head symbols, a {body.shape[0]}-token body and "
                     f"the closing tag needs width >= {need}, got {width} (raise action_len)")
  tail, n_tail = closing(vocab, close, closed)
  tokens, length = base.concat_segments(
      [(jnp.asarray(vocab.ids(head), jnp.int32), len(head)), (body, body_len), (tail, n_tail)],
      width)
  return base.Action(tokens, length.astype(jnp.int32))


def choose_action(index: jax.Array, options: Sequence[Any]) -> Any:
  """Select one of several same-shape pytrees (e.g. `Action`s with tokens [W]) by a traced
  index: [] int32, clipped to the options. Returns a pytree like each option."""
  i = jnp.clip(index, 0, len(options) - 1)
  return jax.tree.map(lambda *xs: jnp.stack(xs)[i], *options)
