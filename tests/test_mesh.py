"""The train step on a (data, fsdp, tensor) mesh of 8 simulated CPU devices (conftest.py):
equal to the single-device step, state sharded as the partition rules say, rollout local to
each device's rows, budgets that do not fit the mesh named."""

import re

import chex
import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from configs.quickstart import base_config
from mtrl_jax import rollout as R
from mtrl_jax import sharding
from mtrl_jax import train as train_lib
from mtrl_jax.models import partitioning

# (2, 2, 2) uses all 8 simulated devices with every axis split. It used to deadlock XLA's CPU
# runtime in about half the runs (7 devices in a collective-permute, 1 in an all-reduce) while
# two computations could be in flight at once; with synchronous CPU dispatch (conftest.py) it
# passed 10 of 10 runs (6 standalone, 4 of this file). (1, 2, 2) and (2, 1, 2) run on 4 of the
# devices and pair tensor with fsdp and with data; (2, 4, 1) pairs data with fsdp.
MESHES = [(8, 1, 1), (2, 4, 1), (1, 8, 1), (1, 2, 2), (2, 1, 2), (2, 2, 2)]


def mesh_of(shape):
  """A (data, fsdp, tensor) mesh over the first data x fsdp x tensor devices."""
  return sharding.make_mesh(*shape, devices=jax.devices()[:int(np.prod(shape))])
ALGOS = {
    # PPO with the turn-level critic and a KL reference (its forward goes through the mesh too).
    "ppo_kl": dict(kl_coef=0.1, minibatches=2, epochs=1),
    # DAPO: dynamic-sampling weights renormalised over the global batch; overlong shaping makes
    # the untrained policy's returns differ within some groups.
    "dapo": dict(advantage="grpo", dynamic_sampling=True, eps_high=0.28, loss_agg="token_mean",
                 overlong_len=60, overlong_cache=5, minibatches=1, epochs=1),
}


def config_for(algo):
  c = base_config()
  c.model.preset = "tiny"  # d_model 128, 4 heads / 2 KV heads of 32, MLP 256: all split
  c.rollout.num_envs = 8
  c.rollout.group_size = 2
  c.sft.batch_size = 8
  c.train.eval_envs = 8
  c.env.format_penalty = 0.1  # returns that differ between rows: advantages that are not 0
  # No warm-up: the first RL step must move the params (lr 0 at step 0 would make the
  # comparison of params vacuous), by more than the tolerance.
  c.optim.warmup, c.optim.lr = 0, 1e-3
  c.algo.update(ALGOS[algo])
  return c


def sgd(trainer):
  """The trainer with SGD (lr 1, after the global-norm clip) for the RL update. AdamW's early
  steps, lr * m / (sqrt(v) + eps), turn a gradient entry near 0 into a step of up to lr
  whose sign is that of float rounding, so two programs that sum in different orders agree on
  gradients and metrics but not on such params; SGD keeps the params' difference the size of
  the gradients' (the AdamW comparison is on the metrics, `test_mesh_adamw_metrics`)."""
  import optax
  trainer.rl_opt = optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(1.0))
  return trainer


@pytest.fixture(scope="module")
def single_steps():
  """{algo: (config, state after SFT, single-device (state, metrics) of one RL step)}."""
  out = {}
  for algo in ALGOS:
    c = config_for(algo)
    tr = sgd(train_lib.make_train(c))
    state, sft = tr.init(jax.random.key(4)), jax.jit(tr.sft_step)
    for _ in range(10):  # a policy whose turns differ in format errors: advantages not 0
      state = sft(state)[0]
    state = jax.jit(tr.start_rl)(state)
    out[algo] = (c, state, jax.jit(tr.train_step)(state))
  return out


@pytest.mark.parametrize("mesh_shape", MESHES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("algo", list(ALGOS))
def test_mesh_train_step_equals_single_device(single_steps, algo, mesh_shape):
  c, state, (ref_state, ref_m) = single_steps[algo]
  mesh = mesh_of(mesh_shape)
  new_state, m = sharding.MeshSteps(sgd(train_lib.make_train(c)), mesh).train_step(state)
  # The result lives on the mesh, with the partition rules' shardings.
  kernel = new_state.params["policy"]["layers"]["block"]["gate_proj"]["kernel"]  # [L, d, mlp]
  assert kernel.sharding.mesh.shape == dict(zip(sharding.AXES, mesh_shape))
  expected = P(None, "fsdp" if mesh_shape[1] > 1 else None,
               "tensor" if mesh_shape[2] > 1 else None)
  assert kernel.sharding.spec == expected, kernel.sharding
  chex.assert_trees_all_close(new_state.params, ref_state.params, atol=1e-5, rtol=0)
  chex.assert_trees_all_close(new_state.opt_state, ref_state.opt_state, atol=1e-5, rtol=0)
  chex.assert_trees_all_close(new_state.ref_params, ref_state.ref_params, atol=0, rtol=0)
  assert set(m) == set(ref_m)
  for k in m:
    np.testing.assert_allclose(m[k], ref_m[k], rtol=1e-5, atol=1e-5, err_msg=k)
  # The step changed the params (or the comparison would show nothing).
  moved = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))),
                       ref_state.params, state.params)
  assert max(jax.tree.leaves(moved)) > 5e-4
  if algo == "dapo":  # some groups kept and some not
    assert 0 < float(ref_m["train/frac_groups_kept"]) < 1, ref_m["train/frac_groups_kept"]
  if algo == "ppo_kl":
    assert float(ref_m["train/kl"]) != 0.0


