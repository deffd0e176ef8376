"""Optional dependencies, imported when first needed: `require("safetensors")`.

The `hf` extra (`pip install -e ".[hf]"`: safetensors, tokenizers, jinja2) is only needed for
Hugging Face checkpoints and tokenizers (`mtrl_jax.models.hf`, `mtrl_jax.models.chat`,
`mtrl_jax.envs.json_tool`); those modules import it through `require` inside the functions that
use it, so `import mtrl_jax...` never needs it. A leaf: no mtrl_jax imports.
"""

from __future__ import annotations

import types


def require(module: str) -> types.ModuleType:
  """Import an optional dependency of the `hf` extra, with an error that says how to get it.

  module: a dotted name; the module itself is returned (`require("jinja2.sandbox")` is the
  submodule, not the package). Raises ImportError naming the module and the install command.
  """
  try:
    return __import__(module, fromlist=["_"])
  except ImportError as e:
    raise ImportError(f"{module} is needed for Hugging Face checkpoints and tokenizers: "
                      f'pip install -e ".[hf]"  ({e})') from None
