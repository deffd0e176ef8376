"""Validated settings of the RL algorithm (`config.algo`), as a frozen dataclass.

`AlgoConfig.from_section(config.algo)` rejects unknown keys and range-checks every value in one
place, with errors that name `config.algo.<field>` and the valid range, before anything is
compiled. The defaults below are the quick start's (`configs/quickstart.py`); there are no other
defaults hidden in code.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any, Mapping

from mtrl_jax.rl import losses
from mtrl_jax.rl.estimators import ESTIMATORS


class ConfigError(ValueError):
  """A config value that is unknown or out of range; the message names `config.<section>.<key>`."""


def section_dict(section: Any) -> dict[str, Any]:
  """A config section (ConfigDict, dict or dataclass) as a plain dict."""
  if dataclasses.is_dataclass(section):
    return dataclasses.asdict(section)
  return dict(section.to_dict() if hasattr(section, "to_dict") else section)


def from_section(cls, section: Any, name: str):
  """Build the frozen dataclass `cls` from a config section, rejecting unknown keys.

  `name` is the section's name in errors (`config.<name>.<key>`)."""
  if isinstance(section, cls):
    return section
  kwargs = section_dict(section)
  fields = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(kwargs) - fields)
  if unknown:
    raise ConfigError(f"config.{name}: unknown keys {unknown}; valid keys: {sorted(fields)}")
  return cls(**kwargs)


class Checks:
  """Range checks for a frozen config dataclass; each error names `config.<section>.<field>`."""

  def __init__(self, obj: Any, section: str):
    self.obj, self.section = obj, section

  def _fail(self, field: str, expected: str):
    value = getattr(self.obj, field)
    raise ConfigError(f"config.{self.section}.{field} must be {expected}, got {value!r}")

  def integer(self, field: str, low: int | None = None, high: int | None = None):
    value = getattr(self.obj, field)
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if not ok or (low is not None and value < low) or (high is not None and value > high):
      bounds = (f" >= {low}" if high is None else f" in [{low}, {high}]") if low is not None else ""
      self._fail(field, f"an integer{bounds}")

  def number(self, field: str, low: float | None = None, high: float | None = None, *,
             low_open: bool = False, high_open: bool = False):
    value = getattr(self.obj, field)
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if ok and low is not None:
      ok = value > low if low_open else value >= low
    if ok and high is not None:
      ok = value < high if high_open else value <= high
    if not ok:
      lo = "" if low is None else ("(" if low_open else "[") + f"{low}"
      hi = "" if high is None else f"{high}" + (")" if high_open else "]")
      if low is not None and high is not None:
        self._fail(field, f"a number in {lo}, {hi}")
      elif low is not None:
        self._fail(field, f"a number {'>' if low_open else '>='} {low}")
      else:
        self._fail(field, f"a number {'<' if high_open else '<='} {high}")

  def boolean(self, field: str):
    if not isinstance(getattr(self.obj, field), bool):
      self._fail(field, "True or False")

  def choice(self, field: str, options: tuple[str, ...]):
    if getattr(self.obj, field) not in options:
      self._fail(field, f"one of {options}")


