"""Test session set-up, before JAX starts.

* 8 simulated CPU devices, for the sharding tests, with synchronous dispatch (below).
* CPU collectives that wait up to 15 minutes instead of 40 s (a loaded 2-core machine).
* LLVM backend optimisation off: the suite compiles many small programs and runs each briefly,
  so compile time dominates; level 0 compiles ~3x faster. The HLO is the same, but the machine
  code is not, so float results can differ in the last bits (a long run, e.g. the quickstart,
  then ends elsewhere: tests of a README figure run their subprocess without it,
  `default_optimisation_env`). The benchmarks, which time compiled code, do not use it. Set
  MTRL_TEST_XLA_OPT=1 to keep the default optimisation.
"""

import os

if os.environ.get("MTRL_TEST_XLA_OPT") != "1":
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_backend_optimization_level=0").strip()
# The simulated devices' collectives (the mesh tests) wait for each other on 2 shared cores:
# XLA's CPU runtime aborts the process when one waits more than 40 s (its default), which a
# loaded machine can exceed while another device is still rolling out its rows. Wait longer.
os.environ["XLA_FLAGS"] += (" --xla_cpu_collective_call_terminate_timeout_seconds=900"
                            " --xla_cpu_collective_call_warn_stuck_timeout_seconds=300"
                            " --xla_cpu_collective_timeout_seconds=900")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
# One computation at a time: with asynchronous dispatch, two jitted computations that both hold
# collectives (e.g. the per-leaf checkpoint fingerprints, or a step and the next) can be in
# flight at once and start their collectives in different orders on different devices, which
# deadlocks XLA's CPU runtime (its collectives block until every participant arrives).
jax.config.update("jax_cpu_enable_async_dispatch", False)


def default_optimisation_env() -> dict:
  """os.environ for a subprocess that must compute what a user's run computes: XLA_FLAGS
  without the test session's `--xla_backend_optimization_level=0`."""
  env = dict(os.environ)
  env["XLA_FLAGS"] = env.get("XLA_FLAGS", "").replace("--xla_backend_optimization_level=0", "")
  return env
