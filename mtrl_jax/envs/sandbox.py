"""Run untrusted Python code in a bubblewrap sandbox: `run_python`, and `python_exec` as a tool.

    result = run_python("print(sum(range(10)))", timeout_s=5)   # ExecResult(stdout="45\\n", ...)
    result.ok, result.error                                     # True, None
    tool = python_exec(timeout_s=2)          # ToolFn for `python_tool.PythonToolEnv`
    tool = python_exec_tool(timeout_s=2)     # `json_tool.Tool` "python" for JSON tool calls

Each call runs the code in a fresh separate process under bubblewrap (`bwrap`, the Debian /
Ubuntu package `bubblewrap`; `SandboxUnavailable`, naming the package, if it is missing). The
interpreter is this process's base Python (a virtualenv's own packages are not visible; pass
`extra_paths` to add site-packages directories), started with `-I` (no environment variables,
no user site, no current directory on `sys.path`).

What the sandbox guarantees (tested by the escape tests in tests/test_sandbox.py):

* No access to the host's files: the sandbox sees a read-only `/usr` (and `/bin`, `/lib*` as on
  the host), the interpreter's read-only install prefix, `extra_paths` read-only, a fresh
  `/proc` and a minimal `/dev` (read-only: null, zero, urandom, ...). No `/etc`, `/home`,
  `/root`, `/work`, no repository, no `/etc/passwd` (the host's or any). Everything is
  read-only except `/tmp`.
* A private temporary filesystem: `/tmp` (the working directory) is a fresh tmpfs of
  `tmpfs_mb` MiB, the only writable place; it holds `main.py` (the code) and the `files` given,
  and disappears with the call. Writing anywhere else fails (`EROFS`).
* No network: a new, empty network namespace (only its own loopback; the host's 127.0.0.1
  and everything else is unreachable).
* Nothing outlives the call: the code runs in a new PID namespace whose init is killed when
  the program ends, when the wall-clock timeout fires, or when this process dies
  (`--die-with-parent`), and the kernel then kills every process left in it. A program that
  ends (returns, raises or calls `sys.exit`) with a process still running is answered as an
  error; one that skips that check (`os._exit`) is not, but its processes are killed alike.
* Limits, as rlimits set before the code runs (soft = hard, so the code cannot raise them):
  wall clock `timeout_s` (the whole sandbox is killed), CPU time `cpu_s` per process
  (default `timeout_s`), address space `memory_mb` per process, file size `file_mb` per file
  (also bounds the captured stdout/stderr), `max_processes` processes and threads (a fork bomb
  gets `EAGAIN`), 256 open files, no core dumps. Output beyond `max_output_bytes` is cut.
* Unprivileged: when this process is root, bubblewrap runs privileged (no user namespace) and
  the code runs as a fresh unprivileged uid (`UID_BASE` + a counter; no capabilities, no
  supplementary groups, `no_new_privs` so setuid binaries cannot raise it) via `setpriv`
  (util-linux), which is what makes the process limit count (the kernel does not apply
  RLIMIT_NPROC to root). Otherwise it runs in a user namespace as the calling user, without
  capabilities and with further user namespaces disabled.

What it does not guarantee:

* It is not a virtual machine: the code runs on the host's kernel with the full system call
  interface (no seccomp filter), so a kernel exploit escapes it. Do not run adversarial code
  on a machine holding secrets on this alone.
* Memory and CPU are limited per process, not in total: up to `max_processes` processes of
  `memory_mb` each (plus the tmpfs) can exist at once, and CPU time is only bounded by the
  wall clock times the number of processes; there is no cgroup quota, so a sandboxed program
  competes with the host for CPU and memory bandwidth while it runs.
* `/usr` and the interpreter prefix are readable: anything installed there (and the host's
  kernel information in `/proc`, e.g. `/proc/cpuinfo`) is visible to the code.
* Timing side channels, and the sandbox's own start-up cost (~0.1 s per call).
"""

from __future__ import annotations

import base64
import dataclasses
import itertools
import json
import math
import os
import posixpath
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Callable, Mapping, Sequence

# The code runs as UID_BASE + (a counter mod UID_SPAN) when this process is root: a fresh uid
# per call, so that concurrent calls do not share a process count.
UID_BASE, UID_SPAN = 2_000_000_000, 1 << 16
_calls = itertools.count()

