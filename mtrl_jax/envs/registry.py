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

Your own environments. `name` may also be an import path, `"my_pkg.my_env:MyEnv"`: the module
is imported (it must be importable: installed, or in the directory you run from) and `MyEnv`,
an `Environment` subclass, is built like a registered class (a function there is called as a
factory). `register("my_env", MyEnv)` gives it a short name instead. Both run the cheap static
part of the contract (`envs.check.check_class`: a missing `Params`, an unimplemented hook, a
constructor argument without a default, ... are named), and `make` checks what it built
(`check_instance`); `envs.check.check_env` is the whole contract, to run once on a new
environment. `declared_overrides(name)` lists every override an environment class takes, with
its default (what `mtrl_jax.train.fill_env_section` puts into `config.env`)::

    env, params = make("unit_env:UnitConversion", num_digits=3, format_penalty=0.1)
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import types
import typing
from typing import Any, Callable

from mtrl_jax import vocab as V
from mtrl_jax.envs import base, check
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
  declared `Params`, the `flax.struct.dataclass` of its EnvParams, gives the dynamic ones).
  Runs `envs.check.check_class` (EnvContractError, a ValueError, names what is missing)."""
  if ":" in name:
    raise ValueError(f"environment name {name!r}: ':' marks an import path, not a name")
  check.check_class(cls)
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
  environment class or an import path to one (a factory checks its own overrides:
  ValueError)."""
  cls = _get(name)
  if not isinstance(cls, type):
    raise ValueError(f"environment {name!r} is built by the factory {_owner(name)}, which "
                     "checks its own overrides")
  ctor = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
  fields = [f.name for f in dataclasses.fields(cls.Params)]
  return ctor, fields


def declared_overrides(name: str) -> dict[str, tuple[Any, type | None]]:
  """Every override of environment class `name` (registered or an import path) with its
  default and its type: {argument or field: (default, type)}, constructor arguments first.

  The type is the annotation's (`int | None` -> int), else the default's, else None (`vocab`,
  say). ValueError for a factory (its overrides are its own) or an unknown name."""
  cls = _get(name)
  if not isinstance(cls, type):
    raise ValueError(f"environment {name!r} is built by the factory {_owner(name)}, which "
                     "declares no overrides")
  out = {}
  hints = _hints(cls.__init__)
  for p in list(inspect.signature(cls.__init__).parameters.values())[1:]:
    out[p.name] = (p.default, _plain_type(hints.get(p.name), p.default))
  hints = _hints(cls.Params)
  for f in dataclasses.fields(cls.Params):
    default = f.default if f.default is not dataclasses.MISSING else None
    out[f.name] = (default, _plain_type(hints.get(f.name), default))
  return out


def _hints(obj) -> dict[str, Any]:
  try:
    return typing.get_type_hints(obj)
  except Exception:  # an annotation that does not resolve: fall back to the defaults' types
    return {}


def _plain_type(hint, default) -> type | None:
  """`int`, `float`, `str` or `bool` from an annotation (`X | None` -> X), else the default's
  type if it is one of those, else None."""
  scalars = (bool, int, float, str)
  if hint in scalars:
    return hint
  args = [a for a in typing.get_args(hint) if a is not type(None)]
  if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 1 \
      and args[0] in scalars:
    return args[0]
  return type(default) if type(default) in scalars else None


def make(name: str, **overrides: Any) -> tuple[base.Environment, Any]:
  """Build environment `name` (registered, or an import path `"pkg.mod:Class"`) and its
  EnvParams, applying `overrides` (see module docstring). A factory's environment is what the
  factory returns, its errors the factory's."""
  cls = _get(name)
  if not isinstance(cls, type):
    return cls(**overrides)
  ctor, fields = accepted_overrides(name)
  unknown = sorted(k for k in overrides if k not in ctor and k not in fields)
  if unknown:
    raise ValueError(f"unknown override(s) {unknown} for environment {name!r}; accepted: "
                     f"constructor arguments {ctor}, EnvParams fields {fields}")
  env = cls(**{k: v for k, v in overrides.items() if k in ctor})
  check.check_instance(env)
  params = env.default_params.replace(**{k: v for k, v in overrides.items() if k in fields})
  return env, params


def shared_vocab(*envs: base.Environment) -> V.Vocab:
  """One vocabulary covering every given environment's symbols (pass it back as `vocab=`)."""
  return V.Vocab.build(*(env.symbols() for env in envs))


def _get(name: str) -> type[base.Environment] | Factory:
  """The class (or factory) `name` stands for: registered, or imported from `"pkg.mod:Attr"`
  (a class is checked with `check.check_class`)."""
  if not isinstance(name, str):
    raise ValueError(f"an environment name is a string, got {name!r}")
  if name in _FACTORIES:
    return _FACTORIES[name]
  if ":" in name:
    return _import(name)
  try:
    return _ENVS[name]
  except KeyError:
    raise ValueError(f"unknown environment {name!r}; known environments: {list_envs()}, "
                     f"built by factories: {list_factories()}, or an import path "
                     f"'package.module:Class'") from None


def _import(path: str) -> type[base.Environment] | Factory:
  module_name, _, attr = path.partition(":")
  if not module_name or not attr:
    raise ValueError(f"environment {path!r}: an import path is 'package.module:Class'")
  try:
    module = importlib.import_module(module_name)
  except ImportError as e:
    raise ValueError(f"environment {path!r}: cannot import {module_name!r} ({e}); it must be "
                     "importable - installed, or a module in the directory you run from")
  try:
    obj = getattr(module, attr)
  except AttributeError:
    found = sorted(n for n, v in vars(module).items() if isinstance(v, type)
                   and issubclass(v, base.Environment) and v.__module__ == module.__name__)
    raise ValueError(f"environment {path!r}: module {module_name!r} has no {attr!r}; "
                     f"environments defined there: {found}") from None
  if isinstance(obj, type):
    check.check_class(obj)
  elif not callable(obj):
    raise ValueError(f"environment {path!r} is a {type(obj).__name__}: name an Environment "
                     "subclass (or a factory function returning (env, params))")
  return obj


def _owner(name: str) -> str:
  """What `name` is registered to: the class's name, or the factory's module and name."""
  if name in _ENVS:
    return _ENVS[name].__name__
  factory = _FACTORIES[name] if name in _FACTORIES else _get(name)
  return f"{factory.__module__}.{factory.__qualname__}"
