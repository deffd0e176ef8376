"""Command-line plumbing shared by the experiment programs, and their console scripts.

`--config PATH` is an `ml_collections` config file. A path under `configs/` that does not
exist where you run names the shipped config of that name (the installed `configs` package),
so `--config configs/quickstart.py` works from any folder; your own config files can import
the shipped ones (`from configs import quickstart`). When the file is loaded, `config.env` is
filled with every override its environment declares (`mtrl_jax.train.fill_env_section`, for
the `--config.env.name` of the command line if there is one), so `--config.env.<key>=...`
sets any of them and an unknown key is an error listing them.

The console scripts `mtrl-train`, `mtrl-sft`, `mtrl-evaluate`, `mtrl-reflexion` and
`mtrl-benchmark` (setup.py) run `python -m experiments.<program>` from any folder, with that
folder on `sys.path` as `python -m` has it (so a config can name an environment in a module
there, `config.env.name = "my_env:MyEnv"`).
"""

from __future__ import annotations

import functools
import importlib
import os
import runpy
import sys

from absl import app, flags
from ml_collections import config_dict, config_flags

from mtrl_jax import checkpoint as ckpt_lib

# The --config flag of every experiment program (ml_collections config file + overrides).
CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a configs/<name>.py file "
                                         "(a shipped one from any folder) or your own.",
                                         lock_config=True)


def config_path(path: str) -> str:
  """`path`, or, if it does not exist and starts with `configs/`, the shipped config of that
  name in the installed `configs` package (unchanged when there is none: the loader then
  reports the missing file)."""
  parts = os.path.normpath(path).split(os.sep)
  if os.path.exists(path) or len(parts) < 2 or parts[0] != "configs":
    return path
  try:
    import configs
  except ImportError:
    return path
  shipped = os.path.join(os.path.dirname(os.path.abspath(configs.__file__)), *parts[1:])
  return shipped if os.path.exists(shipped) else path


def env_name_override(argv: list[str]) -> str | None:
  """The value of `--config.env.name=...` in `argv` (the last one), or None."""
  name = None
  for i, a in enumerate(argv):
    if a.startswith("--config.env.name="):
      name = a.split("=", 1)[1]
    elif a == "--config.env.name" and i + 1 < len(argv):
      name = argv[i + 1]
  return name


def complete_config(config, argv: list[str]) -> None:
  """Fill `config.env` with its environment's declared overrides (in place; see the module
  docstring)."""
  if isinstance(config, config_dict.ConfigDict) and "env" in config:
    from mtrl_jax import train as train_lib
    train_lib.fill_env_section(config, env_name_override(argv))


class _ConfigFileParser(flags.ArgumentParser):
  """`ml_collections`' config-file parser (`inner`: it loads and locks the file) with
  `config_path` before and `complete_config` after (the overrides are applied after both)."""

  def __init__(self, inner: flags.ArgumentParser):
    self.inner = inner

  def parse(self, argument):
    file, sep, arg = str(argument).partition(":")
    config = self.inner.parse(config_path(file) + sep + arg)
    complete_config(config, sys.argv)
    return config

  def flag_type(self):
    return self.inner.flag_type()


flags.FLAGS["config"].parser = _ConfigFileParser(flags.FLAGS["config"].parser)


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parser that turns a bad `--config.<key>` into a one-line error (exit 2).

  ml_collections raises a bare AttributeError/KeyError (or an unrecognised-flag error) for a
  key the config does not have; this names the offending flag and lists the valid keys of the
  section it tried to set.
  """
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError, flags.Error) as e:
    overrides = [a.split("=")[0] for a in argv[1:] if a.startswith("--config.")]
    config = _load_config(argv)
    for flag in overrides:
      section, parts = config, flag[len("--config."):].split(".")
      for depth, part in enumerate(parts):
        if not hasattr(section, "keys"):
          break
        if part not in section:
          where = ".".join(["config", *parts[:depth]])
          print(f"error: unknown config key {flag[2:]!r}: {where} has no {part!r}; valid keys "
                f"there: {sorted(section.keys())}", file=sys.stderr)
          sys.exit(2)
        section = section[part]
    print(f"error: {str(e).strip(chr(34))}", file=sys.stderr)
    sys.exit(2)


def _load_config(argv: list[str]):
  """The config named by `--config PATH` / `--config=PATH`, loaded directly (None if absent)."""
  for i, a in enumerate(argv):
    path = a.split("=", 1)[1] if a.startswith("--config=") else (
        argv[i + 1] if a == "--config" and i + 1 < len(argv) else None)
    if path:
      try:
        config = runpy.run_path(config_path(path.split(":")[0]))["get_config"]()
        complete_config(config, argv)
        return config
      except Exception:  # the real parse reports problems with the file itself
        return None
  return None


def config_error(e: Exception):
  """Exit with a bad config's error as one line on stderr, exit code 2 (no traceback)."""
  message = " ".join(str(e).split())
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


