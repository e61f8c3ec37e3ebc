"""`bemerc query`: nearest neighbours, one utterance in full, SQL filters and exports of the store."""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from bemerc.cli.common import DEFAULT_STORE, JsonOption, StoreOption, choices, console, fail, open_store
from bemerc.store.schema import MODALITIES

if TYPE_CHECKING:
    import polars as pl

    from bemerc.store import Store

# Each command imports bemerc.store.query (and with it LanceDB) when it runs, not when listed.

query_app = typer.Typer(help="Query stored utterances, embeddings and predictions.", no_args_is_help=True)


Modality = choices("Modality", MODALITIES)


class Format(str, Enum):
    parquet = "parquet"
    csv = "csv"


def _open(path: Path) -> Store:
    return open_store(path)


def _print_frame(df: pl.DataFrame, title: str | None = None, wide: tuple[str, ...] = ("text",)) -> None:
    table = Table(title=title, show_lines=False)
    for col in df.columns:
        table.add_column(col, overflow="fold", no_wrap=col == "uid", ratio=3 if col in wide else None)
    for row in df.iter_rows():
        table.add_row(*("" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v) for v in row))
    console.print(table)


def _print_json(data: object) -> None:
    print(json.dumps(data, indent=2, ensure_ascii=False))


@query_app.command("similar")
def similar(
    uid: Annotated[str, typer.Argument(help="Utterance id, e.g. dev/dia0_utt0.")],
    modality: Annotated[Modality, typer.Option("--modality", "-m", help="Whose embedding to compare.")] = Modality.text,
    k: Annotated[int, typer.Option("-k", min=1, help="How many neighbours.")] = 10,
    where: Annotated[str | None, typer.Option("--where", help="SQL filter on utterance columns, e.g. \"split = 'train'\".")] = None,
    store: StoreOption = DEFAULT_STORE,
    as_json: JsonOption = False,
) -> None:
    """The K utterances nearest to UID by cosine distance of the newest MODALITY features.

    Example: `bemerc query similar dev/dia0_utt0 -m text -k 5 --where "split = 'train'"`
    """
    from bemerc.store import StoreError
    from bemerc.store import query as Q

    try:
        df = Q.similar(_open(store), uid, modality.value, k=k, where=where)
    except (Q.QueryError, StoreError) as exc:
        fail(str(exc))
    if as_json:
        _print_json(Q.to_records(df))
    else:
        _print_frame(df, title=f"nearest to {uid} ({modality.value})")


@query_app.command("show")
def show(
    uid: Annotated[str, typer.Argument(help="Utterance id, e.g. dev/dia0_utt0.")],
    context: Annotated[int | None, typer.Option("--context", "-c", min=0, show_default=False,
                                                help="How many earlier turns of the dialogue to list (default: bemerc.store.query.SHOW_CONTEXT, 10).")] = None,
    store: StoreOption = DEFAULT_STORE,
    as_json: JsonOption = False,
) -> None:
    """One utterance: the turns before it in its dialogue (--context of them), transcript,
    behaviour description, feature sets, failures and every run's prediction."""
    from bemerc.store import StoreError
    from bemerc.store import query as Q

    try:
        view = Q.show(_open(store), uid, context=Q.SHOW_CONTEXT if context is None else context)
    except (Q.QueryError, StoreError) as exc:
        fail(str(exc))
    if as_json:
        _print_json(view.to_dict())
        return
    u = view.utterance
    if view.context.height:
        hidden = view.earlier_turns - view.context.height
        title = f"context (the {view.context.height} turns before; {hidden:,} earlier not shown: --context)" if hidden else "context"
        _print_frame(view.context.select("turn", "speaker", "text", "label"), title=title)
    console.print(f"[bold]{u['uid']}[/]  turn {u['turn']} of dialogue {u['dialogue_id']} ({u['dataset']} {u['split']})")
    console.print(f"[bold]{u['speaker']}:[/] {u['text']}", highlight=False)
    console.print(f"label: [bold]{u['label']}[/]  sentiment: {u['sentiment']}")
    for name, value in (("transcript", view.transcript), ("behaviour", view.description)):
        if value:
            console.print(f"{name}: {value}", highlight=False)
    console.print("feature sets: " + (", ".join(view.feature_sets) or "none"))
    for f in view.failures.iter_rows(named=True):
        console.print(f"[red]failed[/] {f['feature_set']}: {f['reason']}", highlight=False)
    if view.predictions.height:
        rows = [
            {"run": p["run_id"], "kind": p["kind"], "predicted": p["label"],
             "p": max(p["probabilities"].values()) if p["probabilities"] else None,
             "correct": p["correct"]}
            for p in Q.prediction_records(view.predictions)
        ]
        import polars as pl

        _print_frame(pl.DataFrame(rows), title="predictions")
    else:
        console.print("predictions: none (train a run with `bemerc baseline`)")


