"""`bemerc ingest meld|iemocap|manifest`: annotations and media paths into the utterances table."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.progress import Progress

from bemerc.cli.common import DEFAULT_STORE, StoreOption, console, fail, open_store

ingest_app = typer.Typer(
    help=(
        "Read a corpus into the store's `utterances` table. Everything is checked before anything is "
        "written: bad input stops with one line naming the file, the row and the problem, and the store "
        "stays as it was. Re-ingesting the same data changes nothing."
    ),
    no_args_is_help=True,
)


def _write(store_path: Path, reader: str, name: str, *args, **kwargs) -> None:
    """Read a corpus with ``bemerc.store.ingest.<reader>(*args, **kwargs)`` and write its utterances
    (the store and ingest modules load here, when the command runs)."""
    from bemerc.store import Store, StoreError, StoreLockedError
    from bemerc.store import ingest
    from bemerc.store.ingest.common import add_checksums

    try:
        report = getattr(ingest, reader)(*args, **kwargs)
        media_rows = [r for r in report.rows if r.get("video_path") or r.get("audio_path")]
        if media_rows:
            with Progress(console=console, transient=True) as progress:
                task = progress.add_task("checksumming media", total=len(media_rows))
                add_checksums(media_rows, lambda n: progress.advance(task, n))
        inserted, updated, unchanged = ingest.write_utterances(Store(store_path), report.rows, source=args[0])
    except (ingest.IngestError, StoreError, StoreLockedError) as e:
        fail(str(e))
    splits = ", ".join(f"{split} {n:,}" for split, n in report.counts().items())
    console.print(f"{name}: {len(report.rows):,} utterances ({splits}); {inserted:,} new, {updated:,} updated, {unchanged:,} unchanged")
    if report.skipped:
        console.print("left out: " + ", ".join(f"{reason} {n:,}" for reason, n in sorted(report.skipped.items())))
    if report.missing_media:
        shown = ", ".join(report.missing_media[:5]) + (" ..." if len(report.missing_media) > 5 else "")
        console.print(f"[yellow]{len(report.missing_media)} utterance(s) have no clip in the release:[/] {shown}")


@ingest_app.command("meld")
def meld(
    folder: Annotated[str, typer.Argument(help="MELD folder (or a prefix on object storage, s3://bucket/MELD): the *_sent_emo.csv files here or in data/MELD/; clips under train_splits/, dev_splits_complete/, output_repeated_splits_test/ when present.", show_default=False)],
    store: StoreOption = DEFAULT_STORE,
) -> None:
    """Ingest MELD (train, dev and test CSVs, whichever exist) and link its clips.

    uids are `{split}/dia{Dialogue_ID}_utt{Utterance_ID}`; `turn` is the 0-based order in the dialogue.

    Example: `bemerc ingest meld ~/data/MELD --store store`
    """
    _write(store, "read_meld", "MELD", folder)


@ingest_app.command("iemocap")
def iemocap(
    folder: Annotated[str, typer.Argument(help="IEMOCAP_full_release folder (Session1..Session5), or a prefix on object storage.", show_default=False)],
    store: StoreOption = DEFAULT_STORE,
) -> None:
    """Ingest IEMOCAP with the standard 6 classes (happy, sad, neutral, angry, excited, frustrated).

    Session 5 is the test split; about 10% of Session 1-4 dialogues form dev. Utterances with other
    labels are left out and counted. Video comes from dialog/avi/DivX with the utterance's time span.
    """
    _write(store, "read_iemocap", "IEMOCAP", folder)


@ingest_app.command("manifest")
def manifest(
    file: Annotated[str, typer.Argument(help="CSV, JSONL or Parquet file, one row per utterance; a path or an object URI (s3://bucket/corpus/manifest.csv).", show_default=False)],
    labels: Annotated[str, typer.Option(help="Allowed labels: 'meld', 'iemocap' or a comma-separated list.")] = "meld",
    dataset: Annotated[str | None, typer.Option(help="Dataset name stored with each row (default: the file's name).")] = None,
    store: StoreOption = DEFAULT_STORE,
) -> None:
    """Ingest your own corpus from a manifest.

    Columns: `dialogue_id`, `turn` (required); `speaker`, `text`, `label`, `split` (train/dev/test,
    default train), `video`, `audio` (paths or object URIs; relative ones resolve against the manifest's
    folder), `start`, `end` (seconds inside the media; empty = whole file). uid is `{split}/{dialogue_id}_{turn}`.

    Media on object storage (s3://, gs://, az://) stay there: ingest checks and hashes them, the
    extractors (and the workers of `--engine ray`) download each one when they need it.

    Example: `bemerc ingest manifest my_corpus/manifest.csv --labels happy,sad,neutral`
    """
    _write(store, "read_manifest", "manifest", file, labels=labels, dataset=dataset)


@ingest_app.command("predictions")
def predictions(
    file: Annotated[str, typer.Argument(help="CSV, JSONL or Parquet file: `uid`, then `label` or one probability column per label (any order).", show_default=False)],
    name: Annotated[str, typer.Option(help="Name of the model that made them (letters, digits, '.', '_', '-'); the run id is external-NAME-....", show_default=False)],
    store: StoreOption = DEFAULT_STORE,
    run_dir: Annotated[Path | None, typer.Option(help="Folder of the run's config.json and metrics.json (default: runs/RUN_ID inside the store).")] = None,
) -> None:
    """Record predictions made elsewhere as a run of kind `external`, scored against the store's labels.

    Every uid must be in the store (one dataset), every label one of the dataset's, every row's
    probabilities sum to 1 (within 0.01), and every split predicted have labels; otherwise one line
    names the row and nothing is written. `bemerc compare` then scores the run beside bemerc's (with
    the paired test), `bemerc fuse external:latest baseline:latest` stacks it (probabilities only),
    and `/runs` and the browse page list it. The same file under the same name is recorded once.

    Example: `bemerc ingest predictions qwen7b-dev.csv --name qwen7b`
    """
    from bemerc.store import StoreError, StoreLockedError
    from bemerc.store.ingest import IngestError
    from bemerc.train.external import ingest_predictions

    try:
        result = ingest_predictions(open_store(store), file, name, run_dir=run_dir)
    except (IngestError, StoreError, StoreLockedError, ValueError) as e:
        fail(str(e))
    kind = "probabilities" if result.probabilities else "labels only (not fusable)"
    scores = ", ".join(f"{s} weighted F1 {m['weighted_f1']:.4f} (n={m['n']:,})" for s, m in result.metrics.items() if isinstance(m, dict) and "weighted_f1" in m)
    console.print(f"{result.run_id}: {result.rows:,} predictions, {kind}; {scores}"
                  f"{' (already stored)' if result.reused else ''}", highlight=False)


def register(app: typer.Typer) -> None:
    app.add_typer(ingest_app, name="ingest")
