"""Prompt datasets for real models: local JSONL task files -> TFDS `array_record`, read without TF.

A researcher's own task set, one JSON object per line::

    {"question": "Tom has 3 boxes of 12 eggs ...", "answer": 36}
    {"question": "...", "answer": "Natalia sold 48/2 = 24 clips ... #### 72"}     # GSM8K style
    {"question": "Who directed ...?", "answer": "Jane Campion", "id": "q7"}       # text answer
    {"question": "...", "answer": 60,
     "solution": ["<tool_call>...</tool_call>", "<answer>60</answer>"]}      # one line in the file

`question` and `answer` are required; `id` (default: the line number) and `solution` (assistant
turns of a demonstration, replayed by `JsonToolEnv.expert`) are optional. A numeric answer
(a number, or a string like "1,234", "$5", or GSM8K's "... #### 72") is compared numerically,
any other answer by normalised exact match (see `mtrl_jax.tasks.is_correct`). For
multi-hop QA with the search tool, a corpus JSONL (`{"title": ..., "text": ...}` per line) is
stored with the dataset (in its metadata: meant for small collections).

    builder = build_prompt_dataset(data_dir, "arith", "tasks.jsonl", test="held_out.jsonl")
    tasks, corpus, metadata = load_prompt_dataset(data_dir, "arith", split="train")
    env = JsonToolEnv(ChatTokenizer.from_dir(ckpt), tasks, make_tools(["calculator"], corpus))

writes `data_dir/prompt_dataset/<name>/1.0.0/` with splits `train` (and `test`). Per-row features:
index [] int64, id / question / answer / solution (JSON list) text, answer_value [] float32
(NaN when not numeric). Metadata: the source files and their SHA-1, rows per split, the corpus.
Building again with the same name reuses the dataset if the sources are unchanged and raises
ValueError naming the dataset if they changed. The text is stored untokenized, so one dataset
serves every tokenizer; prompts are tokenized with the model's chat template when the
environment is built.

No TensorFlow: TFDS's in-process writer and `tfds.data_source` (numpy decoding), as in
`mtrl_jax.data.demos`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from mtrl_jax.tasks import Task, parse_numeric

DATASET_NAME = "prompt_dataset"


def _json_lines(path: str) -> list[dict[str, Any]]:
  rows = []
  with open(path, encoding="utf-8") as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
      if not isinstance(row, dict):
        raise ValueError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
      rows.append((n, row))
  return rows


def read_tasks(path: str) -> list[dict[str, Any]]:
  """Validated task rows of a JSONL file (see the module docstring); errors name file:line."""
  out = []
  for n, row in _json_lines(path):
    for key in ("question", "answer"):
      if key not in row:
        raise ValueError(f"{path}:{n}: missing field {key!r} (fields: {sorted(row)})")
    if not isinstance(row["question"], str) or not row["question"].strip():
      raise ValueError(f"{path}:{n}: 'question' must be a non-empty string")
    solution = row.get("solution", [])
    if not isinstance(solution, list) or not all(isinstance(s, str) for s in solution):
      raise ValueError(f"{path}:{n}: 'solution' must be a list of strings (assistant turns)")
    answer = row["answer"]
    value = parse_numeric(answer)
    text = answer if isinstance(answer, str) else json.dumps(answer)
    if isinstance(answer, str) and "####" in answer:
      text = answer.split("####")[-1].strip()
    out.append(dict(id=str(row.get("id", n)), question=row["question"], answer=text,
                    answer_value=value, solution=json.dumps(solution)))
  if not out:
    raise ValueError(f"{path}: no tasks")
  return out


def read_corpus(path: str) -> list[dict[str, str]]:
  """Documents of a corpus JSONL file (`title`, `text`); errors name file:line."""
  docs = []
  for n, row in _json_lines(path):
    if not isinstance(row.get("text"), str):
      raise ValueError(f"{path}:{n}: a corpus document needs a 'text' string")
    docs.append({"title": str(row.get("title", "")), "text": row["text"]})
  return docs


def _sha1(path: str) -> str:
  with open(path, "rb") as f:
    return hashlib.sha1(f.read()).hexdigest()


@dataclasses.dataclass(eq=False, repr=False)
class PromptConfig(tfds.core.BuilderConfig):
  """Sources of one prompt dataset: split name -> JSONL path, and an optional corpus JSONL."""

  files: dict[str, str] = dataclasses.field(default_factory=dict)
  corpus: str | None = None

  def __repr__(self) -> str:
    return f"PromptConfig({self.name!r})"


class PromptDataset(tfds.core.GeneratorBasedBuilder):
  """TFDS builder of prompts from local JSONL files; construct with `config=PromptConfig(...)`."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Prompts from local JSONL task files."}

  def __init__(self, *, config: PromptConfig, **kwargs):
    self._rows = {split: read_tasks(path) for split, path in config.files.items()}
    self._corpus = read_corpus(config.corpus) if config.corpus else []
    kwargs.setdefault("file_format", tfds.core.FileFormat.ARRAY_RECORD)
    super().__init__(config=config, **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    cfg: PromptConfig = self.builder_config
    features = tfds.features.FeaturesDict({
        "index": tfds.features.Scalar(dtype=np.int64), "id": tfds.features.Text(),
        "question": tfds.features.Text(), "answer": tfds.features.Text(),
        "answer_value": tfds.features.Scalar(dtype=np.float32),
        "solution": tfds.features.Text()})
    sources = {split: {"path": os.path.abspath(p), "sha1": _sha1(p)}
               for split, p in cfg.files.items()}
    if cfg.corpus:
      sources["corpus"] = {"path": os.path.abspath(cfg.corpus), "sha1": _sha1(cfg.corpus)}
    metadata = tfds.core.MetadataDict(
        sources=sources, rows={s: len(r) for s, r in self._rows.items()}, corpus=self._corpus,
        numeric={s: int(sum(not math.isnan(x["answer_value"]) for x in r))
                 for s, r in self._rows.items()})
    return tfds.core.DatasetInfo(builder=self, description=cfg.description, features=features,
                                 metadata=metadata, disable_shuffling=True)

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    return {split: self._generate_examples(split) for split in self._rows}

  def _generate_examples(self, split: str = "train"):
    for i, row in enumerate(self._rows[split]):
      yield i, dict(row, index=i, answer_value=np.float32(row["answer_value"]))


def build_prompt_dataset(data_dir: str | epath.PathLike, name: str | None, train: str, *,
                         test: str | None = None, corpus: str | None = None) -> PromptDataset:
  """Build (or reuse) the prompt dataset `name` from JSONL files and return its builder.

  name: dataset name ([A-Za-z0-9_.-]; default: the train file's stem). Raises ValueError
  naming the file and line of a bad row, or naming the dataset if it exists with other sources.
  """
  for label, path in (("train", train), ("test", test), ("corpus", corpus)):
    if path is not None and not os.path.isfile(path):
      raise FileNotFoundError(f"{label} file {path!r} does not exist")
  name = name or re.sub(r"[^\w.\-]", "_", os.path.splitext(os.path.basename(train))[0])
  if not re.fullmatch(r"[A-Za-z0-9_.\-]+", name):
    raise ValueError(f"dataset name {name!r} may only use letters, digits, '_', '.', '-'")
  files = {"train": train, **({"test": test} if test else {})}
  config = PromptConfig(name=name, description=f"prompts from {sorted(files.values())}",
                        files=files, corpus=corpus)
  if name in list_prompt_datasets(data_dir):
    _, meta = _source(data_dir, name, "train")
    want = {s: _sha1(p) for s, p in files.items()}
    if corpus:
      want["corpus"] = _sha1(corpus)
    have = {s: v["sha1"] for s, v in meta["sources"].items()}
    if want != have:
      raise ValueError(f"prompt dataset {name!r} in {str(data_dir)!r} was built from other "
                       "files; choose another name or delete it")
  builder = PromptDataset(config=config, data_dir=str(data_dir))
  builder.download_and_prepare()
  return builder


def list_prompt_datasets(data_dir: str | epath.PathLike) -> list[str]:
  """Names of the prepared prompt datasets under `data_dir`, sorted."""
  root = epath.Path(data_dir) / DATASET_NAME
  if not root.exists():
    return []
  return sorted(p.name for p in root.iterdir()
                if p.is_dir() and any((v / "dataset_info.json").exists() for v in p.iterdir()))


def _source(data_dir, name: str, split: str):
  source = tfds.data_source(f"{DATASET_NAME}/{name}", split=split, data_dir=str(data_dir),
                            download=False)
  return source, dict(source.dataset_info.metadata)


def load_prompt_dataset(data_dir: str | epath.PathLike, name: str, split: str = "train"):
  """(tasks: list of `mtrl_jax.tasks.Task`, corpus: list of {title, text}, metadata) of a split.

  Raises ValueError naming the dataset (and listing what `data_dir` holds) or the split."""
  if name not in list_prompt_datasets(data_dir):
    raise ValueError(f"no prompt dataset {name!r} in {str(data_dir)!r}; it holds "
                     f"{list_prompt_datasets(data_dir)} (build it with build_prompt_dataset)")
  try:
    source, meta = _source(data_dir, name, split)
  except (KeyError, ValueError) as e:
    raise ValueError(f"prompt dataset {name!r} has no split {split!r} ({e})") from None
  text = lambda b: b.decode("utf-8") if isinstance(b, bytes) else str(b)
  tasks = []
  for i in range(len(source)):
    row = source[i]
    tasks.append(Task(question=text(row["question"]), answer=text(row["answer"]),
                      answer_value=float(row["answer_value"]),
                      solution=tuple(json.loads(text(row["solution"]))), id=text(row["id"])))
  return tasks, list(meta.get("corpus", [])), meta
