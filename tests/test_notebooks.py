"""The analysts' notebooks run top to bottom, in a python3 kernel (nbclient), against a store the demo
filled: every notebook in notebooks/ is executed with SMTPGUARD_STORE__DSN naming that store, and fails the
test on any cell error. The notebooks this suite knows are also checked against the scenario's truth.

The demo runs once per module in a subprocess (`smtpguard demo`): the embedded engine allows one store
directory per process, and each notebook's kernel is a process of its own, so this process never opens
a store itself.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from smtpguard.models import anomaly
from smtpguard.core.store import SEVERITIES

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
SMTPGUARD = str(Path(sys.executable).with_name("smtpguard"))


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SMTPGUARD_")}
    env.update(extra)
    return env


def smtpguard(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([SMTPGUARD, *args], capture_output=True, text=True, env=clean_env(), cwd=cwd, timeout=280)


@dataclass
class Demo:
    dir: Path
    """what `smtpguard demo` wrote: store/, truth.json, flows.log, ..."""

    @property
    def dsn(self) -> str:
        return f"chdb://{self.dir / 'store'}"

    @property
    def truth(self) -> dict[str, dict]:
        return {a["ip"]: a for a in json.loads((self.dir / "truth.json").read_text())}


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Demo:
    data = tmp_path_factory.mktemp("notebooks-demo")
    r = smtpguard("--data-dir", str(data), "demo", "--instances", "60", "--minutes", "30", cwd=data)
    assert r.returncode == 0, r.stderr[-3000:]
    return Demo(data / "demo")


# A reviewer's work, done with the console's own actions: the first raised alert of every source is
# confirmed, except the source that only tried blocked port 25, which the reviewer dismisses as a
# misconfigured app.
REVIEW = """
import json, sys
from pathlib import Path
from smtpguard.core import config
from smtpguard.console import actions
from smtpguard.core.store import Store

store_dir, truth_path = sys.argv[1], sys.argv[2]
truth = {a["ip"]: a["label"] for a in json.loads(Path(truth_path).read_text())}
cfg = config.load(environ={}, overrides={"data_dir": str(Path(store_dir).parent)})
done = {"confirmed": {}, "false_positive": {}}
with Store(f"chdb://{store_dir}", cfg.store.database) as store:
    console = actions.Console(cfg, store)
    first = {}
    for a in sorted(store.list_alerts(limit=100_000), key=lambda a: (a["window_start"], a["alert_id"])):
        if a["src_ip"]:
            first.setdefault(a["src_ip"], a["alert_id"])
    for ip, alert_id in sorted(first.items()):
        if truth.get(ip) == "blocked_attempts":
            actions.dismiss(console, alert_id, "reviewer")
            done["false_positive"][ip] = alert_id
        else:
            actions.confirm(console, alert_id, "reviewer")
            done["confirmed"][ip] = alert_id
print(json.dumps(done))
"""


@dataclass
class Reviewed:
    dsn: str
    confirmed: dict[str, str]
    """source IP -> the alert confirmed"""
    false_positive: dict[str, str]


@pytest.fixture(scope="module")
def reviewed(demo, tmp_path_factory) -> Reviewed:
    """A copy of the demo's store (without truth.json beside it) in which a reviewer labelled alerts."""
    store = tmp_path_factory.mktemp("notebooks-reviewed") / "store"
    shutil.copytree(demo.dir / "store", store, symlinks=True)  # the engine links tables by relative symlinks
    r = subprocess.run([sys.executable, "-c", REVIEW, str(store), str(demo.dir / "truth.json")], capture_output=True,
                       text=True, env=clean_env(), cwd=store.parent, timeout=280)
    assert r.returncode == 0, r.stderr[-3000:]
    done = json.loads(r.stdout.strip().splitlines()[-1])
    assert done["confirmed"] and done["false_positive"], done
    return Reviewed(f"chdb://{store}", done["confirmed"], done["false_positive"])


def parameters_cell(nb) -> int:
    return next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))


def execute(path: Path, dsn: str, **params: object) -> nbformat.NotebookNode:
    """Run the notebook in a python3 kernel with SMTPGUARD_STORE__DSN=dsn; ``params`` go in a cell after the
    parameters cell, as papermill injects them. A failing cell raises CellExecutionError."""
    nb = nbformat.read(path, as_version=4)
    if params:
        cell = nbformat.v4.new_code_cell("\n".join(f"{k} = {v!r}" for k, v in params.items()))
        cell.metadata["tags"] = ["injected-parameters"]
        nb.cells.insert(parameters_cell(nb) + 1, cell)
    client = NotebookClient(nb, kernel_name="python3", timeout=240, resources={"metadata": {"path": str(path.parent)}})
    client.execute(env=clean_env(SMTPGUARD_STORE__DSN=dsn))
    return nb


def outputs(nb) -> list[dict]:
    return [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]


def text(nb) -> str:
    parts = []
    for o in outputs(nb):
        if o.output_type == "stream":
            parts.append(o.text)
        elif "data" in o and "text/plain" in o.data:
            parts.append(o.data["text/plain"])
    return "\n".join(parts)


