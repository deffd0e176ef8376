"""Checkpoints (exact round trip, keep-N, corruption, mismatch) and metrics (JSONL, TB, plots)."""

import glob
import io
import json
import math
import os

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from mtrl_jax import checkpoint as ckpt_lib
from mtrl_jax import metrics as metrics_lib
from mtrl_jax.checkpoint import CheckpointError, Checkpointer


@flax.struct.dataclass
class _State:
  params: dict
  opt_state: object
  ref_params: object
  step: jax.Array
  rng: jax.Array


def _make_state(seed=0, width=4, extra=False):
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  params = {"w": jax.random.normal(k1, (64, width)),
            "b": jax.random.normal(k2, (width,)).astype(jnp.bfloat16),
            "count": jnp.arange(3, dtype=jnp.int8)}
  if extra:
    params["extra"] = jnp.ones((2,))
  tx = optax.adam(1e-2)
  opt_state = tx.init(params)
  grads = jax.tree.map(lambda p: jnp.ones_like(p) * 0.1, params)
  _, opt_state = tx.update(grads, opt_state, params)  # non-trivial mu/nu/count
  return _State(params=params, opt_state=opt_state, ref_params=None,
                step=jnp.int32(7 + seed), rng=k3)


def _bits(x):
  if ckpt_lib._is_typed_key(x):
    x = jax.random.key_data(x)
  a = np.asarray(x)
  return a.dtype, a.shape, a.tobytes()


def _assert_bitwise_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert _bits(x) == _bits(y)


def _save(directory, states, *, save_every=1, keep=5, meta=None):
  with Checkpointer(directory, save_every=save_every, keep=keep) as ck:
    for step, state in states:
      ck.save(step, state, meta or {"step": step})


# ----------------------------------------------------------------------------- checkpoint


def test_round_trip_bitwise_with_adam_and_typed_key(tmp_path):
  state = _make_state(seed=1)
  meta = {"config": {"lr": 0.01, "name": "x"}, "metrics_lines": 12}
  with Checkpointer(tmp_path, save_every=10, keep=2) as ck:
    assert ck.latest_step() is None
    assert not ck.save(5, state, meta)            # not due
    assert ck.save(10, state, meta)
    assert not ck.save(10, state, meta, force=True)  # exists: never overwritten
    assert ck.save(13, state, meta, force=True)
    ck.wait()
    assert ck.latest_step() == 13
  with Checkpointer(tmp_path, save_every=10, keep=2) as ck:  # a fresh process resuming
    template = _make_state(seed=2)
    restored, restored_meta = ck.restore(template)
    assert restored_meta == meta
    _assert_bitwise_equal(restored, state)
    assert jax.dtypes.issubdtype(restored.rng.dtype, jax.dtypes.prng_key)
    assert jax.random.key_impl(restored.rng) == jax.random.key_impl(state.rng)
    np.testing.assert_array_equal(jax.random.uniform(restored.rng, (3,)),
                                  jax.random.uniform(state.rng, (3,)))
    restored10, _ = ck.restore(template, step=10)
    _assert_bitwise_equal(restored10, state)


def test_restore_into_template_shardings(tmp_path):
  mesh = jax.make_mesh((4,), ("d",), devices=jax.devices()[:4])
  state = _make_state()
  sharded = state.replace(
      params={**state.params, "w": jax.device_put(state.params["w"], NamedSharding(mesh, P("d")))},
      rng=jax.device_put(jax.random.split(state.rng, 8), NamedSharding(mesh, P("d"))))
  _save(tmp_path, [(1, sharded)])
  replicated = NamedSharding(mesh, P())
  template = jax.tree.map(lambda x: jax.device_put(x, replicated), sharded)
  with Checkpointer(tmp_path, save_every=1, keep=1) as ck:
    restored, _ = ck.restore(template)
  _assert_bitwise_equal(restored, sharded)
  assert restored.params["w"].sharding == replicated
  assert restored.rng.sharding.is_equivalent_to(replicated, 1)
  # And back into the sharded layout, from ShapeDtypeStructs.
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), sharded)
  with Checkpointer(tmp_path, save_every=1, keep=1) as ck:
    restored, _ = ck.restore(abstract)
    with pytest.raises(ValueError, match="abstract sharding"):  # no devices to restore onto
      ck.restore(jax.eval_shape(lambda s: s, sharded))
  _assert_bitwise_equal(restored, sharded)
  assert restored.params["w"].sharding.is_equivalent_to(sharded.params["w"].sharding, 2)


