"""Tool use for real models: JSON tool calls in decoded text, Python tools, chat-template replies.

`JsonToolEnv(tokenizer, tasks, tools)` is an `Environment` whose token space is a real
tokenizer's (`mtrl_jax.models.chat.ChatTokenizer`):

* `reset` picks a task (uniformly, from the key) and returns its prompt: the chat-template
  rendering of `[system,] user(question)` with the tools listed, plus the header that opens the
  assistant turn. Prompts are tokenized once, at construction, and live in the env params as
  fixed-length arrays (`params.prompts [N, P]`), so the episode runs inside the jitted rollout.
* The policy's turn ends with the layout's end-of-turn token (`<|im_end|>`, `<|eot_id|>`).
  `step` enters Python once per turn boundary through `jax.pure_callback` (batched: one call
  for all rows; rows whose turn did not end are passed with an empty action and skipped). The
  callback decodes the turn and
  - if it contains `<tool_call>...</tool_call>` blocks (Hermes convention, up to
    `max_calls_per_turn`), parses each as JSON `{"name": ..., "arguments": {...}}`, runs the
    named Python tool and replies with one tool message holding the results;
  - otherwise takes the turn as the final answer: the episode ends, with success if the answer
    (see `mtrl_jax.tasks.extract_answer`) matches the task's.
* Replies are the exact template pieces after the end-of-turn (`ChatTokenizer.fit_reply`): for
  ChatML `\\n<|im_start|>user\\n<tool_response>\\n{result}\\n</tool_response><|im_end|>\\n
  <|im_start|>assistant\\n`, padded to the static `reply_len`; a result too long for the budget
  is cut (`...`), never the template pieces.
* A malformed call (bad JSON, no `</tool_call>`, unknown tool, arguments that break the
  tool's JSON schema, a tool that raises or returns a complex, NaN or infinite number) is
  answered with an error tool message (`Error: ...`) and counted in `info['format_errors']`;
  nothing the model writes makes `step` raise. Reward: `correct_reward` for a correct final
  answer, minus `format_penalty` per error.
* Limits, checked before parsing (each an error reply): a `<tool_call>` block longer than
  `max_call_chars` characters (default `MAX_CALL_CHARS` = 4096) or nested deeper than
  `max_depth` levels (default `MAX_JSON_DEPTH` = 32); JSON numbers longer than
  `MAX_NUMBER_CHARS` (100) characters, overflowing floats and NaN/Infinity are refused. So
  neither Python's int-string limit (4,300 digits) nor its recursion limit (~1,000 levels) is
  ever reached. Arguments are checked against the tool's schema by `validate_arguments` (the
  subset tool schemas use) before the tool runs.
* Tool results and error messages (which quote the model's text, cut to a few dozen
  characters) are written as plain text (`ChatTokenizer.plain`), and each reply's ids are
  checked to hold exactly the special tokens of its template frame (a reply that does not is
  replaced by an error reply), so `<|im_end|><|im_start|>` in a tool name or argument can never
  become a turn boundary.
* `expert` replays a task's `solution` (assistant turns given in the task file), for
  demonstrations and tests; a task without one answers nothing.

Tools are `Tool(name, description, parameters, fn)`: `fn(**arguments) -> str`, described to the
model by its JSON schema `parameters` in the system prompt (arguments are validated against it);
any other result is written with `str` (`result_text`). `calculator_tool()` (safe arithmetic)
and `search_tool(corpus)` (BM25 over a small document collection) are built in.

Tasks (`mtrl_jax.tasks.Task`) come from a TFDS prompt dataset (`mtrl_jax.data.prompts`) or a
list.

`TokenizedEnv(env, tokenizer)` runs any symbol-vocabulary environment of this package
(calculator, search, clarify) in a real tokenizer's ids, with its own turn grammar.
"""

from __future__ import annotations

import ast
import collections
import dataclasses
import json
import math
import numbers
import operator
import re
from typing import Any, Callable, Mapping, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from mtrl_jax import vocab as V
from mtrl_jax.envs import base
from mtrl_jax.envs import wrappers
from mtrl_jax.tasks import Task, is_correct

DEFAULT_SYSTEM = ("You are a helpful assistant. Use the tools when they help. When you know the "
                  "final answer, reply with it inside <answer></answer> tags, without a tool call.")
_CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.S)
MAX_CALL_CHARS = 4096  # characters of one <tool_call> block (`JsonToolEnv.max_call_chars`)
MAX_JSON_DEPTH = 32  # nesting levels of its JSON (`JsonToolEnv.max_depth`)
MAX_NUMBER_CHARS = 100  # characters of one JSON number
_QUOTE_CHARS = 60  # how much of the model's text an error message quotes


# --- tools ------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Tool:
  """A Python tool: `fn(**arguments) -> str`, described to the model by a JSON schema."""

  name: str
  description: str
  parameters: Mapping[str, Any]
  fn: Callable[..., Any]

  @property
  def schema(self) -> dict[str, Any]:
    """The OpenAI/Hermes function schema chat templates list in the system prompt."""
    return {"type": "function", "function": {"name": self.name, "description": self.description,
                                             "parameters": dict(self.parameters)}}