def build_trainer(config):
  """`mtrl_jax.train.make_train(config)`; a bad config (any section) exits via `config_error`
  before anything is compiled."""
  from mtrl_jax import train as train_lib
  try:
    return train_lib.make_train(config)
  except ValueError as e:  # ConfigError, BudgetError, ...: every message names its setting
    config_error(e)


def init_from_run(source: str, init, start_rl, seed_keys):
  """Params of the latest checkpoint in the run directory `source` (or its `checkpoints/`)."""
  directory = os.path.join(source, "checkpoints")
  directory = directory if os.path.isdir(directory) else source
  if not os.path.isdir(directory):
    sys.exit(f"error: config.init_from={source!r} is not a directory")
  ckpt = ckpt_lib.Checkpointer(directory, save_every=1, keep=1)
  step = ckpt.latest_step()
  if step is None:
    sys.exit(f"error: config.init_from={source!r} has no checkpoint")
  # A finished SFT phase was saved with the RL optimizer, an unfinished one with the SFT one.
  template = init(seed_keys)
  errors = []
  for t in (start_rl(template), template):
    try:
      state, meta = ckpt.restore(t, step)
      break
    except ckpt_lib.CheckpointError as e:
      errors.append(str(e))
  else:
    sys.exit(f"error: config.init_from={source!r}: its checkpoint does not fit this config's "
             f"model and seeds:\n{errors[0]}")
  ckpt.close()
  print(f"initialised from {directory} step {step} ({meta.get('phase')})")
  return template.replace(params=state.params)


def trained_run(config, run_dir: str | None):
  """(trainer, state, vmap) for evaluating a trained run: the trainer built from `config`
  (a bad config exits with its error), the params of `run_dir`'s latest checkpoint for each of
  `config.train.num_seeds` seeds (leading seed axis when > 1), and `vmap`, which maps a function
  of one seed's params over the seeds (the identity for one seed).

  `run_dir=None`: the config's initial params instead (`trainer.init`): a Hugging Face
  checkpoint as loaded (`model.preset="hf"`); for the package's own models, an untrained
  policy (said on stdout)."""
  import jax  # the flag plumbing above does not need JAX
  trainer = build_trainer(config)
  seeds = trainer.train_config.num_seeds
  vmap = (lambda f: jax.vmap(f)) if seeds > 1 else (lambda f: f)
  seed_keys = jax.random.split(jax.random.key(config.seed), seeds)
  seed_keys = seed_keys if seeds > 1 else seed_keys[0]
  if run_dir is None:
    preset = config.model.get("preset", "")
    what = (f"the checkpoint {config.model.checkpoint}" if preset == "hf" else
            f"untrained, model preset {preset!r}")
    print(f"no --run: the config's initial params ({what})")
    return trainer, jax.jit(vmap(trainer.init))(seed_keys), vmap
  state = init_from_run(run_dir, jax.jit(vmap(trainer.init)), jax.jit(vmap(trainer.start_rl)),
                        seed_keys)
  return trainer, state, vmap


def output_path(out: str | None, run_dir: str | None, name: str) -> str:
  """`--out`, else `<run_dir>/<name>`; without either, exit with the error."""
  if out:
    return out
  if run_dir is None:
    sys.exit("error: without --run, name the output file with --out")
  return os.path.join(run_dir, name)


# --- console scripts (setup.py entry points) ---------------------------------------------------

def _program(module: str):
  """Import `experiments.<module>` (which defines its flags) with the working directory first on
  `sys.path`, as `python -m` runs it."""
  if os.getcwd() not in sys.path:
    sys.path.insert(0, os.getcwd())
  return importlib.import_module(f"experiments.{module}")


def train_script():
  """`mtrl-train`: `python -m experiments.train`."""
  app.run(_program("train").main, flags_parser=parse_flags)


def sft_script():
  """`mtrl-sft`: `python -m experiments.sft`."""
  app.run(functools.partial(_program("train").main, sft_only=True), flags_parser=parse_flags)


def evaluate_script():
  """`mtrl-evaluate`: `python -m experiments.evaluate`."""
  app.run(_program("evaluate").main, flags_parser=parse_flags)


def reflexion_script():
  """`mtrl-reflexion`: `python -m experiments.reflexion`."""
  app.run(_program("reflexion").main, flags_parser=parse_flags)


def benchmark_script():
  """`mtrl-benchmark`: `python -m experiments.benchmark`."""
  sys.exit(_program("benchmark").main())
