"""Tests for demonstration datasets on disk (TFDS array_record, read without TensorFlow).

One dataset (64 calculator episodes, noise 0.3, max_len 136) is built once per module, in
chunks of 24 so the last chunk is partial, and every test reads it back.
"""

from __future__ import annotations

import sys

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from mtrl_jax.data import demos as D
from mtrl_jax.envs import demos as env_demos
from mtrl_jax.envs import registry
from mtrl_jax.types import check_trajectory

N, T, SEED, NOISE = 64, 136, 3, 0.3  # calculator needs max_len >= 134


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("demos")
  builder = D.build_demo_dataset(data_dir, "calculator", N, T, seed=SEED, chunk_size=24,
                                 noise=NOISE)
  return data_dir, builder.builder_config.name, builder


@pytest.fixture(scope="module")
def reference():
  """Row i as the documented key schedule says: `demonstrations` on fold_in(key, i)."""
  env, params = registry.make("calculator", noise=NOISE)
  base = jax.random.PRNGKey(SEED)
  rows = [jax.device_get(env_demos.demonstrations(env, params, jax.random.fold_in(base, i), 1, T))
          for i in range(N)]
  return jax.tree.map(lambda *xs: np.concatenate(xs), *rows)


def test_roundtrip_is_bitwise(built, reference):
  data_dir, name, _ = built
  assert name == f"calculator-n{N}-len{T}-seed{SEED}-noise{NOISE}"
  source, _ = D.load_demo_dataset(data_dir, name)
  assert len(source) == N
  rows = source.__getitems__(list(range(N)))
  got = jax.tree.map(lambda *xs: np.stack(xs), *rows)
  ref = reference
  np.testing.assert_array_equal(got["index"], np.arange(N))  # files keep generation order
  for k in ("tokens", "loss_mask", "turn", "turn_reward", "done", "truncated"):
    assert got[k].dtype == np.asarray(getattr(ref, k)).dtype, k
    np.testing.assert_array_equal(got[k], getattr(ref, k), err_msg=k)
  assert got["tokens"].shape == (N, T) and got["turn_reward"].shape == (N, ref.max_turns)
  for k, v in ref.info.items():
    np.testing.assert_array_equal(got["info"][k], v, err_msg=f"info/{k}")
  np.testing.assert_array_equal(got["success"], ref.info["success"])
  np.testing.assert_array_equal(got["num_turns"], ref.info["num_turns"])
  np.testing.assert_array_equal(got["return"], np.asarray(ref.returns))

  traj = D.batch_to_trajectory(got)
  check_trajectory(traj)
  for k in ("turn_end", "turn_valid", "sampler_logprob"):
    np.testing.assert_array_equal(getattr(traj, k), getattr(ref, k), err_msg=k)
  # noise 0.3 makes the expert fail sometimes: the data is not all successes.
  assert 0 < got["success"].mean() < 1
  assert "tensorflow" not in sys.modules


def test_metadata_records_settings(built):
  data_dir, name, builder = built
  _, meta = D.load_demo_dataset(data_dir, name)
  assert meta["env_name"] == "calculator"
  assert meta["env_overrides"] == {"noise": NOISE}
  assert meta["env_params"]["noise"] == pytest.approx(NOISE)
  assert (meta["max_len"], meta["num_episodes"], meta["seed"]) == (T, N, SEED)
  assert "fold_in" in meta["key_schedule"]
  env, params = D.demo_env(meta)
  assert list(env.vocab.symbols) == meta["vocab"] and params.noise == NOISE
  assert meta["max_turns"] == env.max_turns
  # The same metadata is on disk for any TFDS reader, without our builder class.
  ro = tfds.builder_from_directory(builder.data_dir)
  assert ro.info.metadata["env_overrides"] == {"noise": NOISE}
  assert ro.info.file_format == tfds.core.FileFormat.ARRAY_RECORD
  assert ro.info.splits["train"].num_examples == N
  # Building again with the same settings reuses the files.
  again = D.build_demo_dataset(data_dir, "calculator", N, T, seed=SEED, chunk_size=24,
                               noise=NOISE)
  assert again.data_dir == builder.data_dir
  assert D.list_demo_datasets(data_dir) == [name]


def test_batches_static_shapes_and_epochs(built):
  data_dir, name, _ = built
  bs = 10  # 64 rows -> 6 batches per epoch, 4 rows dropped
  plain = list(D.demo_batches(data_dir, name, bs, shuffle=False, num_epochs=1))
  assert len(plain) == N // bs
  for b in plain:
    assert b["tokens"].shape == (bs, T) and b["tokens"].dtype == np.int32
    assert b["loss_mask"].shape == (bs, T) and b["loss_mask"].dtype == np.bool_
    assert b["turn"].shape == (bs, T) and b["turn"].dtype == np.int32
  np.testing.assert_array_equal(np.concatenate([b["index"] for b in plain]), np.arange(60))

  two = list(D.demo_batches(data_dir, name, bs, seed=5, num_epochs=2))
  assert len(two) == 2 * (N // bs)
  e0, e1 = (np.concatenate([b["index"] for b in two[i * 6:(i + 1) * 6]]) for i in range(2))
  assert len(set(e0)) == len(set(e1)) == 60 and not np.array_equal(e0, e1)
  same = list(D.demo_batches(data_dir, name, bs, seed=5, num_epochs=2))
  np.testing.assert_array_equal(np.concatenate([b["index"] for b in same]),
                                np.concatenate([e0, e1]))
  endless = D.demo_batches(data_dir, name, bs, seed=5)  # num_epochs=None: never stops
  for _ in range(3 * (N // bs)):
    batch = next(endless)
  assert batch["tokens"].shape == (bs, T)
  check_trajectory(D.batch_to_trajectory(batch))


def test_errors_name_the_culprit(built, tmp_path):
  data_dir, name, _ = built
  with pytest.raises(ValueError, match="no demonstration dataset 'calculator-nope'"):
    D.load_demo_dataset(data_dir, "calculator-nope")
  with pytest.raises(ValueError, match="no demonstration dataset"):
    next(D.demo_batches(tmp_path / "empty", name, 4))
  with pytest.raises(ValueError, match="unknown environment 'abacus'"):
    D.build_demo_dataset(tmp_path, "abacus", 8, T)
  with pytest.raises(ValueError, match="unknown override"):
    D.build_demo_dataset(tmp_path, "calculator", 8, T, nosie=0.3)
  with pytest.raises(ValueError, match="max_len=10"):
    D.build_demo_dataset(tmp_path, "calculator", 8, 10)
  with pytest.raises(ValueError, match="batch_size"):
    next(D.demo_batches(data_dir, name, N + 1))
  assert "tensorflow" not in sys.modules
