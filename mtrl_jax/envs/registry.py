"""`make(name, **overrides) -> (env, params)`: environments by name.

An override is either a constructor argument (static: changes shapes, e.g. `num_digits`,
`hops`, `fully_specified`, `max_turns`, `vocab`) or a field of the environment's `EnvParams`
(dynamic: `noise`, `format_penalty`, ...); `make` routes each to the right place. Unknown names
raise `ValueError` listing what exists / what is accepted::

    env, params = make("search", hops=3, noise=0.2)
    env, params = make("fix", num_bugs=2, turn_penalty=1.0)   # static and dynamic knobs
    vocab = shared_vocab(make("calculator")[0], make("search")[0])
    calc, _ = make("calculator", vocab=vocab)      # both speak one vocabulary

Environments that need files or optional dependencies are built by a registered factory,
`factory(**overrides) -> (env, params)`, which checks its own overrides and imports what it
needs when called (so importing the registry never needs them): `json_tool`, a real
tokenizer's JSON tool calls (`mtrl_jax.envs.json_tool.from_config`; the `hf` extra)::

    env, params = make("json_tool", checkpoint="/ckpt/Qwen2.5-0.5B-Instruct",
                       tasks="tasks.jsonl", data_dir="/data/tfds")

`list_envs()` names the environment classes (`make(name)` builds each from its defaults
alone), `list_factories()` the factories.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable

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


Factory = Callable[..., tuple[base.Environment, Any]]


def _json_tool(**overrides: Any) -> tuple[base.Environment, Any]:
  """`json_tool.from_config({"name": "json_tool", **overrides})`, imported when called."""
  from mtrl_jax.envs import json_tool
  return json_tool.from_config({"name": "json_tool", **overrides})


_FACTORIES: dict[str, Factory] = {
    "json_tool": _json_tool,
}


def list_envs() -> list[str]:
  """Registered environment classes, sorted (each built by `make(name)` from its defaults)."""
  return sorted(_ENVS)


def list_factories() -> list[str]:
  """Environments built by a registered factory (see the module docstring), sorted."""
  return sorted(_FACTORIES)


def register(name: str, cls: type[base.Environment]) -> None:
  """Add an environment class (its constructor's keyword arguments become overrides; its
  declared `Params`, the `flax.struct.dataclass` of its EnvParams, gives the dynamic ones)."""
  if name in _FACTORIES or (name in _ENVS and _ENVS[name] is not cls):
    raise ValueError(f"environment {name!r} is already registered to {_owner(name)}")
  _ENVS[name] = cls


def register_factory(name: str, factory: Factory) -> None:
  """Add an environment built by `factory(**overrides) -> (env, params)`: it validates its
  overrides (errors are its own) and imports what it needs when called."""
  if name in _ENVS or (name in _FACTORIES and _FACTORIES[name] is not factory):
    raise ValueError(f"environment {name!r} is already registered to {_owner(name)}")
  _FACTORIES[name] = factory


def accepted_overrides(name: str) -> tuple[list[str], list[str]]:
  """(constructor arguments, EnvParams fields) that `make(name, ...)` accepts, for a registered
  environment class (a factory checks its own overrides: ValueError)."""
  if name in _FACTORIES:
    raise ValueError(f"environment {name!r} is built by the factory {_owner(name)}, which "
                     "checks its own overrides")
  cls = _get(name)
  ctor = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
  fields = [f.name for f in dataclasses.fields(cls.Params)]
  return ctor, fields


def make(name: str, **overrides: Any) -> tuple[base.Environment, Any]:
  """Build environment `name` and its EnvParams, applying `overrides` (see module docstring).
  A factory's environment is what the factory returns, its errors the factory's."""
  if name in _FACTORIES:
    return _FACTORIES[name](**overrides)
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
    raise ValueError(f"unknown environment {name!r}; known environments: {list_envs()}, "
                     f"built by factories: {list_factories()}") from None


def _owner(name: str) -> str:
  """What `name` is registered to: the class's name, or the factory's module and name."""
  if name in _ENVS:
    return _ENVS[name].__name__
  factory = _FACTORIES[name]
  return f"{factory.__module__}.{factory.__qualname__}"