@query_app.command("where")
def where(
    sql: Annotated[str, typer.Argument(help="SQL filter on utterance columns, e.g. \"label = 'fear' AND split = 'dev'\".")],
    limit: Annotated[int | None, typer.Option("--limit", "-n", min=0, help="At most this many rows (default: all).")] = None,
    store: StoreOption = DEFAULT_STORE,
    as_json: JsonOption = False,
) -> None:
    """Utterances matching an SQL filter, in dialogue order.

    Columns: uid, dataset, split, dialogue_id, turn, speaker, text, label, sentiment, start_s, end_s,
    video_path, audio_path, media_sha256, meta_json.
    """
    from bemerc.store import StoreError
    from bemerc.store import query as Q

    try:
        df = Q.where(_open(store), sql, limit=limit)
    except (Q.QueryError, StoreError) as exc:
        fail(str(exc))
    if as_json:
        _print_json(Q.to_records(df))
    else:
        _print_frame(df.select("uid", "speaker", "text", "label"), title=f"{df.height} utterance(s)")


@query_app.command("export")
def export(
    table: Annotated[str, typer.Argument(help="Table name (utterances, runs, ...) or a feature set (text, text/minilm-l6).")],
    out: Annotated[Path, typer.Argument(help="Output file.")],
    fmt: Annotated[Format | None, typer.Option("--format", "-f", show_default=False,
                                               help="File format (default: from the name: .csv, .parquet or .pq; a name "
                                               "that says another format is refused); csv writes list columns as JSON arrays.")] = None,
    store: StoreOption = DEFAULT_STORE,
) -> None:
    """Write a whole table to a parquet or csv file.

    Example: `bemerc query export utterances utt.csv`
    """
    from bemerc.store import StoreError
    from bemerc.store import query as Q

    try:
        rows = Q.export(_open(store), table, out, fmt.value if fmt else None)
    except (Q.QueryError, StoreError) as exc:
        fail(str(exc))
    console.print(f"wrote {rows:,} rows to {out}")


@query_app.command("index")
def index(
    modality: Annotated[Modality, typer.Option("--modality", "-m", help="Whose feature table to index.")] = Modality.text,
    min_rows: Annotated[int | None, typer.Option("--min-rows", show_default=False, help="Index only tables with at least this many rows (default: bemerc.store.query.INDEX_MIN_ROWS).")] = None,
    replace: Annotated[bool, typer.Option("--replace", help="Rebuild an existing index.")] = False,
    store: StoreOption = DEFAULT_STORE,
) -> None:
    """Build an IVF_PQ (approximate) vector index for `query similar` on a large feature table."""
    from bemerc.store import StoreError
    from bemerc.store import query as Q

    try:
        given = {"min_rows": min_rows} if min_rows is not None else {}  # the default is create_vector_index's
        built = Q.create_vector_index(_open(store), modality.value, replace=replace, **given)
    except (Q.QueryError, StoreError) as exc:
        fail(str(exc))
    console.print("index built" if built else f"no index built (fewer than {given.get('min_rows', Q.INDEX_MIN_ROWS):,} rows, or one exists: --replace)")


def register(app: typer.Typer) -> None:
    app.add_typer(query_app, name="query")
