"""Which Whisper encoder layers carry emotion, and what the audio stage's choice costs (offline profile).

Prints, all measured in this one run on the shared RAVDESS subset (704 clips; actors 1-9 train,
10-12 dev, 8 emotions):
- per layer (0 = after the convolutions, k = after block k, the last after ln_post), and for the
  averages of a few middle layers: dev weighted F1 of a linear probe (standardised features, logistic
  regression, C chosen by cross-validation over the train actors) on mean+std pooled states, pooled
  over all frames and over voiced frames only;
- the same probe on the stage's stored ``vector`` (the layers the profile names) and on the old
  stage's (the last layer), each without and with the eGeMAPS functionals beside it;
- with --baseline-store (a RAVDESS store with an audio feature set, e.g. one built by `bemerc ingest
  manifest` + `bemerc extract --modality audio`): `bemerc baseline`'s dev weighted F1 (late fusion,
  default settings) with each candidate's cached vectors in place of the stored ones;
- loudness: how many clips the old whole-clip RMS rule and the stage's loudest-window rule call silent;
- extraction time per clip of the old stage (last layer) and the stage as configured, on the same
  clips, interleaved (ratio; target <= 1.3).

Pooled states of every layer are cached in --cache (one pass of Whisper over the 704 clips, ~5-10 min on
two loaded cores); a second run reads them and only times the stage.

Usage: HF_HUB_OFFLINE=1 python bench/audio_layers.py [--threads N] [--cache DIR] [--time-clips N]
       [--baseline-store STORE]
"""

from __future__ import annotations

import argparse
import csv
import os
import time
from pathlib import Path

import bemerc  # noqa: F401  (first: it sets the OpenMP wait policy before torch loads)
import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from bemerc.extract.audio import AudioExtractor, loudness_dbfs, voiced_frames
from bemerc.extract.base import UtteranceMedia
from bemerc.extract.media import SAMPLE_RATE, decode_audio

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "ravdess"
LABELS = ["neutral", "calm", "happy", "sad", "angry", "fearful", "disgust", "surprised"]
SETS = {"avg 3-4": (3, 4), "avg 3-5": (3, 4, 5), "avg 2-5": (2, 3, 4, 5)}  # averaged frame by frame
C_GRID = (0.01, 0.1, 1.0)


def manifest() -> list[dict]:
    with open(DATA / "speech_manifest.csv", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def pool(states: torch.Tensor, mask: np.ndarray | None = None) -> np.ndarray:
    if mask is not None and mask.any():
        states = states[torch.from_numpy(mask)]
    return torch.cat([states.mean(0), states.std(0, unbiased=False)]).float().numpy()


def build_cache(rows: list[dict], extractor: AudioExtractor, path: Path) -> dict[str, np.ndarray]:
    n_layer = extractor.model.dims.n_audio_layer
    layers = list(range(n_layer + 1))
    out: dict[str, list] = {"loud": [], "rms": [], "egemaps": []}
    start = time.perf_counter()
    for k, row in enumerate(rows):
        audio = decode_audio(DATA / row["audio"])
        per_layer = extractor.encode_layers(audio, layers)
        mask = voiced_frames(audio, per_layer[0].shape[0])
        for i, states in zip(layers, per_layer):
            out.setdefault(f"L{i}", []).append(pool(states))
            out.setdefault(f"L{i}v", []).append(pool(states, mask))
        for name, members in SETS.items():
            avg = sum(per_layer[i] for i in members) / len(members)
            out.setdefault(name, []).append(pool(avg))
            out.setdefault(name + "v", []).append(pool(avg, mask))
        out["loud"].append(loudness_dbfs(audio))
        out["rms"].append(20 * np.log10(max(float(np.sqrt(np.mean(audio.astype(np.float64) ** 2))), 1e-10)))
        out["egemaps"].append(extractor.smile.process_signal(audio, SAMPLE_RATE).to_numpy()[0])
        if k % 100 == 99:
            print(f"  cached {k + 1}/{len(rows)} clips in {time.perf_counter() - start:.0f} s", flush=True)
    arrays = {k: np.asarray(v, dtype=np.float32) for k, v in out.items()}
    np.savez(path, **arrays)
    return arrays


def probe(x: np.ndarray, y: np.ndarray, groups: np.ndarray, train: np.ndarray, dev: np.ndarray) -> tuple[float, float]:
    """Dev weighted F1 of a standardised logistic regression, C chosen by leave-3-actors-out CV on train."""
    with threadpool_limits(1):  # one BLAS thread: on a loaded machine more make each small fit minutes long
        return _probe(x, y, groups, train, dev)


def _probe(x, y, groups, train, dev) -> tuple[float, float]:
    def fit(c, fit_idx):
        return make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000)).fit(x[fit_idx], y[fit_idx])

    actors = np.unique(groups[train])
    folds = np.array_split(actors, 3)
    scores = {}
    for c in C_GRID:
        f = []
        for held in folds:
            inner_dev = train & np.isin(groups, held)
            inner_train = train & ~np.isin(groups, held)
            f.append(f1_score(y[inner_dev], fit(c, inner_train).predict(x[inner_dev]), average="weighted"))
        scores[c] = float(np.mean(f))
    best = max(scores, key=scores.get)
    return float(f1_score(y[dev], fit(best, train).predict(x[dev]), average="weighted")), best


