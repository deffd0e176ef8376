"""The repository stands on its own: the README links only to files inside it (the design is
docs/DESIGN.md), every module path the design names exists, the quick start keeps its two
commands, and .ci/run runs the README's test command with the notebook required."""

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read(*path) -> str:
  with open(os.path.join(ROOT, *path), encoding="utf-8") as f:
    return f.read()


def _links(text: str) -> list[str]:
  return re.findall(r"\]\(([^)\s]+)\)", text)


def test_readme_links_stay_inside_the_repository():
  readme = _read("README.md")
  links = _links(readme)
  assert "docs/DESIGN.md" in links
  for link in links:
    target = os.path.normpath(os.path.join(ROOT, link.split("#")[0]))
    assert not re.match(r"^[a-z]+:", link), f"README links outside the repository: {link}"
    assert target.startswith(ROOT + os.sep), f"README links outside the repository: {link}"
    assert os.path.exists(target), f"README links to a missing file: {link}"
  for doc in ("DESIGN.md", "RESULTS.md", "HF.md"):
    for link in _links(_read("docs", doc)):
      if not re.match(r"^[a-z]+:", link):
        target = os.path.normpath(os.path.join(ROOT, "docs", link.split("#")[0]))
        assert target.startswith(ROOT + os.sep) and os.path.exists(target), (doc, link)


def test_design_names_only_modules_that_exist():
  design = _read("docs", "DESIGN.md")
  named = set(re.findall(r"`((?:mtrl_jax/|experiments/|configs/)?[\w/]+\.py)`", design))
  named |= {f"mtrl_jax/{m}" for m in re.findall(r"`((?:rl|envs|models|data)/\w+\.py)", design)}
  assert len(named) > 20, named
  for path in sorted(named):
    candidates = [path, os.path.join("mtrl_jax", path)]
    assert any(os.path.exists(os.path.join(ROOT, c)) for c in candidates), path
  for stage in ("collect", "scoring", "estimators", "objective", "update", "config"):
    assert f"rl/{stage}.py" in design, stage
  assert "envs/wrappers" in design and "check_env" in design


def test_quick_start_keeps_two_commands_and_ci_runs_the_test_command():
  readme = _read("README.md")
  quick = readme.split("## Quick start", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
  commands = [l for l in quick.splitlines() if l.strip()]
  assert commands == ['pip install -e . && python -m experiments.train --config '
                      'configs/quickstart.py', 'pip install -e ".[test]" && pytest -q']
  ci = _read(".ci", "run")
  assert ci.rstrip().endswith(commands[1])
  assert "export MTRL_REQUIRE_NOTEBOOK_TEST=1" in ci