def test_mesh_adamw_metrics_equal_single_device():
  """With the config's AdamW (one minibatch: one optimizer step), FSDP x tensor on 1x2x2: the
  metrics (gradient norm included) equal the single-device step's; params to lr's scale."""
  c = config_for("ppo_kl")
  c.algo.minibatches = 1
  tr = train_lib.make_train(c)
  state, sft = tr.init(jax.random.key(4)), jax.jit(tr.sft_step)
  for _ in range(10):
    state = sft(state)[0]
  state = jax.jit(tr.start_rl)(state)
  ref_state, ref_m = jax.jit(tr.train_step)(state)
  _, step = sharding.sharded_trainer(c, mesh_of((1, 2, 2)))
  new_state, m = step(state)
  for k in m:
    np.testing.assert_allclose(m[k], ref_m[k], rtol=1e-5, atol=1e-5, err_msg=k)
  assert float(ref_m["train/grad_norm"]) > 0.1
  chex.assert_trees_all_close(new_state.params, ref_state.params, atol=c.optim.lr, rtol=0)


def _bytes_per_device(tree):
  """{device: bytes of the shards of `tree` stored there}."""
  out = {}
  for x in jax.tree.leaves(tree):
    for shard in x.addressable_shards:
      out[shard.device] = out.get(shard.device, 0) + shard.data.nbytes
  return out


@pytest.mark.parametrize("mesh_shape, split", [((1, 8, 1), 8), ((2, 2, 2), 4), ((8, 1, 1), 1)])
def test_state_bytes_per_device_follow_fsdp_and_tensor(mesh_shape, split):
  """Params + optimizer state per device ~= total / (fsdp x tensor): every large weight split,
  only norm scales, the value head and counters replicated."""
  c = config_for("ppo_kl")
  trainer = train_lib.make_train(c)
  steps = sharding.MeshSteps(trainer, sharding.make_mesh(*mesh_shape))
  state = steps.start_rl(steps.init(jax.random.key(0)))
  tree = (state.params, state.opt_state)
  total = sum(x.nbytes for x in jax.tree.leaves(tree))
  per_device = _bytes_per_device(tree)
  assert len(per_device) == 8
  for device, nbytes in per_device.items():
    assert total / split <= nbytes <= 1.03 * total / split, (device, nbytes, total / split)
  # Every parameter has the spec its name gives (no silently replicated matrix).
  for path, x in jax.tree_util.tree_leaves_with_path(state.params):
    if x.ndim >= 2 and split > 1 and jax.tree_util.keystr(path)[-9:] != "['scale']":
      assert any(s is not None for s in x.sharding.spec), jax.tree_util.keystr(path)


