"""The data contract: one row per episode, the exact token stream the policy saw and produced.

A row is::

    [prompt][assistant turn 0][reply 0][assistant turn 1][reply 1] ... [final turn][pad ...]

`Trajectory` carries it together with everything the learner needs, so nothing is ever
re-rendered from text. `check_trajectory` verifies the invariants on host (numpy); it is for
tests and debugging, never called inside jitted code.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from mtrl_jax.vocab import PAD_ID


@flax.struct.dataclass
class Trajectory:
  """A padded batch of multi-turn episodes. B = episodes, T = max context, K = max turns.

  Attributes:
    tokens: [B, T] int32, the token stream (prompt, agent turns, replies), `PAD_ID` after the end.
    loss_mask: [B, T] bool, True only on tokens the policy sampled. Gates every loss and metric.
    turn: [B, T] int32, agent-turn index k of each token inside agent turn k; -1 for prompt,
      replies and padding.
    sampler_logprob: [B, T] float32, log-prob of each sampled token under the distribution it
      was actually sampled from (temperature/top-k/top-p applied); 0 where `loss_mask` is False.
    turn_end: [B, K] int32, position of the last token of agent turn k (0 where not valid).
    turn_reward: [B, K] float32, reward the environment gave after turn k (0 where not valid).
    turn_valid: [B, K] bool, turn k happened. Valid turns are a prefix.
    done: [B] bool, the episode terminated (answer given, task over).
    truncated: [B] bool, the episode hit a budget (turns, context) before terminating.
    info: pytree of [B] or [B, K] arrays of environment metrics (success, tool calls, ...).
  """

  tokens: jax.Array
  loss_mask: jax.Array
  turn: jax.Array
  sampler_logprob: jax.Array
  turn_end: jax.Array
  turn_reward: jax.Array
  turn_valid: jax.Array
  done: jax.Array
  truncated: jax.Array
  info: Any = flax.struct.field(default_factory=dict)

  @property
  def batch_size(self) -> int:
    return self.tokens.shape[0]

  @property
  def max_len(self) -> int:
    return self.tokens.shape[1]

  @property
  def max_turns(self) -> int:
    return self.turn_end.shape[1]

  @property
  def returns(self) -> jax.Array:
    """[B] float32 undiscounted episode return."""
    return jnp.sum(jnp.where(self.turn_valid, self.turn_reward, 0.0), axis=-1)


class TrajectoryError(ValueError):
  """A trajectory breaks the data contract; the message names the row and the invariant."""


def check_trajectory(traj: Trajectory, *, pad_id: int = PAD_ID) -> None:
  """Raise `TrajectoryError` unless `traj` satisfies the data contract (host-side, numpy).

  Checks: shapes and dtypes agree on B, T, K; `loss_mask` only on agent-turn tokens; turn ids
  in [-1, K), non-decreasing along the row, present exactly for valid turns, valid turns a
  prefix; `turn_end[k]` is the last token of turn k; padding is a suffix with no trained or
  turn tokens; `sampler_logprob` finite, <= 0 on trained tokens and 0 elsewhere; rewards 0 on
  invalid turns; `done` and `truncated` exclusive; `info` leaves lead with B.
  """
  t = jax.tree.map(np.asarray, traj)
  if t.tokens.ndim != 2:
    raise TrajectoryError(f"tokens must be [B, T], got shape {t.tokens.shape}")
  B, T = t.tokens.shape
  K = t.turn_end.shape[-1] if t.turn_end.ndim == 2 else -1
  expected = {
      "tokens": ((B, T), np.integer), "loss_mask": ((B, T), np.bool_),
      "turn": ((B, T), np.integer), "sampler_logprob": ((B, T), np.floating),
      "turn_end": ((B, K), np.integer), "turn_reward": ((B, K), np.floating),
      "turn_valid": ((B, K), np.bool_), "done": ((B,), np.bool_), "truncated": ((B,), np.bool_),
  }
  for name, (shape, kind) in expected.items():
    x = getattr(t, name)
    if x.shape != shape:
      raise TrajectoryError(f"{name} has shape {x.shape}, expected {shape} (B={B}, T={T}, K={K})")
    if not np.issubdtype(x.dtype, kind):
      raise TrajectoryError(f"{name} has dtype {x.dtype}, expected {kind.__name__}")
  for path, leaf in jax.tree_util.tree_leaves_with_path(t.info):
    if np.ndim(leaf) == 0 or np.shape(leaf)[0] != B:
      raise TrajectoryError(f"info{jax.tree_util.keystr(path)} must lead with B={B}, "
                            f"got shape {np.shape(leaf)}")

  if not np.all(np.isfinite(t.sampler_logprob)):
    raise TrajectoryError("sampler_logprob has non-finite values")
  if not np.all(np.isfinite(t.turn_reward)):
    raise TrajectoryError("turn_reward has non-finite values")

  for b in range(B):
    tok, mask, turn = t.tokens[b], t.loss_mask[b], t.turn[b]
    valid, ends = t.turn_valid[b], t.turn_end[b]

    def fail(msg):
      raise TrajectoryError(f"row {b}: {msg}")

    nonpad = np.nonzero(tok != pad_id)[0]
    n = int(nonpad[-1]) + 1 if nonpad.size else 0
    if np.any(tok[:n] == pad_id):
      fail(f"padding inside the sequence at positions {np.nonzero(tok[:n] == pad_id)[0].tolist()}")
    if np.any(mask[n:]):
      fail(f"trained token after padding starts (length {n})")
    if np.any(turn[n:] != -1):
      fail(f"turn id on padding after position {n}")
    if np.any(mask & (turn < 0)):
      fail(f"loss_mask outside agent turns at positions {np.nonzero(mask & (turn < 0))[0].tolist()}")
    if np.any((turn < -1) | (turn >= K)):
      fail(f"turn ids outside [-1, {K})")
    in_turn = turn[turn >= 0]
    if np.any(np.diff(in_turn) < 0):
      fail("turn ids decrease along the row")
    if np.any(t.sampler_logprob[b][mask] > 1e-6):
      fail("sampler_logprob > 0 on a sampled token")
    if np.any(t.sampler_logprob[b][~mask] != 0):
      fail("sampler_logprob nonzero on a token the policy did not sample")
    if np.any(valid[1:] & ~valid[:-1]):
      fail(f"turn_valid is not a prefix: {valid.astype(int).tolist()}")
    if np.any(t.turn_reward[b][~valid] != 0):
      fail("nonzero turn_reward on an invalid turn")
    if t.done[b] and t.truncated[b]:
      fail("done and truncated are both set")
    for k in range(K):
      pos = np.nonzero(turn == k)[0]
      if valid[k] != (pos.size > 0):
        fail(f"turn {k} is {'valid' if valid[k] else 'invalid'} but has {pos.size} tokens")
      if not valid[k]:
        continue
      if np.any(np.diff(pos) != 1):
        fail(f"turn {k} is not contiguous")
      if ends[k] != pos[-1]:
        fail(f"turn_end[{k}]={ends[k]} but the last token of turn {k} is at {pos[-1]}")
