"""`make(name, **overrides) -> (env, params)`: environments by name.

An override is either a constructor argument (static: changes shapes, e.g. `num_digits`,
`hops`, `fully_specified`, `max_turns`, `vocab`) or a field of the environment's `EnvParams`
(dynamic: `noise`, `format_penalty`, ...); `make` routes each to the right place. Unknown names
raise `ValueError` listing what exists / what is accepted::

    env, params = make("search", hops=3, noise=0.2)
    env, params = make("fix", num_bugs=2, turn_penalty=1.0)   # static and dynamic knobs
    vocab = shared_vocab(make("calculator")[0], make("search")[0])
    calc, _ = make("calculator", vocab=vocab)      # both speak one vocabulary
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

from mtrl_jax import vocab as V
from mtrl_jax.envs import base
from mtrl_jax.envs.calculator import Calculator
from mtrl_jax.envs.clarify import Clarify
from mtrl_jax.envs.fix import Fix
from mtrl_jax.envs.retrieval import Retrieval
from mtrl_jax.envs.search import Search

_ENVS: dict[str, type[base.Environment]] = {
    "calculator": Calculator,
    "search": Search,
    "clarify": Clarify,
    "fix": Fix,
    "retrieval": Retrieval,
}


def list_envs() -> list[str]:
  """Registered environment names, sorted."""
  return sorted(_ENVS)


def register(name: str, cls: type[base.Environment]) -> None:
  """Add an environment class (its constructor's keyword arguments become overrides; it needs
  a `Params` class attribute, the `flax.struct.dataclass` of its EnvParams)."""
  if name in _ENVS and _ENVS[name] is not cls:
    raise ValueError(f"environment {name!r} is already registered to {_ENVS[name].__name__}")
  _ENVS[name] = cls


def accepted_overrides(name: str) -> tuple[list[str], list[str]]:
  """(constructor arguments, EnvParams fields) that `make(name, ...)` accepts."""
  cls = _get(name)
  ctor = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
  fields = [f.name for f in dataclasses.fields(cls.Params)]
  return ctor, fields


def make(name: str, **overrides: Any) -> tuple[base.Environment, Any]:
  """Build environment `name` and its EnvParams, applying `overrides` (see module docstring)."""
  ctor, fields = accepted_overrides(name)
  unknown = sorted(k for k in overrides if k not in ctor and k not in fields)
  if unknown:
    raise ValueError(f"unknown override(s) {unknown} for environment {name!r}; accepted: "
                     f"constructor arguments {ctor}, EnvParams fields {fields}")
  env = _ENVS[name](**{k: v for k, v in overrides.items() if k in ctor})
  params = env.default_params.replace(**{k: v for k, v in overrides.items() if k in fields})
  return env, params


def shared_vocab(*envs: base.Environment) -> V.Vocab:
  """One vocabulary covering every given environment's symbols (pass it back as `vocab=`)."""
  return V.Vocab.build(*(env.symbols() for env in envs))


def _get(name: str) -> type[base.Environment]:
  try:
    return _ENVS[name]
  except KeyError:
    raise ValueError(f"unknown environment {name!r}; known environments: {list_envs()}") from None
