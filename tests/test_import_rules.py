"""The package layering: contracts below the three jobs, and no job inside another.

contracts/ holds what the jobs share and imports neither TensorFlow nor FAISS,
so a tool or a notebook can read a manifest, an export or a candidate file
without them; each job imports contracts and its own package only.
"""

import ast
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
JOBS = ("preprocess", "trainer", "retrieval")
CONTRACTS = "contracts"


def _imported_packages(path: pathlib.Path) -> set[str]:
  """Top-level package of every import statement in a file, wherever it stands."""
  packages = set()
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      packages.update(alias.name.split(".")[0] for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
      packages.add(node.module.split(".")[0])
  return packages


@pytest.mark.parametrize("package", JOBS + (CONTRACTS,))
def test_no_package_imports_another_job(package):
  allowed = {package, CONTRACTS}
  offenders = {}
  for path in sorted((REPO / package).rglob("*.py")):
    bad = (_imported_packages(path) & set(JOBS)) - allowed
    if bad:
      offenders[str(path.relative_to(REPO))] = sorted(bad)
  assert not offenders, f"imports across jobs: {offenders}"


def test_contracts_load_without_tensorflow_faiss_or_a_job():
  # conftest imports TF in this process, so check in a fresh interpreter.
  modules = sorted(p.stem for p in (REPO / CONTRACTS).glob("*.py") if p.stem != "__init__")
  assert {"manifest", "metrics", "export_manifest", "candidates", "model_layout"} <= set(modules)
  code = ("import importlib, sys\n"
          f"for name in {modules!r}: importlib.import_module('{CONTRACTS}.' + name)\n"
          f"loaded = sorted(m for m in ('tensorflow', 'faiss', 'keras') + {JOBS!r} "
          "if m in sys.modules)\n"
          "print(','.join(loaded))\n")
  out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                       check=True)
  assert out.stdout.strip() == ""