DEFAULTS = dict(timeout_s=5.0, memory_mb=512, file_mb=16, tmpfs_mb=64, max_processes=16,
                max_output_bytes=65536)
_MARKER = b"\x1emtrl-sandbox-started\n"  # the bootstrap's first write: the sandbox is up

# Runs inside the sandbox before the code (python -c): reads {code, files, limits} from stdin,
# writes the files, sets the limits, runs the code as __main__, and fails a program that leaves
# processes running.
_BOOTSTRAP = r"""
import base64, json, os, resource, sys, traceback, types
sys.stderr.buffer.write(MARKER); sys.stderr.flush()
cfg = json.loads(sys.stdin.buffer.read())
for name, data in cfg["files"].items():
  path = os.path.join("/tmp", name)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "wb") as f:
    f.write(base64.b64decode(data))
with open("/tmp/main.py", "w") as f:
  f.write(cfg["code"])
null = os.open("/dev/null", os.O_RDONLY)
os.dup2(null, 0)
os.close(null)
for name, value in cfg["limits"].items():
  resource.setrlimit(getattr(resource, name), (value, value))
main = types.ModuleType("__main__")
main.__file__ = "/tmp/main.py"
sys.modules["__main__"] = main
sys.argv = ["/tmp/main.py"]
sys.path.insert(0, "/tmp")
sys.path.extend(cfg["path"])
status = 0
try:
  exec(compile(cfg.pop("code"), "/tmp/main.py", "exec"), main.__dict__)
except SystemExit as e:
  status = e.code
except BaseException as e:
  tb = e.__traceback__
  traceback.print_exception(type(e), e, tb.tb_next if tb is not None else None)
  status = 1
for stream in (sys.stdout, sys.stderr):
  try:
    stream.flush()
  except Exception:
    pass
def running(pid):
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rpartition(")")[2].split()[0] != "Z"
  except OSError:
    return False
left = [p for p in os.listdir("/proc") if p.isdigit() and int(p) > 1 and int(p) != os.getpid()
        and running(p)]
if left:
  sys.stderr.write(f"sandbox: the program left {len(left)} process(es) running at exit; "
                   "they are killed\n")
  status = status or 1
sys.exit(status)
""".replace("MARKER", repr(_MARKER))


class SandboxUnavailable(RuntimeError):
  """The sandbox cannot be started here (bubblewrap or setpriv missing, namespaces refused)."""


class ProgramError(RuntimeError):
  """Raised by the `python_exec` tools for a program that failed; `result` is its ExecResult."""

  def __init__(self, result: "ExecResult"):
    super().__init__(result.describe())
    self.result = result


@dataclasses.dataclass(frozen=True)
class ExecResult:
  """What a sandboxed program did.

  stdout, stderr: its output, decoded as UTF-8 (invalid bytes replaced), each cut to
  `max_output_bytes`; returncode: its exit status, 128 + N if killed by signal N, None if the
  wall-clock timeout killed it; timed_out: bool; truncated: some output was cut; duration_s:
  wall-clock seconds of the whole call (sandbox start-up included); timeout_s: the limit it ran
  under.
  """

  stdout: str
  stderr: str
  returncode: int | None
  timed_out: bool
  truncated: bool
  duration_s: float
  timeout_s: float

  @property
  def ok(self) -> bool:
    return not self.timed_out and self.returncode == 0

  @property
  def error(self) -> str | None:
    """None for a program that exited with status 0, else one line saying why not."""
    if self.timed_out:
      return f"timed out after {self.timeout_s:g} s (killed)"
    if self.returncode == 0:
      return None
    if self.returncode is not None and 128 < self.returncode <= 128 + 64:
      sig = self.returncode - 128
      try:
        name = signal.Signals(sig).name
      except ValueError:
        name = f"signal {sig}"
      hint = {"SIGKILL": " (CPU time limit?)", "SIGXCPU": " (CPU time limit)",
              "SIGXFSZ": " (file size limit)", "SIGSEGV": " (memory limit?)"}.get(name, "")
      return f"killed by {name}{hint}"
    last = next((ln for ln in reversed(self.stderr.splitlines()) if ln.strip()), "")
    return f"exit status {self.returncode}" + (f": {last.strip()}" if last else "")

  def describe(self, limit: int = 2000) -> str:
    """The error line, then the tails of stderr and stdout (at most `limit` characters each):
    the message a tool replies for a failed program."""
    parts = [self.error or "ok"]
    if self.stderr.strip():
      parts.append(_tail(self.stderr, limit))
    if self.stdout.strip():
      parts.append("stdout:\n" + _tail(self.stdout, limit))
    return "\n".join(parts)


