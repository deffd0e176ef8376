"""The package's import graph, read from the source with `ast` (function-level, lazy imports
included): no cycles, and the leaves stay leaves (models/ and envs/ never reach the trainer)."""

import ast
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = "mtrl_jax"
# What models/ and envs/ must never import, directly or through other modules.
ABOVE_LEAVES = ("mtrl_jax.train", "mtrl_jax.rollout", "mtrl_jax.rl", "mtrl_jax.reflexion")
# Modules that import nothing of the package.
LEAVES = ("mtrl_jax.tasks", "mtrl_jax.optional")


def package_modules(root: pathlib.Path = ROOT, package: str = PACKAGE) -> dict[str, pathlib.Path]:
  """Dotted module name -> source file, for every module of `package` (a package is its
  `__init__.py`)."""
  modules = {}
  for path in sorted((root / package).rglob("*.py")):
    parts = path.relative_to(root).with_suffix("").parts
    if parts[-1] == "__init__":
      parts = parts[:-1]
    modules[".".join(parts)] = path
  return modules


def _resolve(dotted: str, modules) -> str | None:
  """The longest prefix of `dotted` that is one of `modules` (None: outside the package)."""
  parts = dotted.split(".")
  for n in range(len(parts), 0, -1):
    name = ".".join(parts[:n])
    if name in modules:
      return name
  return None