_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
           ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod,
           ast.Pow: operator.pow}
_UNOPS = {ast.USub: operator.neg, ast.UAdd: operator.pos}


def safe_eval(expression: str, max_abs: float = 1e100) -> float | int:
  """Arithmetic on numbers with + - * / // % ** and parentheses; nothing else is evaluated.
  Raises ValueError for anything else, for huge powers, for results beyond `max_abs` and for
  values that are not real, finite numbers (`(-8) ** 0.5` is complex, `1e309` infinite);
  ZeroDivisionError for a division by zero."""
  if len(expression) > 500:
    raise ValueError("expression longer than 500 characters")

  def real(value):
    if isinstance(value, complex):
      raise ValueError("the result is not a real number")
    if isinstance(value, float) and not math.isfinite(value):
      raise ValueError("the result is not a finite number")
    return value

  def ev(node):
    if isinstance(node, ast.Expression):
      return ev(node.body)
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) \
        and not isinstance(node.value, bool):
      return real(node.value)
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
      left, right = ev(node.left), ev(node.right)
      if isinstance(node.op, ast.Pow) and (abs(right) > 100 or abs(left) > 1e6):
        raise ValueError("power too large")
      try:
        value = real(_BINOPS[type(node.op)](left, right))
      except OverflowError:
        raise ValueError("result too large") from None
      if abs(value) > max_abs:
        raise ValueError("result too large")
      return value
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNOPS:
      return _UNOPS[type(node.op)](ev(node.operand))
    raise ValueError(f"unsupported expression element {type(node).__name__}")

  try:
    tree = ast.parse(expression.strip(), mode="eval")
  except (SyntaxError, RecursionError, MemoryError):
    raise ValueError(f"cannot parse {expression!r}") from None
  try:
    return ev(tree)
  except RecursionError:
    raise ValueError("expression nested too deeply") from None


def format_number(x: float | int) -> str:
  """408 -> '408'; 408.0 -> '408'; 1/3 -> '0.3333333333'."""
  if isinstance(x, float) and x.is_integer() and abs(x) < 1e15:
    return str(int(x))
  if isinstance(x, float):
    return f"{x:.10g}"
  return str(x)


def calculator_tool() -> Tool:
  """`calculator(expression)`: evaluates arithmetic (`safe_eval`), e.g. "(12 + 3) * 4" -> "60"."""
  return Tool(
      name="calculator",
      description="Evaluate an arithmetic expression with + - * / // % ** and parentheses.",
      parameters={"type": "object", "properties": {"expression": {
          "type": "string", "description": "The expression, e.g. (12 + 3) * 4"}},
                  "required": ["expression"]},
      fn=lambda expression: format_number(safe_eval(str(expression))))


def _terms(text: str) -> list[str]:
  return re.findall(r"\w+", text.lower())


def search_tool(corpus: Sequence[Mapping[str, str]], k: int = 3, k1: float = 1.5,
                b: float = 0.75) -> Tool:
  """`search(query)`: the `k` best documents of `corpus` (dicts with `title`, `text`) by BM25,
  one per line as `title: text`."""
  docs = [_terms(d.get("title", "") + " " + d.get("text", "")) for d in corpus]
  counts = [collections.Counter(d) for d in docs]
  n = len(docs)
  avg = sum(map(len, docs)) / max(n, 1)
  df = collections.Counter(t for d in docs for t in set(d))
  idf = {t: math.log(1 + (n - f + 0.5) / (f + 0.5)) for t, f in df.items()}

  def search(query: str) -> str:
    q = _terms(str(query))
    if not q:
      raise ValueError("empty query")
    scores = []
    for i, c in enumerate(counts):
      s = sum(idf.get(t, 0.0) * c[t] * (k1 + 1) / (c[t] + k1 * (1 - b + b * len(docs[i]) / avg))
              for t in q if t in c)
      scores.append((-s, i))
    best = [i for s, i in sorted(scores)[:k] if s < 0]
    if not best:
      return "No results."
    return "\n".join(f"{corpus[i].get('title', '')}: {corpus[i].get('text', '')}" for i in best)

  return Tool(name="search", description="Search the document collection; returns the best "
              f"{k} documents.",
              parameters={"type": "object", "properties": {"query": {
                  "type": "string", "description": "What to look for"}}, "required": ["query"]},
              fn=search)


# --- reading a call: strict JSON, schema checks, result text ---------------------------------

def _quote(text: str, limit: int = _QUOTE_CHARS) -> str:
  """The model's text for an error message: its repr, cut to `limit` characters."""
  return repr(text) if len(text) <= limit else repr(text[:limit]) + "..."


def _cut(text: str, limit: int = 200) -> str:
  return text if len(text) <= limit else text[:limit] + "..."


def _too_deep(text: str, max_depth: int) -> bool:
  """True if JSON text nests `[`/`{` deeper than `max_depth` (strings skipped; one linear
  pass, no parsing, so it is safe on any input)."""
  depth, in_string, escaped = 0, False, False
  for c in text:
    if in_string:
      if escaped:
        escaped = False
      elif c == "\\":
        escaped = True
      elif c == '"':
        in_string = False
    elif c == '"':
      in_string = True
    elif c in "[{":
      depth += 1
      if depth > max_depth:
        return True
    elif c in "]}":
      depth -= 1
  return False


