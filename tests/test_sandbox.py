"""`envs.sandbox`: escape tests. Untrusted code cannot read the host's files or the repository,
reach the network, leave processes behind, write outside its /tmp, or exhaust processes, memory,
CPU or disk; each attempt is blocked or killed and answered as an error, and a benign program
returns its stdout. Needs bubblewrap: skipped (with the reason) where it is missing, unless
MTRL_REQUIRE_SANDBOX_TESTS=1 (CI), which makes them fail instead."""

from __future__ import annotations

import os
import pathlib
import signal
import socket
import tempfile
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtrl_jax.envs import base, python_tool, registry, sandbox

ROOT = pathlib.Path(__file__).resolve().parents[1]
REQUIRED = os.environ.get("MTRL_REQUIRE_SANDBOX_TESTS") == "1"
TEST_LIMIT_S = 60  # no test here may take longer


@pytest.fixture(autouse=True)
def time_bound():
  """Fail a test that runs past TEST_LIMIT_S instead of hanging the suite."""

  def expire(signum, frame):
    raise TimeoutError(f"test ran past {TEST_LIMIT_S} s")

  previous = signal.signal(signal.SIGALRM, expire)
  signal.setitimer(signal.ITIMER_REAL, TEST_LIMIT_S)
  yield
  signal.setitimer(signal.ITIMER_REAL, 0)
  signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="module")
def available():
  try:
    sandbox.check()
  except sandbox.SandboxUnavailable as e:
    if REQUIRED:
      pytest.fail(f"MTRL_REQUIRE_SANDBOX_TESTS=1, but the sandbox cannot run: {e}")
    pytest.skip(f"the sandbox cannot run here: {e}")


needs_sandbox = pytest.mark.usefixtures("available")


def run(code, **kw):
  kw.setdefault("timeout_s", 10)
  t = time.monotonic()
  result = sandbox.run_python(code, **kw)
  assert time.monotonic() - t < kw["timeout_s"] + 5, "the wall-clock timeout did not hold"
  return result


def sandboxed_pids(marker: str = "mtrl-sandbox-started") -> list[int]:
  """Host pids of sandboxed processes: their command line holds the bootstrap's marker (or
  the given one)."""
  pids = []
  for entry in os.listdir("/proc"):
    if entry.isdigit() and int(entry) != os.getpid():
      try:
        cmdline = pathlib.Path(f"/proc/{entry}/cmdline").read_bytes()
      except OSError:
        continue
      if marker.encode() in cmdline:
        pids.append(int(entry))
  return pids


def assert_none_survive(marker: str = "mtrl-sandbox-started", within_s: float = 5.0):
  deadline = time.monotonic() + within_s
  while sandboxed_pids(marker) and time.monotonic() < deadline:
    time.sleep(0.05)
  assert not sandboxed_pids(marker), f"processes outlived the call: {sandboxed_pids(marker)}"


# --- a benign program ----------------------------------------------------------------------------

@needs_sandbox
def test_a_benign_program_returns_its_stdout():
  code = ("import os, sys\n"
          "print(sum(range(10)))\n"
          "print(open('data/input.txt').read().strip(), __name__, os.getcwd(), repr(sys.stdin.read()))\n"
          "open('out.txt', 'w').write('scratch')\n"
          "print(open('/tmp/out.txt').read())\n")
  result = run(code, files={"data/input.txt": "1 2 3"})
  assert result.ok and result.error is None, result.describe()
  assert result.stdout == "45\n1 2 3 __main__ /tmp ''\nscratch\n"
  assert result.returncode == 0 and not result.timed_out and result.duration_s < 10