def test_keep_n_and_latest_step(tmp_path):
  state = _make_state()
  with Checkpointer(tmp_path, save_every=2, keep=2) as ck:
    for step in range(1, 9):
      ck.save(step, state.replace(step=jnp.int32(step)), {"step": step})
    ck.wait()
    assert ck.steps() == [6, 8]
    assert ck.latest_step() == 8
    restored, meta = ck.restore(state)
    assert int(restored.step) == 8 and meta == {"step": 8}
  assert sorted(f for f in os.listdir(tmp_path) if f.isdigit()) == ["6", "8"]


def test_keep_steps_survive_keep_n_and_meta_reads_alone(tmp_path):
  """`keep_steps` (the end of SFT in experiments.train) are kept although `keep=2` deletes
  the other old steps; a fresh Checkpointer (a resumed run) keeps them too; `meta` reads a
  step's meta without a template."""
  state = _make_state()
  with Checkpointer(tmp_path, save_every=1, keep=2, keep_steps=(3,)) as ck:
    for step in range(1, 8):
      ck.save(step, state.replace(step=jnp.int32(step)), {"step": step})
    ck.wait()
    assert ck.steps() == [3, 6, 7]
    restored, meta = ck.restore(state, 3)
    assert int(restored.step) == 3 and meta == {"step": 3}
  with Checkpointer(tmp_path, save_every=1, keep=2, keep_steps=[3]) as ck:
    ck.save(8, state.replace(step=jnp.int32(8)), {"step": 8})
    ck.wait()
    assert ck.steps() == [3, 7, 8]
    assert ck.meta() == {"step": 8} and ck.meta(3) == {"step": 3}
    with pytest.raises(CheckpointError, match=r"no checkpoint step 5 .*available: \[3, 7, 8\]"):
      ck.meta(5)
  with Checkpointer(tmp_path / "empty", save_every=1, keep=1) as ck:
    with pytest.raises(CheckpointError, match="no checkpoint in"):
      ck.meta()


def test_interrupted_save_is_not_a_checkpoint(tmp_path):
  """A save killed before its rename leaves a tmp directory that is not listed (and is removed)."""
  state = _make_state()
  _save(tmp_path, [(1, state)])
  partial = tmp_path / "2.orbax-checkpoint-tmp-1234567"  # what orbax writes before the rename
  (partial / "state").mkdir(parents=True)
  (partial / "state" / "_METADATA").write_text("{")
  with Checkpointer(tmp_path, save_every=1, keep=5) as ck:
    assert ck.latest_step() == 1
    restored, _ = ck.restore(state)
    _assert_bitwise_equal(restored, state)
    ck.save(2, state)
    ck.wait()
    assert ck.steps() == [1, 2]
  assert not list(tmp_path.glob("*orbax-checkpoint-tmp*"))


def test_save_is_atomic_when_finalisation_fails(tmp_path, monkeypatch):
  """If orbax fails before the final rename, no step directory appears and the error is clear."""
  from orbax.checkpoint._src.path import atomicity
  state = _make_state()
  _save(tmp_path, [(1, state)])

  def boom(self, *args, **kwargs):
    raise OSError("disk full")

  monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", boom)
  ck = Checkpointer(tmp_path, save_every=1, keep=5)
  with pytest.raises(CheckpointError, match="disk full"):
    ck.save(2, state)
    ck.wait()
  monkeypatch.undo()
  ck.close()
  assert not (tmp_path / "2").exists()
  assert list(tmp_path.glob("2.orbax-checkpoint-tmp*"))  # written, never renamed
  with Checkpointer(tmp_path, save_every=1, keep=5) as ck2:
    assert ck2.latest_step() == 1
    ck2.save(2, state)
    ck2.wait()
    assert ck2.latest_step() == 2
  assert not list(tmp_path.glob("*orbax-checkpoint-tmp*"))  # cleaned up on opening


