"""`bemerc baseline` (XGBoost late fusion on the store) and `bemerc compare` (a report of runs)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from bemerc.cli.common import DEFAULT_STORE, SEEDS_HELP, JsonOption, SpeakerNormOption, StoreOption, console, fail


def baseline(
    store: StoreOption = DEFAULT_STORE,
    run_dir: Annotated[Path | None, typer.Option("--run-dir", help="Folder of the run's models and metrics (default: runs/RUN_ID inside the store).")] = None,
    feature_set: Annotated[list[str] | None, typer.Option("--feature-set", help="Feature set to use (id, MODALITY/EXTRACTOR or MODALITY); repeat for several. Default: the newest of every modality.")] = None,
    context: Annotated[int | None, typer.Option("--context", min=0, show_default=False, help="Previous utterances of the dialogue averaged as context (0: none; default: BaselineConfig.context).")] = None,
    dataset: Annotated[str | None, typer.Option("--dataset", help="Dataset to train on when the store holds several.")] = None,
    seed: Annotated[int | None, typer.Option("--seed", show_default=False, help="Seed of XGBoost's row and column subsampling (default: BaselineConfig.seed, 0).")] = None,
    seeds: Annotated[str | None, typer.Option("--seeds", show_default=False, help=SEEDS_HELP)] = None,
    speaker_norm: SpeakerNormOption = None,
    as_json: JsonOption = False,
) -> None:
    """Train the XGBoost late-fusion baseline on the store.

    One XGBoost classifier (and a logistic-regression head) per modality on the utterance's vector
    plus dialogue context; their class probabilities are averaged with weights chosen on dev, leaving
    out modalities an utterance lacks. An early-fusion model and the modality ablation are scored
    beside it. Early stopping and fusion weights use dev only. Writes the models and metrics.json to
    the run folder and the run and its dev/test predictions to the store.

    Example: `bemerc baseline --store store --feature-set text --feature-set audio`
    """
    from dataclasses import replace

    from bemerc.store import Store, StoreError, StoreLockedError
    from bemerc.train.baseline import BaselineConfig, train_baseline
    from bemerc.train.runs import BASELINE, group_config, parse_seeds, train_group

    given = {name: value for name, value in {"context": context, "seed": seed, "speaker_norm": speaker_norm}.items()
             if value is not None}  # defaults: BaselineConfig
    log = (lambda message: None) if as_json else (lambda message: console.print(f"  {message}", highlight=False))
    if seeds is not None:
        if seed is not None:
            fail("give --seed or --seeds, not both")
        try:
            seed_list = parse_seeds(seeds)
            db = Store(store, create=False)
            config = BaselineConfig(**given)
            group = train_group(
                db, BASELINE, seed_list,
                lambda s, folder: train_baseline(db, feature_sets=feature_set or None, dataset=dataset, config=replace(config, seed=s),
                                                 run_dir=folder, log=log).run_id,
                run_dir=run_dir, config=group_config(config, feature_sets=feature_set or None), log=log)
        except (StoreError, StoreLockedError, ValueError) as e:
            fail(str(e))
        print_group(group, as_json)
        return
    try:
        result = train_baseline(
            Store(store, create=False),
            feature_sets=feature_set or None,
            dataset=dataset,
            config=BaselineConfig(**given),
            run_dir=run_dir,
            log=log,
        )
    except (StoreError, StoreLockedError) as e:
        fail(str(e))
    m = result.metrics
    if as_json:
        print(json.dumps({"run_id": result.run_id, "run_dir": str(result.run_dir), "metrics": m}, indent=2))
        return
    table = Table(title=f"baseline {result.run_id} (weighted F1)")
    splits = [s for s in ("dev", "test") if s in m]
    table.add_column("model")
    for s in splits:
        table.add_column(s, justify="right")
    for name, scores in m["models"].items():
        table.add_row(name, *(f"{scores[s]['weighted_f1']:.4f}" if s in scores else "-" for s in splits))
    for name, entry in m["ablation"].items():
        table.add_row(f"ablation: {name}", *(f"{entry[s]['weighted_f1']:.4f}" if s in entry else "-" for s in splits))
    console.print(table)
    for s in splits:
        ci = m[s]["ci"]["weighted_f1"]
        console.print(f"late fusion {s}: weighted F1 {m[s]['weighted_f1']:.4f} [95% CI {ci['low']:.4f}, {ci['high']:.4f}], "
                      f"accuracy {m[s]['accuracy']:.4f}, macro F1 {m[s]['macro_f1']:.4f} (n={m[s]['n']:,})")
    console.print(f"run {result.run_id} in {result.run_dir} ({result.seconds:.0f} s)")


def print_group(group: dict, as_json: bool) -> None:
    """What `baseline --seeds` and `tune --seeds` print: each seed's scores, mean +- std, and the
    scores of the seeds' mean probabilities (the group's predictions)."""
    from bemerc.train.runs import GROUP_METRICS

    if as_json:
        print(json.dumps(group, indent=2, default=str))
        return
    m = group["metrics"]
    splits = [s for s in ("dev", "test") if s in m]
    table = Table(title=f"group {group['group_id']} ({len(group['members'])} seeds)")
    table.add_column("seed")
    table.add_column("run")
    for s in splits:
        for name in ("weighted F1", "accuracy", "macro F1"):
            table.add_column(f"{s} {name}", justify="right")
    for seed, run_id in group["members"].items():
        table.add_row(str(seed), run_id, *(f"{m[s]['per_seed'][str(seed)][k]:.4f}" if str(seed) in m[s]["per_seed"] else "-"
                                           for s in splits for k in GROUP_METRICS))
    table.add_row("mean ± std", "", *(f"{m[s][k]:.4f} ± {m[s]['std'][k]:.4f}" for s in splits for k in GROUP_METRICS))
    if all("seed_mean_probabilities" in m[s] for s in splits):  # the group's own predictions: an ensemble of the seeds
        table.add_row("seed mean", "(mean probabilities)", *(f"{m[s]['seed_mean_probabilities'][k]:.4f}" for s in splits for k in GROUP_METRICS))
    console.print(table)
    for seed, reason in group["failed"].items():
        console.print(f"[yellow]seed {seed} failed: {reason}[/]", highlight=False)
    console.print(f"group {group['group_id']} in {group['run_dir']}; see `bemerc compare`", highlight=False)


def compare(
    runs: Annotated[list[str] | None, typer.Argument(help="Run ids to compare (default: every run in the store).")] = None,
    store: StoreOption = DEFAULT_STORE,
    split: Annotated[str | None, typer.Option("--split", show_default=False, help="Split to score: dev (the default) or test.")] = None,
    out: Annotated[Path, typer.Option("--out", help="Folder of the report (report.md, report.html, PNG plots).")] = Path("reports"),
    per_seed: Annotated[bool, typer.Option("--per-seed", help="Also print a row per seed under each seed group.")] = False,
    as_json: JsonOption = False,
) -> None:
    """Compare runs side by side in a report.

    Scores each run of any kind (baseline, tune, fusion) from its stored predictions on one split:
    weighted F1 with a 95% bootstrap interval, accuracy, macro F1, F1 per class and the
    row-normalised confusion matrix; a paired permutation test between the best two runs; the
    baseline's modality ablation; each fusion run's members, weights and cross-fitted dev score.
    A seed group (`baseline --seeds`, `tune --seeds`) is one row, mean ± sample std over its seeds
    (`--per-seed` adds each seed's row); its members are folded into it unless named. The paired
    test compares a group by its seeds' mean probabilities, so every seed counts.
    On the synthetic demo the report says first that its scores only show that the pipeline runs.
    Writes OUT/report.md with PNG plots beside it and OUT/report.html (one page, plots embedded).

    Example: `bemerc compare --split dev --out reports`
    """
    from bemerc.store import Store, StoreError
    from bemerc.train.report import REPORT_FILES, RUN_TABLE_HEADERS, comparison, run_table_rows, write_report

    from bemerc.store.runs import check_run_dir

    if split not in (None, "dev", "test"):
        fail(f"--split must be dev or test, got {split!r}")
    try:  # the default split is comparison()'s
        if not as_json:  # before any work: a --out taken by other files is refused
            check_run_dir(out, allow=REPORT_FILES, option="--out")
        data = comparison(Store(store, create=False), runs or None, **({"split": split} if split else {}))
    except StoreError as e:
        fail(str(e))
    if as_json:
        print(json.dumps(data, indent=2))
        return
    split = data["split"]
    if not data["runs"]:
        fail(f"no run has labelled {split} predictions: " + "; ".join(f"{s['run_id']} ({s['reason']})" for s in data["skipped"]))
    try:
        paths = write_report(data, out)
    except StoreError as e:
        fail(str(e))
    shown = [i for i, header in enumerate(RUN_TABLE_HEADERS) if header != "feature sets"]  # in the report
    rows = [tuple(RUN_TABLE_HEADERS[i] for i in shown), *(tuple(row[i] for i in shown) for row in run_table_rows(data["runs"], per_seed=per_seed))]
    widths = [max(len(row[c]) for row in rows) for c in range(len(shown))]
    console.print(f"runs on {split}:", highlight=False)
    for row in rows:  # plain aligned lines: a narrow terminal wraps a line but never splits a score
        console.print("  ".join(cell.ljust(w) if c < 2 else cell.rjust(w) for c, (cell, w) in enumerate(zip(row, widths))).rstrip(),
                      highlight=False, markup=False)
    for r in data["runs"]:
        for s, reason in r.get("failed", {}).items():
            console.print(f"[yellow]{r['run_id']}: seed {s} failed ({reason})[/]", highlight=False)
    best = max(data["runs"], key=lambda r: r["weighted_f1"])
    console.print(f"best on {split}: {best['run_id']} weighted F1 {best['weighted_f1']:.4f}"
                  + (f" (mean of {best['seeds']} seeds)" if "std" in best else ""), highlight=False)
    if data["paired_test"]:
        console.print(f"paired test {data['paired_test']['run_a']} vs {data['paired_test']['run_b']}: p = {data['paired_test']['p_value']:.4f}")
    console.print(f"report: {paths['markdown']} and {paths['html']}")


def register(app: typer.Typer) -> None:
    app.command("baseline")(baseline)
    app.command("compare")(compare)
