"""Python tools inside the jitted rollout, through `jax.pure_callback`.

`PythonToolEnv(env, tools)` wraps any environment. When the agent's turn is a well-formed call
`<call> name args... </call>` (the shared grammar, `tools.parse_turn`, decides that in JAX) and
`name` is one of `tools`, the reply content comes from the Python function
`tools[name](args_text)` (the argument symbols joined by spaces in; its return value out, as
symbols of the environment's vocabulary, cut to the reply budget). Everything else - answers,
malformed turns, other tools, the episode's state and rewards - is the wrapped environment's.
So a researcher can swap a real tool (a code sandbox, `sandbox.python_exec`; a search engine)
into an environment without leaving the compiled loop.

The callback runs once per environment step for the whole batch (`vmap_method="broadcast_all"`)
and only rows of unfinished episodes whose turn is a call to a Python tool are passed to the
Python functions. The rollout only steps the environment in loop iterations where some row's
turn ended, so the host is visited once per turn boundary, not once per token.

Nothing a tool does can take the rollout down:

* Return values (`reply_symbols`): a str is split on whitespace into symbols; None is an empty
  reply; a bool is `true` / `false`; an int or a float (Python or numpy) is the characters of
  `str(x)`, one symbol each, as this package's environments write numbers (`-42` -> `- 4 2`,
  `2.5` -> `2 . 5`; `nan`, `inf`, `- inf` for non-finite floats); a list, tuple or numpy array
  is its elements' forms in order (arrays flattened). Anything else (dict, bytes, complex,
  an object) has no text form: an error reply.
* Errors: a tool that raises any exception (`SystemExit` included), returns a value without a
  text form, or runs past its timeout is answered `<error> bad-argument`; the reason is kept
  host-side in `env.recent_failures` (the last 100 `ToolFailure`s). `KeyboardInterrupt` is not
  caught: it stops the rollout (JAX re-raises it from the callback as its runtime error, naming
  it), so a user can interrupt a run.
* Counting: a turn answered by a Python tool counts one tool call, and one format error (with
  the environment's `params.format_penalty` subtracted from that turn's reward) iff its reply
  is an error reply - one whose first symbol is `<error>`: every failure above, and a tool that
  itself replies `<error> ...` (as `python_calculator` does). The wrapped environment's own
  verdict on that turn is replaced (it may answer `unknown-tool` for a tool only Python
  knows). There is no separate counter: an error reply is a format error, as the environment
  contract says, and `info` keeps the wrapped environment's structure.
* Control symbols: a reply never holds a symbol that structures the conversation -
  `CONTROL_SYMBOLS`, every special token except `<error>` and `<unk>` (`<eot> <assistant>
  <tool> <user> <answer> <call> <think> <ask> <pad> ...`): those, and symbols not in the
  vocabulary, become `<unk>`. So tool output cannot end the turn, open a role or fake an answer.
* Timeout: each call has `timeout_s` (constructor, default 10 s) of wall clock. Python cannot
  kill a thread, so a late call is abandoned: it keeps running in the background (its result is
  dropped) and holds its worker until it returns. Tools that can hang should bound themselves
  (`sandbox.python_exec` kills its process at its own, shorter timeout, default 5 s).
* Concurrency: the calls of one step run on up to `max_workers` (constructor, default 16)
  threads at once, so a step takes about ceil(calls / max_workers) times the slowest call
  rather than the sum of all calls. Tools must therefore be thread-safe (or pass
  `max_workers=1`). The bound is shared by all steps of this environment object; if every worker
  is still held by a call that has not returned after `timeout_s` (hung tools), the step's
  remaining calls are answered `<error> bad-argument` without running.

`python_calculator` is the reference example: the calculator tool in plain Python, replying
exactly what the pure-JAX calculator replies (tested token for token through the rollout).
"""

from __future__ import annotations

import collections
import functools
import math
import threading
import time
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mtrl_jax import vocab as V
from mtrl_jax.envs import base
from mtrl_jax.envs import tools as T
from mtrl_jax.envs import wrappers

ToolFn = Callable[[str], Any]

# Special tokens a tool's reply may not contain (they become `<unk>`): all but the two that are
# content of replies (`<error> code`, and `<unk>` itself).
CONTROL_SYMBOLS: tuple[str, ...] = tuple(s for s in V.SPECIAL_TOKENS if s not in (V.ERROR, V.UNK))
ERROR_REPLY: tuple[str, ...] = (V.ERROR, "bad-argument")
_MAX_DEPTH = 16  # nesting of lists/arrays in a return value


class ToolFailure(NamedTuple):
  """A call answered with an error reply by `PythonToolEnv`: tool name, argument text, why."""

  tool: str
  args: str
  reason: str


