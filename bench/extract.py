"""Extraction speed per modality, and what a re-run costs, measured in this one run.

Prints:
- text: utterances/s on the MELD dev texts (target >= 200/s on 2 cores);
- audio: real-time factor on the RAVDESS wavs, and the Whisper encoder on 3 s of speech, stock
  (padded to 30 s) against true length, both timed here (target ratio >= 8);
- behavior and visual: utterances/s and real-time factor through the real run path
  (`run_extractor` into a LanceDB store on a temp dir) on the embedded demo's talking-face clips
  (target for behaviour at 4 fps: real-time factor <= 0.5, i.e. 2x faster than real time);
- the whole `extract --modality all` on the demo, then the same again: the re-run's share of the
  first run's time (target < 5%).

Usage: HF_HUB_OFFLINE=1 .venv/bin/python bench/extract.py [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bemerc  # noqa: E402,F401  (first: it sets the OpenMP wait policy before torch loads)
import torch  # noqa: E402
from extract_audio_text import bench_audio, bench_text  # noqa: E402

from bemerc.demo import make_demo  # noqa: E402
from bemerc.extract.factory import build_extractor  # noqa: E402
from bemerc.extract.media import probe  # noqa: E402
from bemerc.extract.base import MODALITY_ORDER  # noqa: E402
from bemerc.extract.run import run_extractor  # noqa: E402
from bemerc.store import Store  # noqa: E402
from bemerc.store.ingest import read_manifest, write_utterances  # noqa: E402


def extract_all(store: Store, modalities=MODALITY_ORDER) -> dict[str, tuple[float, int]]:
    """Seconds and rows extracted per modality, building each extractor as `bemerc extract` does."""
    out = {}
    for modality in modalities:
        t0 = time.perf_counter()
        summary = run_extractor(store, build_extractor(modality), batch_size=8)
        out[modality] = (time.perf_counter() - t0, summary.done)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (other work slows every number)")
    bench_text(args.threads)
    bench_audio(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        manifest = make_demo(Path(tmp) / "demo")
        report = read_manifest(manifest, dataset="demo")
        media_s = sum(probe(r["video_path"]).duration_s for r in report.rows)
        store = Store(Path(tmp) / "store")
        write_utterances(store, report.rows)
        first = extract_all(store)
        for modality, (seconds, rows) in first.items():
            print(f"{modality:<8} (demo, {rows} clips, {media_s:.0f} s of media): {rows / seconds:6.1f} utterances/s, "
                  f"real-time factor {seconds / media_s:.3f} (model loading included)")
        t0 = time.perf_counter()
        again = extract_all(store)
        rerun_s = time.perf_counter() - t0
        first_s = sum(s for s, _ in first.values())
        assert sum(rows for _, rows in again.values()) == 0, "a re-run extracted rows again"
        print(f"re-run of all modalities: {rerun_s:.1f} s against {first_s:.1f} s first = {100 * rerun_s / first_s:.1f}% "
              f"(target < 5%)")


if __name__ == "__main__":
    main()