def _parse_int(text: str) -> int:
  if len(text) > MAX_NUMBER_CHARS:
    raise ValueError(f"a number longer than {MAX_NUMBER_CHARS} characters")
  return int(text)


def _parse_float(text: str) -> float:
  if len(text) > MAX_NUMBER_CHARS:
    raise ValueError(f"a number longer than {MAX_NUMBER_CHARS} characters")
  value = float(text)
  if not math.isfinite(value):
    raise ValueError("a number too large for a float")
  return value


def _parse_constant(text: str):
  raise ValueError(f"{text} is not JSON")


def parse_json(text: str, max_depth: int = MAX_JSON_DEPTH) -> Any:
  """Strict JSON text -> value. Raises ValueError (only), its message a short reason for the
  model: nesting deeper than `max_depth` (checked before parsing), numbers longer than
  `MAX_NUMBER_CHARS` or beyond float range, NaN/Infinity, and malformed JSON. Bound `text`'s
  length before calling (`JsonToolEnv.max_call_chars`)."""
  if _too_deep(text, max_depth):
    raise ValueError(f"nested deeper than {max_depth} levels")
  try:
    return json.loads(text, parse_int=_parse_int, parse_float=_parse_float,
                      parse_constant=_parse_constant)
  except json.JSONDecodeError as e:
    raise ValueError(e.msg) from None
  except RecursionError:  # not reachable after the depth check; kept as a guard
    raise ValueError(f"nested deeper than {max_depth} levels") from None


_TYPE_NAMES = ("null", "boolean", "integer", "number", "string", "array", "object")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,39}")


def _json_type(value: Any) -> str:
  """The JSON type name of a parsed value ("integer" for ints, "number" for floats)."""
  if value is None:
    return "null"
  for kind, name in ((bool, "boolean"), (int, "integer"), (float, "number"), (str, "string"),
                     (list, "array"), (dict, "object")):
    if isinstance(value, kind):
      return name
  return type(value).__name__


def _is_type(value: Any, name: str) -> bool:
  """JSON Schema's `type`: integers are numbers, 3.0 is an integer, booleans are neither."""
  kind = _json_type(value)
  if name == "number":
    return kind in ("integer", "number")
  if name == "integer":
    return kind == "integer" or (kind == "number" and value.is_integer())
  return kind == name


def _same(a: Any, b: Any) -> bool:
  """JSON equality (for `enum`): 1 == 1.0, but True != 1."""
  ka, kb = _json_type(a), _json_type(b)
  if ka in ("integer", "number") and kb in ("integer", "number"):
    return a == b
  if ka != kb:
    return False
  if ka == "array":
    return len(a) == len(b) and all(map(_same, a, b))
  if ka == "object":
    return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
  return a == b


def validate_arguments(value: Any, schema: Any, path: str = "arguments",
                       limit: int = 5) -> list[str]:
  """Problems of `value` (parsed JSON) against a JSON schema, as short phrases naming the place
  (`arguments.tags[1] must be string, got integer`); [] when it conforms. At most `limit`.

  The subset tool schemas use: `type` (a name or a list; 3.0 is an integer, booleans are not
  numbers), `enum`, `properties`, `required`, `additionalProperties` (a bool or a schema;
  absent: allowed), `items` (one schema), and boolean schemas. Other keywords (`description`,
  `minimum`, `pattern`, ...) and unknown type names are ignored, never errors. Recursion
  follows `value`, whose depth `parse_json` bounds."""
  out: list[str] = []
  _validate(value, schema, path, out, limit)
  return out[:limit]


def _validate(value, schema, path, out, limit):
  if len(out) >= limit or schema is True:
    return
  if schema is False:
    out.append(f"{path} is not allowed")
    return
  if not isinstance(schema, Mapping):
    return
  kinds = schema.get("type")
  kinds = [kinds] if isinstance(kinds, str) else list(kinds or ())
  kinds = [k for k in kinds if k in _TYPE_NAMES]
  if kinds and not any(_is_type(value, k) for k in kinds):
    out.append(f"{path} must be {' or '.join(kinds)}, got {_json_type(value)}")
    return
  enum = schema.get("enum")
  if isinstance(enum, (list, tuple)) and not any(_same(value, e) for e in enum):
    out.append(f"{path} must be one of {_cut(json.dumps(list(enum), default=str), 100)}")
  if isinstance(value, dict):
    props = schema.get("properties")
    props = props if isinstance(props, Mapping) else {}
    required = schema.get("required")
    for key in required if isinstance(required, (list, tuple)) else ():
      if key not in value:
        out.append(f"{path} misses the required property {key!r}")
    extra = schema.get("additionalProperties", True)
    for key, item in value.items():
      where = f"{path}.{key}" if _NAME.fullmatch(key) else f"{path}[{_quote(key)}]"
      if key in props:
        _validate(item, props[key], where, out, limit)
      elif extra is False:
        out.append(f"{path} has an unexpected property {_quote(key)}")
      else:
        _validate(item, extra, where, out, limit)
  if isinstance(value, list) and isinstance(schema.get("items"), (Mapping, bool)):
    for i, item in enumerate(value):
      _validate(item, schema["items"], f"{path}[{i}]", out, limit)


