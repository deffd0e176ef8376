"""Command-line plumbing shared by the experiment programs."""

from __future__ import annotations

import runpy
import sys

from absl import flags


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
        return runpy.run_path(path.split(":")[0])["get_config"]()
      except Exception:  # the real parse reports problems with the file itself
        return None
  return None
