"""Unit conversion with a `convert` tool: an environment written outside mtrl_jax.

    prompt : <bos> <user> convert 4 7 km to m <eot> <assistant>
    turn 0 : <call> convert 4 7 km m </call> <eot>
    reply 0: <tool> 4 7 0 0 0 <eot> <assistant>
    turn 1 : <answer> 4 7 0 0 0 </answer> <eot>                 reward 1, done
"""

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from mtrl_jax import vocab as V
from mtrl_jax.envs import base
from mtrl_jax.envs import tools as T

CONVERSIONS = (("km", "m", 1000), ("m", "cm", 100), ("h", "min", 60), ("min", "s", 60),
               ("kg", "g", 1000))  # (from, to, factor)
UNITS = ("km", "m", "cm", "h", "min", "s", "kg", "g")


@flax.struct.dataclass
class UnitParams(base.EnvParams):
  """noise, format_penalty (EnvParams); guess_penalty: reward lost by a correct answer given
  without calling the tool."""

  guess_penalty: float = 0.0


@flax.struct.dataclass
class UnitState(base.EnvState):
  """value: [] int32 the quantity; pair: [] int32 index into CONVERSIONS; result: [] int32
  the tool's last answer; have_result, answered: [] bool."""

  value: jax.Array
  pair: jax.Array
  result: jax.Array
  have_result: jax.Array
  answered: jax.Array


