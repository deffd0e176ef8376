"""Python tools inside the jitted rollout, through `jax.pure_callback`.

`PythonToolEnv(env, tools)` wraps any environment. When the agent's turn is a well-formed call
`<call> name args... </call>` (the shared grammar, `tools.parse_turn`, decides that in JAX) and
`name` is one of `tools`, the reply content comes from the Python function
`tools[name](args_text) -> reply_text` (space-separated symbols in, symbols out, encoded with
the environment's vocabulary; unknown output symbols become `<unk>`, output longer than the
reply budget is cut). Everything else - answers, malformed turns, other tools, the episode's
state, rewards and counters - is the wrapped environment's. So a researcher can swap a real
tool (a code sandbox, a search engine) into an environment without leaving the compiled loop.

The callback runs once per environment step for the whole batch (`vmap_method="broadcast_all"`)
and only rows whose turn is a call to a Python tool are passed to the Python functions. The
rollout only steps the environment in loop iterations where some row's turn ended, so the host
is visited once per turn boundary, not once per token. A tool that raises gets the reply
`<error> bad-argument` instead of crashing the rollout.

`python_calculator` is the reference example: the calculator tool in plain Python, replying
exactly what the pure-JAX calculator replies (tested token for token through the rollout).
"""

from __future__ import annotations

from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from mtrl_jax import vocab as V
from mtrl_jax.envs import base
from mtrl_jax.envs import tools as T
from mtrl_jax.envs import wrappers

ToolFn = Callable[[str], str]


class PythonToolEnv(wrappers.Wrapper):
  """`env` with the tools named in `tools` answered by Python functions (see module doc).

  A `Wrapper`: only `name` and `step_env` are its own; everything else is `env`'s."""

  def __init__(self, env: base.Environment, tools: Mapping[str, ToolFn]):
    super().__init__(env)
    self.tools = dict(tools)
    missing = env.vocab.missing(self.tools)
    if missing:
      raise ValueError(f"tool names {missing} are not symbols of {type(env).__name__}'s "
                       "vocabulary; a tool name must be one token")
    self._tool_ids = np.asarray(self.vocab.ids(self.tools), np.int32)
    self._names = {int(i): n for i, n in zip(self._tool_ids, self.tools)}

  @property
  def name(self) -> str:
    return f"python-tool({self.env.name})"

  def step_env(self, key, state, action, params):
    state, obs, reward, done = self.env.step_env(key, state, action, params)
    tokens = jnp.asarray(action.tokens, jnp.int32)
    size = tokens.shape[-1]
    turn = T.parse_turn(tokens, action.length, self.vocab)
    name = tokens[jnp.clip(turn.start, 0, size - 1)]
    handled = (turn.kind == T.KIND_CALL) & (turn.start < turn.end) & jnp.isin(name, self._tool_ids)
    width = self.reply_len - 3  # <tool> content <eot> <assistant>
    content, length = jax.pure_callback(
        self._host, (jax.ShapeDtypeStruct((width,), jnp.int32),
                     jax.ShapeDtypeStruct((), jnp.int32)),
        handled, name, tokens, turn.start + 1, turn.end, vmap_method="broadcast_all")
    reply = self.make_reply(base.ROLE_TOOL, content, length)
    obs = jax.tree.map(lambda a, b: jnp.where(handled, a, b), reply, obs)
    return state, obs, reward, done

  def _host(self, handled, name, tokens, start, end):
    """numpy in, numpy out; leading batch dims are whatever vmap gave us."""
    handled, name, start, end = (np.asarray(x) for x in (handled, name, start, end))
    tokens = np.asarray(tokens)
    batch = handled.shape
    width = self.reply_len - 3
    content = np.zeros(batch + (width,), np.int32)
    length = np.zeros(batch, np.int32)
    tokens = np.broadcast_to(tokens, batch + tokens.shape[-1:])
    for idx in zip(*np.nonzero(handled)) if handled.ndim else ([()] if handled else []):
      args = self.vocab.decode(tokens[idx][int(start[idx]):int(end[idx])], skip_pad=False)
      try:
        text = self.tools[self._names[int(name[idx])]](args)
      except Exception:  # a broken tool is an error reply, not a crashed rollout
        text = f"{V.ERROR} bad-argument"
      unk = self.vocab.id(V.UNK)
      ids = [self.vocab.id(s) if s in self.vocab else unk for s in text.split()][:width]
      content[idx][: len(ids)] = ids
      length[idx] = len(ids)
    return content, length


def python_calculator(max_operands: int = 8) -> ToolFn:
  """The calculator tool in plain Python: `"1 2 * - 3 + 4"` -> `"- 3 2"`.

  Same rules as `tools.eval_expression`: one digit per token, `*` before `+`/`-` (left to
  right), a `-` not after a digit is a unary minus, at most `max_operands` operands of at most
  10 digits, values and every intermediate result within [-(2**31 - 1), 2**31 - 1]. Errors are
  `<error> bad-argument` and `<error> overflow`.
  """
  lim = T.INT_MAX

  def calc(args: str) -> str:
    syms = args.split()
    operands, ops, cur, sign, prev_digit = [], [], "", 1, False
    for s in syms:
      if s.isdigit() and len(s) == 1:
        cur += s
        prev_digit = True
      elif s in ("+", "-", "*") and prev_digit:
        operands.append(sign * int(cur))
        ops.append(s)
        cur, sign, prev_digit = "", 1, False
      elif s == "-" and not cur and sign == 1:
        sign, prev_digit = -1, False
      else:
        return f"{V.ERROR} bad-argument"
    if not prev_digit:
      return f"{V.ERROR} bad-argument"
    operands.append(sign * int(cur))
    if len(operands) > max_operands or any(len(r) > T.MAX_INT_DIGITS for r in _runs(syms)):
      return f"{V.ERROR} bad-argument"
    if any(abs(x) > lim for x in operands):
      return f"{V.ERROR} overflow"
    total, term = 0, operands[0]
    for op, val in zip(ops, operands[1:]):
      if op == "*":
        term = term * val
        if abs(term) > lim:
          return f"{V.ERROR} overflow"
      else:
        total = total + term
        if abs(total) > lim:
          return f"{V.ERROR} overflow"
        term = val if op == "+" else -val
    value = total + term
    if abs(value) > lim:
      return f"{V.ERROR} overflow"
    return " ".join(("-" if value < 0 else "") + str(abs(value)))

  return calc


def _runs(syms: list[str]) -> list[str]:
  """Maximal runs of digit symbols (the operands' digit strings)."""
  runs, cur = [], ""
  for s in syms:
    if s.isdigit():
      cur += s
    elif cur:
      runs.append(cur)
      cur = ""
  return runs + ([cur] if cur else [])