def images(nb) -> int:
    return sum(1 for o in outputs(nb) if "data" in o and "image/png" in o.data)


def found(pattern: str, out: str) -> str:
    m = re.search(pattern, out)
    assert m, f"{pattern!r} not in the notebook's output:\n{out[:3000]}"
    return m.group(1)


# -- what each known notebook must show ---------------------------------------------------------------
def check_explore(nb, demo: Demo, tmp_path: Path) -> None:
    out, truth = text(nb), demo.truth
    busiest = found(r"Busiest source: (\S+)", out)
    assert truth[busiest]["label"] == "flood", f"the flood source sends the most connections, not {busiest}"
    widest = found(r"Widest fan-out: (\S+)", out)
    assert truth[widest]["label"] in ("spam_burst", "spam_exempted_new"), f"a spam run has the widest fan-out, not {widest}"
    abused = {a["tenant"] for a in truth.values() if a["label"] != "benign"}
    assert int(found(r"\d+ tenants; (\d+) with alerts", out)) == len(abused)
    assert images(nb) >= 4


def check_investigate(nb, demo: Demo, tmp_path: Path) -> None:
    out = text(nb)
    r = smtpguard("--store", demo.dsn, "alerts", "list", "--json", "--limit", "100000", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    raised = [json.loads(line) for line in r.stdout.splitlines()]
    worst = min(raised, key=lambda a: (-SEVERITIES.index(a["severity"]), -a["score"], a["window_start"], a["alert_id"]))
    assert found(r"Investigating alert ([0-9a-f]+):", out) == worst["alert_id"]
    ip = worst["src_ip"]
    assert f"from {ip}, tenant {worst['tenant']}" in out
    assert demo.truth[ip]["label"] != "benign"
    exemption = found(rf"Exemption of {re.escape(ip)} at the alert: ([^;]+);", out)
    assert exemption.startswith("active" if demo.truth[ip]["exempted"] else "no exemption"), exemption
    assert "by response policy" in found(r"Actions: (.*)", out), "the policy decided about the incident's alerts"
    assert images(nb) >= 1


def check_train(nb, demo: Demo, tmp_path: Path) -> None:
    out = text(nb)
    assert "No review labels in the store" in out
    assert f"Labels: falling back to the scenario truth file {demo.dir / 'truth.json'}" in out
    abusive = int(found(r"(\d+) abusive and \d+ benign sources", out))
    assert abusive == sum(1 for a in demo.truth.values() if a["label"] != "benign")
    model_dir = tmp_path / "model"
    assert f"Model artifact: {model_dir}" in out
    card = json.loads((model_dir / "card.json").read_text())
    assert card["features"] == list(anomaly.FEATURES) and card["rows"] >= 50
    assert anomaly.load(model_dir).card.sha256 == card["sha256"]
    assert images(nb) >= 2


CHECKS = {"01-explore-traffic": check_explore, "02-investigate-incident": check_investigate,
          "03-tune-and-train": check_train}


# -- tests -----------------------------------------------------------------------------------------------
def test_the_known_notebooks_are_there():
    assert set(CHECKS) <= {p.stem for p in NOTEBOOKS}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_committed_without_outputs_and_starts_with_its_parameters(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert parameters_cell(nb) == nb.cells.index(code[0]), "the first code cell is the parameters cell"
    assert 'STORE_DSN = os.environ.get("SMTPGUARD_STORE__DSN")' in code[0].source and "DATABASE = " in code[0].source
    assert [c.execution_count for c in code if c.execution_count is not None or c.outputs] == []
    assert nb.metadata.kernelspec.name == "python3"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_against_the_demo_store(path, demo, tmp_path):
    committed = nbformat.read(path, as_version=4)
    # a notebook that writes files says where in MODEL_DIR: keep them in the test's directory
    params = {"MODEL_DIR": str(tmp_path / "model")} if "MODEL_DIR" in committed.cells[parameters_cell(committed)].source else {}
    nb = execute(path, demo.dsn, **params)
    check = CHECKS.get(path.stem)
    if check is not None:
        check(nb, demo, tmp_path)


def test_review_labels_and_actions_reach_the_notebooks(reviewed, tmp_path):
    out = text(execute(NOTEBOOK_DIR / "03-tune-and-train.ipynb", reviewed.dsn, MODEL_DIR=str(tmp_path / "model")))
    n_conf, n_fp = len(reviewed.confirmed), len(reviewed.false_positive)
    assert f"Labels: review_labels ({n_conf} confirmed, {n_fp} false_positive alerts" in out
    assert "falling back" not in out
    assert f"{n_conf} abusive and " in out
    assert json.loads((tmp_path / "model" / "card.json").read_text())["features"] == list(anomaly.FEATURES)

    ip, alert_id = sorted(reviewed.confirmed.items())[0]
    out = text(execute(NOTEBOOK_DIR / "02-investigate-incident.ipynb", reviewed.dsn, ALERT_ID=alert_id))
    assert f"Investigating alert {alert_id}:" in out and f"from {ip}," in out
    assert "status confirmed" in out and "labelled confirmed by reviewer" in out
    assert "confirm by reviewer" in found(r"Actions: (.*)", out)