def _tail(text: str, limit: int) -> str:
  text = text.rstrip("\n")
  return text if len(text) <= limit else "..." + text[-limit:]


def _interpreter(python: str | None) -> tuple[str, str]:
  """(interpreter path, install prefix to bind), both real paths."""
  if python is None:
    exe = os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)
    prefix = os.path.realpath(sys.base_prefix)
  else:
    exe = os.path.realpath(shutil.which(python) or python)
    prefix = os.path.dirname(os.path.dirname(exe))
  if not os.access(exe, os.X_OK):
    raise SandboxUnavailable(f"the sandbox's Python interpreter {exe!r} is not executable")
  return exe, prefix


def _tool(name: str, package: str) -> str:
  path = shutil.which(name)
  if path is None:
    raise SandboxUnavailable(
        f"`{name}` is not installed, and the sandbox needs it: install the Debian/Ubuntu "
        f"package `{package}` (apt-get install -y {package})")
  return os.path.realpath(path)


def _covered(path: str, roots: Sequence[str]) -> bool:
  return any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)


def _command(exe: str, binds: Sequence[str], *, tmpfs_mb: int, uid: int | None) -> list[str]:
  """The bwrap command line (see the module docstring for what each part guarantees)."""
  argv = [_tool("bwrap", "bubblewrap"), "--die-with-parent", "--new-session", "--unshare-ipc",
          "--unshare-pid", "--unshare-net", "--unshare-uts", "--unshare-cgroup-try",
          "--hostname", "sandbox"]
  if uid is not None:  # we are root: privileged bwrap, then setpriv drops to `uid`
    setpriv = _tool("setpriv", "util-linux")
    argv += ["--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID",
             "--cap-add", "CAP_SETPCAP"]
  else:
    argv += ["--unshare-user", "--disable-userns"]
  mounted = ["/usr"]
  argv += ["--ro-bind", "/usr", "/usr"]
  for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
    if os.path.islink(top):
      argv += ["--symlink", os.readlink(top), top]
    elif os.path.isdir(top):
      argv += ["--ro-bind", top, top]
      mounted.append(top)
  made: set[str] = set()
  for path in binds:
    if _covered(path, mounted):
      continue
    parts = path.strip("/").split("/")
    for k in range(1, len(parts)):
      parent = "/" + "/".join(parts[:k])
      if parent not in made:
        argv += ["--perms", "0755", "--dir", parent]
        made.add(parent)
    argv += ["--ro-bind", path, path]
    mounted.append(path)
  if not _covered(exe, mounted):
    raise SandboxUnavailable(f"the interpreter {exe} is outside the paths bound in the sandbox")
  argv += ["--proc", "/proc", "--dev", "/dev", "--remount-ro", "/dev",
           "--perms", "01777", "--size", str(tmpfs_mb << 20), "--tmpfs", "/tmp",
           "--chdir", "/tmp", "--remount-ro", "/", "--clearenv",
           "--setenv", "PATH", "/usr/local/bin:/usr/bin:/bin", "--setenv", "HOME", "/tmp",
           "--setenv", "TMPDIR", "/tmp", "--setenv", "LANG", "C.UTF-8",
           # glibc reserves 64 MiB of address space per malloc arena (one per thread, up to
           # 8 x cores): two keep `memory_mb` close to the memory actually used.
           "--setenv", "MALLOC_ARENA_MAX", "2", "--"]
  if uid is not None:
    if not _covered(setpriv, mounted):
      raise SandboxUnavailable(f"setpriv ({setpriv}) is outside the paths bound in the sandbox")
    argv += [setpriv, f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--inh-caps=-all",
             "--bounding-set=-all", "--no-new-privs"]
  return argv + [exe, "-I", "-B", "-u", "-c", _BOOTSTRAP]