def baseline_f1(store: Path, rows: list[dict], cache: dict[str, np.ndarray], keys: list[str]) -> dict[str, float]:
    """`bemerc baseline`'s dev weighted F1 (late fusion) on ``store`` with each key's cached vectors as audio."""
    from bemerc.store import Store
    from bemerc.train.baseline import fit_baseline
    from bemerc.train.tensors import load_corpus

    corpus = load_corpus(Store(str(store)), ["audio"])
    position = {r["dialogue_id"]: i for i, r in enumerate(rows)}
    order = np.array([position[uid.split("/")[-1].rsplit("_", 1)[0]] for uid in corpus.utterances["uid"].to_list()])
    audio = corpus.modalities["audio"]
    audio.present[:] = True  # every clip has audio here (none is silent under the stage's rule)
    out = {}
    for key in keys:
        audio.vectors[:] = cache[key][order]
        out[key] = fit_baseline(corpus).metrics["models"]["late_fusion"]["dev"]["weighted_f1"]
    return out


def time_stage(rows: list[dict], old: AudioExtractor, new: AudioExtractor, n: int) -> tuple[float, float]:
    """Seconds per clip of ``old`` and ``new`` extracting the same ``n`` clips, interleaved in rounds."""
    items = [UtteranceMedia(uid=r["dialogue_id"], text="given", audio_path=str(DATA / r["audio"]))
             for r in rows[:: max(1, len(rows) // n)][:n]]
    old.extract(items[:1]), new.extract(items[:1])  # warm-up
    best = {"old": [], "new": []}
    for _ in range(2):
        for name, ex in (("old", old), ("new", new)):
            start = time.perf_counter()
            ex.extract(items)
            best[name].append((time.perf_counter() - start) / len(items))
    return min(best["old"]), min(best["new"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache", type=Path, default=Path("/tmp/bemerc-audio-layers"))
    parser.add_argument("--baseline-store", type=Path, help="a RAVDESS store: also score bemerc's baseline per candidate")
    parser.add_argument("--time-clips", type=int, default=40, help="clips timed per stage (0: no timing)")
    args = parser.parse_args()
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    torch.set_num_threads(args.threads)
    rows = manifest()
    y = np.array([LABELS.index(r["label"]) for r in rows])
    groups = np.array([r["speaker"] for r in rows])
    train = np.array([r["split"] == "train" for r in rows])
    dev = np.array([r["split"] == "dev" for r in rows])

    new = AudioExtractor("offline", num_threads=args.threads)  # the stage as the profile configures it
    old = AudioExtractor("offline", layers=[-1], frames="all", num_threads=args.threads)  # as before
    n_layer = new.model.dims.n_audio_layer
    chosen = new.layer_indices(n_layer)
    args.cache.mkdir(parents=True, exist_ok=True)
    path = args.cache / f"ravdess-{new.name}-pooled.npz"
    if path.exists():
        cache = dict(np.load(path))
        print(f"per-layer pooled states read from {path}")
    else:
        print(f"encoding {len(rows)} clips at every layer (cached in {path}) ...", flush=True)
        cache = build_cache(rows, new, path)

    print(f"\nlinear probe, dev weighted F1 (actors 10-12, {dev.sum()} clips; train actors 1-9, {train.sum()} clips)")
    print(f"{'features':<14} {'all frames':>10} {'voiced':>8}  (C chosen on train)")
    for key in [*(f"L{i}" for i in range(n_layer + 1)), *SETS]:
        f_all, c_all = probe(cache[key], y, groups, train, dev)
        f_voiced, _ = probe(cache[key + "v"], y, groups, train, dev)
        name = f"layer {key[1:]}" if key.startswith("L") else key
        print(f"{name:<14} {f_all:10.3f} {f_voiced:8.3f}  (C={c_all:g})", flush=True)

    stored_key = f"L{chosen[0]}" if len(chosen) == 1 else next(k for k, v in SETS.items() if list(v) == chosen)
    stored_key += "v" if new.frames == "voiced" else ""
    timed = [UtteranceMedia(uid=r["dialogue_id"], text="given", audio_path=str(DATA / r["audio"])) for r in rows[:3]]
    stored = np.stack([r["vector"] for r in new.extract(timed)])
    assert np.allclose(stored, cache[stored_key][:3], atol=1e-4), "the cache does not hold the stage's vector"
    egemaps = cache["egemaps"]
    print(f"\nstored vector: the stage keeps layers {list(new.layers)} ({stored_key}); old stage: the last layer")
    for label, key in (("old (last)", f"L{n_layer}"), ("new (stored)", stored_key)):
        alone, _ = probe(cache[key], y, groups, train, dev)
        both, _ = probe(np.hstack([cache[key], egemaps]), y, groups, train, dev)
        print(f"{label:<14} vector {alone:.3f}   vector+eGeMAPS {both:.3f}   (+{both - alone:.3f})")
    only, _ = probe(egemaps, y, groups, train, dev)
    print(f"{'eGeMAPS only':<14} {only:.3f}")

    if args.baseline_store:
        keys = [f"L{i}" for i in range(2, n_layer + 1)] + list(SETS)
        keys += [k + "v" for k in keys]
        scores = baseline_f1(args.baseline_store, rows, cache, keys)
        print(f"\nbemerc baseline (late fusion), dev weighted F1, on {args.baseline_store}")
        for key in keys[: len(keys) // 2]:
            name = f"layer {key[1:]}" if key.startswith("L") else key
            print(f"{name:<14} {scores[key]:10.3f} {scores[key + 'v']:8.3f}", flush=True)

    loud, rms = cache["loud"], cache["rms"]
    print(f"\nsilence: old rule (whole-clip RMS < -60 dBFS) fails {int((rms < -60).sum())} of {len(rows)} clips; "
          f"the stage's rule ({new.config()['silence']} < {new.silence_dbfs:.0f} dBFS) fails "
          f"{int((loud < new.silence_dbfs).sum())}; quietest clip's loudest window {loud.min():.1f} dBFS, "
          f"whole-clip RMS {rms.min():.1f} dBFS")

    if not args.time_clips:
        return
    old_s, new_s = time_stage(rows, old, new, args.time_clips)
    print(f"\nextraction time per clip ({args.time_clips} clips, best of 2, no transcription): "
          f"old {old_s * 1000:.0f} ms, new {new_s * 1000:.0f} ms, ratio {new_s / old_s:.2f} (target <= 1.3)")


if __name__ == "__main__":
    main()
