"""One process of the multi-host test (tests/test_multihost.py): 8 CPU devices in all, in 1 or
2 processes, a (data=2, fsdp=4) mesh over them.

    python tests/multihost_worker.py OUT_DIR NUM_PROCESSES PROCESS_ID PORT

Runs 2 RL steps, saves the sharded state with `mtrl_jax.checkpoint` (every process writes its
shards), 2 more steps; then restores the checkpoint into a fresh template and runs the same 2
steps again, which must give the same state bitwise (exact resume on the mesh). Process 0 writes
OUT_DIR/result.npz: the metrics of the first 2 steps and the params after them, gathered to the
host (what the test compares across process layouts).
"""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

out_dir, num_processes, process_id, port = sys.argv[1], *map(int, sys.argv[2:5])

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8 // num_processes)
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.config.update("jax_cpu_enable_async_dispatch", False)  # tests/conftest.py says why
if num_processes > 1:
  from mtrl_jax import sharding  # noqa: E402
  sharding.initialize_distributed(f"localhost:{port}", num_processes, process_id)

import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

from configs.quickstart import base_config  # noqa: E402
from mtrl_jax import checkpoint as ckpt_lib  # noqa: E402
from mtrl_jax import sharding  # noqa: E402
from mtrl_jax import train as train_lib  # noqa: E402


def main():
  assert jax.device_count() == 8 and jax.process_count() == num_processes
  c = base_config()
  c.model.preset = "tiny"
  c.rollout.num_envs, c.rollout.group_size = 16, 1
  c.env.format_penalty = 0.1  # returns differ from the critic's 0: gradients that are not 0
  c.optim.warmup = 0
  tr = train_lib.make_train(c)
  # SGD: AdamW's first steps turn float-rounding-sized gradient entries into lr-sized steps of
  # either sign (tests/test_mesh.py::sgd); the comparison across process layouts is on SGD.
  tr.rl_opt = optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.1))
  mesh = sharding.make_mesh(2, 4, 1)
  steps = sharding.MeshSteps(tr, mesh)
  state = steps.start_rl(steps.init(jax.random.key(4)))
  assert not state.params["policy"]["embed"]["embedding"].is_fully_addressable or \
      num_processes == 1
  metrics = []
  for _ in range(2):
    state, m = steps.train_step(state)
    metrics.append(sharding.to_host(m))
  params = multihost_utils.process_allgather(state.params, tiled=True)
  ckpt = ckpt_lib.Checkpointer(os.path.join(out_dir, "ckpt"), save_every=1, keep=2)
  ckpt.save(2, state, {"phase": "rl"}, force=True)
  ckpt.wait()
  for _ in range(2):
    state, m = steps.train_step(state)
    metrics.append(sharding.to_host(m))
  straight = ckpt_lib.fingerprints(jax.random.key_data(state.rng)), ckpt_lib.fingerprints(
      state.params)

  template = steps.start_rl(steps.init(jax.random.key(99)))
  resumed, meta = ckpt.restore(template, 2)
  assert meta["phase"] == "rl"
  kernel = resumed.params["policy"]["layers"]["block"]["up_proj"]["kernel"]
  assert kernel.sharding == template.params["policy"]["layers"]["block"]["up_proj"][
      "kernel"].sharding, kernel.sharding
  for _ in range(2):
    resumed, _ = steps.train_step(resumed)
  again = ckpt_lib.fingerprints(jax.random.key_data(resumed.rng)), ckpt_lib.fingerprints(
      resumed.params)
  assert again == straight, "resume on the mesh is not exact"
  ckpt.close()

  if jax.process_index() == 0:
    flat = {"params/" + jax.tree_util.keystr(k): np.asarray(v)
            for k, v in jax.tree_util.tree_leaves_with_path(params)}
    flat.update({f"metrics/{i}/{k}": np.asarray(v) for i, m in enumerate(metrics[:2])
                 for k, v in m.items()})
    np.savez(os.path.join(out_dir, "result.npz"), **flat)
  print(f"process {jax.process_index()}: ok", flush=True)


if __name__ == "__main__":
  main()