def _largest_file(step_dir):
  files = [f for f in glob.glob(os.path.join(step_dir, "**", "*"), recursive=True)
           if os.path.isfile(f)]
  return max(files, key=os.path.getsize)


DAMAGES = ("delete_metadata", "truncate_manifest", "garble_meta", "delete_state",
           "flip_data_bit")


def damage_step(step_dir, damage):
  """Corrupt one checkpoint directory in one of the ways `DAMAGES` names."""
  if damage == "delete_metadata":
    os.remove(step_dir / "state" / "_METADATA")
  elif damage == "truncate_manifest":
    with open(step_dir / "state" / "manifest.ocdbt", "r+b") as f:
      f.truncate(10)
  elif damage == "garble_meta":
    (step_dir / "meta" / "metadata").write_text('{"config": ')
  elif damage == "delete_state":
    for f in sorted(step_dir.glob("state/**/*"), reverse=True):
      f.unlink() if f.is_file() else f.rmdir()
    (step_dir / "state").rmdir()
  elif damage == "flip_data_bit":  # chunks carry no checksum: caught by the fingerprints
    path = _largest_file(step_dir)
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0x01
    open(path, "wb").write(bytes(data))


# Orbax leaves a tensorstore read coroutine behind after some read errors ("Event loop is
# closed" when it is collected): harmless, not ours.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("damage", DAMAGES)
def test_corrupt_checkpoint_raises_checkpoint_error(tmp_path, damage):
  state = _make_state(width=256)  # w: 64 KiB, stored outside the b-tree nodes
  _save(tmp_path, [(3, state), (4, state)])
  step_dir = tmp_path / "4"
  damage_step(step_dir, damage)
  files_before = sorted(str(p) for p in step_dir.rglob("*"))
  with Checkpointer(tmp_path, save_every=1, keep=5) as ck:
    assert ck.latest_step() == 4
    with pytest.raises(CheckpointError) as err:
      ck.restore(state)
    msg = str(err.value)
    assert "step 4" in msg and str(tmp_path) in msg
    assert len(msg) < 1500
    if damage == "flip_data_bit":
      assert "fingerprint" in msg and "w" in msg
    restored, _ = ck.restore(state, step=3)  # the older checkpoint is still fine
    _assert_bitwise_equal(restored, state)
    assert not ck.save(4, state, force=True)  # the corrupt one is not overwritten
  assert sorted(str(p) for p in step_dir.rglob("*")) == files_before


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("damage", DAMAGES)
def test_resume_falls_back_to_the_newest_intact_step(tmp_path, damage, capsys):
  """A corrupt latest checkpoint (and a corrupt one before it): the error names the newest intact
  step and `--resume_intact`; with it the run resumes there, bitwise, and the corrupt steps are
  moved to checkpoints.corrupt/ (not deleted), so those steps can be saved anew."""
  from experiments import train as train_cli
  states = {s: _make_state(width=256, seed=s) for s in (2, 3, 4)}
  directory = tmp_path / "checkpoints"
  _save(directory, sorted(states.items()))
  damage_step(directory / "4", damage)
  damage_step(directory / "3", "flip_data_bit")
  template_for = lambda step: states[2]
  with Checkpointer(directory, save_every=1, keep=5) as ck:
    with pytest.raises(SystemExit) as err:
      train_cli.resume(ck, template_for, 4, str(tmp_path), resume_intact=False)
    msg = str(err.value)
    assert "step 4" in msg and "newest intact checkpoint is step 2" in msg
    assert "--resume_intact" in msg and "[4, 3]" in msg
    assert ck.steps() == [2, 3, 4]  # nothing moved without the flag
    state, _, step = train_cli.resume(ck, template_for, 4, str(tmp_path), resume_intact=True)
    assert step == 2 and ck.steps() == [2] and ck.latest_step() == 2
    _assert_bitwise_equal(state, states[2])
    assert "resuming from step 2" in capsys.readouterr().err
    assert ck.save(3, states[3], force=True)  # the quarantined steps can be written again
    ck.wait()
  assert sorted(os.listdir(tmp_path / "checkpoints.corrupt")) == ["3", "4"]


