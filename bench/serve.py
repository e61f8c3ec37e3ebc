"""Latency and throughput of the HTTP API: ``GET /similar`` and text-only ``POST /predict``, quiet
and while long audio is being transcribed.

Starts ``bemerc serve`` on 127.0.0.1 (a free port, at most one media request at a time), sends a
bounded number of requests per endpoint from ``--concurrency`` threads and prints p50/p95 latency,
throughput and errors. Then the mixed run: two clients keep posting ~55 s of speech without text
(Whisper transcribes it; one is served, the other gets the intended 503 + Retry-After and retries)
while the same requests are sent again; it prints each endpoint's p95 against the quiet run (the
target: within 2x) and the 503 count. Exits non-zero when any request failed other than those 503s.

Without ``--store`` it builds a small store first: MELD's first train and dev dialogues (from
../shared/data/meld), real MiniLM text features, real Whisper/eGeMAPS features of the RAVDESS clips
given to two utterances in three, and a text+audio baseline run.

    python bench/serve.py                                # builds its own store
    python bench/serve.py --store out/store --requests 400
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import httpx
import numpy as np

from bemerc.store import Store
from bemerc.store.runs import list_runs
from bemerc.train.runs import BASELINE

ROOT = Path(__file__).resolve().parents[1]
MELD_DIR = ROOT.parent / "shared" / "data" / "meld"
RAVDESS_DIR = ROOT.parent / "shared" / "data" / "ravdess"


def build_store(path: Path, train_dialogues: int = 40, dev_dialogues: int = 20) -> Store:
    """A small real store: MELD dialogues, MiniLM text features, audio features of the RAVDESS clips,
    one text+audio baseline run."""
    import pyarrow as pa

    from bemerc.extract.base import UtteranceMedia
    from bemerc.extract.factory import build_extractor
    from bemerc.extract.run import register, run_extractor
    from bemerc.store.ingest import read_meld, write_utterances
    from bemerc.store.schema import feature_schema
    from bemerc.train.baseline import BaselineConfig, train_baseline

    keep = {("train", str(d)) for d in range(train_dialogues)} | {("dev", str(d)) for d in range(dev_dialogues)}
    store = Store(path)
    write_utterances(store, [r for r in read_meld(MELD_DIR).rows if (r["split"], r["dialogue_id"]) in keep])
    print(run_extractor(store, build_extractor("text")).line(), flush=True)
    audio = build_extractor("audio")
    fs = register(store, audio)
    clips = [*sorted((RAVDESS_DIR / "audio").glob("*.wav")), *sorted((RAVDESS_DIR / "video").glob("*.mp4"))]
    features = audio.extract([UtteranceMedia(uid=str(i), text="-", audio_path=str(p)) for i, p in enumerate(clips)])
    uids = store.utterances()["uid"].to_list()
    rows = [{"uid": uid, **features[i % len(features)]} for i, uid in enumerate(uids) if i % 3]
    store.write_features(fs, pa.Table.from_pylist(rows, schema=feature_schema(audio.fields())))
    print(f"audio features of {len(clips)} RAVDESS clips given to {len(rows)} utterances", flush=True)
    result = train_baseline(store, feature_sets=["text", "audio"], run_dir=path / "runs" / "baseline",
                            config=BaselineConfig(max_rounds=100, bootstrap_resamples=100))
    print(f"baseline run {result.run_id} (text + audio) in {result.seconds:.0f} s", flush=True)
    return store


def long_speech(folder: Path, seconds: float = 55.0) -> Path:
    """~``seconds`` of real speech (a RAVDESS sentence looped), under the server's 60 s limit."""
    out = folder / "long_speech.wav"
    wav = sorted((RAVDESS_DIR / "audio").glob("*.wav"))[2]
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-stream_loop", "-1", "-i", str(wav), "-ac", "1", "-ar", "16000",
                    "-t", str(seconds), str(out)], check=True)
    return out


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(store: Path, port: int, timeout_s: float = 180.0) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "bemerc", "serve", "--store", str(store), "--host", "127.0.0.1", "--port", str(port),
           "--max-media-pending", "1"]
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
    parser.add_argument("--store", type=Path, help="an existing store with text features and a baseline run "
                                                    "(the mixed run needs one on text and audio)")
    parser.add_argument("--requests", type=int, default=200, help="requests per endpoint")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--turns", type=int, default=5, help="utterances per /predict dialogue")
    parser.add_argument("--time-budget", type=float, default=300.0, help="seconds per endpoint before giving up")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bemerc-bench-serve-") as tmp:
        store = Store(args.store, create=False) if args.store else build_store(Path(tmp) / "store")
        runs = [r for r in list_runs(store) if r.kind == BASELINE]
        if not runs:
            print(f"error: {store.path} has no baseline run (train one with `bemerc baseline`)", file=sys.stderr)
            return 1
        run_id = runs[-1].run_id
        audio_runs = [r.run_id for r in runs if any(f.startswith("audio/") for f in r.feature_sets)]
        speech = long_speech(Path(tmp))
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
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=300) as http:

                def similar(uid: str) -> str:
                    r = http.get("/similar", params={"uid": uid, "modality": "text", "k": 10})
                    return "" if r.status_code == 200 and len(r.json()) == 10 else f"/similar {uid}: {r.status_code} {r.text[:200]}"

                def predict(turns: list[dict]) -> str:
                    r = http.post("/predict", json={"utterances": turns, "run": run_id})
                    ok = r.status_code == 200 and len(r.json()["utterances"]) == len(turns)
                    return "" if ok else f"/predict: {r.status_code} {r.text[:200]}"

                def endpoints() -> dict[str, dict]:
                    return {
                        "GET /similar (k=10)": measure(similar, [rng.choice(uids) for _ in range(args.requests)],
                                                       args.concurrency, args.time_budget),
                        f"POST /predict (text, {args.turns} turns)": measure(
                            predict, [rng.choice(dialogues) for _ in range(args.requests)], args.concurrency, args.time_budget),
                    }

                t = time.perf_counter()
                warm = similar(uids[0]) or predict(dialogues[0])  # loads the extractor and the model
                print(f"warm-up (model loading) {time.perf_counter() - t:.1f} s {warm}", flush=True)
                quiet = endpoints()
                mixed, long_audio = {}, {}
                if audio_runs:
                    mixed, long_audio = mixed_run(http, audio_runs[-1], speech, endpoints)
                else:
                    print(f"no run on audio in {store.path}: the mixed run is skipped", flush=True)
        finally:
            server.terminate()
            server.wait(30)

    print(f"\nstore {args.store or '(built for the bench)'}: {n_utterances:,} utterances; "
          f"concurrency {args.concurrency}; server on 127.0.0.1:{port}")
    print(f"{'endpoint':<32} {'run':<6} {'requests':>8} {'errors':>6} {'p50 ms':>8} {'p95 ms':>8} {'req/s':>7} {'p95 vs quiet':>12}")
    for label, results in (("quiet", quiet), ("mixed", mixed)):
        for name, m in results.items():
            ratio = m["p95_ms"] / quiet[name]["p95_ms"]
            print(f"{name:<32} {label:<6} {m['requests']:>8} {m['errors']:>6} {m['p50_ms']:>8.1f} {m['p95_ms']:>8.1f} "
                  f"{m['throughput_rps']:>7.1f} {ratio:>11.2f}x")
    if long_audio:
        print(f"long audio ({long_audio['seconds_of_audio']:.0f} s of speech, no text: transcribed): "
              f"{long_audio['served']} served in {long_audio['mean_s']:.1f} s on average, "
              f"{long_audio['503']} answered 503 with Retry-After (intended: one media request at a time), "
              f"{len(long_audio['errors'])} other errors")
        worst = max(m["p95_ms"] / quiet[name]["p95_ms"] for name, m in mixed.items())
        print(f"mixed-run p95 / quiet p95: worst {worst:.2f}x (target: within 2x)")
    failures = [m["first_error"] for m in (*quiet.values(), *mixed.values()) if m["first_error"]] + long_audio.get("errors", [])
    total_errors = sum(m["errors"] for m in (*quiet.values(), *mixed.values())) + len(long_audio.get("errors", []))
    print(f"errors (503s of the long-audio clients excluded): {total_errors}")
    for problem in failures[:5]:
        print(f"  {problem}")
    return 1 if total_errors else 0