@needs_sandbox
def test_python_exec_tool_replies_stdout_and_raises_for_a_failed_program():
  tool = sandbox.python_exec(timeout_s=10)
  assert tool("print(6 * 7)") == "42\n"
  with pytest.raises(sandbox.ProgramError, match="ZeroDivisionError") as err:
    tool("print('before'); 1 / 0")
  assert "exit status 1" in str(err.value) and "before" in str(err.value)
  assert err.value.result.returncode == 1
  json_tool = sandbox.python_exec_tool(timeout_s=10)
  assert json_tool.name == "python" and json_tool.parameters["required"] == ["code"]
  assert json_tool.fn(code="print(2 ** 10)") == "1024\n"


@needs_sandbox
def test_python_exec_in_a_python_tool_env_rollout_step():
  """The calculator's `calc` answered by sandboxed Python: a right expression replies its
  digits, a broken one an error reply that is counted; 8 rows run concurrently."""
  exec_tool = sandbox.python_exec(timeout_s=10)

  def calc(args):
    out = exec_tool(f"import time; time.sleep(0.3); print({args.replace(' ', '')})")
    return " ".join(out.strip())

  env0, params = registry.make("calculator")
  env = python_tool.PythonToolEnv(env0, {"calc": calc})
  texts = ["<call> calc 1 2 + 3 0 </call> <eot>"] * 7 + ["<call> calc 1 + * 2 </call> <eot>"]
  toks = np.zeros((8, env.action_len), np.int32)
  for i, text in enumerate(texts):
    ids = env.vocab.encode(text)
    toks[i, :len(ids)] = ids
  action = base.Action(jnp.asarray(toks), jnp.asarray([len(env.vocab.encode(t)) for t in texts]))
  keys = jax.random.split(jax.random.key(0), 8)
  state, _ = jax.vmap(env.reset, in_axes=(0, None))(keys, params)
  step = jax.jit(jax.vmap(env.step, in_axes=(0, 0, 0, None)))
  jax.block_until_ready(step(keys, state, action, params))  # compile (and a first run)
  t = time.monotonic()
  _, obs, _, _, info = jax.block_until_ready(step(keys, state, action, params))
  elapsed = time.monotonic() - t
  replies = [env.vocab.decode(np.asarray(obs.tokens[i])) for i in range(8)]
  assert replies[:7] == ["<tool> 4 2 <eot> <assistant>"] * 7
  assert replies[7] == "<tool> <error> bad-argument <eot> <assistant>"
  np.testing.assert_array_equal(info["format_errors"], [0] * 7 + [1])
  assert "SyntaxError" in env.recent_failures[-1].reason
  assert elapsed < 8 * 0.3, elapsed  # one at a time would take 8 x (0.3 s + start-up)


@needs_sandbox
def test_extra_paths_are_importable_read_only():
  if not os.path.isdir("/var/tmp"):
    pytest.skip("no /var/tmp to make a package directory outside /tmp in")
  with tempfile.TemporaryDirectory(dir="/var/tmp") as lib:
    os.chmod(lib, 0o755)  # the code runs as an unprivileged user: it must be world-readable
    pathlib.Path(lib, "mtrl_probe_mod.py").write_text("VALUE = 42\n")
    result = run("import mtrl_probe_mod\nprint(mtrl_probe_mod.VALUE)\n"
                 "open(mtrl_probe_mod.__file__, 'a')", extra_paths=[lib])
    assert result.stdout == "42\n" and ("Read-only file system" in result.error
                                         or "Permission denied" in result.error), result.error
  with pytest.raises(ValueError, match="under /tmp"):
    sandbox.run_python("print(1)", extra_paths=[tempfile.gettempdir()])


# --- escapes ----------------------------------------------------------------------------------------

