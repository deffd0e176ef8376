"""Test session set-up, before JAX starts.

* 8 simulated CPU devices, for the sharding tests.
* LLVM backend optimisation off: the suite compiles many small programs and runs each briefly,
  so compile time dominates; level 0 compiles ~3x faster. Numerics are unchanged (same HLO),
  and the benchmarks, which time compiled code, do not use it. Set MTRL_TEST_XLA_OPT=1 to keep
  the default optimisation.
"""

import os

if os.environ.get("MTRL_TEST_XLA_OPT") != "1":
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_backend_optimization_level=0").strip()

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
