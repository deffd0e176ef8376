"""Calculator: multi-digit arithmetic that a small model cannot do in its head, with a tool.

Task. The user asks for the value of `x1 op x2 op ... xn` (n = `num_operands` operands of
exactly `num_digits` digits, ops drawn uniformly from `operators`, usual precedence: `*` before
`+`/`-`, see `tools.eval_expression`). Default: three 3-digit operands over `+ - *`, e.g.
`512 * 879 - 302`, results up to ~10^9: far beyond what a ~1M-parameter model computes reliably
in its head, trivial with the tool.

Tokens (one digit per token; `-` doubles as unary minus)::

    prompt : <bos> <user> what is 5 1 2 * 8 7 9 - 3 0 2 ? <eot> <assistant>
    turn 0 : <call> calc 5 1 2 * 8 7 9 - 3 0 2 </call> <eot>
    reply 0: <tool> 4 4 9 7 4 6 <eot> <assistant>
    turn 1 : <answer> 4 4 9 7 4 6 </answer> <eot>                      reward 1, done

Tool. `<call> calc <expression> </call>` evaluates any expression of up to `max_tool_operands`
operands (int32; the agent may call it on sub-expressions too). Errors are replies
`<tool> <error> code <eot> <assistant>` with code one of `tools.ERROR_CODES`: `unknown-tool`
(a tool name other than `calc`), `bad-argument` (not an expression), `overflow` (an operand or
intermediate result outside int32), or a grammar error of the turn (`format`, `unclosed`; `<ask>`
is `format` here). Every error reply increments `format_errors`; every call naming `calc`
increments `num_tool_calls` (whether or not its arguments parse).

Answer. `<answer> [-] digits </answer>` ends the episode with reward 1 if the value equals the
question's, else 0. A malformed answer (empty, non-digits, more than 10 digits) does *not* end
the episode: it is answered `<error> bad-answer` and costs the turn. Reward per turn is
`correct - format_penalty * (error this turn)`. The episode is truncated after `max_turns`
(default 4) agent turns.

Expert. Calls `calc` on the question, then answers the tool's result (it answers whatever the
tool last returned, as if it only read replies). With probability `params.noise` per turn it
instead makes one mistake, uniformly among:
  * before it has a result: *guess* - skip the tool and answer an estimate (right leading
    digits, last two digits random: correct ~1% of the time); *typo* - call `calc` with one
    operand's last digit changed (the tool answers the wrong question, the expert then
    answers that wrong result); *unclosed* - forget `</call>` (error reply, it retries);
  * once it has a result: forget `</answer>` (error reply, it retries).

Habit (`params.habit_p`, per episode): the expert never calls the tool and answers its no-tool
guess at once (the *guess* above: right ~1% of the time); with `noise` it may forget
`</answer>` and retry with a new guess.

Difficulty knobs (constructor, static): `num_digits`, `num_operands`, `operators`, `max_turns`,
`max_tool_operands`. EnvParams (dynamic): `noise`, `habit_p`, `format_penalty`.
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

RESULT_WIDTH = T.int_width(T.INT_MAX, negative=True)  # 11 tokens: any int32 tool result


CalculatorParams = base.EnvParams


@flax.struct.dataclass
class CalculatorState(base.EnvState):
  """question: [Q] int32 expression tokens; answer: [] int32 its value; last_result: [] int32
  the last value `calc` returned; have_result: [] bool; answered: [] bool a well-formed answer
  was given."""

  question: jax.Array
  answer: jax.Array
  last_result: jax.Array
  have_result: jax.Array
  answered: jax.Array


class Calculator(base.Environment):
  """Arithmetic questions answered with a `calc` tool. See the module docstring."""

  name = "calculator"
  Params = CalculatorParams

  def __init__(self, num_digits: int = 3, num_operands: int = 3,
               operators: str | Sequence[str] = "+-*", max_turns: int = 4,
               max_tool_operands: int = 8, vocab: V.Vocab | None = None):
    ops = tuple(operators)
    if not 1 <= num_digits <= 9:
      raise ValueError(f"num_digits must be in [1, 9], got {num_digits}")
    if not 1 <= num_operands:
      raise ValueError(f"num_operands must be >= 1, got {num_operands}")
    if not ops or len(set(ops)) != len(ops) or any(o not in T.OPERATORS for o in ops):
      raise ValueError(f"operators must be distinct symbols from {T.OPERATORS}, got {operators!r}")
    if max_tool_operands < num_operands:
      raise ValueError(f"max_tool_operands={max_tool_operands} must be >= "
                       f"num_operands={num_operands} (the expert's call must fit the tool)")
    biggest = 10**num_digits - 1
    bound = biggest**num_operands if "*" in ops else num_operands * biggest
    if bound > T.INT_MAX:
      raise ValueError(f"num_digits={num_digits} with num_operands={num_operands} and "
                       f"operators={''.join(ops)!r} can exceed int32 ({bound} > {T.INT_MAX})")
    if max_turns < 2:
      raise ValueError(f"max_turns must be >= 2 (call, then answer), got {max_turns}")
    self.num_digits, self.num_operands, self.operators = num_digits, num_operands, ops
    self._max_turns, self.max_tool_operands = max_turns, max_tool_operands
    self.answer_width = T.int_width(bound, negative="-" in ops and num_operands > 1)
    self.question_len = num_operands * num_digits + num_operands - 1
    super().__init__(vocab)
    voc = self.vocab
    self._digit_of = T.table(voc, V.DIGITS)
    self._op_of = T.table(voc, T.OPERATORS)
    self._digit_ids = np.asarray(voc.ids(V.DIGITS), np.int32)
    self._question_op_ids = np.asarray(voc.ids(ops), np.int32)
    self._question_op_kinds = np.asarray([T.OPERATORS.index(o) for o in ops], np.int32)
    self._minus = voc.id("-")
    self._calc = voc.id("calc")

  # --- static description ---------------------------------------------------------------
  def symbols(self) -> Sequence[str]:
    return (*V.DIGITS, *T.OPERATORS, "calc", "what", "is", "?", *T.ERROR_CODES)

  @property
  def default_params(self) -> CalculatorParams:
    return CalculatorParams()

  @property
  def prompt_len(self) -> int:
    return self.question_len + 7  # <bos> <user> what is Q ? <eot> <assistant>

  @property
  def reply_len(self) -> int:
    return RESULT_WIDTH + 3  # <tool> result <eot> <assistant>

  @property
  def action_len(self) -> int:
    return max(self.question_len + 4, self.answer_width + 3)

  @property
  def max_turns(self) -> int:
    return self._max_turns

  # --- dynamics ---------------------------------------------------------------------------
  def _eval(self, tokens, start, end):
    return T.eval_expression(tokens, start, end, self._digit_of, self._op_of,
                             self.max_tool_operands)

  def _value(self, values: jax.Array, ops: jax.Array) -> jax.Array:
    """The question's value from its operands [n] int32 and operators [n] int32 (`OP_*`; the
    last is unused), with the tool's precedence; no overflow by the constructor's bound. The
    tests check it against the tool (`eval_expression`) on the question's tokens."""
    total, term = jnp.int32(0), values[0]
    for k in range(1, self.num_operands):
      op, v = ops[k - 1], values[k]
      total = jnp.where(op == T.OP_MUL, total, total + term)
      term = jnp.where(op == T.OP_MUL, term * v, jnp.where(op == T.OP_ADD, v, -v))
    return (total + term).astype(jnp.int32)

  def reset_env(self, key, params):
    n, d = self.num_operands, self.num_digits
    bits = T.random_bits(key, 2 * n)
    values = 10 ** (d - 1) + T.below(bits[:n], 10**d - 10 ** (d - 1))
    powers = jnp.asarray([10 ** (d - 1 - j) for j in range(d)], jnp.int32)
    digits = jnp.asarray(self._digit_ids)[(values[:, None] // powers[None, :]) % 10]  # [n, d]
    which = T.below(bits[n:], len(self.operators))  # [n] index into self.operators
    ops = jnp.asarray(self._question_op_ids)[which]
    question = jnp.concatenate([digits, ops[:, None]], axis=1).reshape(-1)[: self.question_len]
    answer = self._value(values, jnp.asarray(self._question_op_kinds)[which])
    state = CalculatorState(
        **base.initial_counters(), question=question, answer=answer,
        last_result=jnp.int32(0), have_result=jnp.bool_(False), answered=jnp.bool_(False))
    content = jnp.concatenate([jnp.asarray(self.vocab.ids(["what", "is"]), jnp.int32), question,
                               jnp.asarray([self.id("?")], jnp.int32)])
    return state, self.make_prompt(content, jnp.int32(content.shape[0]))

  def step_env(self, key, state, action, params):
    tokens = jnp.asarray(action.tokens, jnp.int32)
    size = tokens.shape[-1]
    t = T.parse_turn(tokens, action.length, self.vocab)
    is_call, is_answer = t.kind == T.KIND_CALL, t.kind == T.KIND_ANSWER
    known = is_call & (t.start < t.end) & (tokens[jnp.clip(t.start, 0, size - 1)] == self._calc)
    value, expr_ok, overflow = self._eval(tokens, t.start + 1, t.end)
    guess, answer_ok = T.parse_int(tokens, t.start, t.end, self._digit_of, self._minus)
    error = jnp.select(
        [t.kind == T.KIND_INVALID, t.kind == T.KIND_ASK, is_call & ~known,
         known & overflow, known & ~expr_ok, is_answer & ~answer_ok],
        [t.error, T.E_FORMAT, T.E_UNKNOWN_TOOL, T.E_OVERFLOW, T.E_ARGUMENT, T.E_ANSWER],
        T.NO_ERROR)
    failed = error != T.NO_ERROR
    tool_ok = known & expr_ok
    answered = is_answer & answer_ok
    correct = answered & (guess == state.answer)

    result, result_len = T.encode_int(value, self._digit_ids, self._minus, RESULT_WIDTH)
    err_ids, err_len = T.error_content(self.vocab, error, RESULT_WIDTH)
    content = jnp.where(failed, err_ids, result)
    obs = self.make_reply(base.ROLE_TOOL, content, jnp.where(failed, err_len, result_len))

    reward = correct.astype(jnp.float32) - params.format_penalty * failed
    state = state.replace(
        success=state.success | correct,
        num_tool_calls=state.num_tool_calls + known,
        format_errors=state.format_errors + failed,
        last_result=jnp.where(tool_ok, value, state.last_result),
        have_result=state.have_result | tool_ok,
        answered=state.answered | answered)
    return state, obs, reward, answered

  # --- actions (the expert's vocabulary; handy for scripted policies and tests) -------------
  def call_action(self, expression: jax.Array, closed=True) -> base.Action:
    """`<call> calc <expression> </call> <eot>` (without `</call>` if not `closed`, a bool or
    [] bool). expression: [n] int32 tokens (static n). tokens: [max(action_len, n + 4)]."""
    tail, n_tail = T.closing(self.vocab, V.CALL_CLOSE, closed)
    toks = jnp.concatenate([jnp.asarray(self.vocab.ids([V.CALL_OPEN, "calc"]), jnp.int32),
                            jnp.asarray(expression, jnp.int32), tail])
    return base.Action(T.pad_to(toks, max(self.action_len, toks.shape[0])),
                       (toks.shape[0] - 2 + n_tail).astype(jnp.int32))

  def answer_action(self, value: jax.Array, closed=True) -> base.Action:
    """`<answer> digits </answer> <eot>` (without `</answer>` if not `closed`) for value: []
    int32 (|value| within the question's range). tokens: [action_len]."""
    digits, m = T.encode_int(value, self._digit_ids, self._minus, self.answer_width)
    tail, n_tail = T.closing(self.vocab, V.ANSWER_CLOSE, closed)
    j = jnp.arange(self.action_len)
    body = digits[jnp.clip(j - 1, 0, self.answer_width - 1)]
    toks = jnp.where(j == 0, self.id(V.ANSWER_OPEN), jnp.where(
        j <= m, body, jnp.where(j == m + 1, tail[0], jnp.where(j == m + 2, tail[1], V.PAD_ID))))
    toks = toks.astype(jnp.int32)
    return base.Action(toks, (m + 1 + n_tail).astype(jnp.int32))

  def estimate(self, bits: jax.Array, state: CalculatorState) -> jax.Array:
    """A no-tool guess: the answer's leading digits with the last two random. bits: [] uint32.
    Returns [] int32 (right ~1% of the time)."""
    mag = jnp.abs(state.answer)
    scale = jnp.where(mag >= 10, 100, 10)
    est = mag - mag % scale + T.below(bits, scale)
    return jnp.where(state.answer < 0, -est, est)

  def expert(self, key, state, params) -> base.Action:
    n, d = self.num_operands, self.num_digits
    bits = T.random_bits(key, 5)
    mistake = T.unit(bits[0]) < params.noise
    kind = T.below(bits[1], 3)  # before a result: 0 guess, 1 typo, 2 unclosed
    q = state.question
    # Typo: the last digit of one operand changes.
    at = T.below(bits[3], n) * (d + 1) + d - 1
    new = (T.lookup(self._digit_of, q[at]) + 1 + T.below(bits[4], 9)) % 10
    typo_q = q.at[at].set(jnp.asarray(self._digit_ids)[new])

    have = state.have_result
    answers = have | state.habit | (mistake & (kind == 0))
    call = self.call_action(jnp.where(mistake & (kind == 1), typo_q, q),
                            closed=~(mistake & (kind == 2)))
    answer = self.answer_action(jnp.where(have, state.last_result, self.estimate(bits[2], state)),
                                closed=~((have | state.habit) & mistake))
    return jax.tree.map(lambda a, c: jnp.where(answers, a, c), answer, call)

  def extra_info(self, state):
    return {"answered": state.answered}