def test_resume_with_no_intact_checkpoint_says_so(tmp_path):
  from experiments import train as train_cli
  directory = tmp_path / "checkpoints"
  _save(directory, [(4, _make_state(width=256))])
  damage_step(directory / "4", "flip_data_bit")
  with Checkpointer(directory, save_every=1, keep=5) as ck:
    with pytest.raises(SystemExit, match="no older checkpoint is intact"):
      train_cli.resume(ck, lambda s: _make_state(width=256), 4, str(tmp_path), resume_intact=True)
    assert ck.steps() == [4]


def test_structure_mismatch_raises_checkpoint_error(tmp_path):
  _save(tmp_path, [(5, _make_state())])
  with Checkpointer(tmp_path, save_every=1, keep=5) as ck:
    with pytest.raises(CheckpointError, match=r"step 5.*missing in the checkpoint: .*extra"):
      ck.restore(_make_state(extra=True))
    with pytest.raises(CheckpointError, match=r"step 5.*shape .*params/b \(4,\) vs \(5,\)"):
      ck.restore(_make_state(width=5))
    wrong_dtype = _make_state()
    wrong_dtype = wrong_dtype.replace(
        params={**wrong_dtype.params, "b": wrong_dtype.params["b"].astype(jnp.float32)})
    with pytest.raises(CheckpointError, match=r"dtype .*params/b bfloat16 vs float32"):
      ck.restore(wrong_dtype)
    with pytest.raises(CheckpointError, match="not in the template"):
      ck.restore({"params": _make_state().params})
    with pytest.raises(CheckpointError, match=r"no checkpoint step 6 .*available: \[5\]"):
      ck.restore(_make_state(), step=6)
  with Checkpointer(tmp_path / "empty", save_every=1, keep=1) as ck:
    with pytest.raises(CheckpointError, match="no checkpoint in"):
      ck.restore(_make_state())


def test_fingerprint_detects_single_bit_changes():
  x = jax.random.normal(jax.random.key(0), (5, 7)).astype(jnp.bfloat16)
  base = ckpt_lib.fingerprints({"x": x})
  bits = jax.lax.bitcast_convert_type(x, jnp.uint16)
  for i, j, b in [(0, 0, 0), (4, 6, 15), (2, 3, 7)]:
    flipped = bits.at[i, j].set(bits[i, j] ^ (1 << b))
    y = jax.lax.bitcast_convert_type(flipped, jnp.bfloat16)
    assert ckpt_lib.fingerprints({"x": y}) != base
  swapped = x.at[0, 0].set(x[0, 1]).at[0, 1].set(x[0, 0])
  if x[0, 0] != x[0, 1]:
    assert ckpt_lib.fingerprints({"x": swapped}) != base


def _reference_fingerprint(x) -> str:
  """The checksum of `checkpoint._block_fingerprint` in plain NumPy over the whole host array."""
  a = np.asarray(x)
  if a.dtype.itemsize >= 4:
    w = np.ascontiguousarray(a).view(np.uint32).reshape(-1)
  else:
    w = np.ascontiguousarray(a).view({1: np.uint8, 2: np.uint16}[a.dtype.itemsize]).reshape(-1)
    w = w.astype(np.uint32)
  idx = np.arange(w.size, dtype=np.uint32)
  with np.errstate(over="ignore"):
    m1 = (idx * np.uint32(0x9E3779B1) + np.uint32(0x7F4A7C15)) | np.uint32(1)
    m2 = ((idx ^ np.uint32(0x85EBCA6B)) * np.uint32(0xC2B2AE35)) | np.uint32(1)
    h1 = np.sum(w * m1, dtype=np.uint32)
    h2 = np.sum((w ^ (w >> 16)) * m2, dtype=np.uint32)
  return f"{int(h1):08x}{int(h2):08x}"