@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (1, 8, 1)], ids=["data8", "fsdp8"])
def test_rollout_moves_no_rows_between_devices(mesh_shape):
  """Each device rolls out its own rows: the collect stage compiled on the mesh has no
  collective inside any loop (per token); FSDP's params are gathered once, before it."""
  c = config_for("ppo_kl")
  tr = train_lib.make_train(c)
  mesh = sharding.make_mesh(*mesh_shape)
  steps = sharding.MeshSteps(tr, mesh)
  params = steps.init(jax.random.key(0)).params["policy"]
  rc = tr.rollout_config

  def collect(p, key):
    keys = partitioning.constrain_rows(R.rollout_keys(key, rc.num_envs, rc.group_size))
    return tr.collect(p, *keys, tr.env_params).traj

  fn = sharding.jit_on_mesh(collect, mesh, in_shardings=(steps.rl_state_shardings.params
                                                        ["policy"], None))
  hlo = fn.lower(params, jax.random.key(1)).compile().as_text()
  collectives = [line for line in hlo.splitlines() if re.search(
      r"\b(all-gather|all-to-all|collective-permute|reduce-scatter|all-reduce)(-start)?\(",
      line)]
  in_loops = [line for line in collectives if "while" in line]
  assert not in_loops, in_loops[:3]
  if mesh_shape[1] > 1:
    assert any("all-gather" in line for line in collectives)  # FSDP: params gathered once
  else:
    assert not collectives, collectives[:3]  # replicated params: nothing to communicate
  single = jax.jit(collect)(jax.device_get(params), jax.random.key(1))
  out = fn(params, jax.random.key(1))
  assert len(out.tokens.sharding.device_set) == 8
  assert {s.data.shape[0] for s in out.tokens.addressable_shards} == {rc.batch_size // 8}
  np.testing.assert_array_equal(out.tokens, single.tokens)
  chex.assert_trees_all_close(out, single, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("make, match", [
    (lambda: sharding.make_mesh(2, 2, 1), r"config\.mesh\.(data|fsdp): data=2 x fsdp=2"),
    (lambda: sharding.make_mesh(3, -1, 1), r"config\.mesh: 8 devices are not divisible by data=3"),
    (lambda: sharding.make_mesh(-1, -1, 1), "only one axis may be -1"),
    (lambda: sharding.make_mesh(0, 8, 1), r"config\.mesh\.data must be a positive integer"),
])
def test_mesh_sizes_that_do_not_fit_are_named(make, match):
  with pytest.raises(ValueError, match=match):
    make()


def test_mesh_from_config_and_parse():
  c = base_config()
  mesh = sharding.mesh_from_config(c)
  assert mesh.shape == {"data": 8, "fsdp": 1, "tensor": 1}
  with c.unlocked():
    c.mesh = {"data": 2, "fsdp": -1}
  assert sharding.mesh_from_config(c).shape == {"data": 2, "fsdp": 4, "tensor": 1}
  with c.unlocked():
    c.mesh = {"data": 2, "fdsp": 4}
  with pytest.raises(ValueError, match=r"config\.mesh: unknown keys \['fdsp'\]"):
    sharding.mesh_from_config(c)
  assert sharding.parse_mesh("data=1,fsdp=8,tensor=1") == {"data": 1, "fsdp": 8, "tensor": 1}
  with pytest.raises(ValueError, match="--mesh"):
    sharding.parse_mesh("fsdp:8")


def test_batch_that_does_not_split_over_the_mesh_is_named():
  c = config_for("ppo_kl")
  c.rollout.num_envs = 6
  with pytest.raises(ValueError, match=r"config\.rollout\.num_envs=6 is not divisible by the "
                                       r"data x fsdp = 2 x 2 = 4 row shards"):
    sharding.sharded_trainer(c, sharding.make_mesh(2, 2, 2))
  c.rollout.num_envs = 8
  c.algo.minibatches = 4  # 16 rows / 4 = 4 per minibatch, over 8 row shards
  with pytest.raises(ValueError, match=r"config\.algo\.minibatches=4: a minibatch of 4"):
    sharding.sharded_trainer(c, sharding.make_mesh(8, 1, 1))


def test_partition_rules_by_parameter_name():
  """The rules name every parameter of a Qwen-style model (a matrix no rule names would be
  replicated on every device) and leave an indivisible dimension unsplit."""
  from mtrl_jax.models import transformer as tf
  cfg = tf.model_config("tiny", 64, qkv_bias=True, tie_embeddings=False)
  shapes = jax.eval_shape(lambda k: tf.init_actor_critic(cfg, k), jax.random.key(0))
  for path, x in jax.tree_util.tree_leaves_with_path(shapes):
    assert partitioning.param_logical_axes(path, x.ndim) is not None, jax.tree_util.keystr(path)
  mesh_shape = {"data": 1, "fsdp": 8, "tensor": 2}
  specs = partitioning.tree_specs(shapes, mesh_shape)
  block = specs["policy"]["layers"]["block"]
  assert block["q_proj"]["kernel"] == P(None, "fsdp", "tensor")
  assert block["o_proj"]["kernel"] == P(None, "tensor", "fsdp")
  assert block["down_proj"]["kernel"] == P(None, "tensor", "fsdp")
  assert block["k_proj"]["bias"] == P(None, "tensor")
  assert block["attn_norm"]["scale"] == P(None, None)
  assert specs["policy"]["lm_head"]["kernel"] == P("fsdp", "tensor")
  assert specs["policy"]["embed"]["embedding"] == P("tensor", "fsdp")
  # 2 KV heads of 32 = 64 columns do not split 128 ways, nor 3 ways: unsplit.
  assert partitioning.spec_for(("embed", "kv_heads"), (128, 64), {"fsdp": 1, "tensor": 128}) \
      == P(None, None)
  assert partitioning.spec_for(("embed", "kv_heads"), (128, 64), {"fsdp": 1, "tensor": 3}) \
      == P(None, None)
  # Adam's moments follow the params by path suffix; counters are replicated.
  import optax
  opt = jax.eval_shape(optax.adam(1e-3).init, shapes)
  opt_specs = partitioning.tree_specs(opt, mesh_shape)
  assert opt_specs[0].mu["policy"]["layers"]["block"]["q_proj"]["kernel"] == \
      P(None, "fsdp", "tensor")
  assert opt_specs[0].count == P()
