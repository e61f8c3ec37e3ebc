"""Latency and throughput of the HTTP API: ``GET /similar`` and text-only ``POST /predict``.

Starts ``bemerc serve`` on 127.0.0.1 (a free port), sends a bounded number of requests per endpoint
from ``--concurrency`` threads, prints p50/p95 latency, throughput and the error count, stops the
server, and exits non-zero when any request failed.

Without ``--store`` it builds a small store first: MELD's first train and dev dialogues (from
../shared/data/meld), real MiniLM text features and a baseline run trained on them.

    python bench/serve.py                                # builds its own store
    python bench/serve.py --store out/store --requests 400
"""

from __future__ import annotations

import argparse
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import httpx
import numpy as np

from bemerc.store import Store
from bemerc.store.runs import list_runs

ROOT = Path(__file__).resolve().parents[1]
MELD_DIR = ROOT.parent / "shared" / "data" / "meld"


def build_store(path: Path, train_dialogues: int = 40, dev_dialogues: int = 20) -> Store:
    """A small real store: MELD dialogues, MiniLM text features, one baseline run."""
    from bemerc.extract.run import run_extractor
    from bemerc.extract.text import TextExtractor
    from bemerc.store.ingest import read_meld, write_utterances
    from bemerc.train.baseline import BaselineConfig, train_baseline

    keep = {("train", str(d)) for d in range(train_dialogues)} | {("dev", str(d)) for d in range(dev_dialogues)}
    store = Store(path)
    write_utterances(store, [r for r in read_meld(MELD_DIR).rows if (r["split"], r["dialogue_id"]) in keep])
    print(run_extractor(store, TextExtractor("offline")).line(), flush=True)
    result = train_baseline(store, config=BaselineConfig(max_rounds=100, bootstrap_resamples=100), run_dir=path / "runs" / "baseline")
    print(f"baseline run {result.run_id} in {result.seconds:.0f} s", flush=True)
    return store


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(store: Path, port: int, timeout_s: float = 180.0) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "bemerc", "serve", "--store", str(store), "--host", "127.0.0.1", "--port", str(port)]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"bemerc serve exited with {server.returncode}: {server.stderr.read().strip()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/info", timeout=2).status_code == 200:
                return server
        except httpx.TransportError:
            time.sleep(0.3)
    server.kill()
    raise RuntimeError(f"bemerc serve did not answer on port {port} within {timeout_s:.0f} s")


def measure(send, jobs: list, concurrency: int, deadline_s: float) -> dict:
    """Run ``send(job)`` for every job from ``concurrency`` threads; per-request latency in ms."""
    latencies: list[float] = []
    errors: list[str] = []
    stop_at = time.monotonic() + deadline_s

    def one(job) -> None:
        if time.monotonic() > stop_at:
            errors.append("not sent: time budget exhausted")
            return
        t = time.perf_counter()
        try:
            problem = send(job)
        except httpx.HTTPError as exc:
            problem = f"{type(exc).__name__}: {exc}"
        latencies.append((time.perf_counter() - t) * 1000)
        if problem:
            errors.append(problem)

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, jobs))
    wall = time.perf_counter() - started
    lat = np.array(latencies) if latencies else np.array([np.nan])
    return {"requests": len(jobs), "errors": len(errors), "first_error": errors[0] if errors else "",
            "p50_ms": float(np.percentile(lat, 50)), "p95_ms": float(np.percentile(lat, 95)),
            "throughput_rps": len(latencies) / wall}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", type=Path, help="an existing store with text features and a baseline run")
    parser.add_argument("--requests", type=int, default=200, help="requests per endpoint")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--turns", type=int, default=5, help="utterances per /predict dialogue")
    parser.add_argument("--time-budget", type=float, default=300.0, help="seconds per endpoint before giving up")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bemerc-bench-serve-") as tmp:
        store = Store(args.store) if args.store else build_store(Path(tmp) / "store")
        runs = [r for r in list_runs(store) if r["kind"] == "baseline"]
        if not runs:
            print(f"error: {store.path} has no baseline run (train one with `bemerc baseline`)", file=sys.stderr)
            return 1
        rng = random.Random(0)
        dev = store.utterances("dev")
        uids = dev["uid"].to_list()
        dialogues = [
            [{"speaker": r["speaker"], "text": r["text"]} for r in group.head(args.turns).iter_rows(named=True)]
            for _, group in dev.group_by("dialogue_id", maintain_order=True)
        ]
        n_utterances = store.count("utterances")
        port = free_port()
        server = start_server(store.path, port)
        try:
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as http:

                def similar(uid: str) -> str:
                    r = http.get("/similar", params={"uid": uid, "modality": "text", "k": 10})
                    return "" if r.status_code == 200 and len(r.json()) == 10 else f"/similar {uid}: {r.status_code} {r.text[:200]}"

                def predict(turns: list[dict]) -> str:
                    r = http.post("/predict", json={"utterances": turns, "run": runs[-1]["run_id"]})
                    ok = r.status_code == 200 and len(r.json()["utterances"]) == len(turns)
                    return "" if ok else f"/predict: {r.status_code} {r.text[:200]}"

                t = time.perf_counter()
                warm = similar(uids[0]) or predict(dialogues[0])  # loads the extractor and the model
                print(f"warm-up (model loading) {time.perf_counter() - t:.1f} s {warm}", flush=True)
                results = {
                    "GET /similar (k=10)": measure(similar, [rng.choice(uids) for _ in range(args.requests)],
                                                   args.concurrency, args.time_budget),
                    f"POST /predict (text, {args.turns} turns)": measure(predict, [rng.choice(dialogues) for _ in range(args.requests)],
                                                                        args.concurrency, args.time_budget),
                }
        finally:
            server.terminate()
            server.wait(30)

    print(f"\nstore {args.store or '(built for the bench)'}: {n_utterances:,} utterances; "
          f"concurrency {args.concurrency}; server on 127.0.0.1:{port}")
    print(f"{'endpoint':<32} {'requests':>8} {'errors':>6} {'p50 ms':>8} {'p95 ms':>8} {'req/s':>7}")
    for name, m in results.items():
        print(f"{name:<32} {m['requests']:>8} {m['errors']:>6} {m['p50_ms']:>8.1f} {m['p95_ms']:>8.1f} {m['throughput_rps']:>7.1f}")
    total_errors = sum(m["errors"] for m in results.values())
    print(f"errors: {total_errors}")
    for name, m in results.items():
        if m["first_error"]:
            print(f"  {name}: {m['first_error']}")
    return 1 if total_errors else 0


if __name__ == "__main__":
    sys.exit(main())
