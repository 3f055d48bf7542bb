"""The detector core computes what its golden output says (tests/golden/make.py): the same window
and tenant features and the same medium-or-higher alerts, field by field, on three scenarios.

A faster core (integer keys, other group-bys, other data structures) must pass this unchanged; a
change meant to alter detection regenerates the golden files and says so.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import polars as pl
import pytest
from polars.testing import assert_frame_equal

GOLDEN = Path(__file__).resolve().parent / "golden"
_spec = importlib.util.spec_from_file_location("golden_make", GOLDEN / "make.py")
make = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make)


def _frames_equal(got: pl.DataFrame, want: pl.DataFrame) -> None:
    assert got.columns == want.columns
    assert got.height == want.height
    # sums in another order may differ in the last bits of a float, never more
    assert_frame_equal(got, want, check_exact=False, rel_tol=1e-9, abs_tol=1e-9)


@pytest.mark.parametrize("case", make.CASES, ids=lambda c: make.case_name(c[0]))
def test_core_reproduces_its_golden_output(case, tmp_path):
    seed = case[0]
    name = make.case_name(seed)
    feats, tenants, alerts = make.run_case(*case, tmp_path)
    _frames_equal(feats, pl.read_parquet(GOLDEN / f"{name}-features.parquet"))
    _frames_equal(tenants, pl.read_parquet(GOLDEN / f"{name}-tenants.parquet"))
    want = json.loads((GOLDEN / f"{name}-alerts.json").read_text())
    got = json.loads(json.dumps(alerts, sort_keys=True, default=str))
    assert [a["alert_id"] for a in got] == [a["alert_id"] for a in want]
    for g, w in zip(got, want):
        assert g == w, f"alert {w['alert_id']} differs"
