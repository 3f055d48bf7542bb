"""The architecture contract: dependencies point one way along the data flow
(``[tool.importlinter]`` in pyproject.toml: cli > lab > app > console > response > detectors | ingest
> models > core). A later change that reverses an arrow fails here.

The repository keeps the flow's folders at its top (ingest/, detectors/, response/, console/,
models/), installed as sub-packages of ``smtpguard``; import-linter reads one package tree, so the
test assembles that tree (links to the folders) in a temporary directory and checks it there.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"ingest": "ingest", "detectors": "detectors", "response": "response", "console": "console",
           "models": "models"}


def _tree(tmp: Path) -> Path:
    pkg = tmp / "smtpguard"
    pkg.mkdir()
    for entry in (ROOT / "smtpguard").iterdir():
        (pkg / entry.name).symlink_to(entry)
    for name, folder in FOLDERS.items():
        (pkg / name).symlink_to(ROOT / folder)
    return tmp


def _lint(tree: Path) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("lint-imports")
    return subprocess.run([str(exe), str(ROOT / "pyproject.toml")], cwd=tree, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(tree)}, timeout=300)


def test_dependencies_point_one_way(tmp_path):
    r = _lint(_tree(tmp_path))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "1 kept, 0 broken" in r.stdout


def test_the_contract_can_fail(tmp_path):
    """A reversed arrow (the core importing the detectors) breaks the contract."""
    tree = _tree(tmp_path)
    core = tree / "smtpguard" / "core"
    core.unlink()
    core.mkdir()
    for f in (ROOT / "smtpguard" / "core").iterdir():
        (core / f.name).symlink_to(f)
    (core / "reversed.py").write_text("from smtpguard.detectors import rules  # noqa: F401\n")
    r = _lint(tree)
    assert r.returncode != 0 and "smtpguard.core is not allowed to import smtpguard.detectors" in r.stdout


def test_every_module_imports():
    """Every module of the package imports: a name moved to another stage breaks here, not in the
    first notebook or command that happens to reach it."""
    import importlib
    import pkgutil

    import smtpguard

    names = [m.name for m in pkgutil.walk_packages(smtpguard.__path__, "smtpguard.")]
    for folder in FOLDERS:  # the flow's folders, installed as sub-packages
        pkg = importlib.import_module(f"smtpguard.{folder}")
        names += [m.name for m in pkgutil.walk_packages(pkg.__path__, f"smtpguard.{folder}.")]
    assert {"smtpguard.detectors.pipeline", "smtpguard.lab.notebook", "smtpguard.response.service"} <= set(names)
    failed = {}
    for name in names:
        try:
            importlib.import_module(name)
        except Exception as e:  # noqa: BLE001 - the test reports every module that fails
            failed[name] = f"{type(e).__name__}: {e}"
    assert not failed, failed
