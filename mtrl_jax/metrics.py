"""Training metrics on the host: a JSONL log + TensorBoard events, a progress bar, plots.

    writer = MetricsWriter(workdir, resume_step=restored_step)   # None for a fresh run
    bar = ProgressBar(num_steps, initial=restored_step or 0, keys=("train/return",))
    for step in ...:
      writer.write(step, metrics)          # {"train/return": jax scalar, ...}
      bar.update(step, metrics)
    writer.close(); bar.close()
    plot_learning_curves(workdir / "metrics.jsonl", workdir / "curves.png")

`workdir/metrics.jsonl` holds one JSON object per `write`: `{"step": 10, "train/return": 0.5,
...}`. It is strict JSON: non-finite values (a NaN loss) are written as `null`. The same scalars
go to TensorBoard event files in `workdir` (NaN as NaN).

Resuming: `MetricsWriter(workdir, resume_step=s)` drops the lines with step > s (written after
the checkpoint the run resumes from) and asks TensorBoard to purge its events from step s + 1 on,
so that a resumed run's `metrics.jsonl` is identical to an uninterrupted run's. Without
`resume_step`, the writer starts a fresh file (and TensorBoard hides the older events).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any, Callable, Iterable, Mapping

import jax
import numpy as np
import tqdm

METRICS_FILE = "metrics.jsonl"
DEFAULT_PLOT_KEYS = ("train/return", "train/success_rate", "eval/success_rate",
                     "eval/return", "train/tool_calls", "train/kl")


def _to_python(name: str, value: Any) -> int | float | None:
  """A host scalar: int for integer/bool values, float otherwise, None for NaN/inf."""
  a = np.asarray(value)
  if a.size != 1:
    raise ValueError(f"metric {name!r} must be a scalar, got shape {a.shape}")
  a = a.reshape(())
  if a.dtype == np.bool_ or np.issubdtype(a.dtype, np.integer):
    return int(a)
  x = float(a)
  return x if math.isfinite(x) else None


def _parse_lines(lines: Iterable[str], path: str) -> list[dict]:
  """JSON objects, one per non-empty line; a garbled last line (a crash mid-write) is dropped."""
  lines = [line for line in lines if line.strip()]
  records = []
  for i, line in enumerate(lines):
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError as e:
      if i == len(lines) - 1:
        break
      raise ValueError(f"{path}: line {i + 1} is not JSON: {e}") from e
  return records


def read_metrics(path: str | os.PathLike) -> list[dict]:
  """The records of a metrics.jsonl file, in order (NaN/inf were stored as None)."""
  path = os.fspath(path)
  with open(path, encoding="utf-8") as f:
    return _parse_lines(f, path)


def _truncate(path: str, last_step: int) -> None:
  """Rewrites `path` keeping only records with step <= last_step (atomically, via rename)."""
  if not os.path.exists(path):
    return
  kept = [r for r in read_metrics(path) if r.get("step", -1) <= last_step]
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    for r in kept:
      f.write(json.dumps(r, allow_nan=False) + "\n")
  os.replace(tmp, path)


class MetricsWriter:
  """Appends scalar metrics to `workdir/metrics.jsonl` and to TensorBoard events in `workdir`.

  Args:
    workdir: the run's directory (created if needed).
    tensorboard: also write TensorBoard events (tensorboardX).
    resume_step: the step of the checkpoint a run resumes from: records after it are removed.
      None = a fresh run: an existing metrics.jsonl is replaced.
  """

  def __init__(self, workdir: str | os.PathLike, *, tensorboard: bool = True,
               resume_step: int | None = None):
    self.workdir = os.fspath(workdir)
    os.makedirs(self.workdir, exist_ok=True)
    self.path = os.path.join(self.workdir, METRICS_FILE)
    if resume_step is None:
      mode = "w"
    else:
      _truncate(self.path, int(resume_step))
      mode = "a"
    self._file = open(self.path, mode, encoding="utf-8")
    self._tb = None
    if tensorboard:
      from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
      # TensorBoard hides older events at steps >= purge_step (all of them for a fresh run).
      purge = 0 if resume_step is None else int(resume_step) + 1
      self._tb = SummaryWriter(logdir=self.workdir, purge_step=purge)

  def write(self, step: int, metrics: Mapping[str, Any]) -> dict:
    """Writes one record; values may be Python, NumPy or JAX scalars. Returns the record."""
    if "step" in metrics:
      raise ValueError("'step' is reserved for the step argument; rename the metric")
    values = jax.device_get(dict(metrics))  # one transfer for all device scalars
    record = {"step": int(step)}
    record.update({k: _to_python(k, v) for k, v in values.items()})
    self._file.write(json.dumps(record, allow_nan=False) + "\n")
    self._file.flush()
    if self._tb is not None:
      for k, v in values.items():
        self._tb.add_scalar(k, float(np.asarray(v)), global_step=int(step))
      self._tb.flush()
    return record

  def close(self) -> None:
    """Flushes and closes the files (idempotent)."""
    if not self._file.closed:
      self._file.close()
    if self._tb is not None:
      self._tb.close()
      self._tb = None

  def __enter__(self) -> MetricsWriter:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def _format(value: Any) -> str:
  """Compact number: 4 significant digits, ints as ints, NaN as nan."""
  x = _to_python("", value)
  if x is None:
    return "nan"
  return str(x) if isinstance(x, int) else f"{x:.4g}"


class ProgressBar:
  """A tqdm bar over training steps showing rate, ETA and a few key metrics.

  `disable=None` (default) shows it only when stderr is a terminal, so logs of batch jobs and
  captured test output stay clean (the JSONL log is the record); without the bar, a plain line
  `step n/total (p%), elapsed, eta, metrics` goes to `file` at most every `plain_every_s`
  seconds (0: never), so a long job in a log still shows it is alive.

  Args:
    total: the final step.
    keys: metric names shown after the bar, with their latest values (a metric written only
      every N steps, like eval/*, keeps its last value).
    initial: the step a resumed run starts at.
    disable: True/False to force; None = only on a TTY.
    desc: a prefix for the bar.
    file: where the bar is drawn (default stderr).
    plain_every_s: seconds between plain progress lines when the bar is not shown.
    clock: the seconds clock those lines are timed by (a test's fake clock).
  """

  def __init__(self, total: int, *, keys: Iterable[str] = ("train/return", "train/success_rate"),
               initial: int = 0, disable: bool | None = None, desc: str | None = None,
               file: Any = None, plain_every_s: float = 60.0,
               clock: Callable[[], float] = time.monotonic):
    self.keys = tuple(keys)
    self._latest: dict[str, str] = {}
    self._file = file or sys.stderr
    self._bar = tqdm.tqdm(total=total, initial=initial, desc=desc, disable=disable,
                          dynamic_ncols=True, unit="step", file=self._file, leave=True)
    self._total, self._initial, self._desc = int(total), int(initial), desc
    self._plain_every = float(plain_every_s)
    self._clock = clock
    self._t0 = self._last_plain = clock()

  def update(self, step: int, metrics: Mapping[str, Any] | None = None) -> None:
    """Moves the bar to `step` and refreshes the shown metrics."""
    if self._bar.disable and not self._plain_every:
      return
    shown = {k: metrics[k] for k in self.keys if metrics and k in metrics}
    self._latest.update({k: _format(v) for k, v in jax.device_get(shown).items()})
    if self._bar.disable:
      self._plain(int(step))
      return
    if self._latest:
      self._bar.set_postfix_str(
          " ".join(f"{k}={self._latest[k]}" for k in self.keys if k in self._latest),
          refresh=False)
    self._bar.update(int(step) - self._bar.n)

  def _plain(self, step: int) -> None:
    now = self._clock()
    if now - self._last_plain < self._plain_every:
      return
    self._last_plain = now
    elapsed, done = now - self._t0, step - self._initial
    eta = elapsed / done * (self._total - step) if done > 0 else float("nan")
    shown = " ".join(f"{k}={self._latest[k]}" for k in self.keys if k in self._latest)
    head = f"{self._desc}: " if self._desc else ""
    print(f"{head}step {step}/{self._total} ({100 * step / max(self._total, 1):.0f}%), "
          f"{elapsed / 60:.1f} min elapsed, eta {eta / 60:.1f} min {shown}".rstrip(),
          file=self._file, flush=True)

  def close(self) -> None:
    self._bar.close()

  def __enter__(self) -> ProgressBar:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def plot_learning_curves(metrics_jsonl_path: str | os.PathLike, png_path: str | os.PathLike,
                         keys: Iterable[str] = DEFAULT_PLOT_KEYS) -> str:
  """One subplot per key present in the log (x = step); keys never logged are skipped.

  None values (non-finite) are gaps. Returns `png_path` as a string; raises ValueError when
  none of the keys is in the log.
  """
  # A bare Figure renders with Agg without touching pyplot's global backend (notebooks).
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel

  records = read_metrics(metrics_jsonl_path)
  series = {}
  for key in keys:
    points = [(r["step"], np.nan if r[key] is None else r[key]) for r in records if key in r]
    if points:
      series[key] = np.asarray(points, dtype=np.float64)
  if not series:
    raise ValueError(f"none of {tuple(keys)} is in {os.fspath(metrics_jsonl_path)}")
  cols = min(3, len(series))
  rows = -(-len(series) // cols)
  fig = Figure(figsize=(4.5 * cols, 3.2 * rows))
  axes = fig.subplots(rows, cols, squeeze=False)
  for ax, (key, xy) in zip(axes.flat, series.items()):
    ax.plot(xy[:, 0], xy[:, 1], marker="." if len(xy) < 50 else None)
    ax.set_title(key)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
  for ax in list(axes.flat)[len(series):]:
    ax.set_visible(False)
  fig.tight_layout()
  png_path = os.fspath(png_path)
  fig.savefig(png_path, dpi=100)
  return png_path