def _check_files(files: Mapping[str, str | bytes] | None) -> dict[str, str]:
  out = {}
  for name, data in (files or {}).items():
    norm = posixpath.normpath(name) if isinstance(name, str) else ""
    if (not norm or norm.startswith("/") or norm in (".", "..", "main.py")
        or norm.startswith("../") or norm != name):
      raise ValueError(f"files: {name!r} must be a normalised relative path inside /tmp, "
                       "not main.py")
    raw = data.encode() if isinstance(data, str) else bytes(data)
    out[name] = base64.b64encode(raw).decode("ascii")
  return out


def _positive(name: str, value, integer: bool = True):
  ok = (isinstance(value, int) and not isinstance(value, bool)) if integer else (
      isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value))
  if not ok or value <= 0:
    kind = "a positive integer" if integer else "a positive finite number"
    raise ValueError(f"{name} must be {kind}, got {value!r}")
  return value


def run_python(code: str, *, timeout_s: float = DEFAULTS["timeout_s"],
               memory_mb: int = DEFAULTS["memory_mb"], cpu_s: int | None = None,
               file_mb: int = DEFAULTS["file_mb"], tmpfs_mb: int = DEFAULTS["tmpfs_mb"],
               max_processes: int = DEFAULTS["max_processes"],
               max_output_bytes: int = DEFAULTS["max_output_bytes"],
               files: Mapping[str, str | bytes] | None = None, python: str | None = None,
               extra_paths: Sequence[str] = ()) -> ExecResult:
  """Run `code` (Python source) in the sandbox described in the module docstring.

  Args:
    code: the program; run as `/tmp/main.py` (`__name__ == "__main__"`), cwd `/tmp`, stdin
      empty.
    timeout_s: wall-clock seconds before the whole sandbox is killed (start-up included).
    memory_mb: address-space limit per process, MiB. cpu_s: CPU seconds per process (default
      `ceil(timeout_s)`). file_mb: largest file (and captured stdout/stderr), MiB. tmpfs_mb:
      size of `/tmp`, MiB. max_processes: processes plus threads the program may have,
      itself included. max_output_bytes: stdout and stderr are each cut to this.
    files: {relative path: text or bytes} written under `/tmp` before the code runs.
    python: the interpreter (default: this process's base interpreter); its prefix
      (`<dir of the executable>/..`) is bound read-only.
    extra_paths: host directories bound read-only at the same place and appended to
      `sys.path` (e.g. a site-packages directory); not under /tmp, /dev or /proc. When this
      process is root the code runs as an unprivileged uid, so they must be world-readable.

  Returns an `ExecResult`; never raises for anything the program does. Raises
  `SandboxUnavailable` if the sandbox cannot start, ValueError for bad arguments.
  """
  if not isinstance(code, str):
    raise ValueError(f"code must be a str, got {type(code).__name__}")
  timeout_s = _positive("timeout_s", timeout_s, integer=False)
  for name, value in (("memory_mb", memory_mb), ("file_mb", file_mb), ("tmpfs_mb", tmpfs_mb),
                      ("max_processes", max_processes), ("max_output_bytes", max_output_bytes)):
    _positive(name, value)
  cpu_s = math.ceil(timeout_s) if cpu_s is None else _positive("cpu_s", cpu_s)
  payload_files = _check_files(files)
  extra = [os.path.realpath(p) for p in extra_paths]
  for p in extra:
    if not os.path.isdir(p):
      raise ValueError(f"extra_paths: {p!r} is not a directory")
    if _covered(p, ("/tmp", "/dev", "/proc")):
      raise ValueError(f"extra_paths: {p!r} is under /tmp, /dev or /proc, which the sandbox "
                       "replaces with its own")
  exe, prefix = _interpreter(python)
  root = os.geteuid() == 0
  uid = UID_BASE + next(_calls) % UID_SPAN if root else None
  argv = _command(exe, [prefix, *extra], tmpfs_mb=tmpfs_mb, uid=uid)
  limits = {"RLIMIT_AS": memory_mb << 20, "RLIMIT_CPU": cpu_s, "RLIMIT_FSIZE": file_mb << 20,
            # Without root, the user namespace's count includes bubblewrap's own init.
            "RLIMIT_NPROC": max_processes + (0 if root else 1), "RLIMIT_NOFILE": 256,
            "RLIMIT_CORE": 0}
  payload = json.dumps({"code": code, "files": payload_files, "limits": limits,
                        "path": extra}).encode()

  start = time.monotonic()
  with tempfile.TemporaryFile() as stdin, tempfile.TemporaryFile() as out, \
      tempfile.TemporaryFile() as err:
    stdin.write(payload)
    stdin.seek(0)
    proc = subprocess.Popen(argv, stdin=stdin, stdout=out, stderr=err, close_fds=True,
                            start_new_session=True)
    timed_out = False
    try:
      proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
      timed_out = True
    finally:
      if proc.returncode is None:  # timeout (or an interrupt): kill bwrap, and so the sandbox
        try:
          os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
          pass
        proc.wait()
    duration = time.monotonic() - start
    stdout, cut_out = _read(out, max_output_bytes)
    stderr, cut_err = _read(err, max_output_bytes + len(_MARKER))
  if stderr.startswith(_MARKER):
    stderr = stderr[len(_MARKER):]
  elif not timed_out:
    raise SandboxUnavailable("the sandbox did not start (bubblewrap failed): "
                             + stderr.decode("utf-8", "replace").strip()[:1000])
  return ExecResult(stdout=stdout.decode("utf-8", "replace"),
                    stderr=stderr.decode("utf-8", "replace"),
                    returncode=None if timed_out else proc.returncode, timed_out=timed_out,
                    truncated=cut_out or cut_err, duration_s=duration, timeout_s=timeout_s)