@needs_sandbox
def test_host_files_are_not_visible():
  host_passwd = pathlib.Path("/etc/passwd").read_text() if os.path.exists("/etc/passwd") else ""
  result = run("print(open('/etc/passwd').read())")
  assert not result.ok and "FileNotFoundError" in result.error
  assert "root:" not in result.stdout and (not host_passwd or host_passwd not in result.stdout)
  # The root holds the system directories, /tmp, /dev, /proc, and the way to the interpreter.
  result = run("import os, sys; print(sorted(os.listdir('/'))); print(sys.base_prefix)")
  assert result.ok, result.describe()
  listing, prefix = result.stdout.splitlines()
  system = {"usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32", "tmp", "dev", "proc"}
  assert set(eval(listing)) <= system | {prefix.strip("/").split("/")[0]}, listing
  if not prefix.startswith("/usr"):  # e.g. /root/.pyenv/...: only the path to it is there
    parent, child = os.path.split(prefix)
    result = run(f"import os; print(os.listdir({parent!r}))")
    assert result.ok and eval(result.stdout) == [child], result.stdout


@needs_sandbox
@pytest.mark.parametrize("path", sorted({str(ROOT), "/work/main"}))
def test_the_repository_is_not_visible(path):
  result = run(f"import os; print(os.listdir({path!r}))")
  assert not result.ok and "FileNotFoundError" in result.error, result.describe()
  result = run(f"print(open({path + '/README.md'!r}).read())")
  assert not result.ok and "FileNotFoundError" in result.error, result.describe()


@needs_sandbox
@pytest.mark.parametrize("where", ["/", "/usr/", "/usr/bin/", "/dev/", "/dev/shm/", "/proc/",
                                   f"{ROOT}/", "/tmp/../"])
def test_nothing_outside_tmp_is_writable(where):
  path = f"{where}mtrl-sandbox-probe-{os.getpid()}"  # a new name: a broken sandbox harms nothing
  try:
    result = run(f"open({path!r}, 'w').write('pwned')")
    assert not result.ok and ("Read-only file system" in result.error
                              or "Permission denied" in result.error
                              or "No such file" in result.error), result.describe()
  finally:
    host_path = os.path.normpath(path)
    assert not os.path.exists(host_path)
    if os.path.exists(host_path):
      os.remove(host_path)


@needs_sandbox
def test_no_network_not_even_the_hosts_loopback():
  server = socket.socket()
  server.bind(("127.0.0.1", 0))
  server.listen(1)
  server.settimeout(0.2)
  port = server.getsockname()[1]
  accepted = []

  def accept():
    try:
      accepted.append(server.accept())
    except OSError:
      pass

  thread = threading.Thread(target=accept)
  thread.start()
  result = run(f"import socket; socket.create_connection(('127.0.0.1', {port}), timeout=2)")
  thread.join()
  server.close()
  assert not result.ok and "ConnectionRefusedError" in result.error, result.describe()
  assert not accepted
  result = run("import socket; socket.create_connection(('1.1.1.1', 53), timeout=2)")
  assert not result.ok and ("unreachable" in result.error or "OSError" in result.error), \
      result.describe()


@needs_sandbox
def test_a_subprocess_cannot_outlive_the_call():
  marker = f"{os.getpid() % 1000 + 1}.{time.time_ns() % 10**6:06d}"  # a unique sleep length
  result = run(f"import subprocess\n"
               f"subprocess.Popen(['sleep', '{marker}'], start_new_session=True)\n"
               f"print('spawned')")
  assert not result.ok and "left 1 process(es) running" in result.error, result.describe()
  assert result.stdout == "spawned\n"
  assert_none_survive(marker)
  # A daemon that double-forks, and a program that skips the exit check: still killed.
  result = run(f"import os, subprocess\n"
               f"if os.fork() == 0:\n"
               f"  os.setsid()\n"
               f"  subprocess.Popen(['sleep', '{marker}'])\n"
               f"  os._exit(0)\n"
               f"os.wait()\n"
               f"print('daemonised', flush=True)\n"
               f"os._exit(0)")
  assert "daemonised" in result.stdout
  assert_none_survive(marker)


