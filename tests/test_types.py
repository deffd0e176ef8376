"""Vocabulary, the Trajectory contract and the pretty-printer, on a hand-built conversation."""

import jax.numpy as jnp
import numpy as np
import pytest

from mtrl_jax import types, vocab as V

VOCAB = V.Vocab.build(V.DIGITS, ["calc", "what", "is", "*", "?"])

# prompt | turn 0 (sampled) | reply 0 | turn 1 (sampled) | pad
SEGMENTS = [
    ("prompt", "<bos> <user> what is 1 2 * 3 4 ? <eot> <assistant>"),
    ("agent", "<call> calc 1 2 * 3 4 </call> <eot>"),
    ("reply", "<tool> 4 0 8 <eot> <assistant>"),
    ("agent", "<answer> 4 0 8 </answer> <eot>"),
]
T, K = 40, 3


def hand_built(batch=2):
  tokens = np.zeros((batch, T), np.int32)
  mask = np.zeros((batch, T), bool)
  turn = np.full((batch, T), -1, np.int32)
  logp = np.zeros((batch, T), np.float32)
  turn_end = np.zeros((batch, K), np.int32)
  turn_reward = np.zeros((batch, K), np.float32)
  turn_valid = np.zeros((batch, K), bool)
  pos, k = 0, 0
  for kind, text in SEGMENTS:
    ids = VOCAB.encode(text)
    tokens[:, pos:pos + len(ids)] = ids
    if kind == "agent":
      mask[:, pos:pos + len(ids)] = True
      turn[:, pos:pos + len(ids)] = k
      logp[:, pos:pos + len(ids)] = -0.5
      turn_end[:, k] = pos + len(ids) - 1
      turn_valid[:, k] = True
      k += 1
    pos += len(ids)
  turn_reward[:, 1] = 1.0
  return types.Trajectory(
      tokens=jnp.asarray(tokens), loss_mask=jnp.asarray(mask), turn=jnp.asarray(turn),
      sampler_logprob=jnp.asarray(logp), turn_end=jnp.asarray(turn_end),
      turn_reward=jnp.asarray(turn_reward), turn_valid=jnp.asarray(turn_valid),
      done=jnp.ones((batch,), bool), truncated=jnp.zeros((batch,), bool),
      info={"success": jnp.ones((batch,), bool)})


def test_vocab_layout_and_round_trip():
  assert VOCAB.id(V.PAD) == V.PAD_ID == 0
  assert VOCAB.symbols[: len(V.SPECIAL_TOKENS)] == V.SPECIAL_TOKENS
  text = "<call> calc 1 2 * 3 4 </call> <eot>"
  ids = VOCAB.encode(text)
  assert VOCAB.decode(ids) == text
  assert VOCAB.encode(text.split()) == ids
  # Duplicates across symbol lists are dropped, order is kept, ids are stable.
  again = V.Vocab.build(V.DIGITS, ["calc", "what", "calc", "is", "*", "?"])
  assert again.symbols == VOCAB.symbols
  padded, n = VOCAB.encode_padded("4 0 8", 6)
  assert n == 3 and padded.tolist() == VOCAB.encode("4 0 8") + [0, 0, 0]
  assert VOCAB.decode([VOCAB.size + 3]) == f"<?{VOCAB.size + 3}>"


def test_vocab_errors():
  with pytest.raises(KeyError, match="'banana'"):
    VOCAB.encode("what is banana")
  with pytest.raises(ValueError, match="whitespace"):
    V.Vocab.build(["two words"])
  with pytest.raises(ValueError, match="do not fit"):
    VOCAB.encode_padded("1 2 3", 2)
  assert VOCAB.missing(["1", "zebra", "calc", "yak"]) == ["zebra", "yak"]


def test_check_trajectory_accepts_valid():
  traj = hand_built()
  types.check_trajectory(traj)
  np.testing.assert_allclose(traj.returns, [1.0, 1.0])
  assert (traj.batch_size, traj.max_len, traj.max_turns) == (2, T, K)


def _broken(**changes):
  traj = hand_built()
  fields = {f: np.array(getattr(traj, f)) for f in (
      "tokens", "loss_mask", "turn", "sampler_logprob", "turn_end", "turn_reward",
      "turn_valid", "done", "truncated")}
  for name, fn in changes.items():
    fn(fields[name])
  return types.Trajectory(**{k: jnp.asarray(v) for k, v in fields.items()}, info=traj.info)


def _set(index, value):
  def fn(a):
    a[index] = value
  return fn


BROKEN = {
    "loss_mask on the prompt": (dict(loss_mask=_set((0, 2), True)), "outside agent turns"),
    "loss_mask on a reply": (dict(loss_mask=_set((1, 22), True)), "outside agent turns"),
    "turn_end not last token": (dict(turn_end=_set((0, 0), 15)), "turn_end"),
    "trained token after pad": (dict(loss_mask=_set((0, 38), True), turn=_set((0, 38), 1)),
                                "after padding"),
    "pad inside the sequence": (dict(tokens=_set((0, 5), 0)), "padding inside"),
    "turn id on padding": (dict(turn=_set((0, 39), 1)), "turn id on padding"),
    "valid turns not a prefix": (dict(turn_valid=_set((0, 2), True)), "turn 2 is valid"),
    "reward on invalid turn": (dict(turn_reward=_set((0, 2), 1.0)), "invalid turn"),
    "done and truncated": (dict(truncated=_set(0, True)), "both"),
    "positive logprob": (dict(sampler_logprob=_set((0, 13), 0.5)), "sampler_logprob > 0"),
    "logprob off the mask": (dict(sampler_logprob=_set((0, 1), -1.0)), "did not sample"),
    "nan logprob": (dict(sampler_logprob=_set((0, 13), np.nan)), "non-finite"),
    "turn id out of range": (dict(turn=_set((0, 13), K)), r"turn ids outside|turn_end"),
}


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_check_trajectory_rejects(name):
  changes, match = BROKEN[name]
  with pytest.raises(types.TrajectoryError, match=match):
    types.check_trajectory(_broken(**changes))


def test_check_trajectory_rejects_inconsistent_shapes():
  traj = hand_built()
  with pytest.raises(types.TrajectoryError, match="turn_reward has shape"):
    types.check_trajectory(traj.replace(turn_reward=traj.turn_reward[:, :2]))
  with pytest.raises(types.TrajectoryError, match="info"):
    types.check_trajectory(traj.replace(info={"success": jnp.ones((3,), bool)}))
  with pytest.raises(types.TrajectoryError, match="dtype"):
    types.check_trajectory(traj.replace(loss_mask=traj.loss_mask.astype(jnp.int32)))


def test_render_trajectory():
  text = V.render_trajectory(hand_built(), VOCAB)
  assert text.splitlines() == [
      "prompt   │ <bos> <user> what is 1 2 * 3 4 ? <eot> <assistant>",
      "agent 0  ▶ <call> calc 1 2 * 3 4 </call> <eot>",
      "reply 0  │ <tool> 4 0 8 <eot> <assistant>",
      "agent 1  ▶ <answer> 4 0 8 </answer> <eot>      reward 1",
      "[done; return 1]",
  ]
  colored = V.render_trajectory(hand_built(), VOCAB, color=True)
  assert "\033[1m<call>" in colored and "\033[2m<bos>" in colored