def _read(f, limit: int) -> tuple[bytes, bool]:
  """The first `limit` bytes of file `f` and whether there was more."""
  f.seek(0)
  data = f.read(limit + 1)
  return data[:limit], len(data) > limit


def check(**limits) -> None:
  """Start the sandbox once with a trivial program; raises `SandboxUnavailable` (saying what to
  install or why it failed) if it cannot run here."""
  limits = {**limits, "timeout_s": max(float(limits.get("timeout_s", 0)), 30.0)}
  result = run_python("print('ok')", **limits)
  if result.stdout != "ok\n":
    raise SandboxUnavailable(f"the sandbox started but a trivial program failed: "
                             f"{result.describe()}")


def python_exec(**limits) -> Callable[[str], str]:
  """A tool: `tool(code) -> stdout` of `code` run by `run_python(code, **limits)`; a program
  that fails (exception, non-zero exit, killed, timed out) raises `ProgramError` whose message
  is `ExecResult.describe()`, which `PythonToolEnv` and `JsonToolEnv` answer as an error reply
  and count. Checks that the sandbox runs here when called (`SandboxUnavailable`), so a missing
  bubblewrap fails at setup, not as error replies during training.

  For `python_tool.PythonToolEnv` (`{"python": python_exec()}`), `code` is the call's argument
  symbols joined by spaces, and the stdout's whitespace-separated words are the reply's symbols.
  """
  _validate(limits)
  check(**{k: v for k, v in limits.items() if k != "timeout_s"})

  def tool(code: str) -> str:
    result = run_python(str(code), **limits)
    if not result.ok:
      raise ProgramError(result)
    return result.stdout

  return tool


def _validate(limits: Mapping) -> None:
  allowed = set(run_python.__kwdefaults__)
  unknown = sorted(set(limits) - allowed)
  if unknown:
    raise TypeError(f"unknown sandbox limits {unknown}; allowed: {sorted(allowed)}")


def python_exec_tool(name: str = "python", **limits):
  """`python_exec(**limits)` as a `json_tool.Tool` with one argument, `code` (a string), for
  JSON tool calls: `JsonToolEnv(..., tools=[python_exec_tool()])`."""
  from mtrl_jax.envs import json_tool  # lazy: json_tool needs jax/flax, this module does not

  run = python_exec(**limits)
  return json_tool.Tool(
      name=name,
      description=("Run a Python 3 program in a sandbox (no network, no files but its own "
                   "/tmp) and return what it prints to stdout. Use print() for results."),
      parameters={"type": "object", "properties": {"code": {
          "type": "string", "description": "The complete program, e.g. print(2 ** 10)"}},
                  "required": ["code"]},
      fn=lambda code: run(str(code)))
