"""Tasks for real models: the task record and answer checking (a leaf: no mtrl_jax imports).

`Task` is one prompt with its reference answer, as `mtrl_jax.data.prompts` reads it from a JSONL
file (or a TFDS prompt dataset) and `mtrl_jax.envs.json_tool.JsonToolEnv` plays it:

    task = Task(question="What is 12 * 5?", answer="60", answer_value=parse_numeric("60"))
    is_correct("so the <answer>60</answer>", task)          # True

* `parse_numeric(answer)`: a reference answer's number (NaN when it is not numeric);
* `extract_answer(text)`: the final answer in an assistant turn (`<answer>` tags, `\\boxed{}`,
  "the answer is ...");
* `is_correct(text, task)`: numeric tasks compare the last number of the extracted answer,
  other tasks the SQuAD-normalised text (`normalize_text`).
"""

from __future__ import annotations

import dataclasses
import math
import re
import string
from typing import Any

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


@dataclasses.dataclass(frozen=True)
class Task:
  """One prompt. answer: the reference answer as text; answer_value: its number (NaN when the
  answer is not numeric); solution: assistant turns of a demonstration (may be empty)."""

  question: str
  answer: str
  answer_value: float = math.nan
  solution: tuple[str, ...] = ()
  id: str = ""


def extract_answer(text: str) -> str:
  """The final answer in a turn: the last `<answer>...</answer>`, else the last `\\boxed{...}`,
  else what follows the last "answer is" / "Answer:", else the whole text (stripped)."""
  tags = re.findall(r"<answer>(.*?)</answer>", text, re.S)
  if tags:
    return tags[-1].strip()
  boxed = re.findall(r"\\boxed\{([^{}]*)\}", text)
  if boxed:
    return boxed[-1].strip()
  said = re.findall(r"answer(?: is|:)\s*(.+)", text, re.I)
  if said:
    return said[-1].strip()
  return text.strip()


def normalize_text(s: str) -> str:
  """SQuAD-style: lower case, no punctuation, no articles, single spaces."""
  s = "".join(c for c in s.lower() if c not in set(string.punctuation))
  s = re.sub(r"\b(a|an|the)\b", " ", s)
  return " ".join(s.split())


def is_correct(text: str, task: Task) -> bool:
  """Numeric tasks: the last number of the extracted answer equals `answer_value` (relative
  tolerance 1e-6). Other tasks: normalised exact match with `answer`."""
  got = extract_answer(text)
  if not math.isnan(task.answer_value):
    numbers = _NUMBER.findall(got)
    if not numbers:
      return False
    try:
      value = float(numbers[-1].replace(",", ""))
    except ValueError:
      return False
    return abs(value - task.answer_value) <= 1e-6 * max(1.0, abs(task.answer_value))
  return normalize_text(got) == normalize_text(task.answer)


def parse_numeric(answer: Any) -> float:
  """A reference answer's number: numbers as is; strings like "1,234", "$5", "72", or GSM8K's
  "... #### 72"; NaN when there is none."""
  if isinstance(answer, bool):
    return math.nan
  if isinstance(answer, (int, float)):
    return float(answer)
  s = str(answer)
  if "####" in s:
    s = s.split("####")[-1]
  s = s.strip().replace(",", "").lstrip("$").rstrip("%").strip()
  try:
    return float(s)
  except ValueError:
    return math.nan