def test_fingerprints_match_a_reference_whatever_the_sharding():
  """Shard by shard on 8 simulated devices (split, replicated, partly replicated, uneven rows
  of a 3-d array) the fingerprint is the plain whole-array checksum."""
  mesh = jax.make_mesh((2, 4), ("a", "b"), devices=jax.devices()[:8])
  x = jax.random.normal(jax.random.key(1), (8, 12, 3))
  ints = jax.random.randint(jax.random.key(2), (16, 4), 0, 2**30, jnp.int32)
  cases = {
      "one_device": x,
      "rows": jax.device_put(x, NamedSharding(mesh, P(("a", "b")))),
      "rows_cols": jax.device_put(x, NamedSharding(mesh, P("a", "b"))),
      "cols_replicated_over_a": jax.device_put(x, NamedSharding(mesh, P(None, "b"))),
      "replicated": jax.device_put(x, NamedSharding(mesh, P())),
      "bf16_last_axis": jax.device_put(ints.astype(jnp.bfloat16), NamedSharding(mesh, P("b"))),
      "int32": jax.device_put(ints, NamedSharding(mesh, P("b", "a"))),
      "scalar": jnp.int32(7),
  }
  got = ckpt_lib.fingerprints(cases)
  for name, v in cases.items():
    assert got[name] == _reference_fingerprint(jax.device_get(v)), name
  assert len({got[k] for k in ("one_device", "rows", "rows_cols", "replicated")}) == 1
  host = {"int64": np.arange(6, dtype=np.int64) * 2**40, "float": 0.1}
  got = ckpt_lib.fingerprints(host)
  assert got["int64"] == _reference_fingerprint(host["int64"])
  assert got["float"] == _reference_fingerprint(np.float64(0.1))


def test_meta_must_be_json(tmp_path):
  with Checkpointer(tmp_path, save_every=1, keep=1) as ck:
    with pytest.raises(TypeError, match="JSON"):
      ck.save(1, _make_state(), {"array": np.ones(2)})
    assert ck.latest_step() is None


# ----------------------------------------------------------------------------- metrics


