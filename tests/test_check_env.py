"""`mtrl_jax.envs.check_env` and its static part (`check_class`, `check_instance`, run by the
registry): each contract property, broken on purpose in a small calculator, is reported by
name. (The built-in environments pass it: test_envs.py, test_env_fix.py,
test_env_retrieval.py.)

Compile budget: every broken environment is a 1-digit, 2-operand calculator checked at batch 8.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import pytest

from mtrl_jax import vocab as V
from mtrl_jax.envs import EnvContractError, base, check, check_env, registry
from mtrl_jax.envs import tools as T
from mtrl_jax.envs.calculator import Calculator

SMALL = dict(num_digits=1, num_operands=2, max_turns=2)


class Small(Calculator):
  def __init__(self, num_digits: int = 1, num_operands: int = 2, max_turns: int = 2,
               vocab: V.Vocab | None = None):
    super().__init__(num_digits=num_digits, num_operands=num_operands, max_turns=max_turns,
                     vocab=vocab)


def _check(env, **kw):
  return check_env(env, batch=8, **kw)


def test_a_correct_small_environment_passes():
  report = _check(Small())
  assert report["expert_success"] == 1.0 and report["turns"] == 2.0
  assert report["garbage_error_rate"] > 0.9 and report["garbage_success"] == 0.0


# --- the static part ----------------------------------------------------------------------------

class NotAnEnv:
  """Has the hooks but not `Environment`'s declarations."""

  def reset(self, key, params=None):
    ...

  def step(self, key, state, action, params=None):
    ...


class NoExpert(base.Environment):
  def symbols(self):
    return ()

  default_params = base.EnvParams()
  prompt_len = reply_len = action_len = max_turns = 4

  def reset_env(self, key, params):
    ...

  def step_env(self, key, state, action, params):
    ...


class DictParams(Small):
  Params = dict


@flax.struct.dataclass
class NoNoise:
  format_penalty: float = 0.0


class ParamsWithoutNoise(Small):
  Params = NoNoise


class NoDefault(Small):
  def __init__(self, num_digits: int):
    super().__init__(num_digits=num_digits)


@flax.struct.dataclass
class ClashParams(base.EnvParams):
  num_digits: int = 1


class Clash(Small):
  Params = ClashParams


@pytest.mark.parametrize("cls, match", [
    (NotAnEnv, r"NotAnEnv is not a subclass of mtrl_jax.envs.base.Environment; it lacks "
               r"symbols, default_params, .*Params"),
    (NoExpert, r"NoExpert does not implement expert"),
    (DictParams, r"DictParams.Params must be a flax.struct.dataclass"),
    (ParamsWithoutNoise, r"ParamsWithoutNoise.Params \(NoNoise\) lacks the EnvParams field\(s\) "
                         r"\['noise', 'habit_p'\]"),
    (NoDefault, r"NoDefault.__init__ argument 'num_digits' has no default"),
    (Clash, r"Clash: \['num_digits'\] are both constructor arguments and fields of "
            r"ClashParams"),
])
def test_static_part_names_what_is_wrong(cls, match):
  with pytest.raises(EnvContractError, match=match):
    check.check_class(cls)
  with pytest.raises(ValueError, match=match):  # registering runs it
    registry.register("broken-env", cls)
  assert "broken-env" not in registry.list_envs()
  # An import path runs it as well (this test module is importable as tests.test_check_env).
  with pytest.raises(ValueError, match=match):
    registry.make(f"tests.test_check_env:{cls.__name__}")


def test_instance_part_names_the_size():
  class ZeroTurns(Small):
    max_turns = 0

  with pytest.raises(EnvContractError, match=r"ZeroTurns.max_turns must be a static integer "
                                             r">= 1, got 0"):
    check.check_instance(ZeroTurns())

  class WrongDefaults(Small):
    @property
    def default_params(self):
      return NoNoise()

  with pytest.raises(EnvContractError, match=r"default_params is a NoNoise, not its declared "
                                             r"Params EnvParams"):
    check.check_instance(WrongDefaults())

  class NamesWithoutTemplate(Small):
    names_actions = True  # the action reflection extends a template it does not have

  with pytest.raises(EnvContractError, match=r"NamesWithoutTemplate.names_actions is True but "
                                             r"reflection_len is 0"):
    check.check_instance(NamesWithoutTemplate())


# --- the dynamic part ---------------------------------------------------------------------------

class PromptOneShort(Small):
  @property
  def prompt_len(self):
    return super().prompt_len - 1


class ReplyOneShort(Small):
  """The longest reply here is `<tool> 8 1 <eot> <assistant>` (or a 2-token error): 5."""

  reply_len = 4


class ErrorNotCounted(Small):
  """Answers a turn that breaks the grammar with an error reply but does not count it."""

  def step_env(self, key, state, action, params):
    new, obs, reward, done = super().step_env(key, state, action, params)
    t = T.parse_turn(action.tokens, action.length, self.vocab)
    return new.replace(format_errors=jnp.where(t.kind == T.KIND_INVALID, state.format_errors,
                                               new.format_errors)), obs, reward, done


class LastTurnErrorNotCounted(Small):
  """Counts format errors except on the last turn, where the reply is emptied anyway."""

  def step_env(self, key, state, action, params):
    new, obs, reward, done = super().step_env(key, state, action, params)
    last = state.turn == self.max_turns - 1
    return new.replace(format_errors=jnp.where(last, state.format_errors,
                                               new.format_errors)), obs, reward, done