def mixed_run(http: httpx.Client, run_id: str, speech: Path, endpoints) -> tuple[dict, dict]:
    """The endpoints measured again while two clients keep posting ``speech`` (no text) to ``run_id``;
    returns (the endpoints' measurements, what the long-audio clients saw)."""
    stop = threading.Event()
    seen = {"served": 0, "503": 0, "errors": [], "seconds": [], "seconds_of_audio": 0.0}
    dialogue = json.dumps({"utterances": [{"speaker": "Actor"}], "run": run_id})
    payload = speech.read_bytes()

    def long_client() -> None:
        while not stop.is_set():
            t = time.perf_counter()
            try:
                r = http.post("/predict", data={"dialogue": dialogue}, files={"audio_0": (speech.name, payload, "audio/wav")})
            except httpx.HTTPError as exc:
                seen["errors"].append(f"long audio: {type(exc).__name__}: {exc}")
                continue
            if r.status_code == 200:
                seen["served"] += 1
                seen["seconds"].append(time.perf_counter() - t)
            elif r.status_code == 503 and r.headers.get("retry-after"):
                seen["503"] += 1
                stop.wait(1.0)  # sooner than Retry-After asks: the point is to keep the queue full
            else:
                seen["errors"].append(f"long audio: {r.status_code} {r.text[:200]}")

    clients = [threading.Thread(target=long_client, daemon=True) for _ in range(2)]
    for c in clients:
        c.start()
    time.sleep(1.0)  # the first long request is decoding by now
    measured = endpoints()
    stop.set()
    for c in clients:
        c.join(600)
    import soundfile

    seen["seconds_of_audio"] = soundfile.info(str(speech)).duration
    seen["mean_s"] = float(np.mean(seen["seconds"])) if seen["seconds"] else float("nan")
    return measured, seen


if __name__ == "__main__":
    sys.exit(main())