def result_text(value: Any) -> str:
  """A tool's return value as reply text: `str(value)`. Raises ValueError, saying what it was,
  for a number that is not real and finite (complex, NaN, infinite; Python or numpy scalars and
  arrays) and for a value whose `str` fails."""
  if isinstance(value, str):
    return value
  if isinstance(value, numbers.Complex) and not isinstance(value, numbers.Real):
    raise ValueError("a complex number, not a real one")
  if isinstance(value, numbers.Real) and not isinstance(value, numbers.Integral) \
      and not math.isfinite(value):
    raise ValueError(f"{value}, not a finite number")
  if isinstance(value, np.ndarray) and value.dtype.kind in "fc" and (
      value.dtype.kind == "c" or not np.isfinite(value).all()):
    raise ValueError("an array with complex or non-finite numbers")
  try:
    return str(value)
  except Exception as e:
    raise ValueError(f"a value that cannot be written as text ({type(e).__name__})") from None


# --- the environment --------------------------------------------------------------------------

@flax.struct.dataclass
class JsonToolParams(base.EnvParams):
  """prompts: [N, P] int32 prompt ids (right-padded); prompt_lens: [N] int32; demo: [N, K, A]
  int32 expert turns; demo_lens: [N, K] int32; correct_reward: [] reward of a right answer."""

  prompts: Any = None
  prompt_lens: Any = None
  demo: Any = None
  demo_lens: Any = None
  correct_reward: float = 1.0


@flax.struct.dataclass
class JsonToolState(base.EnvState):
  """`EnvState` plus task: [] int32 index of the episode's task."""

  task: jax.Array


