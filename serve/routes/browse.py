"""Browsing the store: what it holds, one utterance, similar utterances, dialogues, and the page.

Store reads take only ids (quoted as SQL string literals); nothing a client sends names a file.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.responses import FileResponse

from bemerc.serve.routes import StoreDep
from bemerc.store import query as Q
from bemerc.store.schema import MODALITIES, sql_quote

PAGE_DIR = Path(__file__).parent.parent / "page"
SPLIT_PATTERN = r"^[A-Za-z0-9_-]{1,40}$"

Modality = Enum("Modality", {m: m for m in MODALITIES}, type=str)

router = APIRouter()


@router.get("/info", summary="What the store holds")
def info(store: StoreDep) -> dict:
    """Splits, modalities with features, feature sets and table row counts."""
    data = store.info()
    splits = store.read("utterances", ["split"])["split"].unique().to_list()
    order = {s: i for i, s in enumerate(("train", "dev", "test"))}
    return {
        "store": data["path"],
        "splits": sorted(splits, key=lambda s: (order.get(s, 9), s)),
        "modalities": sorted({fs.modality for fs in store.feature_sets()}),
        "features": data["features"],
        "tables": data["tables"],
    }


@router.get("/utterances/{uid:path}", summary="One utterance in full")
def utterance(uid: str, store: StoreDep) -> dict:
    """The utterance with its dialogue context, transcript, behaviour description, feature sets,
    failures and every run's prediction. ``uid`` contains slashes: ``/utterances/dev/dia0_utt0``."""
    return Q.show(store, uid).to_dict()


@router.get("/similar", summary="Nearest utterances")
def similar(
    uid: Annotated[str, Query(max_length=300, description="Utterance id, e.g. dev/dia0_utt0")],
    store: StoreDep,
    modality: Modality = Modality.text,
    k: Annotated[int, Query(ge=1, le=100)] = 10,
    split: Annotated[str | None, Query(pattern=SPLIT_PATTERN, description="Only neighbours from this split")] = None,
) -> list[dict]:
    """The ``k`` utterances nearest to ``uid`` by cosine distance of the newest ``modality`` features."""
    where = f"split = {sql_quote(split)}" if split else None
    return Q.to_records(Q.similar(store, uid, modality.value, k=k, where=where))


@router.get("/dialogues", summary="Dialogues of a split")
def dialogues(store: StoreDep, split: Annotated[str | None, Query(pattern=SPLIT_PATTERN)] = None) -> list[dict]:
    """One row per dialogue: dataset, split, dialogue_id, utterance count, speakers, first line."""
    return Q.to_records(Q.dialogues(store, split))


@router.get("/dialogues/{split}/{dialogue_id:path}", summary="One dialogue with predictions")
def dialogue(split: str, dialogue_id: str, store: StoreDep, dataset: Annotated[str | None, Query(max_length=100)] = None) -> dict:
    """The dialogue's utterances in order with gold labels, behaviour descriptions and every run's
    prediction (``probabilities`` as ``{class: p}``). ``dataset`` is needed only when several
    datasets of the store have this split and dialogue id. ``dialogue_id`` may hold slashes
    (``/dialogues/dev/a%2Fb``, or unescaped)."""
    df = Q.dialogue(store, split, dialogue_id, dataset)
    rows = Q.to_records(df.drop("predictions"))
    for row, preds in zip(rows, df["predictions"].to_list()):
        row["predictions"] = Q.prediction_records(preds)
    return {"split": split, "dialogue_id": dialogue_id, "utterances": rows}


@router.get("/", include_in_schema=False)
def page() -> FileResponse:
    return FileResponse(PAGE_DIR / "index.html")
