"""The walk a maintainer takes through `bemerc tune`: which of bemerc's files the store path enters,
how often, and how many times the utterances table is read.

Target (issue 32): **calls in <= 5 per file**, and the utterances table read once. A file's *calls in*
is the number of its functions that the walk first reads from another file: the surface a reader
must learn of that file to follow the run. The bench prints ``target: calls in <= 5 per file`` with
pass or fail (and exits 1 on fail).

Builds the demo store (``bemerc demo`` + ``bemerc ingest manifest``; no extraction: behaviour tokens
with descriptions and audio vectors are stand-ins computed from each line's text, as in
tests/test_tune.py, so every part of the data path runs: soft tokens, speaker normalisation, the three
stages), a 2-block random-weight Llama with SmolLM2's tokenizer (``train.tune.model.write_tiny_llm``), and runs
``bemerc tune`` under ``sys.setprofile``.

The count is a reader's walk, not the CPU's: the reader follows the calls in the order they run and
reads each function once (its first call; a later call of a function already read is not followed).
The caller is the nearest bemerc frame (a call through a library, such as torch calling a module's
``forward``, comes from the bemerc frame below it); module bodies (imports) are left out.
``--edges`` lists the distinct call edges between files (caller function -> callee function),
``--path`` the walk itself. Reads of the utterances table are counted at ``Store.read_arrow`` and
``Store.count``.

*Entries* are also printed: every step of the walk from another file, the calls in and the returns
to the caller's file to read on from there. They are not the target: a function that reads top to
bottom and asks k other files for k things (``tune()`` asks for the data, the model, the prompter,
each stage's examples, the scores and the record) is re-entered after each answer, so an
orchestrator's entries grow with the steps it names, however well each step is packed. Entries
measure how often the reader comes back, which a plain top-to-bottom function is meant to make them
do; calls in measure how much of each file they must learn, which is what the redesign bounds.

    HF_HUB_OFFLINE=1 python bench/tune_walk.py            # prints the table; --json for machine output
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("bemerc", "extract", "store", "train", "serve")
K, D = 4, 6
CALLS_IN_TARGET = 5  # the most functions of one file the walk may first read from another file


def _ours(filename: str) -> str | None:
    """The repository path of a bemerc source file, else None."""
    try:
        rel = Path(filename).resolve().relative_to(ROOT)
    except ValueError:
        return None
    return str(rel) if rel.parts and rel.parts[0] in PACKAGES else None


def _measures(text: str) -> np.ndarray:
    words = text.split() or [""]
    rows = []
    for q in np.array_split(np.array(words, dtype=object), K):
        part = " ".join(q)
        letters = [c for c in part if c.isalpha()] or ["a"]
        rows.append([len(part), len(q), part.count("!"), part.count("?"), sum(c.isupper() for c in letters) / len(letters),
                     sum(c in "aeiou" for c in letters) / len(letters)])
    return np.asarray(rows, dtype=np.float32)


def demo_store(folder: Path):
    from typer.testing import CliRunner

    from bemerc.cli import app
    from bemerc.demo import make_demo
    from bemerc.store import Store

    manifest = make_demo(folder / "demo")
    result = CliRunner().invoke(app, ["ingest", "manifest", str(manifest), "--store", str(folder / "store"), "--dataset", "demo"])
    assert result.exit_code == 0, result.output
    store = Store(folder / "store")
    rows = store.read("utterances", ["uid", "speaker", "text"]).to_dicts()
    behavior = store.register_feature_set("behavior", "text-stand-in", "t0001", {"tokens_k": K, "tokens_d": D}, [
        pa.field("vector", pa.list_(pa.float32(), 2 * D)), pa.field("tokens", pa.list_(pa.float32(), K * D)),
        pa.field("description", pa.string())])
    measures = [_measures(r["text"] or "") for r in rows]
    store.write_features(behavior, pa.table({
        "uid": [r["uid"] for r in rows],
        "vector": [np.concatenate([m.mean(0), m.std(0)]).tolist() for m in measures],
        "tokens": [m.reshape(-1).tolist() for m in measures],
        "description": [f"{r['speaker']} says {len((r['text'] or '').split())} words" for r in rows]},
        schema=store.table(behavior.table_name).schema))
    audio = store.register_feature_set("audio", "text-stand-in", "a0001", {}, [pa.field("vector", pa.list_(pa.float32(), 8))])
    store.write_features(audio, pa.table({"uid": [r["uid"] for r in rows[::2]],
                                          "vector": [np.resize(m.reshape(-1), 8).tolist() for m in measures[::2]]},
                                         schema=store.table(audio.table_name).schema))
    return store


def walk(argv: list[str]) -> tuple[Counter, Counter, int, int, list, list]:
    """(entries per file, calls into each file (the entries that are calls, not returns), reads of the utterances table, exit code, the edges, the walk: each step's
    file:function) of ``bemerc ARGV``."""
    from typer.testing import CliRunner

    import bemerc.cli  # noqa: F401  (loaded before the profile starts)
    from bemerc.cli import app
    from bemerc.store import db

    reads = Counter()
    read_arrow, count = db.Store.read_arrow, db.Store.count

    def counted_read(self, name, *args, **kwargs):
        reads[name] += 1
        return read_arrow(self, name, *args, **kwargs)

    def counted_count(self, name, *args, **kwargs):
        reads[name] += 1
        return count(self, name, *args, **kwargs)

    edges: set[tuple[str, str, str, str]] = set()
    entries: Counter = Counter()
    called: Counter = Counter()  # the callee steps alone: functions first read from another file
    files: dict[object, str | None] = {}
    read: set = set()
    path: list[str] = []
    location = [None]
    wrappers = (counted_read.__code__, counted_count.__code__)

    def where(code) -> str | None:
        if code not in files:
            files[code] = None if code in wrappers else _ours(code.co_filename)
        return files[code]

    def profile(frame, event, arg):
        if event != "call":
            return
        code = frame.f_code
        callee = where(code)
        if callee is None or code.co_name == "<module>":
            return
        caller = frame.f_back
        while caller is not None and where(caller.f_code) is None:
            caller = caller.f_back
        if caller is None:
            return
        source = where(caller.f_code)
        if source != callee:
            edges.add((source, caller.f_code.co_name, callee, code.co_name))
        if code in read:  # read already: the reader does not go there again
            return
        read.add(code)
        if source != callee:
            called[callee] += 1
        for step, function in ((source, caller.f_code.co_name), (callee, code.co_name)):  # back to the caller's file, then the callee's
            if step != location[0]:
                entries[step] += 1
                location[0] = step
                path.append(f"{step}:{function}")

    db.Store.read_arrow, db.Store.count = counted_read, counted_count
    sys.setprofile(profile)
    try:
        result = CliRunner().invoke(app, argv)
    finally:
        sys.setprofile(None)
        db.Store.read_arrow, db.Store.count = read_arrow, count
    if result.exit_code:
        print(result.output, file=sys.stderr)
    return entries, called, reads["utterances"], result.exit_code, sorted(edges), path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print the counts as JSON")
    parser.add_argument("--layout", default="dialogue", choices=["dialogue", "utterance"])
    parser.add_argument("--edges", action="store_true", help="also list the call edges between files (caller file:function -> callee file:function)")
    parser.add_argument("--path", action="store_true", help="also print the walk, one step (file:function entered) a line")
    args = parser.parse_args()
    from bemerc.train.tune.model import write_tiny_llm

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        store = demo_store(tmp)
        model = write_tiny_llm(tmp / "llm")
        argv = ["tune", "--store", str(store.path), "--model", str(model), "--run-dir", str(tmp / "run"), "--layout", args.layout,
                "--modalities", "audio,behavior", "--epochs", "1", "--align-epochs", "1", "--project-epochs", "1",
                "--batch-size", "4", "--json"]
        entries, called, utterance_reads, code, edges, path = walk(argv)
    if code:
        sys.exit(code)
    most = max(called.values(), default=0)
    passed = most <= CALLS_IN_TARGET and utterance_reads == 1
    if args.json:
        print(json.dumps({"entries": dict(entries.most_common()), "calls_in": dict(called.most_common()), "utterances_reads": utterance_reads,
                          "target": {"calls_in_max": CALLS_IN_TARGET, "utterances_reads": 1, "passed": passed},
                          **({"edges": edges} if args.edges else {}), **({"path": path} if args.path else {})}, indent=2))
        sys.exit(0 if passed else 1)
    print(f"bemerc tune ({args.layout} layout, demo store, tiny LLM): entries into each file (the walk's steps from "
          "another file: calls and returns), and of those the calls in (functions first read from another file)")
    print("  entries  calls in  file")
    for name, n in entries.most_common():
        print(f"  {n:7d}  {called[name]:8d}  {name}")
    if args.path:
        print("\n".join(f"  {step}" for step in path))
    if args.edges:
        for source, caller, callee, function in sorted(edges, key=lambda e: (e[2], e[3], e[0], e[1])):
            print(f"  {callee}:{function}  <-  {source}:{caller}")
    print(f"most entered: {entries.most_common(1)[0][1] if entries else 0} entries, {most} calls in; "
          f"utterances table read {utterance_reads} time(s)")
    over = [name for name, n in called.items() if n > CALLS_IN_TARGET]
    print(f"target: calls in <= {CALLS_IN_TARGET} per file, utterances table read once: {'pass' if passed else 'FAIL'}"
          + (f" ({', '.join(over)} over)" if over else ""))
    sys.exit(0 if passed else 1)


if __name__ == "__main__":
    main()
