"""The task record and answer checking (`mtrl_jax.tasks`): no optional dependency needed."""

import math

from mtrl_jax import tasks


def test_answers():
  num = tasks.Task("q", "72", 72.0)
  for text, ok in (("<answer>72</answer>", True), ("so \\boxed{72}", True),
                   ("The answer is 72.", True), ("<answer>1,234</answer>", False),
                   ("<answer>72.0000000001</answer>", True), ("72 or 73", False),
                   ("no idea", False), ("<answer>71</answer> 72", False)):
    assert tasks.is_correct(text, num) == ok, text
  assert tasks.is_correct("<answer>1,234</answer>", tasks.Task("q", "1234", 1234.0))
  txt = tasks.Task("q", "the Amber River")
  assert tasks.is_correct("<answer>Amber river.</answer>", txt)
  assert not tasks.is_correct("<answer>Marrow</answer>", txt)
  assert tasks.parse_numeric("Natalia ... #### 72") == 72.0
  assert tasks.parse_numeric("$1,250") == 1250.0
  assert math.isnan(tasks.parse_numeric("Bergen"))


def test_one_home():
  """The environment and the prompt datasets use this module's record, not copies."""
  from mtrl_jax.data import prompts
  from mtrl_jax.envs import json_tool
  assert json_tool.Task is prompts.Task is tasks.Task
  assert json_tool.is_correct is tasks.is_correct and prompts.parse_numeric is tasks.parse_numeric
