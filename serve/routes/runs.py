"""Trained runs: the list with their seed groups, and one run's metrics with the comparison report.

Report files come only from the folder the server was started with (``report_dir``).
"""

from __future__ import annotations

import json
from pathlib import Path

from fastapi import APIRouter, HTTPException, Request

from bemerc.serve.routes import StoreDep
from bemerc.store import query as Q
from bemerc.store.runs import list_runs
from bemerc.train.runs import seed_groups

REPORT_FILES = ("report.md", "report.html")

router = APIRouter()


@router.get("/runs", summary="Trained runs")
def runs(store: StoreDep) -> list[dict]:
    """Every run, oldest first: id, kind, classes, feature sets and metrics per split. A seed
    group (kind ``group``) also has ``group``: its seeds, members and failed seeds, and its
    metrics per split hold the mean, ``std`` and ``per_seed`` values; a member run has the
    ``group_id`` it belongs to (null for a run of no group)."""
    keep = ("run_id", "kind", "created_at", "dataset", "classes", "feature_sets", "metrics")
    stored = list_runs(store)
    groups = seed_groups(stored)
    group_of = {member: g for g, entry in groups.items() for member in entry["members"].values()}
    return Q.to_records([{**{k: getattr(r, k) for k in keep}, "group_id": group_of.get(r.run_id),
                          **({"group": groups[r.run_id]} if r.run_id in groups else {})} for r in stored])


@router.get("/runs/{run_id}/report", summary="A run's metrics and the comparison report")
def run_report(run_id: str, store: StoreDep, request: Request) -> dict:
    """The run's ``metrics.json`` and, when ``bemerc compare`` wrote one into the server's report
    folder, the comparison report (markdown)."""
    run = next((r for r in list_runs(store) if r.run_id == run_id), None)
    if run is None:
        raise HTTPException(404, f"no run {run_id!r} in {store.path}")
    metrics_file = Path(run.run_dir or "") / "metrics.json"
    metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else run.metrics
    report = None
    report_dir = request.app.state.report_dir
    if report_dir is not None:
        found = next((Path(report_dir) / f for f in REPORT_FILES if (Path(report_dir) / f).is_file()), None)
        if found is not None:
            report = {"file": found.name, "format": found.suffix.lstrip("."), "content": found.read_text()}
    return {"run_id": run_id, "kind": run.kind, "metrics": metrics, "report": report}