def reply_symbols(value: Any, limit: int) -> list[str]:
  """The reply symbols of a tool's return value (the text forms of the module docstring), at
  most `limit` of them (the rest of a long value is never converted). Raises TypeError for a
  value with no text form (ValueError for an int too long for `str`)."""
  out: list[str] = []

  def add(v, depth):
    room = limit - len(out)
    if room <= 0:
      return
    if isinstance(v, str):
      out.extend(v.split(None, room)[:room])
    elif v is None:
      pass
    elif isinstance(v, (bool, np.bool_)):
      out.append("true" if v else "false")
    elif isinstance(v, (int, np.integer)):
      out.extend(str(int(v))[:room])
    elif isinstance(v, (float, np.floating)):
      if math.isfinite(v):
        out.extend(str(v)[:room])
      else:
        out.extend(("nan",) if math.isnan(v) else ("inf",) if v > 0 else ("-", "inf"))
    elif isinstance(v, (list, tuple, np.ndarray)):
      if depth >= _MAX_DEPTH:
        raise TypeError(f"a return value nested deeper than {_MAX_DEPTH} levels")
      items = v.flat if isinstance(v, np.ndarray) else v
      if isinstance(v, np.ndarray) and v.dtype.kind not in "biufUO":
        raise TypeError(f"a numpy array of dtype {v.dtype} has no text form")
      for item in items:
        if len(out) >= limit:
          break
        add(item, depth + 1)
    else:
      raise TypeError(f"a return value of type {type(v).__name__} has no text form")

  add(value, 0)
  return out[:limit]


class _Workers:
  """Runs calls on daemon threads, at most `size` at once. A call holds its slot from its start
  until it returns - also past its timeout, since a Python thread cannot be killed."""

  def __init__(self, size: int):
    self._slots = threading.BoundedSemaphore(size)

  def run(self, calls: Sequence[Callable[[], Any]], timeout_s: float) -> list[tuple[str, Any]]:
    """Each call's outcome, in order: ("ok", value), ("raised", exception), ("interrupt",
    KeyboardInterrupt), ("timeout", None) or ("not-run", None) when no worker freed up."""
    n = len(calls)
    results: list[Any] = [None] * n
    started: list[float | None] = [None] * n
    finished: list[float] = [math.inf] * n
    done = [threading.Event() for _ in range(n)]
    out: list[tuple[str, Any]] = [("not-run", None)] * n

    def work(i):
      try:
        results[i] = ("ok", calls[i]())
      except KeyboardInterrupt as e:
        results[i] = ("interrupt", e)
      except BaseException as e:  # noqa: BLE001 (SystemExit too: an error reply, not an exit)
        results[i] = ("raised", e)
      finally:
        finished[i] = time.monotonic()
        self._slots.release()
        done[i].set()

    for i in range(n):
      # Every running call ends or overstays its timeout within timeout_s: no free slot by
      # then means all workers are held by calls that have not returned (hung tools).
      if not self._slots.acquire(timeout=timeout_s):
        break
      started[i] = time.monotonic()
      try:
        threading.Thread(target=work, args=(i,), daemon=True, name="python-tool").start()
      except RuntimeError as e:  # cannot start a thread: the call is not run
        self._slots.release()
        started[i], out[i] = None, ("raised", e)
    for i in range(n):
      if started[i] is None:
        continue
      done[i].wait(max(0.0, started[i] + timeout_s - time.monotonic()))
      on_time = done[i].is_set() and finished[i] - started[i] <= timeout_s
      out[i] = results[i] if on_time else ("timeout", None)
    return out