@dataclasses.dataclass(frozen=True)
class AlgoConfig:
  """The RL algorithm: advantage estimator, loss and update (`config.algo`).

  Advantages:
    advantage: `turn_gae` (PPO with a trajectory-level critic over turns) | `token_gae` |
      `grpo` | `rloo`, or any other name in `mtrl_jax.rl.estimators.ESTIMATORS`.
    gamma_turn: reward horizon in [0, 1]: 0 = myopic next-turn reward, ~1 = whole trajectory.
    lam: GAE lambda in [0, 1].
    scale_by_std: GRPO divides by the group's std (False: Dr.GRPO).
    normalize_adv: batch-normalise the critic-based (GAE) advantages.
  Loss (`mtrl_jax.rl.objective.ppo_loss`):
    eps_low, eps_high: clip range [1 - eps_low, 1 + eps_high] (eps_high > eps_low: DAPO
      clip-higher); eps_low in [0, 1), eps_high >= 0.
    dual_clip: c > 1 bounds the loss of negative-advantage tokens (0 = off).
    loss_agg: `token_mean` | `seq_mean_token_mean` | `seq_mean_token_sum_norm`.
    vf_coef, value_clip, ent_coef: value-loss weight, value clip (0 = off), entropy bonus.
    kl_coef, kl_kind, kl_in_reward: KL to the frozen reference (0 = off; `k1|k2|k3`; in the
      loss, or subtracted from the per-turn reward).
    tis_cap: truncated importance correction against the sampler (0 = off).
  Scoring (`mtrl_jax.rl.scoring`):
    dynamic_sampling: DAPO: weight out groups whose returns have zero variance.
    overlong_len, overlong_cache: DAPO overlong reward shaping (0 = off).
    mask_replies: False puts tool/user replies into the loss (the masking ablation).
    keep_truncated: False drops truncated episodes from the loss (ablation).
  Model and collection:
    separate_critic: the critic is its own network instead of a value head on the policy.
    mr_window, mr_samples: CollabLLM multiturn-aware reward, turns of look-ahead (0 = off)
      and continuations per turn (`mtrl_jax.rl.collect.MultiturnAwareReward`).
  Update (`mtrl_jax.rl.update.ppo_update`):
    epochs, minibatches: passes over the batch, minibatches per pass (>= 1; minibatches must
      divide the per-device episode batch, checked by the trainer).
  """

  advantage: str = "turn_gae"
  gamma_turn: float = 1.0
  lam: float = 0.95
  scale_by_std: bool = True
  normalize_adv: bool = True
  eps_low: float = 0.2
  eps_high: float = 0.2
  dual_clip: float = 0.0
  loss_agg: str = "token_mean"
  vf_coef: float = 0.5
  value_clip: float = 0.0
  ent_coef: float = 0.0
  kl_coef: float = 0.0
  kl_kind: str = "k3"
  kl_in_reward: bool = False
  tis_cap: float = 0.0
  dynamic_sampling: bool = False
  overlong_len: int = 0
  overlong_cache: int = 0
  mask_replies: bool = True
  keep_truncated: bool = True
  separate_critic: bool = False
  mr_window: int = 0
  mr_samples: int = 1
  epochs: int = 2
  minibatches: int = 2

  def __post_init__(self):
    c = Checks(self, "algo")
    c.choice("advantage", tuple(ESTIMATORS))
    c.number("gamma_turn", 0.0, 1.0)
    c.number("lam", 0.0, 1.0)
    for flag in ("scale_by_std", "normalize_adv", "kl_in_reward", "dynamic_sampling",
                 "mask_replies", "keep_truncated", "separate_critic"):
      c.boolean(flag)
    c.number("eps_low", 0.0, 1.0, high_open=True)
    c.number("eps_high", 0.0)
    c.number("dual_clip", 0.0)
    if self.dual_clip and self.dual_clip <= 1.0:
      c._fail("dual_clip", "0 (off) or > 1")
    c.choice("loss_agg", losses.AGGREGATION_MODES)
    for coef in ("vf_coef", "value_clip", "ent_coef", "kl_coef", "tis_cap"):
      c.number(coef, 0.0)
    c.choice("kl_kind", losses.KL_KINDS)
    c.integer("overlong_len", 0)
    c.integer("overlong_cache", 0)
    if self.overlong_len:  # L_cache: the soft zone, in (0, L_max]
      c.integer("overlong_cache", 1, self.overlong_len)
    c.integer("mr_window", 0)
    c.integer("mr_samples", 1)
    if self.mr_window and self.advantage != "turn_gae":
      raise ConfigError(f"config.algo.mr_window={self.mr_window} (multiturn-aware reward) "
                        f"needs config.algo.advantage='turn_gae', got {self.advantage!r}")
    c.integer("epochs", 1)
    c.integer("minibatches", 1)

  @classmethod
  def from_section(cls, section: Mapping[str, Any] | Any) -> "AlgoConfig":
    """`config.algo` -> AlgoConfig (unknown keys and out-of-range values are `ConfigError`s)."""
    return from_section(cls, section, "algo")