class JsonToolEnv(base.Environment):
  """Hermes JSON tool calls against Python tools, for real tokenizers (see module docstring)."""

  name = "json_tool"
  Params = JsonToolParams
  empty_idle_actions = True  # the rollout passes length 0 for rows whose turn did not end

  def __init__(self, tokenizer, tasks: Sequence[Task], tools: Sequence[Tool], *,
               system: str | None = DEFAULT_SYSTEM, prompt_len: int | None = None,
               reply_len: int = 128, max_turns: int = 4, max_calls_per_turn: int = 4,
               max_call_chars: int = MAX_CALL_CHARS, max_depth: int = MAX_JSON_DEPTH,
               template_kwargs: Mapping[str, Any] | None = None):
    """tokenizer: a `ChatTokenizer`; tasks: the prompts; tools: the Python tools (unique
    names); system: system prompt (None: none); prompt_len: static prompt budget (default: the
    longest prompt; a longer prompt is an error naming `prompt_len`); reply_len: static reply
    budget (tokens; it must hold the frame of `max_calls_per_turn + 2` results: the calls and
    two error notes); max_turns: agent turns per episode; max_call_chars: longest
    `<tool_call>` block parsed (characters; longer is an error reply); max_depth: deepest JSON
    nesting parsed (levels; deeper is an error reply); template_kwargs: extra variables for
    the chat template (e.g. `enable_thinking=False` for Qwen3)."""
    super().__init__(tokenizer)
    if not tasks:
      raise ValueError("JsonToolEnv needs at least one task")
    names = [t.name for t in tools]
    if len(set(names)) != len(names):
      raise ValueError(f"tool names must be unique, got {names}")
    for name, v in (("reply_len", reply_len), ("max_turns", max_turns),
                    ("max_calls_per_turn", max_calls_per_turn), ("max_call_chars", max_call_chars),
                    ("max_depth", max_depth)):
      if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
        raise ValueError(f"JsonToolEnv.{name} must be a positive integer, got {v!r}")
    self.tokenizer, self.tasks, self.tools = tokenizer, tuple(tasks), {t.name: t for t in tools}
    self.system, self._max_turns, self._reply_len = system, int(max_turns), int(reply_len)
    self.max_calls_per_turn = int(max_calls_per_turn)
    self.max_call_chars, self.max_depth = int(max_call_chars), int(max_depth)
    most = self.max_calls_per_turn + 2  # results of one turn: calls, unclosed, over the limit
    frame = len(tokenizer.tool_reply_ids([""] * most))
    if frame >= reply_len:
      raise ValueError(f"JsonToolEnv.reply_len={reply_len} cannot hold the tool reply frame "
                       f"for {most} results (max_calls_per_turn={max_calls_per_turn} calls and "
                       f"two error notes: {frame} tokens of template pieces) and any content")
    # The special and frame tokens each reply may hold: exactly those of its frame.
    self._protected = frozenset(tokenizer.protected_tokens())
    self._frame_tokens = {k: self._protected_counts(tokenizer.tool_reply_ids([""] * k))
                          for k in range(1, most + 1)}
    self._unwritable = self._fixed_reply("Error: the tool reply could not be written as plain "
                                         "text.")
    self._failed = self._fixed_reply("Error: the tool call could not be answered.")
    schemas = [t.schema for t in tools] or None
    prompts = [tokenizer.prompt_ids(t.question, system, schemas, **dict(template_kwargs or {}))
               for t in self.tasks]
    longest = max(len(p) for p in prompts)
    if prompt_len is None:
      prompt_len = longest
    elif longest > prompt_len:
      i = max(range(len(prompts)), key=lambda j: len(prompts[j]))
      raise ValueError(f"JsonToolEnv.prompt_len={prompt_len} is shorter than the prompt of task "
                       f"{i} ({self.tasks[i].id or self.tasks[i].question[:40]!r}): "
                       f"{longest} tokens")
    self._prompt_len = int(prompt_len)
    P = self._prompt_len
    prompt_arr = np.zeros((len(prompts), P), np.int32)
    for i, p in enumerate(prompts):
      prompt_arr[i, :len(p)] = p
    # Expert turns from the tasks' solutions: text + end-of-turn.
    turns = [[tokenizer.encode(s) + [tokenizer.eot_id] for s in t.solution[:max_turns]]
             for t in self.tasks]
    A = max([1] + [len(x) for ts in turns for x in ts])
    demo = np.zeros((len(prompts), max_turns, A), np.int32)
    demo_lens = np.ones((len(prompts), max_turns), np.int32)
    demo[:, :, 0] = tokenizer.eot_id
    for i, ts in enumerate(turns):
      for k, x in enumerate(ts):
        demo[i, k, :len(x)] = x
        demo_lens[i, k] = len(x)
    self._action_len = A
    self._default = JsonToolParams(prompts=jnp.asarray(prompt_arr),
                                   prompt_lens=jnp.asarray([len(p) for p in prompts], jnp.int32),
                                   demo=jnp.asarray(demo), demo_lens=jnp.asarray(demo_lens))

  def _protected_counts(self, ids: Sequence[int]) -> collections.Counter:
    return collections.Counter(i for i in ids if i in self._protected)

  def _fixed_reply(self, message: str) -> list[int]:
    """Reply ids of a fixed error message (checked: plain, within `reply_len`)."""
    ids, _ = self.tokenizer.fit_reply("tool", [message], self.reply_len)
    if self._protected_counts(ids) != self._frame_tokens[1]:
      raise ValueError(f"the tokenizer writes {message!r} with special tokens")
    return ids

  # --- static description -----------------------------------------------------------------
  def symbols(self):
    return ()

  @property
  def default_params(self):
    return self._default

  @property
  def prompt_len(self):
    return self._prompt_len

  @property
  def reply_len(self):
    return self._reply_len

  @property
  def action_len(self):
    return self._action_len

  @property
  def max_turns(self):
    return self._max_turns

  @property
  def num_tasks(self) -> int:
    return len(self.tasks)

  # --- dynamics -----------------------------------------------------------------------------
  def reset_env(self, key, params):
    n = params.prompts.shape[0]
    task = jax.random.randint(key, (), 0, n, jnp.int32)
    state = JsonToolState(task=task, **base.initial_counters())
    obs = base.Observation(tokens=params.prompts[task], length=params.prompt_lens[task],
                           role=jnp.int32(base.ROLE_USER))
    return state, obs

  def expert(self, key, state, params):
    del key
    k = jnp.clip(state.turn, 0, self.max_turns - 1)
    return base.Action(tokens=params.demo[state.task, k], length=params.demo_lens[state.task, k])

  def step_env(self, key, state, action, params):
    del key
    R = self.reply_len
    live = (action.length > 0) & ~state.done
    reply, reply_n, answered, success, calls, errors = jax.pure_callback(
        self._host,
        (jax.ShapeDtypeStruct((R,), jnp.int32), jax.ShapeDtypeStruct((), jnp.int32),
         jax.ShapeDtypeStruct((), jnp.bool_), jax.ShapeDtypeStruct((), jnp.bool_),
         jax.ShapeDtypeStruct((), jnp.int32), jax.ShapeDtypeStruct((), jnp.int32)),
        live, state.task, jnp.asarray(action.tokens, jnp.int32), action.length,
        vmap_method="broadcast_all")
    reward = (jnp.where(success, params.correct_reward, 0.0)
              - params.format_penalty * errors.astype(jnp.float32))
    state = state.replace(success=state.success | success,
                          num_tool_calls=state.num_tool_calls + calls,
                          format_errors=state.format_errors + errors)
    role = jnp.where(answered, base.ROLE_NONE, base.ROLE_TOOL).astype(jnp.int32)
    obs = base.Observation(tokens=reply, length=reply_n, role=role)
    return state, obs, reward.astype(jnp.float32), answered

  # --- the host side ------------------------------------------------------------------------
  def respond(self, text: str, task: Task) -> tuple[list[str] | None, bool, int, int]:
    """Python view of one turn: (tool results or None for a final answer, success, valid
    calls, errors). Results are plain text (`ChatTokenizer.plain`), one per call or error."""
    opens = text.count("<tool_call>")
    if not opens:
      return None, is_correct(text, task), 0, 0
    results, calls, errors = [], 0, 0
    blocks = _CALL.findall(text)
    if len(blocks) < opens:
      results.append("Error: a <tool_call> is not closed by </tool_call>.")
      errors += 1
    for i, block in enumerate(blocks):
      if i >= self.max_calls_per_turn:
        results.append(f"Error: at most {self.max_calls_per_turn} tool calls per turn.")
        errors += 1
        break
      result, ok = self.call(block)
      results.append(result)
      calls += ok
      errors += not ok
    return [self.tokenizer.plain(r) for r in results], False, calls, errors

  def call(self, block: str) -> tuple[str, bool]:
    """Run one `<tool_call>` body: (result text, ok). Never raises (only `KeyboardInterrupt`
    passes): every failure is an `Error: ...` text with ok False. The text may quote the
    model's words (cut short); `respond` makes it plain text."""
    try:
      return self._call(block)
    except (Exception, SystemExit) as e:
      return f"Error: the tool call could not be handled ({type(e).__name__}).", False

  def _call(self, block: str) -> tuple[str, bool]:
    if len(block) > self.max_call_chars:
      return f"Error: the tool call is longer than {self.max_call_chars} characters.", False
    try:
      call = parse_json(block, self.max_depth)
    except ValueError as e:
      return f"Error: the tool call is not valid JSON ({e}).", False
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
      return 'Error: a tool call must be {"name": ..., "arguments": {...}}.', False
    tool = self.tools.get(call["name"])
    if tool is None:
      return (f"Error: unknown tool {_quote(call['name'])}; available: "
              f"{', '.join(sorted(self.tools))}."), False
    args = call.get("arguments", {})
    if isinstance(args, str):  # some models write the arguments as a JSON string
      try:
        args = parse_json(args, self.max_depth)
      except ValueError:
        pass
    if not isinstance(args, dict):
      return "Error: arguments must be a JSON object.", False
    problems = validate_arguments(args, tool.parameters)
    if problems:
      return f"Error: invalid arguments for {tool.name}: {'; '.join(problems)}.", False
    try:
      value = tool.fn(**args)
    except (Exception, SystemExit) as e:  # a broken call is an error reply, not a crashed rollout
      return f"Error: {tool.name} failed: {type(e).__name__}: {_cut(str(e))}", False
    try:
      return result_text(value), True
    except ValueError as e:
      return f"Error: {tool.name} returned {e}.", False

  def _host(self, live, task, tokens, length):
    """numpy in, numpy out; leading batch dims are whatever vmap gave us."""
    live, task, length = np.asarray(live), np.asarray(task), np.asarray(length)
    tokens = np.asarray(tokens)
    batch = live.shape
    tokens = np.broadcast_to(tokens, batch + tokens.shape[-1:])
    task, length = np.broadcast_to(task, batch), np.broadcast_to(length, batch)
    R = self.reply_len
    reply = np.zeros(batch + (R,), np.int32)
    reply_n = np.zeros(batch, np.int32)
    answered = np.zeros(batch, bool)
    success = np.zeros(batch, bool)
    calls = np.zeros(batch, np.int32)
    errors = np.zeros(batch, np.int32)
    for idx in zip(*np.nonzero(live)) if live.ndim else ([()] if live else []):
      try:
        ids, done, ok, n_calls, n_errors = self._answer(tokens[idx], int(length[idx]),
                                                        int(task[idx]))
      except (Exception, SystemExit):  # the last guard: a row's failure is its error reply
        ids, done, ok, n_calls, n_errors = self._failed, False, False, 0, 1
      if done:
        answered[idx], success[idx] = True, ok
        continue
      reply[idx][: len(ids)] = ids
      reply_n[idx] = len(ids)
      calls[idx], errors[idx] = n_calls, n_errors
    return reply, reply_n, answered, success, calls, errors

  def _answer(self, tokens: np.ndarray, length: int, task: int
              ) -> tuple[list[int], bool, bool, int, int]:
    """One finished turn (tokens [A], its length) -> (reply ids, answered, success, valid
    calls, errors). A reply whose ids hold special tokens its frame does not is replaced by an
    error reply (one more error)."""
    ids = tokens[:length].tolist()
    if ids and ids[-1] == self.tokenizer.eot_id:
      ids = ids[:-1]
    results, ok, n_calls, n_errors = self.respond(self.tokenizer.decode(ids), self.tasks[task])
    if results is None:
      return [], True, ok, 0, 0
    ids, _ = self.tokenizer.fit_reply("tool", results, self.reply_len)
    if self._protected_counts(ids) != self._frame_tokens[len(results)]:
      ids, n_errors = self._unwritable, n_errors + 1
    return ids, False, False, n_calls, n_errors


