"""Scaling out, measured in this one run: local engine against Ray, and a store on S3 against a folder.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/scale.py [--modality behavior] [--meld-limit 2000]

1. On the embedded demo corpus (51 clips), `--modality` extracted by the local engine, then by the Ray
   engine with 1 and 2 workers (each into a fresh store): utterances/s and the ratio to local. Ray's
   start-up (`ray.init` of a local cluster) is timed apart; each Ray figure includes its actors'
   start and model load, as a real run does.
2. MELD (train + dev CSVs from ../shared/data): ingest, then text features for the first
   `--meld-limit` utterances (one text model, loaded before timing), into a local folder and into a
   local S3 server (moto on 127.0.0.1): seconds and the S3/local ratio.
3. Media on object storage: the demo's clips and manifest uploaded to the S3 server; ingest of the
   manifest (checks and checksums: local files against objects) and `--modality` extraction with the
   local engine reading media from the folder against downloading each object: seconds and ratios.

`--parts engines,meld,media` picks the parts (all by default).

On one machine Ray cannot beat the local engine (which already keeps both cores busy); the figures
say what Ray's overhead costs per worker, and with it what a cluster of N such workers gives.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import bemerc  # noqa: E402,F401  (first: it sets the OpenMP wait policy before torch loads)
from s3_server import local_s3  # noqa: E402

from bemerc.demo import make_demo  # noqa: E402
from bemerc.extract.base import UtteranceMedia  # noqa: E402
from bemerc.extract.factory import build_extractor  # noqa: E402
from bemerc.extract.ray_engine import ExtractorRecipe, RayEngine  # noqa: E402
from bemerc.extract.run import run_extractor  # noqa: E402
from bemerc.store import Store  # noqa: E402
from bemerc.store.ingest import read_manifest, read_meld, write_utterances  # noqa: E402

MELD_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "meld"


def engines(modality: str, manifest: Path, root: Path) -> None:
    import ray

    rows = read_manifest(manifest, dataset="demo").rows
    results = {}
    for name, workers in (("local", 0), ("ray", 1), ("ray", 2)):
        store = Store(root / f"{name}-{workers}")
        write_utterances(store, rows)
        if name == "ray" and not ray.is_initialized():
            start = time.perf_counter()
            ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
            print(f"ray start-up (local cluster, {os.cpu_count()} CPUs): {time.perf_counter() - start:.1f} s")
        engine = RayEngine(ExtractorRecipe(modality), workers=workers) if workers else None
        start = time.perf_counter()
        summary = run_extractor(store, build_extractor(modality), engine=engine)
        seconds = time.perf_counter() - start
        label = "local" if not workers else f"ray, {workers} worker{'s' if workers > 1 else ''}"
        results[label] = summary.done / seconds
        print(f"{modality} {label:15} {summary.done} utterances in {seconds:6.1f} s: {results[label]:5.2f}/s, "
              f"{results[label] / results['local']:.2f}x local")
    ray.shutdown()


def meld_text(limit: int, root: Path) -> None:
    extractor = build_extractor("text")
    extractor.extract([UtteranceMedia("warm-up", text="The model loads before the clock starts.")])
    timings = {}
    with local_s3("bemerc-bench"):
        for where, path in (("local folder", str(root / "meld")), ("S3 (moto)", "s3://bemerc-bench/meld")):
            store = Store(path)
            start = time.perf_counter()
            write_utterances(store, read_meld(MELD_DIR).rows)
            ingest_s = time.perf_counter() - start
            summary = run_extractor(store, extractor, limit=limit)
            timings[where] = (ingest_s, summary.seconds, summary.done)
    (local_ingest, local_text, done), (s3_ingest, s3_text, _) = timings.values()
    for where, (ingest_s, text_s, done) in timings.items():
        print(f"MELD {where:13} ingest {ingest_s:5.1f} s, text for {done} utterances {text_s:5.1f} s ({done / text_s:5.1f}/s)")
    print(f"S3 / local: ingest {s3_ingest / local_ingest:.2f}x, text {s3_text / local_text:.2f}x the time")


def media(modality: str, manifest: Path, root: Path) -> None:
    import boto3

    extractor = build_extractor(modality)
    timings = {}
    with local_s3("bemerc-media") as endpoint:
        s3 = boto3.client("s3", endpoint_url=endpoint)
        for path in manifest.parent.rglob("*"):
            if path.is_file():
                s3.upload_file(str(path), "bemerc-media", f"demo/{path.relative_to(manifest.parent)}")
        for where, source in (("local files", manifest), ("S3 objects", f"s3://bemerc-media/demo/{manifest.name}")):
            from bemerc.store.ingest.common import add_checksums

            store = Store(root / f"media-{where.split()[0]}")
            start = time.perf_counter()
            rows = read_manifest(source, dataset="demo").rows
            add_checksums(rows)
            write_utterances(store, rows)
            ingest_s = time.perf_counter() - start
            summary = run_extractor(store, extractor)
            timings[where] = (ingest_s, summary.seconds, summary.done)
            print(f"media as {where:11}: ingest (check + checksum) {ingest_s:5.2f} s, {modality} for {summary.done} "
                  f"utterances {summary.seconds:6.1f} s ({summary.done / summary.seconds:5.2f}/s)")
    (li, lx, _), (si, sx, _) = timings.values()
    print(f"S3 / local media: ingest {si / li:.2f}x, {modality} {sx / lx:.2f}x the time")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modality", default="behavior", choices=("text", "audio", "behavior", "visual"))
    parser.add_argument("--meld-limit", type=int, default=2000)
    parser.add_argument("--parts", default="engines,meld,media", help="comma-separated: engines, meld, media")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        print(f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}")
        manifest = make_demo(root / "demo")
        if "engines" in parts:
            engines(args.modality, manifest, root)
        if "meld" in parts:
            meld_text(args.meld_limit, root)
        if "media" in parts:
            media(args.modality, manifest, root)


if __name__ == "__main__":
    main()
