"""Fix: a stateful "fix the program" task with delayed reward (after RL on SWE-bench agents).

Task. The environment holds a small program for a one-register machine and a hidden test
suite. The program has `num_lines` = L lines (default 4), each `op d` with `op` one of
`add sub mul` and `d` a digit; it runs on an accumulator that starts at the test's input
x in 0..9, line by line, in arithmetic mod 10 (`add 3`: acc <- (acc + 3) % 10). A reference
program is drawn every episode (add/sub operands in {1..4, 6..9}, mul operands in {3, 7, 9}:
every line is a bijection of 0..9, so any change of one line changes every output), and
`num_bugs` distinct lines are corrupted. The hidden tests are `num_tests` distinct inputs with
the reference's outputs. (Several bugs can cancel out on every test; such draws are rejected -
the first of 4 candidate episodes that fails a test is kept - so a fresh episode fails a test
except with probability ~1e-5.) Bug kinds (`bug_kind`, static): `sign` (default) - an `add` line
became `sub` or vice versa; `operand` - a line's operand changed to another valid one;
`mixed` - either, half and half (mul lines only get operand bugs).

Tools (the agent sees the program only through them; its edits change what they show)::

    <call> view </call>             -> 1 add 3 2 sub 7 3 mul 3 4 add 1      (every line)
    <call> view 2 </call>           -> 2 sub 7
    <call> run </call>              -> pass                                 (all tests pass)
                                       fail n line l got a want e           (report_line)
                                       fail n in x got a want e             (not report_line)
    <call> edit 2 add 7 </call>     -> ok 2 add 7
    <call> submit </call>           -> (episode over)

`run` executes the hidden tests in the interpreter. `n` is the number of failing tests; for
the first failing test (input x), with `params.report_line` (default True) it names the first
line l whose accumulator differs from the reference's and both values after that line (`a`
got, `e` wanted: the debugger's view of a failing assertion); without it, the final output
got vs wanted. Line numbers are 1-based single digits (so L <= 9).

Tokens (L = 4, one sign bug on line 2)::

    prompt : <bos> <user> fix program 4 lines <eot> <assistant>
    turn 0 : <call> run </call> <eot>
    reply 0: <tool> fail 3 line 2 got 1 want 5 <eot> <assistant>
    turn 1 : <call> view 2 </call> <eot>
    reply 1: <tool> 2 sub 2 <eot> <assistant>
    turn 2 : <call> edit 2 add 2 </call> <eot>
    reply 2: <tool> ok 2 add 2 <eot> <assistant>
    turn 3 : <call> run </call> <eot>
    reply 3: <tool> pass <eot> <assistant>
    turn 4 : <call> submit </call> <eot>                                    reward 1, done

Errors (replies `<tool> <error> code <eot> <assistant>`, each counted in `format_errors`, never
raised): `unknown-tool` (not `view run edit submit`), `bad-argument` (wrong arity, a line
outside 1..L, an operation other than `add sub mul`, an operand that is not a digit), grammar
errors (`format`, `unclosed`); `<ask>` and `<answer>` are `format` (this task only takes tool
calls; `submit` ends it). Calls naming a tool count in `num_tool_calls`.

Reward. Delayed and binary: at `submit`, 1 if the current program passes every hidden test,
else 0; `submit` always ends the episode. Optional turn-based length penalty (the modification
that helped in the SWE-bench RL work), added on the episode's last turn - at `submit` or when
the turn limit truncates it - and weighted by `params.turn_penalty` (0 = off, 1 = on)::

    penalty(n) = -clip((n - penalty_start) / (max_turns - penalty_start), 0, 1)

with n the agent turns used: 0 up to `penalty_start` turns (default: the 3 * num_bugs + 2 turns
an efficient agent needs), then linear down to -1 at `max_turns`. An episode that ends
because the *rollout* runs out of context (or a rollout `max_turns` below the environment's)
never reaches the environment's last turn and gets no penalty. Plus `-format_penalty` per
error reply. Truncated (overlong) episodes are ordinary trajectories with reward 0 (or the
penalty): nothing here filters them out of training.

Expert (privileged: it knows the reference program, but each action is the one the
observations justify). It runs the tests whenever the program changed since the last run,
submits once a run passed, otherwise views the line `run` reports and then edits it to the
reference instruction: run, view, edit per bug, then run, submit (3 * num_bugs + 2 turns).
With probability `params.noise` per turn it instead makes one mistake, uniformly among:
*premature submit*; *wrong edit* - the reported line gets a random wrong instruction (a later
run shows it, and it repairs); *extra run* - runs again (a repeated action when it just ran);
*unclosed* - its intended call without `</call>` (error reply, it retries).

Habit (`params.habit_p`, per episode): the expert never runs the tests. It views the whole
program, then edits `num_bugs` lines, each drawn uniformly (without a run nothing it sees names
the faulty line), to their reference instruction (a no-op edit when the line was right), and
submits unverified: `view`, edit per bug, `submit` (`num_bugs` + 2 turns, `runs` 0). It
succeeds when its guesses cover the bugs: 1 / num_lines with one bug (1/4 at the defaults,
0.25 measured), 2 / num_lines**2 with two (0.13 measured at L = 4). With `noise` its mistakes
are the expert's, with *extra run* replaced by an extra view (it never runs).

Info extras: `tests_passed` (hidden tests the current program passes), `bugs_left` (lines that
differ from the reference), `runs`, `views`, `edits`, `noop_edits` (edits that write the
instruction already there - re-applying a fix that did not work), `loops` (turns whose action
repeats the previous turn's exactly), `submitted`.

Knobs. Constructor (static): `num_lines`, `num_bugs`, `num_tests`, `bug_kind`, `max_turns`
(default 3 * num_bugs + 4). Params (dynamic): `noise`, `habit_p`, `format_penalty`,
`report_line`, `turn_penalty`, `penalty_start`.
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

OPS: tuple[str, ...] = ("add", "sub", "mul")
OP_ADD, OP_SUB, OP_MUL = 0, 1, 2
TOOLS: tuple[str, ...] = ("view", "run", "edit", "submit")
TOOL_VIEW, TOOL_RUN, TOOL_EDIT, TOOL_SUBMIT = 0, 1, 2, 3
BUG_KINDS: tuple[str, ...] = ("sign", "operand", "mixed")
ADD_OPERANDS = np.array([1, 2, 3, 4, 6, 7, 8, 9], np.int32)  # 2d != 0 mod 10: add d != sub d
MUL_OPERANDS = np.array([3, 7, 9], np.int32)                 # units mod 10 other than 1
_WORDS = ("fix", "program", "lines", "ok", "pass", "fail", "line", "in", "got", "want")


@flax.struct.dataclass
class FixParams(base.EnvParams):
  """`EnvParams` plus:

  report_line: [] bool, `run` names the first diverging line (and the accumulator there).
  turn_penalty: [] float weight of the turn-based length penalty (0 = off, 1 = on).
  penalty_start: [] int turns used before the penalty starts (see the module docstring).
  """

  report_line: bool = True
  turn_penalty: float = 0.0
  penalty_start: int = 5


@flax.struct.dataclass
class FixState(base.EnvState):
  """ops, args: [L] int32 the current program (edited by the agent); ref_ops, ref_args: [L]
  int32 the reference; inputs: [NT] int32 hidden test inputs; stale: [] bool the program
  changed (or was never run) since the last `run`; viewed: [L] bool lines shown since the last
  `run`; runs, views, edits, noop_edits, loops: [] int32 counters; prev_hash: [] uint32 hash
  of the last action; submitted: [] bool."""

  ops: jax.Array
  args: jax.Array
  ref_ops: jax.Array
  ref_args: jax.Array
  inputs: jax.Array
  stale: jax.Array
  viewed: jax.Array
  runs: jax.Array
  views: jax.Array
  edits: jax.Array
  noop_edits: jax.Array
  loops: jax.Array
  prev_hash: jax.Array
  submitted: jax.Array


def turn_penalty(turns: jax.Array, start, limit) -> jax.Array:
  """The turn-based length penalty: 0 for `turns <= start`, linear to -1 at `turns = limit`.

  turns: [...] int agent turns used; start: [] int threshold; limit: [] int the turn limit
  (`max_turns`). Returns [...] float32 in [-1, 0] (0 everywhere when `start >= limit`).
  """
  turns = jnp.asarray(turns, jnp.float32)
  start = jnp.asarray(start, jnp.float32)
  span = jnp.maximum(jnp.asarray(limit, jnp.float32) - start, 1.0)
  return -jnp.clip((turns - start) / span, 0.0, 1.0)


def execute(ops: jax.Array, args: jax.Array, inputs: jax.Array) -> jax.Array:
  """Run a program on inputs: the accumulator after every line.

  ops, args: [L] int32 (`OP_*`, digit); inputs: [NT] int32 in 0..9. Returns [NT, L] int32 in
  0..9 (column L - 1 is the output). Arithmetic mod 10.
  """
  acc = jnp.asarray(inputs, jnp.int32)
  out = []
  for i in range(ops.shape[-1]):
    d = args[i]
    acc = jnp.where(ops[i] == OP_ADD, acc + d, jnp.where(ops[i] == OP_SUB, acc - d, acc * d))
    acc = jnp.mod(acc, 10)
    out.append(acc)
  return jnp.stack(out, axis=-1).astype(jnp.int32)


def _action_hash(tokens: jax.Array, length: jax.Array) -> jax.Array:
  """[] uint32 hash of `tokens[:length]` (and the length), for detecting repeated actions."""
  size = tokens.shape[-1]
  mult = jnp.asarray(np.array([pow(1_000_003, i + 1, 2**32) for i in range(size)], np.uint32))
  n = jnp.clip(jnp.asarray(length, jnp.int32), 0, size)
  terms = jnp.where(jnp.arange(size) < n, jnp.asarray(tokens, jnp.int32).astype(jnp.uint32) * mult,
                    jnp.uint32(0))
  return (jnp.sum(terms, dtype=jnp.uint32) + n.astype(jnp.uint32) * jnp.uint32(2654435761))


class Fix(base.Environment):
  """Fix a buggy program with view/run/edit/submit tools. See the module docstring."""

  name = "fix"
  Params = FixParams

  def __init__(self, num_lines: int = 4, num_bugs: int = 1, num_tests: int = 3,
               bug_kind: str = "sign", max_turns: int | None = None,
               vocab: V.Vocab | None = None):
    if not 2 <= num_lines <= 9:
      raise ValueError(f"num_lines must be in [2, 9] (line numbers are single digits), got "
                       f"{num_lines}")
    if not 1 <= num_bugs <= num_lines:
      raise ValueError(f"num_bugs must be in [1, num_lines={num_lines}], got {num_bugs}")
    if not 3 <= num_tests <= 9:
      raise ValueError(f"num_tests must be in [3, 9] (three distinct inputs catch every "
                       f"single-line bug; counts are single digits), got {num_tests}")
    if bug_kind not in BUG_KINDS:
      raise ValueError(f"bug_kind must be one of {BUG_KINDS}, got {bug_kind!r}")
    need = 3 * num_bugs + 2
    max_turns = need + 2 if max_turns is None else max_turns
    if max_turns < need:
      raise ValueError(f"max_turns={max_turns} must be >= 3 * num_bugs + 2 = {need} (run, view, "
                       f"edit per bug, then run and submit)")
    self.num_lines, self.num_bugs, self.num_tests = num_lines, num_bugs, num_tests
    self.bug_kind, self._max_turns = bug_kind, max_turns
    self.expert_turns = need
    super().__init__(vocab)
    voc = self.vocab
    self._digit_of = T.table(voc, V.DIGITS)
    self._op_of = T.table(voc, OPS)
    self._tool_of = T.table(voc, TOOLS)
    self._digit_ids = np.asarray(voc.ids(V.DIGITS), np.int32)
    self._op_ids = np.asarray(voc.ids(OPS), np.int32)
    self._tool_ids = np.asarray(voc.ids(TOOLS), np.int32)

  # --- static description ---------------------------------------------------------------
  def symbols(self) -> Sequence[str]:
    return (*_WORDS, *TOOLS, *OPS, *V.DIGITS, *T.ERROR_CODES)

  @property
  def default_params(self) -> FixParams:
    return FixParams(penalty_start=self.expert_turns)

  @property
  def prompt_len(self) -> int:
    return 8  # <bos> <user> fix program L lines <eot> <assistant>

  @property
  def reply_len(self) -> int:
    # view of every line (3 per line) | fail n line l got a want e (8) | ok l op d (4)
    return max(3 * self.num_lines, 8) + 3

  @property
  def action_len(self) -> int:
    return 7  # <call> edit l op d </call> <eot>

  @property
  def max_turns(self) -> int:
    return self._max_turns

  # --- dynamics ---------------------------------------------------------------------------
  def _draw(self, bits: jax.Array):
    """One candidate episode from [6L + 10] uint32 words: (ops, args, ref_ops, ref_args,
    inputs), [L] / [NT] int32."""
    L, NB, NT = self.num_lines, self.num_bugs, self.num_tests
    b_op, b_arg, b_line, b_in, b_kind, b_new = jnp.split(bits, np.cumsum([L, L, L, 10, L]))
    bug = jnp.zeros((L,), bool).at[jnp.argsort(b_line)[:NB]].set(True)  # NB distinct lines
    ops = T.below(b_op, 3)
    if self.bug_kind == "sign":  # a sign bug needs an add/sub line
      ops = jnp.where(bug, T.below(b_op, 2), ops)
    args = jnp.where(ops == OP_MUL, jnp.asarray(MUL_OPERANDS)[T.below(b_arg, 3)],
                     jnp.asarray(ADD_OPERANDS)[T.below(b_arg, 8)])
    if self.bug_kind == "sign":
      sign = jnp.ones((L,), bool)
    elif self.bug_kind == "operand":
      sign = jnp.zeros((L,), bool)
    else:
      sign = T.below(b_kind, 2) == 0
    sign = sign & (ops != OP_MUL)
    # Operand bugs: another operand of the same class (index shifted by 1..n-1).
    add_idx = jnp.argmax(jnp.asarray(ADD_OPERANDS)[None, :] == args[:, None], axis=1)
    mul_idx = jnp.argmax(jnp.asarray(MUL_OPERANDS)[None, :] == args[:, None], axis=1)
    new_add = jnp.asarray(ADD_OPERANDS)[(add_idx + 1 + T.below(b_new[:L], 7)) % 8]
    new_mul = jnp.asarray(MUL_OPERANDS)[(mul_idx + 1 + T.below(b_new[L:], 2)) % 3]
    bug_ops = jnp.where(bug & sign, 1 - ops, ops)
    bug_args = jnp.where(bug & ~sign, jnp.where(ops == OP_MUL, new_mul, new_add), args)
    inputs = jnp.argsort(b_in)[:NT].astype(jnp.int32)  # NT distinct inputs in 0..9
    return tuple(x.astype(jnp.int32) for x in (bug_ops, bug_args, ops, args, inputs))

  def reset_env(self, key, params):
    L = self.num_lines
    # Several bugs can cancel on every hidden test (~5% of two-bug episodes): draw a few
    # candidate episodes and keep the first whose program fails a test (one bug always does).
    C = 1 if self.num_bugs == 1 else 4
    bits = T.random_bits(key, C * (6 * L + 10)).reshape(C, 6 * L + 10)
    ops, args, ref_ops, ref_args, inputs = jax.vmap(self._draw)(bits)
    fails = jax.vmap(lambda o, a, ro, ra, x: jnp.any(
        execute(o, a, x)[:, -1] != execute(ro, ra, x)[:, -1]))(ops, args, ref_ops, ref_args,
                                                             inputs)
    c = jnp.argmax(fails)
    ops, args, ref_ops, ref_args, inputs = (x[c] for x in (ops, args, ref_ops, ref_args, inputs))
    state = FixState(
        **base.initial_counters(), ops=ops, args=args, ref_ops=ref_ops, ref_args=ref_args,
        inputs=inputs, stale=jnp.bool_(True), viewed=jnp.zeros((L,), bool), runs=jnp.int32(0),
        views=jnp.int32(0), edits=jnp.int32(0), noop_edits=jnp.int32(0), loops=jnp.int32(0),
        prev_hash=jnp.uint32(0),
        submitted=jnp.bool_(False))
    content = jnp.asarray([self.id("fix"), self.id("program"), self._digit_ids[L],
                           self.id("lines")], jnp.int32)
    return state, self.make_prompt(content, jnp.int32(4))

  def diagnose(self, state: FixState):
    """What `run` finds. Returns (n_fail, test input x, line l (0-based), got, want, final got,
    final want), all [] int32: n_fail failing tests; for the first failing test, the first line
    whose accumulator differs from the reference's and both values there (0s if all pass)."""
    cur = execute(state.ops, state.args, state.inputs)           # [NT, L]
    ref = execute(state.ref_ops, state.ref_args, state.inputs)
    fails = cur[:, -1] != ref[:, -1]
    n_fail = jnp.sum(fails).astype(jnp.int32)
    t = jnp.argmax(fails)
    line = jnp.argmax(cur[t] != ref[t]).astype(jnp.int32)
    return (n_fail, state.inputs[t], line, cur[t, line], ref[t, line], cur[t, -1], ref[t, -1])

  def tests_passed(self, state: FixState) -> jax.Array:
    """[] int32 hidden tests the current program passes."""
    cur = execute(state.ops, state.args, state.inputs)[:, -1]
    ref = execute(state.ref_ops, state.ref_args, state.inputs)[:, -1]
    return jnp.sum(cur == ref).astype(jnp.int32)

  def listing(self, ops: jax.Array, args: jax.Array, line: jax.Array) -> jax.Array:
    """Tokens `l op d` of one line (0-based index, shown 1-based): [3] int32."""
    i = jnp.clip(line, 0, self.num_lines - 1)
    digit = jnp.asarray(self._digit_ids)
    return jnp.stack([digit[i + 1], jnp.asarray(self._op_ids)[jnp.clip(ops[i], 0, 2)],
                      digit[jnp.clip(args[i], 0, 9)]]).astype(jnp.int32)

  def step_env(self, key, state, action, params):
    L = self.num_lines
    tokens = jnp.asarray(action.tokens, jnp.int32)
    size = tokens.shape[-1]
    at = lambda i: tokens[jnp.clip(i, 0, size - 1)]
    t = T.parse_turn(tokens, action.length, self.vocab)
    is_call = t.kind == T.KIND_CALL
    tool = jnp.where(is_call & (t.start < t.end), T.lookup(self._tool_of, at(t.start)), -1)
    nargs = t.end - t.start - 1
    a0, a1, a2 = (at(t.start + 1 + j) for j in range(3))
    line = T.lookup(self._digit_of, a0) - 1            # 0-based; valid in [0, L)
    line_ok = (line >= 0) & (line < L)
    new_op, new_arg = T.lookup(self._op_of, a1), T.lookup(self._digit_of, a2)
    is_view, is_run = tool == TOOL_VIEW, tool == TOOL_RUN
    is_edit, is_submit = tool == TOOL_EDIT, tool == TOOL_SUBMIT
    args_ok = jnp.select(
        [is_view, is_edit, is_run | is_submit],
        [(nargs == 0) | ((nargs == 1) & line_ok),
         (nargs == 3) & line_ok & (new_op >= 0) & (new_arg >= 0),
         nargs == 0], False)
    known = tool >= 0
    error = jnp.select(
        [t.kind == T.KIND_INVALID, ~is_call, ~known, ~args_ok],
        [t.error, T.E_FORMAT, T.E_UNKNOWN_TOOL, T.E_ARGUMENT], T.NO_ERROR)
    failed = error != T.NO_ERROR
    view = ~failed & is_view
    run, edit, submit = ~failed & is_run, ~failed & is_edit, ~failed & is_submit
    view_all = view & (nargs == 0)

    # Edit first: `ok` echoes the new line.
    onehot = (jnp.arange(L) == line) & edit
    noop = edit & (state.ops[jnp.clip(line, 0, L - 1)] == new_op) & (
        state.args[jnp.clip(line, 0, L - 1)] == new_arg)
    ops = jnp.where(onehot, new_op, state.ops).astype(jnp.int32)
    args = jnp.where(onehot, new_arg, state.args).astype(jnp.int32)
    state = state.replace(ops=ops, args=args)

    # Replies (content only; framed below). Widths: every reply fits reply_len - 3.
    W = self.reply_len - 3
    digit = jnp.asarray(self._digit_ids)
    ids = lambda *s: jnp.asarray(self.vocab.ids(s), jnp.int32)
    every = jnp.concatenate([self.listing(ops, args, jnp.int32(i)) for i in range(L)])
    one = self.listing(ops, args, line)
    n_fail, x, bad_line, got, want, out_got, out_want = self.diagnose(state)
    fail_line = self._fail_line(n_fail, bad_line, got, want)
    fail_out = jnp.stack([self.id("fail"), digit[n_fail], self.id("in"), digit[x],
                          self.id("got"), digit[out_got], self.id("want"), digit[out_want]])
    fail = jnp.where(params.report_line, fail_line, fail_out)
    ran = jnp.where(n_fail > 0, T.pad_to(fail, W), T.pad_to(ids("pass"), W))
    err_ids, err_len = T.error_content(self.vocab, error, W)
    content = jnp.select(
        [failed, view_all, view, run, edit],
        [err_ids, T.pad_to(every, W), T.pad_to(one, W), ran,
         T.pad_to(jnp.concatenate([ids("ok"), one]), W)], jnp.zeros((W,), jnp.int32))
    length = jnp.select([failed, view_all, view, run, edit],
                        [err_len, 3 * L, 3, jnp.where(n_fail > 0, 8, 1), 4], 0)
    obs = self.make_reply(base.ROLE_TOOL, content, length)

    passed = n_fail == 0
    correct = submit & passed
    last = submit | (state.turn + 1 >= self.max_turns)  # base.step truncates at max_turns
    reward = (correct.astype(jnp.float32) - params.format_penalty * failed
              + params.turn_penalty * jnp.where(
                  last, turn_penalty(state.turn + 1, params.penalty_start, self.max_turns), 0.0))
    h = _action_hash(tokens, action.length)
    state = state.replace(
        success=state.success | correct,
        num_tool_calls=state.num_tool_calls + (is_call & known),
        format_errors=state.format_errors + failed,
        stale=jnp.where(run, False, state.stale | edit),
        viewed=jnp.where(run, jnp.zeros((L,), bool),
                         state.viewed | view_all | ((jnp.arange(L) == line) & view)),
        runs=state.runs + run, views=state.views + view, edits=state.edits + edit,
        noop_edits=state.noop_edits + noop,
        loops=state.loops + ((state.turn > 0) & (h == state.prev_hash)),
        prev_hash=h, submitted=state.submitted | submit)
    return state, obs, reward, submit

  # --- actions (the expert's vocabulary; handy for scripted policies and tests) -------------
  def call_action(self, tool: int, args: Sequence = (), closed=True) -> base.Action:
    """`<call> tool args... </call> <eot>` (without `</call>` if not `closed`, a bool or []
    bool). tool: `TOOL_*`; args: token ids ([] int32 each, traced or not). tokens:
    [action_len]."""
    closed = jnp.asarray(closed)
    head = [jnp.int32(self.id(V.CALL_OPEN)), jnp.int32(self._tool_ids[tool])]
    body = [jnp.asarray(a, jnp.int32) for a in args]
    tail = [jnp.where(closed, self.id(V.CALL_CLOSE), self.id(V.EOT)),
            jnp.where(closed, self.id(V.EOT), V.PAD_ID)]
    toks = jnp.stack(head + body + tail).astype(jnp.int32)
    return base.Action(T.pad_to(toks, self.action_len),
                       (len(head) + len(body) + 1 + closed.astype(jnp.int32)).astype(jnp.int32))

  def edit_action(self, line: jax.Array, op: jax.Array, arg: jax.Array, closed=True
                  ) -> base.Action:
    """`<call> edit l op d </call> <eot>`; line: [] int32 0-based; op: [] `OP_*`; arg: [] digit."""
    digit = jnp.asarray(self._digit_ids)
    return self.call_action(TOOL_EDIT, [digit[jnp.clip(line, 0, 8) + 1],
                                        jnp.asarray(self._op_ids)[jnp.clip(op, 0, 2)],
                                        digit[jnp.clip(arg, 0, 9)]], closed)

  def view_action(self, line: jax.Array | None = None, closed=True) -> base.Action:
    """`<call> view [l] </call> <eot>`; line: [] int32 0-based, or None for every line."""
    if line is None:
      return self.call_action(TOOL_VIEW, [], closed)
    return self.call_action(TOOL_VIEW, [jnp.asarray(self._digit_ids)[jnp.clip(line, 0, 8) + 1]],
                            closed)

  def expert(self, key, state, params) -> base.Action:
    L = self.num_lines
    bits = T.random_bits(key, 5)
    mistake = T.unit(bits[0]) < params.noise
    kind = T.below(bits[1], 4)  # 0 premature submit, 1 wrong edit, 2 extra run, 3 unclosed
    n_fail, _, line, _, _, _, _ = self.diagnose(state)
    line = jnp.where(n_fail > 0, line, T.below(bits[2], L))
    line = jnp.where(state.habit, T.below(bits[2], L), line)  # the habit guesses (no run)
    ref_op, ref_arg = state.ref_ops[line], state.ref_args[line]
    # A wrong instruction for the line: the reference with its op and/or operand changed.
    w_op = (ref_op + T.below(bits[3], 3)) % 3
    w_arg = jnp.where(w_op == ref_op, (ref_arg + 1 + T.below(bits[4], 9)) % 10, ref_arg)

    # 0 run, 1 submit, 2 view line, 3 edit line (right), 4 edit line (wrong)
    intended = jnp.where(state.stale, 0, jnp.where(n_fail == 0, 1,
                                                   jnp.where(state.viewed[line], 3, 2)))
    # Habit (never runs): 5 view every line, then edit a guessed line per bug, then submit.
    habit_intended = jnp.where(state.views == 0, 5, jnp.where(state.edits < self.num_bugs, 3, 1))
    intended = jnp.where(state.habit, habit_intended, intended)
    choice = jnp.where(mistake, jnp.select([kind == 0, kind == 1, kind == 2],
                                           [1, 4, jnp.where(state.habit, 5, 0)], intended),
                       intended)
    closed = ~(mistake & (kind == 3))
    options = [self.call_action(TOOL_RUN, [], closed), self.call_action(TOOL_SUBMIT, [], closed),
               self.view_action(line, closed), self.edit_action(line, ref_op, ref_arg, closed),
               self.edit_action(line, w_op, w_arg, closed), self.view_action(None, closed)]
    return T.choose_action(choice, options)

  def _fail_line(self, n_fail, line, got, want) -> jax.Array:
    """`fail n line l got a want e` (line 0-based, shown 1-based): [8] int32."""
    digit = jnp.asarray(self._digit_ids)
    return jnp.stack([self.id("fail"), digit[n_fail], self.id("line"), digit[line + 1],
                      self.id("got"), digit[got], self.id("want"), digit[want]])

  # --- Reflexion ----------------------------------------------------------------------------
  reflection_len = 8
  names_actions = True

  def reflection_action(self, state: FixState) -> base.Action:
    """What the failed episode should have done: `run` if it never ran the tests (the habit),
    else `view l` of the line `run` reports failing, or `submit` if the final program passes."""
    n_fail, _, line, _, _, _, _ = self.diagnose(state)
    options = [self.call_action(TOOL_RUN), self.view_action(line), self.call_action(TOOL_SUBMIT)]
    choice = jnp.where(state.runs == 0, 0, jnp.where(n_fail > 0, 1, 2))
    return T.choose_action(choice, options)

  def reflection(self, state: FixState):
    """What `run` reports on the final program (`fail n line l got a want e`, or `pass` if it
    passes but was not submitted): the environment's feedback on the failed episode.
    [reflection_len] int32, []."""
    n_fail, _, line, got, want, _, _ = self.diagnose(state)
    fail = self._fail_line(n_fail, line, got, want)
    ok = T.pad_to(jnp.asarray([self.id("pass")], jnp.int32), 8)
    return (jnp.where(n_fail > 0, fail, ok).astype(jnp.int32),
            jnp.where(n_fail > 0, 8, 1).astype(jnp.int32))

  def extra_info(self, state):
    bugs = jnp.sum((state.ops != state.ref_ops) | (state.args != state.ref_args))
    return {"tests_passed": self.tests_passed(state), "bugs_left": bugs.astype(jnp.int32),
            "runs": state.runs, "views": state.views, "edits": state.edits,
            "noop_edits": state.noop_edits, "loops": state.loops, "submitted": state.submitted}
