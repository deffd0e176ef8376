"""colab/quickstart.ipynb runs end to end in the default suite (a short run set through its
environment knobs), so it cannot rot as the API changes: every cell executes without error, the plot cell draws an image,
the conversations show sampled (`▶`) and masked (`│`) tokens, and the last cell reports the
final greedy success rate."""

import json
import os
import re
import sys
import time

import pytest

if os.environ.get("MTRL_REQUIRE_NOTEBOOK_TEST"):  # CI: a missing test extra fails, never skips
  import ipykernel, nbclient, nbformat  # noqa: F401,E401
nbformat = pytest.importorskip("nbformat", reason="the notebook test needs nbformat (test extra)")
nbclient = pytest.importorskip("nbclient", reason="the notebook test needs nbclient (test extra)")
pytest.importorskip("ipykernel", reason="the notebook test needs ipykernel (test extra)")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "colab", "quickstart.ipynb")
KERNEL = "mtrl-notebook-test"


def _text(cell) -> str:
  """All stream and text/plain output of a code cell."""
  parts = []
  for out in cell.get("outputs", []):
    if out["output_type"] == "stream":
      parts.append(out["text"])
    elif "data" in out and "text/plain" in out["data"]:
      parts.append(out["data"]["text/plain"])
  return "".join(parts)


def _tagged(nb, tag):
  cells = [c for c in nb.cells if tag in c.get("metadata", {}).get("tags", [])]
  assert len(cells) == 1, f"expected one cell tagged {tag!r}, found {len(cells)}"
  return cells[0]


def test_notebook_is_committed_without_outputs():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  for cell in nb.cells:
    if cell.cell_type == "code":
      assert not cell.outputs and cell.execution_count is None, cell.source[:80]


def test_notebook_code_compiles_and_names_resolve():
  """A quick guard before the run below: every code cell is valid Python
  (after IPython's magics), and every attribute the notebook takes from the trainer, the
  library modules and the config exists, so a rename in the API fails here first."""
  import ast

  from IPython.core.inputtransformer2 import TransformerManager

  from configs.quickstart import get_config
  from mtrl_jax import metrics as metrics_lib
  from mtrl_jax import train as train_lib
  from mtrl_jax import vocab as V

  config = get_config()
  objects = {"trainer": train_lib.make_train(config), "train_lib": train_lib,
             "metrics_lib": metrics_lib, "V": V}
  nb = nbformat.read(NOTEBOOK, as_version=4)
  seen = set()
  for cell in nb.cells:
    if cell.cell_type != "code":
      continue
    tree = ast.parse(TransformerManager().transform_cell(cell.source))
    for node in ast.walk(tree):
      if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
          and node.value.id in objects):
        assert hasattr(objects[node.value.id], node.attr), f"{node.value.id}.{node.attr}"
        seen.add(node.value.id)
      # config.<section>.<key> = ... and config.<key> = ...: keys the quickstart config has.
      if isinstance(node, ast.Assign):
        for target in node.targets:
          path = []
          while isinstance(target, ast.Attribute):
            path.insert(0, target.attr)
            target = target.value
          if isinstance(target, ast.Name) and target.id == "config":
            section = config
            for key in path:
              assert key in section, f"config.{'.'.join(path)}"
              section = section[key]
  assert seen == set(objects), seen


def test_quickstart_notebook_runs_end_to_end(tmp_path, monkeypatch):
  """In the default suite, so that the notebook cannot rot: 70-80 s on 2 (shared) CPU cores,
  where kernel start, imports and compiling each jitted function once dominate; the run itself
  is the reduced parameterisation below (5 SFT steps and 2 RL steps on 4 episodes, through the
  notebook's MTRL_NB_* environment knobs; in Colab the defaults apply)."""
  # A kernel spec of this very interpreter, found first on JUPYTER_PATH: the kernel runs the
  # Python (and virtualenv) that runs pytest, whatever kernels the user has installed.
  spec_dir = tmp_path / "jupyter" / "kernels" / KERNEL
  spec_dir.mkdir(parents=True)
  (spec_dir / "kernel.json").write_text(json.dumps({
      "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
      "display_name": "mtrl_jax test", "language": "python"}))
  monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
  workdir = tmp_path / "run"
  for key, value in dict(SFT_STEPS=5, RL_STEPS=2, NUM_ENVS=4, EVAL_ENVS=4, EVAL_EVERY=1,
                         WORKDIR=workdir).items():
    monkeypatch.setenv(f"MTRL_NB_{key}", str(value))
  monkeypatch.setenv("PYDEVD_DISABLE_FILE_VALIDATION", "1")  # debugpy's frozen-modules notice

  nb = nbformat.read(NOTEBOOK, as_version=4)
  nb.cells.append(nbformat.v4.new_code_cell("import sys; print('KERNEL_PREFIX=' + sys.prefix)"))
  t0 = time.perf_counter()
  nbclient.NotebookClient(nb, timeout=600, startup_timeout=120, kernel_name=KERNEL,
                          resources={"metadata": {"path": ROOT}}).execute()
  elapsed = time.perf_counter() - t0

  errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
            if o["output_type"] == "error"]
  assert not errors, errors
  assert f"KERNEL_PREFIX={sys.prefix}" in _text(nb.cells[-1])

  plot = _tagged(nb, "plot")
  assert any("image/png" in o.get("data", {}) for o in plot.outputs), plot.outputs
  for tag in ("before-rl", "after-rl"):
    text = _text(_tagged(nb, tag))
    assert "prompt   │ <bos>" in text and "agent 0  ▶ " in text, text
    assert "sampled success" in text
  final = re.search(r"final greedy eval success: ([0-9.]+)", _text(_tagged(nb, "final")))
  assert final and 0.0 <= float(final.group(1)) <= 1.0, _text(_tagged(nb, "final"))

  # What the run left in WORKDIR: the CLI's metrics format, the curves, the samples.
  from mtrl_jax import metrics as metrics_lib
  steps = [r["step"] for r in metrics_lib.read_metrics(workdir / "metrics.jsonl")]
  assert steps == list(range(1, 8)), steps
  assert (workdir / "learning_curves.png").stat().st_size > 1000
  assert "▶" in (workdir / "samples.txt").read_text()
  print(f"notebook executed in {elapsed:.0f} s")
