"""The README's "Write your own environment" example, as a user runs it: its files
(examples/unit_conversion/, shown verbatim in the README) copied to a temporary folder outside
the repository, and the README's commands run there against the installed package (no
PYTHONPATH, the repository not on sys.path): check_env, training (tiny step counts added to the
command), and loading the run back to render and evaluate it. Also the console scripts and the
shipped configs from any folder, and `--config.env.<key>` for every declared override.
"""

import os
import re
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "examples", "unit_conversion")
FILES = ("unit_env.py", "unit_config.py", "show_run.py")
# The README's commands, in order (test_readme_shows_the_example checks they are there).
CHECK = ('python -c "from unit_env import UnitConversion; from mtrl_jax.envs import check_env; '
         'print(check_env(UnitConversion()))"')
TRAIN = "python -m experiments.train --config unit_config.py --workdir runs/unit"
SHOW = "python show_run.py runs/unit"
TINY = ["--config.sft.steps=4", "--config.train.steps=3", "--config.train.checkpoint_every=2",
        "--config.train.keep_checkpoints=1", "--config.rollout.num_envs=4",
        "--config.train.eval_envs=4", "--config.sft.batch_size=4", "--config.train.eval_every=3",
        "--config.num_samples=1", "--config.env.guess_penalty=0.5"]


def _readme() -> str:
  with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
    return f.read()


def _env() -> dict:
  env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
  env["PYTHONDONTWRITEBYTECODE"] = "1"
  return env


def _run(args, cwd, timeout=600, check=True):
  out = subprocess.run(args, cwd=cwd, env=_env(), capture_output=True, text=True,
                       timeout=timeout)
  if check:
    assert out.returncode == 0, (args, out.stdout[-2000:], out.stderr[-3000:])
  return out


def _python(command: str) -> list[str]:
  """A README command line as argv, run by this interpreter (the test's virtualenv)."""
  import shlex
  argv = shlex.split(command)
  assert argv[0] == "python"
  return [sys.executable, *argv[1:]]


def test_readme_shows_the_example():
  """README and example cannot drift: each file appears verbatim in a python block, and the
  commands this test runs are the README's."""
  readme = _readme()
  for name in FILES:
    with open(os.path.join(EXAMPLE, name), encoding="utf-8") as f:
      text = f.read()
    assert f"`{name}`" in readme, name
    assert f"```python\n{text}```" in readme, f"README does not show {name} verbatim"
  blocks = re.findall(r"```bash\n(.*?)```", readme, flags=re.S)
  commands = [b for b in blocks if "unit_config.py" in b]
  assert len(commands) == 1, commands
  lines = [l.split("#")[0].strip() for l in commands[0].splitlines()]
  assert [l for l in lines if l.startswith("python")] == [CHECK, TRAIN, SHOW]


def test_example_trains_and_renders_from_outside_the_repository(tmp_path):
  for name in FILES:
    shutil.copy(os.path.join(EXAMPLE, name), tmp_path / name)
  # The installed package, not the checkout on sys.path.
  probe = _run([sys.executable, "-c", "import sys, mtrl_jax, experiments, configs; "
                "print(repr(sys.path))"], tmp_path)
  assert ROOT not in eval(probe.stdout) and os.path.realpath(ROOT) not in eval(probe.stdout)

  check = _run(_python(CHECK), tmp_path)
  assert "'expert_success': 1.0" in check.stdout, check.stdout

  train = _run(_python(TRAIN) + TINY, tmp_path)
  assert "env unit_env:UnitConversion" in train.stdout, train.stdout
  assert "prompt   │ <bos> <user> convert" in train.stdout
  run = tmp_path / "runs" / "unit"
  # keep_checkpoints=1 keeps the latest (7) and, always, the end of SFT (4).
  assert sorted(os.listdir(run / "checkpoints"), key=int) == ["4", "7"]
  metrics = (run / "metrics.jsonl").read_text()
  assert '"eval/guessed"' in metrics and '"eval/answered"' in metrics  # its own counters

  show = _run(_python(SHOW), tmp_path)
  text = show.stdout
  assert "--- after SFT, step 4 ---" in text and "--- final ---" in text, text
  assert text.count("prompt   │ <bos> <user> convert") == 2 and "agent 0  ▶ " in text, text
  assert text.count("'eval/success_rate'") == 2 and "'eval/guessed'" in text, text

  # The same run in Python: the trainer of its saved config (the override included).
  sys.path.insert(0, str(tmp_path))
  try:
    from mtrl_jax import checkpoint as ckpt_lib
    from mtrl_jax import runs
    trainer, state = runs.load_run(run)
    assert trainer.env.name == "unit_conversion" and trainer.env_params.guess_penalty == 0.5
    assert int(state.step) == 3  # RL steps (the phase's counter)
    _, warm = runs.load_run(run, step=4)
    assert int(warm.step) == 0  # saved right after the switch to the RL optimizer
    with pytest.raises(ckpt_lib.CheckpointError, match=r"no checkpoint step 5 .*available: "
                                                      r"\[4, 7\]"):
      runs.load_run(run, step=5)
  finally:
    sys.path.remove(str(tmp_path))
    sys.modules.pop("unit_env", None)


def _console(name: str) -> str:
  path = os.path.join(os.path.dirname(sys.executable), name)
  assert os.path.exists(path), f"{path} is missing: reinstall the package (pip install -e .)"
  return path


@pytest.mark.parametrize("args, expect", [
    # A shipped config by its repository path from another folder; any declared override is a
    # key of config.env, an unknown one is named with the valid keys.
    (["--config", "configs/quickstart.py", "--config.env.formt_penalty=0.1"],
     r"config.env has no 'formt_penalty'; valid keys there: \['format_penalty', 'habit_p', "
     r"'max_tool_operands', 'max_turns', 'name', 'noise', 'num_digits', 'num_operands', "
     r"'operators'\]"),
    # --config.env.name switches the environment whose overrides config.env accepts.
    (["--config", "configs/quickstart.py", "--config.env.name=search", "--config.env.hops=3",
      "--config.env.nope=1"], r"config.env has no 'nope'; valid keys there: \[.*'hops'.*\]"),
    (["--config", "unit_config.py", "--config.env.nope=1"],
     r"valid keys there: \[.*'guess_penalty', .*'num_digits'.*\]"),
])
def test_console_script_from_any_folder(tmp_path, args, expect):
  for name in FILES:
    shutil.copy(os.path.join(EXAMPLE, name), tmp_path / name)
  out = _run([_console("mtrl-train"), *args], tmp_path, timeout=300, check=False)
  assert out.returncode != 0
  assert re.search(expect, out.stderr), out.stderr[-3000:]


def test_console_scripts_are_installed():
  """Every console script is installed and its entry point loads; `mtrl-sft` runs (and stops
  on a bad setting before compiling anything)."""
  from experiments import cli
  scripts = {"mtrl-train": "train_script", "mtrl-sft": "sft_script",
             "mtrl-evaluate": "evaluate_script", "mtrl-reflexion": "reflexion_script",
             "mtrl-benchmark": "benchmark_script"}
  for name, function in scripts.items():
    with open(_console(name), encoding="utf-8") as f:
      assert f"from experiments.cli import {function}" in f.read(), name
    assert callable(getattr(cli, function)), function
  out = _run([_console("mtrl-sft"), "--config", "configs/quickstart.py", "--config.sft.steps=0"],
             ROOT, timeout=300, check=False)
  assert out.returncode != 0 and "experiments.sft needs at least one step" in out.stderr, \
      out.stderr[-2000:]