# --- pure-JAX environments through a real tokenizer ----------------------------------------

class TokenizedEnv(wrappers.Wrapper):
  """A symbol-vocabulary environment (calculator, search, clarify, ...) spoken in a real
  tokenizer's ids, so the pure-JAX environments can talk to a real model.

  * The inner environment's prompt and replies (symbol ids) are written as real tokens by a
    gather through `ChatTokenizer.symbol_table`, in JAX: chat-structure symbols become the
    template pieces (`<user>` a role header, `<eot>` the end-of-turn and separator, ...), every
    other symbol its text after a space. A reply starts with the layout's separator (the text
    after end-of-turn the model never emits), so the stream follows the chat template.
  * The policy's turn (real tokens, ending with the end-of-turn token) is decoded on the host
    (`jax.pure_callback`, once per finished turn), split on whitespace into symbols (a word
    the vocabulary lacks becomes `<unk>`), closed with `<eot>`, and stepped by the inner
    environment in JAX: rewards, counters, `info` and errors are the inner environment's.
  * `expert` writes the inner expert's symbol turn as tokens (its `<eot>` is the end-of-turn
    token), so demonstrations and expert forcing work unchanged.

  Static budgets are the inner ones times the longest symbol in tokens (an upper bound).
  A `Wrapper`: the vocabulary (the tokenizer), the budgets, `name`, `empty_idle_actions`, the
  reflection and the hooks that translate are its own; params, `max_turns`, `info` are `env`'s.
  """

  empty_idle_actions = True  # the rollout passes length 0 for rows whose turn did not end

  def __init__(self, env: base.Environment, tokenizer):
    super().__init__(env)
    self.vocab = self.tokenizer = tokenizer
    reply_table, reply_lens = tokenizer.symbol_table(env.vocab, eot_sep=True)
    turn_table, turn_lens = tokenizer.symbol_table(env.vocab, eot_sep=False)
    self._reply_table, self._reply_lens = jnp.asarray(reply_table), jnp.asarray(reply_lens)
    self._turn_table, self._turn_lens = jnp.asarray(turn_table), jnp.asarray(turn_lens)
    self._sep = np.asarray(tokenizer.encode(tokenizer.layout.sep), np.int32)
    self._prompt_len = env.prompt_len * reply_table.shape[1]
    self._reply_len = len(self._sep) + env.reply_len * reply_table.shape[1]
    self._action_len = env.action_len * turn_table.shape[1]
    self._symbols = env.vocab.symbols
    self._unk, self._eot = env.vocab.id(V.UNK), env.vocab.id(V.EOT)

  @property
  def name(self) -> str:
    return f"tokenized({self.env.name})"

  def symbols(self):
    return ()

  @property
  def prompt_len(self):
    return self._prompt_len

  @property
  def reply_len(self):
    return self._reply_len

  @property
  def action_len(self):
    return self._action_len

  # Reflections: the inner environment's symbols written as text, each symbol at most one
  # reply-table row wide (so the lengths are upper bounds).
  @property
  def reflection_len(self) -> int:
    """The inner environment's templated reflection (0: none), in tokens."""
    return self.env.reflection_len * self._reply_table.shape[1]

  def reflection(self, state):
    """The inner environment's templated reflection as text tokens (`mtrl_jax.reflexion`):
    (tokens [reflection_len] int32 padded, length [])."""
    return self._as_text(self.env.reflection(state), self.reflection_len)

  @property
  def action_reflection_len(self) -> int:
    """The inner environment's `action_reflection`, in tokens."""
    return self.env.action_reflection_len * self._reply_table.shape[1]

  def action_reflection(self, state):
    """The inner environment's reflection naming the action to change, as text tokens:
    (tokens [action_reflection_len] int32 padded, length [])."""
    return self._as_text(self.env.action_reflection(state), self.action_reflection_len)

  def _as_text(self, symbols_and_length, size: int) -> tuple[jax.Array, jax.Array]:
    symbols, n = symbols_and_length
    return self.translate(symbols, n, self._reply_table, self._reply_lens, size)

  @staticmethod
  def translate(ids, length, table, lens, size: int, prefix=()) -> tuple[jax.Array, jax.Array]:
    """Symbol ids [N] (first `length` real) -> (token ids [size] int32, count []): `prefix`
    tokens, then each symbol's row of `table` [S, L] (its first `lens[s]` entries)."""
    ids = jnp.asarray(ids, jnp.int32)
    n, width = ids.shape[0], table.shape[1]
    count = jnp.where(jnp.arange(n) < length, lens[ids], 0)
    offset = jnp.cumsum(count) - count + len(prefix)
    pos = offset[:, None] + jnp.arange(width)[None, :]
    pos = jnp.where(jnp.arange(width)[None, :] < count[:, None], pos, size)
    out = jnp.zeros((size,), jnp.int32).at[pos].set(table[ids], mode="drop")
    if len(prefix):
      out = out.at[: len(prefix)].set(jnp.asarray(prefix, jnp.int32))
    return out, jnp.minimum(len(prefix) + jnp.sum(count), size).astype(jnp.int32)

  def reset_env(self, key, params):
    state, obs = self.env.reset_env(key, params)
    tokens, n = self.translate(obs.tokens, obs.length, self._reply_table, self._reply_lens,
                               self.prompt_len)
    return state, base.Observation(tokens=tokens, length=n, role=obs.role)

  def expert(self, key, state, params):
    action = self.env.expert(key, state, params)
    tokens, n = self.translate(action.tokens, action.length, self._turn_table, self._turn_lens,
                               self.action_len)
    return base.Action(tokens=tokens, length=n)

  def step_env(self, key, state, action, params):
    width = action.tokens.shape[-1] + 1
    symbols, n = jax.pure_callback(
        self._host, (jax.ShapeDtypeStruct((width,), jnp.int32),
                     jax.ShapeDtypeStruct((), jnp.int32)),
        jnp.asarray(action.tokens, jnp.int32), action.length, vmap_method="broadcast_all")
    state, obs, reward, done = self.env.step_env(key, state, base.Action(symbols, n), params)
    tokens, count = self.translate(obs.tokens, obs.length, self._reply_table, self._reply_lens,
                                   self.reply_len, self._sep)
    count = jnp.where(obs.length > 0, count, 0)
    obs = base.Observation(tokens=tokens, length=count, role=obs.role)
    return state, obs, reward, done

  def _host(self, tokens, length):
    """numpy in, numpy out; leading batch dims are whatever vmap gave us."""
    tokens, length = np.asarray(tokens), np.asarray(length)
    batch = length.shape
    tokens = np.broadcast_to(tokens, batch + tokens.shape[-1:])
    width = tokens.shape[-1] + 1
    symbols = np.zeros(batch + (width,), np.int32)
    count = np.zeros(batch, np.int32)
    ids_of = {s: i for i, s in enumerate(self._symbols)}
    eot = self.tokenizer.eot_id
    for idx in zip(*np.nonzero(length > 0)) if length.ndim else ([()] if length > 0 else []):
      ids = tokens[idx][: int(length[idx])].tolist()
      if ids and ids[-1] == eot:
        ids = ids[:-1]
      words = self.tokenizer.decode(ids).split()[: width - 1]
      row = [ids_of.get(w, self._unk) for w in words] + [self._eot]
      symbols[idx][: len(row)] = row
      count[idx] = len(row)
    return symbols, count