def test_metrics_jsonl_round_trip_nan_is_null_and_tensorboard(tmp_path):
  with metrics_lib.MetricsWriter(tmp_path) as w:
    w.write(1, {"train/return": jnp.float32(0.5), "train/loss": float("nan"),
                "train/tokens": np.int64(12), "eval/success_rate": np.float32(1.0)})
    w.write(2, {"train/return": 0.25, "train/loss": jnp.float32(jnp.inf)})
  text = (tmp_path / "metrics.jsonl").read_text()
  assert "NaN" not in text and "Infinity" not in text
  for line in text.splitlines():
    json.loads(line, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
  records = metrics_lib.read_metrics(tmp_path / "metrics.jsonl")
  assert records == [
      {"step": 1, "train/return": 0.5, "train/loss": None, "train/tokens": 12,
       "eval/success_rate": 1.0},
      {"step": 2, "train/return": 0.25, "train/loss": None},
  ]
  events = glob.glob(str(tmp_path / "events.out.tfevents.*"))
  assert events and os.path.getsize(events[0]) > 0
  with pytest.raises(ValueError, match="scalar"):
    with metrics_lib.MetricsWriter(tmp_path / "x", tensorboard=False) as w:
      w.write(1, {"a": np.ones(3)})


def _run(workdir, steps, resume_step=None):
  with metrics_lib.MetricsWriter(workdir, tensorboard=False, resume_step=resume_step) as w:
    for s in steps:
      w.write(s, {"train/return": s / 10, "train/x": math.sin(s)})


def test_metrics_resume_truncation_matches_uninterrupted(tmp_path):
  _run(tmp_path / "full", range(1, 11))
  _run(tmp_path / "resumed", range(1, 8))          # crashed after step 7 ...
  with open(tmp_path / "resumed" / "metrics.jsonl", "a") as f:
    f.write('{"step": 8, "train/ret')                # ... in the middle of a line
  _run(tmp_path / "resumed", range(6, 11), resume_step=5)  # resumed from the step-5 checkpoint
  assert ((tmp_path / "resumed" / "metrics.jsonl").read_bytes()
          == (tmp_path / "full" / "metrics.jsonl").read_bytes())
  _run(tmp_path / "full", range(1, 3))               # a fresh run replaces the file
  records = metrics_lib.read_metrics(tmp_path / "full" / "metrics.jsonl")
  assert [r["step"] for r in records] == [1, 2]


def test_plot_learning_curves(tmp_path):
  with metrics_lib.MetricsWriter(tmp_path, tensorboard=False) as w:
    for s in range(20):
      m = {"train/success_rate": s / 20, "train/return": float("nan") if s == 3 else s}
      if s % 5 == 0:
        m["eval/success_rate"] = s / 25
      w.write(s, m)
  out = metrics_lib.plot_learning_curves(
      tmp_path / "metrics.jsonl", tmp_path / "curves.png",
      keys=("train/success_rate", "eval/success_rate", "train/return", "not/there"))
  assert out == str(tmp_path / "curves.png")
  data = open(out, "rb").read()
  assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
  with pytest.raises(ValueError, match="none of"):
    metrics_lib.plot_learning_curves(tmp_path / "metrics.jsonl", tmp_path / "n.png",
                                     keys=("not/there",))


def test_progress_bar_is_silent_when_not_a_tty(capsys):
  """No bar without a terminal, and no plain line within `plain_every_s` (60 s default)."""
  with metrics_lib.ProgressBar(10, keys=("train/return", "eval/success_rate")) as bar:
    for s in range(1, 11):
      bar.update(s, {"train/return": jnp.float32(s), "other": 1.0})
  captured = capsys.readouterr()
  assert captured.out == "" and captured.err == ""


def test_progress_without_a_tty_is_a_plain_line_now_and_then():
  """Without the bar, a long job still says where it is: one plain line per `plain_every_s`
  (a fake clock: 30 s per step, a line every 60 s)."""
  ticks = iter(range(0, 10_000, 30))
  out = io.StringIO()
  with metrics_lib.ProgressBar(10, keys=("train/return",), disable=True, file=out,
                               desc="fix", initial=2, clock=lambda: float(next(ticks))) as bar:
    for s in range(3, 11):
      bar.update(s, {"train/return": jnp.float32(s)})
  lines = out.getvalue().splitlines()
  assert len(lines) == 4  # 8 steps x 30 s: at 60, 120, 180, 240 s
  assert lines[0] == "fix: step 4/10 (40%), 1.0 min elapsed, eta 3.0 min train/return=4"
  assert lines[-1].startswith("fix: step 10/10 (100%), 4.0 min elapsed, eta 0.0 min")
  quiet = io.StringIO()
  with metrics_lib.ProgressBar(10, disable=True, file=quiet, plain_every_s=0) as bar:
    for s in range(1, 11):
      bar.update(s, {"train/return": 1.0})
  assert quiet.getvalue() == ""


def test_progress_bar_shows_key_metrics():
  out = io.StringIO()
  with metrics_lib.ProgressBar(10, keys=("train/return", "eval/success_rate"), disable=False,
                               file=out) as bar:
    bar.update(2, {"train/return": jnp.float32(0.123456), "eval/success_rate": 0.5})
    bar.update(4, {"train/return": float("nan"), "other": 3.0})  # eval/* keeps its last value
  final = out.getvalue().split("\r")[-1]
  assert "4/10" in final
  assert "train/return=nan eval/success_rate=0.5" in final
  assert "other" not in final
