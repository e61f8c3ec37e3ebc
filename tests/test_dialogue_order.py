"""One dialogue order: the store's utterances, the query filters and the training corpus agree on it,
for numeric dialogue ids (MELD), text ids and a mix of both."""

from __future__ import annotations

import pyarrow as pa

from bemerc.store import Store
from bemerc.store import query as Q
from bemerc.store import schema as S
from bemerc.train.tensors import load_corpus


def test_store_queries_and_corpus_share_one_dialogue_order(tmp_path):
    store = Store(tmp_path / "store")
    dialogues = {"10": 2, "2": 3, "b": 1, "a10": 2}  # dialogue id -> turns, in no particular order
    rows = [{"uid": f"dev/{d}_{t}", "dataset": "mix", "split": "dev", "dialogue_id": d, "turn": t,
             "speaker": "A", "text": "hi", "label": "joy"} for d, n in dialogues.items() for t in reversed(range(n))]
    store.upsert("utterances", pa.Table.from_pylist(rows, schema=S.UTTERANCES))

    ordered = store.utterances()
    assert list(zip(ordered["dialogue_id"], ordered["turn"])) == [
        ("2", 0), ("2", 1), ("2", 2), ("10", 0), ("10", 1), ("a10", 0), ("a10", 1), ("b", 0)]
    assert Q.where(store, "split = 'dev'")["uid"].to_list() == ordered["uid"].to_list()

    corpus = load_corpus(store, [])
    assert corpus.utterances["uid"].to_list() == ordered["uid"].to_list()
    assert corpus.dialogue_start.tolist() == [0, 0, 0, 3, 3, 5, 5, 7]


def test_run_classes_are_the_same_for_every_model_of_a_corpus():
    labels = ["sad", None, "happy", "sad", "calm"]  # all splits together
    assert S.run_classes("my_corpus", labels) == ["calm", "happy", "sad"]
    assert S.run_classes("meld", labels) == list(S.MELD_LABELS)  # a known corpus keeps its fixed order