def imports_of(source: str, name: str, modules, is_package: bool = False) -> set[str]:
  """The modules of `modules` that module `name` (with this `source`) imports anywhere in its
  code: `import a.b` -> a.b; `from a import b` -> a.b if that is a module, else a; relative
  imports are resolved against `name`. Importing a submodule also runs its packages'
  `__init__`, so each package above an imported module is imported too (except the packages
  above `name` itself, which are initialised before `name` is). Self-imports are left out."""
  out = set()
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, ast.Import):
      out.update(_resolve(alias.name, modules) for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        pkg = name if is_package else name.rpartition(".")[0]
        for _ in range(node.level - 1):
          pkg = pkg.rpartition(".")[0]
        base = f"{pkg}.{base}" if base else pkg
      for alias in node.names:
        sub = f"{base}.{alias.name}"
        out.add(sub if sub in modules else _resolve(base, modules))
  own = {".".join(name.split(".")[:n]) for n in range(1, name.count(".") + 1)}
  if is_package:
    own.add(name)
  for m in [m for m in out if m is not None]:
    parts = m.split(".")
    out.update(p for p in (".".join(parts[:n]) for n in range(1, len(parts)))
               if p in modules and p not in own)
  return {m for m in out if m is not None and m != name and m not in own}


def import_graph(root: pathlib.Path = ROOT, package: str = PACKAGE) -> dict[str, set[str]]:
  """module -> the package modules it imports (see `imports_of`)."""
  modules = package_modules(root, package)
  return {name: imports_of(path.read_text(encoding="utf-8"), name, modules,
                           is_package=path.name == "__init__.py")
          for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """A cycle of `graph` as a path [a, b, ..., a], or None when it is acyclic (depth-first
  search; nodes visited in sorted order, so the answer is deterministic)."""
  state: dict[str, int] = {}  # 1: on the current path, 2: finished
  path: list[str] = []

  def visit(node):
    state[node] = 1
    path.append(node)
    for nxt in sorted(graph.get(node, ())):
      if state.get(nxt) == 1:
        return path[path.index(nxt):] + [nxt]
      if nxt not in state:
        found = visit(nxt)
        if found:
          return found
    path.pop()
    state[node] = 2
    return None

  for node in sorted(graph):
    if node not in state:
      found = visit(node)
      if found:
        return found
  return None


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
  """Every module `start` imports, directly or through others."""
  seen, todo = set(), [start]
  while todo:
    for nxt in graph.get(todo.pop(), ()):
      if nxt not in seen:
        seen.add(nxt)
        todo.append(nxt)
  return seen


# --- the checker itself -------------------------------------------------------------------------

def test_find_cycle_on_small_graphs():
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
  assert find_cycle({"x": {"y"}, "y": {"z", "x"}, "z": set()}) == ["x", "y", "x"]
  assert find_cycle({"a": {"a"}}) == ["a", "a"]
  # A diamond and a chain are not cycles.
  assert find_cycle({"a": {"b", "c"}, "b": {"d"}, "c": {"d"}, "d": set()}) is None
  assert find_cycle({"a": {"b"}, "b": {"outside"}}) is None
  assert find_cycle({}) is None


def test_imports_are_resolved_to_modules():
  modules = {"p", "p.a", "p.sub", "p.sub.b", "p.sub.c"}
  source = ("import os\nimport p.a\nfrom p.sub import b\nfrom p.sub import CONSTANT\n"
            "from p.sub.c import name as n\n"
            "def lazy():\n  from p import a\n  import numpy\n")
  assert imports_of(source, "p.x", modules) == {"p.a", "p.sub.b", "p.sub", "p.sub.c"}
  # Importing p.sub.c runs p.sub's __init__ too.
  assert imports_of("def f():\n  from p.sub import c\n", "p.a", modules) == {"p.sub.c", "p.sub"}
  # Relative imports, from a module and from a package's __init__; self-imports left out.
  assert imports_of("from . import c\nfrom .. import a\n", "p.sub.b", modules) == \
      {"p.sub.c", "p.a"}
  assert imports_of("from .b import f\nfrom . import c\n", "p.sub", modules,
                    is_package=True) == {"p.sub.b", "p.sub.c"}
  assert imports_of("import p.a\n", "p.a", modules) == set()
  # A lazy import that closes a loop is a cycle.
  graph = {"p.a": imports_of("def f():\n  from p.sub import b\n", "p.a", modules),
           "p.sub.b": imports_of("from p import a\n", "p.sub.b", modules)}
  assert find_cycle(graph) == ["p.a", "p.sub.b", "p.a"]
  # A cycle through a package's __init__: p.a imports p.sub.c, whose package p.sub re-exports
  # p.sub.b, which imports p.a (registry -> json_tool -> data.prompts -> data -> data.demos).
  graph = {"p.a": imports_of("def f():\n  from p.sub import c\n", "p.a", modules),
           "p.sub": imports_of("from p.sub.b import f\n", "p.sub", modules, is_package=True),
           "p.sub.b": imports_of("from p import a\n", "p.sub.b", modules), "p.sub.c": set()}
  assert find_cycle(graph) is not None


# --- the package --------------------------------------------------------------------------------

GRAPH = import_graph()


def test_the_graph_sees_the_package():
  assert len(GRAPH) > 30
  assert "mtrl_jax.envs.base" in GRAPH["mtrl_jax.envs.registry"]
  assert "mtrl_jax.envs.json_tool" in GRAPH["mtrl_jax.envs.registry"]  # the lazy factory
  assert "mtrl_jax.models.chat" in GRAPH["mtrl_jax.envs.json_tool"]     # a lazy import


def test_no_import_cycles():
  cycle = find_cycle(GRAPH)
  assert cycle is None, "import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize("package", ["mtrl_jax.models", "mtrl_jax.envs"])
def test_models_and_envs_stay_leaves(package):
  for name in sorted(m for m in GRAPH if m == package or m.startswith(package + ".")):
    above = sorted(m for m in reachable(GRAPH, name)
                   if any(m == a or m.startswith(a + ".") for a in ABOVE_LEAVES))
    assert not above, f"{name} imports {above} (directly or through other modules)"


def test_leaf_modules_import_nothing_of_the_package():
  for name in LEAVES:
    assert GRAPH[name] == set(), f"{name} imports {sorted(GRAPH[name])}"


def test_registry_import_needs_no_hf_extra():
  """The json_tool factory is registered without importing it (nor the `hf` extra)."""
  code = ("import sys; import mtrl_jax.envs.registry as r; assert 'json_tool' in "
          "r.list_factories(); bad = [m for m in ('tokenizers', 'safetensors', 'jinja2', "
          "'mtrl_jax.envs.json_tool', 'mtrl_jax.models.chat') if m in sys.modules]; "
          "assert not bad, bad")
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