TOOL_FACTORIES = {"calculator": lambda corpus: calculator_tool(),
                  "search": lambda corpus: search_tool(corpus)}


def make_tools(names: Sequence[str], corpus: Sequence[Mapping[str, str]] = ()) -> list[Tool]:
  """Built-in tools by name ("calculator", "search"); `search` needs a non-empty corpus."""
  unknown = [n for n in names if n not in TOOL_FACTORIES]
  if unknown:
    raise ValueError(f"unknown tools {unknown}; built-in tools: {sorted(TOOL_FACTORIES)}")
  if "search" in names and not corpus:
    raise ValueError("the search tool needs a corpus (the prompt dataset has none)")
  return [TOOL_FACTORIES[n](corpus) for n in names]


CONFIG_KEYS = ("name", "checkpoint", "data_dir", "dataset", "tasks", "corpus", "split",
               "tools", "system", "layout", "prompt_len", "reply_len", "max_turns",
               "max_calls_per_turn", "noise", "format_penalty", "correct_reward")


def from_config(section: Mapping[str, Any]) -> tuple[JsonToolEnv, JsonToolParams]:
  """(env, params) from a `config.env` section with `name="json_tool"`.

  Keys: checkpoint (directory with tokenizer.json, normally the model's), data_dir + dataset
  (a TFDS prompt dataset), or tasks (+ corpus) JSONL files built into `data_dir` on first use;
  split; tools (names, see `make_tools`: a list or "calculator,search"); system; layout ("auto" | "chatml" | "llama3");
  prompt_len (0 = longest prompt); reply_len; max_turns; max_calls_per_turn; noise,
  format_penalty, correct_reward (EnvParams). Unknown keys are errors that list these.
  """
  from mtrl_jax.data import prompts as prompt_data
  from mtrl_jax.models import chat

  kw = dict(section)
  unknown = sorted(set(kw) - set(CONFIG_KEYS))
  if unknown:
    raise ValueError(f"unknown keys {unknown} for environment 'json_tool'; accepted: "
                     f"{list(CONFIG_KEYS)}")
  if not kw.get("checkpoint"):
    raise ValueError("env.checkpoint (the directory with tokenizer.json; it follows "
                     "config.model.checkpoint) is not set")
  tokenizer = chat.ChatTokenizer.from_dir(kw["checkpoint"], layout=kw.get("layout", "auto"))
  data_dir, dataset = kw.get("data_dir", ""), kw.get("dataset", "")
  if kw.get("tasks"):
    if not data_dir:
      raise ValueError("env.tasks needs env.data_dir (where the TFDS dataset is written)")
    builder = prompt_data.build_prompt_dataset(data_dir, dataset or None, kw["tasks"],
                                               corpus=kw.get("corpus") or None)
    dataset = builder.builder_config.name
  if not dataset:
    raise ValueError("set env.dataset (a prompt dataset in env.data_dir) or env.tasks (a JSONL "
                     "file of tasks)")
  tasks, corpus, _ = prompt_data.load_prompt_dataset(data_dir, dataset, kw.get("split", "train"))
  tools = kw.get("tools", "calculator")
  tools = [t.strip() for t in tools.split(",") if t.strip()] if isinstance(tools, str) else tools
  tools = make_tools(list(tools), corpus)
  env = JsonToolEnv(tokenizer, tasks, tools, system=kw.get("system", DEFAULT_SYSTEM) or None,
                    prompt_len=kw.get("prompt_len") or None, reply_len=kw.get("reply_len", 128),
                    max_turns=kw.get("max_turns", 4),
                    max_calls_per_turn=kw.get("max_calls_per_turn", 4))
  params = env.default_params.replace(
      **{k: kw[k] for k in ("noise", "format_penalty", "correct_reward") if k in kw})
  return env, params