class NaNOnGarbage(Small):
  def step_env(self, key, state, action, params):
    new, obs, reward, done = super().step_env(key, state, action, params)
    return new, obs, jnp.where(action.length < 0, jnp.nan, reward), done


class FinishedMoves(Small):
  """Replaces `step` (which a subclass must not do) and forgets that a finished episode stays."""

  def step(self, key, state, action, params=None):
    new, obs, reward, done, info = super().step(key, state, action, params)
    new = new.replace(num_tool_calls=jnp.where(state.done, new.num_tool_calls + 1,
                                               new.num_tool_calls))
    return new, obs, reward, done, self.info(new)


class ExpertGuesses(Small):
  def expert(self, key, state, params):
    return self.answer_action(state.answer + 1)


class ExpertTooLong(Small):
  """Its expert pads every turn with one token more than `action_len` (7) allows."""

  def expert(self, key, state, params):
    action = super().expert(key, state, params)
    return base.Action(jnp.pad(action.tokens, (0, 1)), action.length + 1)


class StateChangesDtype(Small):
  def step_env(self, key, state, action, params):
    new, obs, reward, done = super().step_env(key, state, action, params)
    return new.replace(last_result=new.last_result.astype(jnp.float32)), obs, reward, done


class UnframedReply(Small):
  """A reply that forgets the `<assistant>` header of the next turn."""

  def step_env(self, key, state, action, params):
    new, obs, reward, done = super().step_env(key, state, action, params)
    last = jnp.maximum(obs.length - 1, 0)
    tokens = obs.tokens.at[last].set(V.PAD_ID)
    return new, obs.replace(tokens=tokens, length=last.astype(jnp.int32)), reward, done


@pytest.mark.parametrize("cls, match", [
    (PromptOneShort, r"reset's prompt length 10 exceeds env.prompt_len=9: the content was cut "
                     r".*raise prompt_len to at least 10"),
    (ReplyOneShort, r"reply.* length 5 .*env.reply_len=4.*raise reply_len to at least 5"),
    (ErrorNotCounted, r"a turn did not count a format error but its reply holds an <error>"),
    (LastTurnErrorNotCounted, r"turn 1: a turn did not count a format error but its reply "
                              r"holds an <error> \(the last turn"),
    (NaNOnGarbage, r"garbage: turn 0: reward nan is not finite"),
    (FinishedMoves, r"a finished episode moved: state fields \['.num_tool_calls'\] changed"),
    (ExpertGuesses, r"the expert at noise 0 solves 0.000 of 8 episodes, below "
                    r"expert_success=1.0"),
    (ExpertTooLong, r"the expert plays a turn of 8 tokens, more than env.action_len=7"),
    (StateChangesDtype, r"step returned a state of other shapes, dtypes or weak types.*"
                        r"last_result: float32\[8\] vs int32\[8\]"),
    (UnframedReply, r"step's reply is not framed as <tool>\|<user> ... <eot> <assistant>"),
])
def test_broken_contract_is_reported(cls, match):
  env = cls()
  check.check_class(cls)  # the static part cannot see these
  check.check_instance(env)
  with pytest.raises(EnvContractError, match=match):
    _check(env)


def test_expert_success_threshold_and_width():
  report = _check(Small(), expert_success=0.5)
  assert report["expert_success"] == 1.0
  with pytest.raises(ValueError, match=r"width=2 is below env.action_len=7"):
    check_env(Small(), width=2)
  with pytest.raises(EnvContractError, match=r"params is a NoNoise, not its Params EnvParams"):
    check_env(Small(), NoNoise())


# --- the registry: names and import paths --------------------------------------------------------

def test_registry_makes_an_environment_from_an_import_path():
  env, params = registry.make("tests.test_check_env:Small", num_digits=2, format_penalty=0.5)
  # (pytest imports this file under another module name: compare the class by name)
  assert type(env).__qualname__ == "Small" and env.num_digits == 2
  assert params.format_penalty == 0.5
  assert registry.accepted_overrides("tests.test_check_env:Small") == (
      ["num_digits", "num_operands", "max_turns", "vocab"], ["noise", "format_penalty",
                                                              "habit_p"])
  with pytest.raises(ValueError, match=r"cannot import 'tests.no_such_module'.*importable"):
    registry.make("tests.no_such_module:Env")
  with pytest.raises(ValueError, match=r"module 'tests.test_check_env' has no 'Smal'; "
                                       r"environments defined there: \[.*'Small'.*\]"):
    registry.make("tests.test_check_env:Smal")
  with pytest.raises(ValueError, match=r"unknown override\(s\) \['digits'\]"):
    registry.make("tests.test_check_env:Small", digits=2)
  with pytest.raises(ValueError, match=r"':' marks an import path"):
    registry.register("a:b", Small)


def test_declared_overrides_give_every_default_and_type():
  declared = registry.declared_overrides("clarify")
  assert declared["num_attributes"] == (3, int)
  assert declared["max_turns"] == (None, int)        # `int | None = None`
  assert declared["vocab"] == (None, None)           # not a scalar
  assert declared["ask_cost"] == (0.0, float) and declared["noise"] == (0.0, float)
  assert list(declared)[:3] == ["num_attributes", "num_values", "fully_specified"]
  with pytest.raises(ValueError, match="factory"):
    registry.declared_overrides("json_tool")
  registry.register("small-test-env", Small)
  try:
    assert registry.declared_overrides("small-test-env")["num_digits"] == (1, int)
    env, _ = registry.make("small-test-env")
    assert isinstance(env, Small)
  finally:
    del registry._ENVS["small-test-env"]