class PythonToolEnv(wrappers.Wrapper):
  """`env` with the tools named in `tools` answered by Python functions (see module doc).

  Args:
    env: the wrapped environment; its params must have `format_penalty` (`EnvParams` do).
    tools: {tool name: function(args_text) -> value}; each name must be one symbol of `env`'s
      vocabulary.
    timeout_s: wall-clock seconds per call before it is answered as an error (default 10).
    max_workers: calls running at once (default 16).

  A `Wrapper`: only `name` and `step_env` are its own; everything else is `env`'s."""

  def __init__(self, env: base.Environment, tools: Mapping[str, ToolFn], *,
               timeout_s: float = 10.0, max_workers: int = 16):
    super().__init__(env)
    self.tools = dict(tools)
    missing = env.vocab.missing(self.tools)
    if missing:
      raise ValueError(f"tool names {missing} are not symbols of {type(env).__name__}'s "
                       "vocabulary; a tool name must be one token")
    if not (isinstance(timeout_s, (int, float)) and math.isfinite(timeout_s) and timeout_s > 0):
      raise ValueError(f"timeout_s must be a positive number of seconds, got {timeout_s!r}")
    if not (isinstance(max_workers, int) and max_workers >= 1):
      raise ValueError(f"max_workers must be an integer >= 1, got {max_workers!r}")
    self.timeout_s, self.max_workers = float(timeout_s), max_workers
    self.recent_failures: collections.deque[ToolFailure] = collections.deque(maxlen=100)
    self._workers = _Workers(max_workers)
    self._tool_ids = np.asarray(self.vocab.ids(self.tools), np.int32)
    self._names = {int(i): n for i, n in zip(self._tool_ids, self.tools)}
    self._control = frozenset(CONTROL_SYMBOLS)
    self._unk = self.vocab.id(V.UNK)

  @property
  def name(self) -> str:
    return f"python-tool({self.env.name})"

  def step_env(self, key, state, action, params):
    new, obs, reward, done = self.env.step_env(key, state, action, params)
    tokens = jnp.asarray(action.tokens, jnp.int32)
    size = tokens.shape[-1]
    turn = T.parse_turn(tokens, action.length, self.vocab)
    name = tokens[jnp.clip(turn.start, 0, size - 1)]
    handled = ((turn.kind == T.KIND_CALL) & (turn.start < turn.end)
               & jnp.isin(name, self._tool_ids) & ~state.done)
    width = self.reply_len - 3  # <tool> content <eot> <assistant>
    content, length, failed = jax.pure_callback(
        self._host, (jax.ShapeDtypeStruct((width,), jnp.int32),
                     jax.ShapeDtypeStruct((), jnp.int32), jax.ShapeDtypeStruct((), jnp.bool_)),
        handled, name, tokens, turn.start + 1, turn.end, vmap_method="broadcast_all")
    reply = self.make_reply(base.ROLE_TOOL, content, length)
    obs = jax.tree.map(lambda a, b: jnp.where(handled, a, b), reply, obs)
    # The turn's error accounting follows the reply the agent sees: the Python tool's.
    failed = failed.astype(jnp.int32)
    inner_errors = new.format_errors - state.format_errors
    fixed = reward + params.format_penalty * (inner_errors - failed)
    reward = jnp.where(handled & (inner_errors != failed), fixed, reward).astype(reward.dtype)
    new = new.replace(
        num_tool_calls=jnp.where(handled, state.num_tool_calls + 1, new.num_tool_calls),
        format_errors=jnp.where(handled, state.format_errors + failed, new.format_errors))
    return new, obs, reward, done

  def _host(self, handled, name, tokens, start, end):
    """numpy in, numpy out; leading batch dims are whatever vmap gave us."""
    handled, name, start, end = (np.asarray(x) for x in (handled, name, start, end))
    tokens = np.asarray(tokens)
    batch = handled.shape
    width = self.reply_len - 3
    content = np.zeros(batch + (width,), np.int32)
    length = np.zeros(batch, np.int32)
    failed = np.zeros(batch, np.bool_)
    tokens = np.broadcast_to(tokens, batch + tokens.shape[-1:])
    rows = list(zip(*np.nonzero(handled))) if handled.ndim else ([()] if handled else [])
    calls = [(self._names[int(name[idx])],
              self.vocab.decode(tokens[idx][int(start[idx]):int(end[idx])], skip_pad=False))
             for idx in rows]
    outcomes = self._workers.run(
        [functools.partial(self.tools[tool], args) for tool, args in calls], self.timeout_s)
    for idx, (tool, args), (kind, value) in zip(rows, calls, outcomes):
      if kind == "interrupt":
        raise value
      symbols, reason = None, None
      if kind == "ok":
        try:
          symbols = reply_symbols(value, width)
        except Exception as e:  # noqa: BLE001 (a value without a text form is an error reply)
          reason = f"returned {type(value).__name__}: {e}"
      elif kind == "raised":
        reason = f"raised {type(value).__name__}: {value}"
      elif kind == "timeout":
        reason = f"did not return within timeout_s={self.timeout_s:g}"
      else:
        reason = (f"not run: all max_workers={self.max_workers} workers held by calls that "
                  f"did not return within timeout_s={self.timeout_s:g}")
      if symbols is None:
        self.recent_failures.append(ToolFailure(tool, args, reason))
        symbols = list(ERROR_REPLY)
      ids = [self._unk if s in self._control or s not in self.vocab else self.vocab.id(s)
             for s in symbols[:width]]
      content[idx][: len(ids)] = ids
      length[idx] = len(ids)
      failed[idx] = bool(symbols) and symbols[0] == V.ERROR
    return content, length, failed


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
