"""`bemerc store info`: what the store holds; `bemerc store check`: whether every table reads."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.table import Table

from bemerc.cli.common import DEFAULT_STORE, JsonOption, StoreOption, console, fail, open_store
from bemerc.store.summary import cached_info

store_app = typer.Typer(help="Inspect the LanceDB feature store.", no_args_is_help=True)


@store_app.command("info")
def info(store: StoreOption = DEFAULT_STORE, as_json: JsonOption = False) -> None:
    """Tables with row counts and versions, the feature sets present, and failure counts.

    Also reads the first row of every table: one that cannot be read is named (exit 1); `store check`
    reads every row.

    With --json prints `{"tables": {NAME: {"rows": N, "version": V}}, "features": {"MODALITY/EXTRACTOR":
    {"rows": N, "dim": D, "random_weights": false, "feature_set": ID, "stale": N, "unverified": N}},
    "failures": {STAGE: N}}`. `stale` rows were computed from a text, media file or span that has
    changed since (`bemerc extract` recomputes them; baseline and tune refuse them); `unverified` rows
    record no input digest (a store written before bemerc recorded them).
    """
    from bemerc.store.check import probe_store

    data = cached_info(store, lambda: open_store(store).info())
    damaged = probe_store(open_store(store)) if data["tables"] else []  # the cache cannot see a file gone
    if as_json:
        print(json.dumps({**data, "damaged": [d.__dict__ for d in damaged]} if damaged else data, indent=2))
        if damaged:
            raise typer.Exit(1)
        return
    tables = Table(title=f"store {data['path']}")
    tables.add_column("table")
    tables.add_column("rows", justify="right")
    tables.add_column("version", justify="right")
    for name, t in data["tables"].items():
        tables.add_row(name, f"{t['rows']:,}", str(t["version"]))
    console.print(tables)
    if data["features"]:
        feats = Table(title="feature sets")
        for col in ("key", "feature set", "rows", "stale", "unverified", "dim", "random weights"):
            feats.add_column(col)
        for key, f in data["features"].items():
            feats.add_row(key, f["feature_set"], f"{f['rows']:,}", f"{f.get('stale', 0):,}", f"{f.get('unverified', 0):,}",
                          str(f["dim"]), "yes" if f["random_weights"] else "no")
        console.print(feats)
        stale = {key: f["stale"] for key, f in data["features"].items() if f.get("stale")}
        if stale:
            console.print("stale rows (inputs changed since extraction): " + ", ".join(f"{k} {v:,}" for k, v in stale.items())
                          + "; `bemerc extract` recomputes them", highlight=False)
    if data["failures"]:
        console.print("failures: " + ", ".join(f"{k} {v}" for k, v in data["failures"].items()))
    if not data["tables"]:
        console.print("The store is empty: start with `bemerc ingest meld DIR`, `bemerc ingest manifest FILE` or `make demo`.")
    for d in damaged:
        console.print(f"[red]damaged[/] {d.line()}", highlight=False)
    if damaged:
        fail(f"{data['path']}: {len(damaged)} table(s) cannot be read; `bemerc store check --store {store}` reads every table whole")


@store_app.command("check")
def check(
    store: StoreOption = DEFAULT_STORE,
    restore: Annotated[bool, typer.Option(
        "--restore", help="For each table whose newest version cannot be opened (its version manifest cut short or "
                          "gone), make the newest older version that reads whole the newest again (the writes after it are lost).")] = False,
    remove_orphans: Annotated[bool, typer.Option(
        "--remove-orphans", help="Remove the prediction rows and run folders (in STORE/runs/) that belong to no recorded run "
                                 "(left by a run writer that was killed); a folder changed in the last lock timeout + 1 min "
                                 "(a writer may still record it) and a stopped tune run's checkpoint folder are kept.")] = False,
    as_json: JsonOption = False,
) -> None:
    """Read every table whole (every row and column) and name each one that cannot be read: a data
    file deleted or cut short, or a newest version whose manifest is damaged (then the newest older
    version that reads whole is named: `--restore` makes it the newest again). `store info` counts
    rows from the tables' manifests and cannot see all of it.

    Also names what belongs to no recorded run (a run writer killed between writing its files or
    predictions and its `runs` row): prediction rows by run id and folders in STORE/runs/; readers
    ignore them, `--remove-orphans` removes them. They do not change the exit status.

    Exit status 1 when a table is damaged, with one line per damaged table. With --json prints
    `{"tables": N, "damaged": [{"table", "path", "cause", "previous_version", "previous_rows"}],
    "orphans": {"predictions": {RUN_ID: ROWS}, "folders": [PATH], "resumable": [PATH]}}`
    (after --remove-orphans: what is left).
    """
    from bemerc.store.check import check_store, find_orphans, remove_orphans as remove, restore_previous

    opened = open_store(store)
    damaged = check_store(opened)
    if restore:
        for d in [d for d in damaged if d.previous_version is not None]:
            moved = restore_previous(opened, d)
            console.print(f"{d.path}: version {d.previous_version} ({d.previous_rows:,} rows) is the newest again; the damaged "
                          f"manifest(s) moved to {moved[0].parent}", highlight=False)
        damaged = check_store(opened)
    removed_lines = []
    if remove_orphans:
        rows, folders, _ = remove(opened)
        removed_lines = [f"removed the predictions of run {run_id!r} ({n:,} rows)" for run_id, n in rows.items()]
        removed_lines += [f"removed {folder}" for folder in folders]
    orphans = find_orphans(opened)
    if as_json:
        print(json.dumps({"tables": len(opened.table_names()), "damaged": [d.__dict__ for d in damaged],
                          "orphans": {"predictions": orphans.predictions, "folders": [str(f) for f in orphans.folders],
                                      "resumable": [str(f) for f in orphans.resumable]}}, indent=2))
        if damaged:
            raise typer.Exit(1)
        return
    for line in removed_lines:
        console.print(line, highlight=False)
    for line in orphans.lines():
        console.print(f"[yellow]orphan[/] {line}", highlight=False)
    if orphans:
        removable = len(orphans.folders) - len(orphans.resumable)
        if remove_orphans:
            if orphans.predictions or removable:
                console.print(f"kept {removable} folder(s) changed in the last lock timeout + 1 min: a run writer may still "
                              "record them; run the check again later", highlight=False)
        else:
            rows = sum(orphans.predictions.values())
            console.print(f"{rows:,} prediction row(s) and {len(orphans.folders)} folder(s) belong to no recorded run (a run "
                          "writer was stopped before recording its run; readers ignore them)"
                          + (f": `bemerc store check --remove-orphans --store {store}` removes them" if rows or removable else ""),
                          highlight=False)
    for d in damaged:
        console.print(f"[red]damaged[/] {d.line(store)}", highlight=False)
    if damaged:
        fail(f"{opened.path}: {len(damaged)} of {len(opened.table_names())} tables cannot be read")
    console.print(f"{opened.path}: all {len(opened.table_names())} tables read whole")


def register(app: typer.Typer) -> None:
    app.add_typer(store_app, name="store")