@needs_sandbox
def test_fork_bombs_are_contained_and_killed():
  result = run("import os\nwhile True:\n  os.fork()", timeout_s=10, max_processes=8)
  assert not result.ok and "BlockingIOError" in result.stderr, result.describe()
  t = time.monotonic()
  result = run("import os\nwhile True:\n  try:\n    os.fork()\n  except OSError:\n    pass",
               timeout_s=2, max_processes=8)
  assert result.timed_out and not result.ok and "timed out after 2 s" in result.error
  assert time.monotonic() - t < 5
  assert_none_survive()


@needs_sandbox
def test_memory_bombs_fail():
  result = run("x = bytearray(8 << 30)", memory_mb=256)
  assert not result.ok and "MemoryError" in result.error, result.describe()
  result = run("chunks = []\nwhile True:\n  chunks.append(bytearray(16 << 20))", memory_mb=256)
  assert not result.ok and "MemoryError" in result.error, result.describe()


@needs_sandbox
def test_cpu_time_and_wall_clock_limits():
  t = time.monotonic()
  result = run("while True:\n  pass", timeout_s=10, cpu_s=1)
  assert not result.ok and not result.timed_out and "CPU time limit" in result.error
  assert time.monotonic() - t < 8
  result = run("import time; print('started', flush=True); time.sleep(60)", timeout_s=1)
  assert result.timed_out and result.returncode is None and result.stdout == "started\n"


@needs_sandbox
def test_disk_and_output_limits():
  result = run("open('big', 'wb').write(b'x' * (8 << 20))", file_mb=4)
  assert not result.ok and "File too large" in result.error, result.describe()
  result = run("for i in range(8):\n  open(f'f{i}', 'wb').write(b'x' * (3 << 20))",
               file_mb=4, tmpfs_mb=8)
  assert not result.ok and "No space left" in result.error, result.describe()
  result = run("while True:\n  print('y' * 1000)", file_mb=1, max_output_bytes=1000)
  assert not result.ok and result.truncated and len(result.stdout) == 1000


@needs_sandbox
def test_no_privileges_and_no_host_environment(monkeypatch):
  monkeypatch.setenv("MTRL_SANDBOX_SECRET", "hunter2")
  result = run("import os\n"
               "print(os.getuid() != 0, os.getgid() != 0, os.getgroups())\n"
               "print([l.split()[1] for l in open('/proc/self/status') if l.startswith('CapEff')])\n"
               "print('MTRL_SANDBOX_SECRET' in os.environ)\n"
               "try:\n  os.setuid(0)\nexcept PermissionError:\n  print('setuid refused')\n")
  assert result.ok, result.describe()
  assert result.stdout == "True True []\n['0000000000000000']\nFalse\nsetuid refused\n"


# --- setup ------------------------------------------------------------------------------------------

def test_missing_bubblewrap_is_a_clear_error(monkeypatch):
  real_which = sandbox.shutil.which
  monkeypatch.setattr(sandbox.shutil, "which",
                      lambda name, *a, **k: None if name == "bwrap" else real_which(name, *a, **k))
  with pytest.raises(sandbox.SandboxUnavailable, match="package `bubblewrap`"):
    sandbox.run_python("print(1)")
  with pytest.raises(sandbox.SandboxUnavailable, match="apt-get install -y bubblewrap"):
    sandbox.python_exec()  # fails when the tool is made, not at its first call


def test_arguments_are_checked():
  with pytest.raises(TypeError, match="unknown sandbox limits"):
    sandbox.python_exec(timeout=3)
  for kw in ({"timeout_s": 0}, {"timeout_s": float("inf")}, {"memory_mb": -1},
             {"max_processes": 0}, {"files": {"../x": "a"}}, {"files": {"/etc/x": "a"}},
             {"files": {"main.py": "a"}}, {"extra_paths": ["/nonexistent/dir"]}):
    with pytest.raises(ValueError):
      sandbox.run_python("print(1)", **kw)
  with pytest.raises(ValueError, match="code must be a str"):
    sandbox.run_python(b"print(1)")
