"""`Wrapper`: an environment built on another one, forwarding everything it does not change.

    class Shouting(Wrapper):              # a wrapper overrides only what it changes
      @property
      def name(self):
        return f"shouting({self.env.name})"

      def step_env(self, key, state, action, params):
        state, obs, reward, done = self.env.step_env(key, state, action, params)
        return state, obs, 2.0 * reward, done

`Wrapper(env)` is an `Environment` whose

* static description - `vocab`, `symbols()`, `default_params`, `prompt_len`, `reply_len`,
  `action_len`, `max_turns` - is `env`'s;
* declared capabilities (see `base.Environment`) - `name`, `Params`, `empty_idle_actions`,
  `reflection_len`, `names_actions` - are `env`'s;
* hooks - `reset_env`, `step_env`, `expert`, `extra_info`, `reflection`, `reflection_action` -
  call `env`'s;
* other public attributes (an environment's own, e.g. `hops`, `tasks`, `tokenizer`) are read
  from `env` (`__getattr__`; names starting with `_` are not forwarded).

The public `reset`, `step` and `info` are `Environment`'s, composed from the hooks above: a
wrapper changes a turn by overriding `step_env` (the shared bookkeeping - a finished episode
does not move, the turn limit truncates, a final reply is empty - is then applied once, after
it, exactly as for any environment), and the prompt by overriding `reset_env`. Without
overrides, `Wrapper(env).step(...)` computes what `env.step(...)` computes, op for op. So the
wrapped environment must keep `Environment`'s `reset` / `step` / `info` too (all environments
of this package do; it is checked at construction).

Writing one: subclass, call `super().__init__(env)` first (it sets `self.env` and
`self.vocab`), then override what changes. A declared capability is overridden with a class
attribute (`empty_idle_actions = True`) or a property (a computed `name`); assigning it on the
instance (`self.name = ...`) raises, since the forwarding is a read-only property. A wrapper
whose params differ from the wrapped environment's (e.g. `reflexion.WithMemory`'s
`MemoryParams`, holding the inner params) declares its `Params`, `default_params`, and unwraps
them in every hook it forwards.

Wrappers in this package: `envs.python_tool.PythonToolEnv` (tools answered by Python
functions), `envs.json_tool.TokenizedEnv` (a symbol environment in a real tokenizer's ids),
`reflexion.WithMemory` (reflections in the prompt).
"""

from __future__ import annotations

from typing import Any, Sequence

import jax

from mtrl_jax.envs import base

# Environment's public methods that wrappers compose from the hooks (so the wrapped env must not
# replace them: a wrapper would silently skip the replacement).
_SHARED = ("reset", "step", "info")


class Wrapper(base.Environment):
  """`env` with everything forwarded (see the module docstring); subclass and override what
  changes."""

  def __init__(self, env: base.Environment):
    replaced = [m for m in _SHARED
                if getattr(type(env), m, None) is not getattr(base.Environment, m)]
    if not isinstance(env, base.Environment) or replaced:
      raise TypeError(f"{type(self).__name__}: can only wrap an Environment whose "
                      f"{'/'.join(_SHARED)} are Environment's (it overrides the hooks "
                      f"reset_env/step_env/...); {type(env).__name__} replaces {replaced}")
    self.env = env
    self.vocab = env.vocab

  def __getattr__(self, attr: str) -> Any:
    # Only called for attributes not found normally: an environment's own (e.g. `hops`).
    if hasattr(type(self), attr):  # a property of the wrapper that raised AttributeError
      raise AttributeError(f"{type(self).__name__}.{attr} raised AttributeError while being "
                           "computed (not forwarded to the wrapped environment)")
    if attr.startswith("_") or "env" not in self.__dict__:
      raise AttributeError(f"{type(self).__name__!r} object has no attribute {attr!r}")
    return getattr(self.env, attr)

  # --- declared capabilities ----------------------------------------------------------------
  @property
  def name(self) -> str:
    return self.env.name

  @property
  def Params(self) -> type:  # noqa: N802 (the declared attribute's name)
    return self.env.Params

  @property
  def empty_idle_actions(self) -> bool:
    return self.env.empty_idle_actions

  @property
  def reflection_len(self) -> int:
    return self.env.reflection_len

  @property
  def names_actions(self) -> bool:
    return self.env.names_actions

  # --- static description -------------------------------------------------------------------
  def symbols(self) -> Sequence[str]:
    return self.env.symbols()

  @property
  def default_params(self) -> Any:
    return self.env.default_params

  @property
  def prompt_len(self) -> int:
    return self.env.prompt_len

  @property
  def reply_len(self) -> int:
    return self.env.reply_len

  @property
  def action_len(self) -> int:
    return self.env.action_len

  @property
  def max_turns(self) -> int:
    return self.env.max_turns

  # --- hooks ----------------------------------------------------------------------------------
  def reset_env(self, key: jax.Array, params) -> tuple[base.EnvState, base.Observation]:
    return self.env.reset_env(key, params)

  def step_env(self, key: jax.Array, state: base.EnvState, action: base.Action, params
               ) -> tuple[base.EnvState, base.Observation, jax.Array, jax.Array]:
    return self.env.step_env(key, state, action, params)

  def expert(self, key: jax.Array, state: base.EnvState, params) -> base.Action:
    return self.env.expert(key, state, params)

  def extra_info(self, state: base.EnvState) -> dict[str, jax.Array]:
    return self.env.extra_info(state)

  def reflection(self, state: base.EnvState) -> tuple[jax.Array, jax.Array]:
    return self.env.reflection(state)

  def reflection_action(self, state: base.EnvState) -> base.Action:
    return self.env.reflection_action(state)