class UnitConversion(base.Environment):
  """Convert `num_digits`-digit quantities; the factor is the tool's, not the model's."""

  name = "unit_conversion"
  Params = UnitParams

  def __init__(self, num_digits: int = 2, max_turns: int = 3, vocab: V.Vocab | None = None):
    if not 1 <= num_digits <= 4:
      raise ValueError(f"num_digits must be in [1, 4], got {num_digits}")
    if max_turns < 2:
      raise ValueError(f"max_turns must be >= 2 (call, then answer), got {max_turns}")
    self.num_digits, self._max_turns = num_digits, max_turns
    self.result_width = T.int_width((10**num_digits - 1) * 1000, negative=False)
    super().__init__(vocab)
    self._digit_of = T.table(self.vocab, V.DIGITS)
    self._unit_of = T.table(self.vocab, UNITS)
    self._digit_ids = np.asarray(self.vocab.ids(V.DIGITS), np.int32)
    self._units = np.asarray([[UNITS.index(a), UNITS.index(b)] for a, b, _ in CONVERSIONS])
    self._factor = np.zeros((len(UNITS), len(UNITS)), np.int32)  # [from, to] -> factor or 0
    for (a, b), (_, _, f) in zip(self._units, CONVERSIONS):
      self._factor[a, b] = f
    self._asked = np.asarray([f for _, _, f in CONVERSIONS], np.int32)  # [pairs] factor

  def symbols(self):
    return (*V.DIGITS, "-", *UNITS, "convert", "to", *T.ERROR_CODES)

  @property
  def default_params(self):
    return UnitParams()

  @property
  def prompt_len(self):
    return self.num_digits + 8   # <bos> <user> convert D from to unit <eot> <assistant>

  @property
  def reply_len(self):
    return self.result_width + 3  # <tool> digits <eot> <assistant>

  @property
  def action_len(self):          # <call> convert D u u </call> <eot> | <answer> R </answer> <eot>
    return max(self.num_digits + 6, self.result_width + 3)

  @property
  def max_turns(self):
    return self._max_turns

  def _unit_ids(self, pair):
    """[2] int32 token ids of pair's (from, to) units."""
    return jnp.asarray(self.vocab.ids(UNITS), jnp.int32)[jnp.asarray(self._units)[pair]]

  def reset_env(self, key, params):
    d = self.num_digits
    bits = T.random_bits(key, 2)
    value = 10 ** (d - 1) + T.below(bits[0], 9 * 10 ** (d - 1))
    pair = T.below(bits[1], len(CONVERSIONS))
    digits, _ = T.encode_int(value, self._digit_ids, self.id("-"), d)
    units = self._unit_ids(pair)
    content = jnp.concatenate([jnp.asarray([self.id("convert")], jnp.int32), digits,
                               jnp.stack([units[0], jnp.int32(self.id("to")), units[1]])])
    state = UnitState(**base.initial_counters(), value=value, pair=pair, result=jnp.int32(0),
                      have_result=jnp.bool_(False), answered=jnp.bool_(False))
    return state, self.make_prompt(content, jnp.int32(content.shape[0]))

  def step_env(self, key, state, action, params):
    tokens = jnp.asarray(action.tokens, jnp.int32)
    size = tokens.shape[-1]
    at = lambda i: tokens[jnp.clip(i, 0, size - 1)]
    t = T.parse_turn(tokens, action.length, self.vocab)
    is_call, is_answer = t.kind == T.KIND_CALL, t.kind == T.KIND_ANSWER
    known = is_call & (t.end > t.start) & (at(t.start) == self.id("convert"))
    # Arguments: digits, then two units.
    number, number_ok = T.parse_int(tokens, t.start + 1, t.end - 2, self._digit_of,
                                    self.id("-"), max_digits=self.num_digits)
    src, dst = T.lookup(self._unit_of, at(t.end - 2)), T.lookup(self._unit_of, at(t.end - 1))
    factor = jnp.asarray(self._factor)[jnp.maximum(src, 0), jnp.maximum(dst, 0)]
    args_ok = number_ok & (src >= 0) & (dst >= 0) & (factor > 0)
    guess, answer_ok = T.parse_int(tokens, t.start, t.end, self._digit_of, self.id("-"))
    error = jnp.select(
        [t.kind == T.KIND_INVALID, t.kind == T.KIND_ASK, is_call & ~known, known & ~args_ok,
         is_answer & ~answer_ok],
        [t.error, T.E_FORMAT, T.E_UNKNOWN_TOOL, T.E_ARGUMENT, T.E_ANSWER], T.NO_ERROR)
    failed = error != T.NO_ERROR
    converted = known & args_ok
    result = number * factor
    answered = is_answer & answer_ok
    target = state.value * jnp.asarray(self._asked)[state.pair]
    correct = answered & (guess == target)

    digits, n = T.encode_int(result, self._digit_ids, self.id("-"), self.result_width)
    err_ids, err_len = T.error_content(self.vocab, error, self.result_width)
    obs = self.make_reply(base.ROLE_TOOL, jnp.where(failed, err_ids, digits),
                          jnp.where(failed, err_len, n))
    guessed = correct & ~state.have_result
    reward = (correct.astype(jnp.float32) - params.guess_penalty * guessed
              - params.format_penalty * failed)
    state = state.replace(
        success=state.success | correct, num_tool_calls=state.num_tool_calls + known,
        format_errors=state.format_errors + failed,
        result=jnp.where(converted, result, state.result),
        have_result=state.have_result | converted, answered=state.answered | answered)
    return state, obs, reward, answered

  def expert(self, key, state, params):
    """Calls `convert` on the question, then answers its result. With probability
    `params.noise` per turn it guesses instead (answers the quantity unconverted) or forgets
    the closing tag."""
    bits = T.random_bits(key, 2)
    mistake = T.unit(bits[0]) < params.noise
    guess = mistake & (T.below(bits[1], 2) == 0) & ~state.have_result
    unclosed = mistake & ~guess
    digits, _ = T.encode_int(state.value, self._digit_ids, self.id("-"), self.num_digits)
    call = T.tagged_action(self.vocab, (V.CALL_OPEN, "convert"),
                           jnp.concatenate([digits, self._unit_ids(state.pair)]),
                           self.num_digits + 2,
                           V.CALL_CLOSE, self.action_len, closed=~unclosed)
    value = jnp.where(guess, state.value, state.result)
    digits, n = T.encode_int(value, self._digit_ids, self.id("-"), self.result_width)
    answer = T.tagged_action(self.vocab, (V.ANSWER_OPEN,), digits, n, V.ANSWER_CLOSE,
                             self.action_len, closed=~unclosed)
    return T.choose_action((state.have_result | guess).astype(jnp.int32), [call, answer])

  def extra_info(self, state):
    """Counters beyond the base ones; each becomes an `eval/<name>` metric."""
    return {"answered": state.answered,
            "guessed": state.answered & ~state.have_result}

