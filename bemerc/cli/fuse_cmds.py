"""`bemerc fuse`: stack stored runs (late fusion, weights fit on dev) into a run of kind `fusion`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from bemerc.cli.common import DEFAULT_STORE, JsonOption, StoreOption, console, fail, open_store


def fuse(
    runs: Annotated[list[str], typer.Argument(
        help="Runs to fuse: run ids, or KIND:latest for the newest run of a kind (baseline:latest, tune:latest, fusion:latest, "
             "group:latest; baseline-group:latest and tune-group:latest for the newest seed group of baselines or tuned runs).",
        show_default=False)],
    store: StoreOption = DEFAULT_STORE,
    run_dir: Annotated[Path | None, typer.Option("--run-dir", help="Folder of the run's config.json and metrics.json (default: runs/RUN_ID inside the store).")] = None,
    skip_missing: Annotated[bool, typer.Option(
        "--skip-missing", help="Leave out refs that match no run; with fewer than two runs left, fuse nothing and exit 0 (for scripts such as `make compare`).")] = False,
    as_json: JsonOption = False,
) -> None:
    """Fuse the stored probabilities of two or more runs, with weights fit on dev.

    Any runs of one dataset and one class list can be fused: baselines (their late fusion), tuned
    LLMs, other fusion runs, seed groups (`--seeds`: a group takes part with its seeds' mean
    probabilities, one member however many seeds). The weights are chosen on the labelled dev utterances every run
    predicted, by the baseline's greedy ensemble selection (dev log loss); test is only scored.
    Records a run of kind `fusion` with its predictions on every evaluation split the runs share,
    RUN_DIR/config.json (members, weights) and RUN_DIR/metrics.json. Its config also holds an honest
    dev estimate, `summary.cross_fit_dev_weighted_f1`: weights fit on one half of the dev dialogues
    score the other half. Fusing the same runs again returns the stored fusion run.

    Example: `bemerc fuse baseline:latest tune:latest`, then `bemerc compare`.
    """
    from bemerc.store import StoreError, StoreLockedError
    from bemerc.train.fuse import FusionError, fuse_runs, resolve_runs

    log = (lambda message: None) if as_json else (lambda message: console.print(f"  {message}", highlight=False))
    try:
        db = open_store(store)
        run_ids = resolve_runs(db, runs, skip_missing=skip_missing)
        if skip_missing and len(run_ids) < 2:
            missing = [ref for ref in runs if not resolve_runs(db, [ref], skip_missing=True)]
            message = f"nothing to fuse: no run matches {', '.join(missing)}"
            if as_json:
                print(json.dumps({"run_id": None, "reason": message}))
            else:
                console.print(message, highlight=False)
            return
        result = fuse_runs(db, run_ids, run_dir=run_dir, log=log)
    except (FusionError, StoreError, StoreLockedError) as e:
        fail(str(e))
    if as_json:
        print(json.dumps({"run_id": result.run_id, "run_dir": str(result.run_dir), "reused": result.reused,
                          "weights": result.weights, "summary": result.summary, "metrics": result.metrics}, indent=2, default=str))
        return
    m = result.metrics
    console.print("weights: " + ", ".join(f"{run} {w:.2f}" for run, w in result.weights.items()), highlight=False)
    for s in ("dev", "test"):
        if s in m:
            ci = m[s]["ci"]["weighted_f1"]
            console.print(f"fusion {s}: weighted F1 {m[s]['weighted_f1']:.4f} [95% CI {ci['low']:.4f}, {ci['high']:.4f}], "
                          f"accuracy {m[s]['accuracy']:.4f}, macro F1 {m[s]['macro_f1']:.4f} (n={m[s]['n']:,})", highlight=False)
    honest = result.summary.get("cross_fit_dev_weighted_f1")
    if honest is not None:
        console.print(f"cross-fitted dev weighted F1 (weights fit on the other half of the dev dialogues): {honest:.4f}", highlight=False)
    console.print(f"run {result.run_id} in {result.run_dir}{' (already stored)' if result.reused else ''}", highlight=False)


def register(app: typer.Typer) -> None:
    app.command("fuse")(fuse)
