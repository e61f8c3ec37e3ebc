"""Speed of the behaviour extractor against real time, on one real clip.

    python bench/extract_behavior.py [VIDEO] [--fps 4] [--repeats 3]

Prints the time to decode the sampled frames, to measure them (faces, expression, pose), and
their sum, then frames per second and the real-time factor (processing time / clip duration;
below 0.5 means more than twice as fast as real time). The first pass, which builds the MediaPipe
graphs and loads the expression model, is reported apart and not counted. Wall time depends on what
else the machine runs, so the CPU time (this process and its ffmpeg children) is printed too.
Default clip: the RAVDESS face video in ../shared/data.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bemerc.extract.behavior import BehaviorExtractor  # noqa: E402
from bemerc.extract.media import probe, sample_frames  # noqa: E402

DEFAULT_VIDEO = Path(__file__).resolve().parents[2] / "shared" / "data" / "ravdess" / "video" / "01-01-01-01-01-01-01.mp4"


def cpu_seconds() -> float:
    """User + system CPU time of this process and its finished children (ffmpeg)."""
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("video", nargs="?", type=Path, default=DEFAULT_VIDEO)
    parser.add_argument("--fps", type=float, default=4.0)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    duration_s = probe(args.video).duration_s
    extractor = BehaviorExtractor(fps=args.fps)
    start = time.perf_counter()
    frames, times_s = sample_frames(args.video, fps=args.fps)
    extractor.features(extractor.measure_frames(frames, times_s), str(args.video))
    print(f"first pass (builds graphs, loads models): {time.perf_counter() - start:.2f} s")

    decode, measure = [], []
    cpu_start = cpu_seconds()
    for _ in range(args.repeats):
        start = time.perf_counter()
        frames, times_s = sample_frames(args.video, fps=args.fps)
        decoded = time.perf_counter()
        measures = extractor.measure_frames(frames, times_s)
        row = extractor.features(measures, str(args.video))
        decode.append(decoded - start)
        measure.append(time.perf_counter() - decoded)
    cpu_per_clip = (cpu_seconds() - cpu_start) / args.repeats
    total = [d + m for d, m in zip(decode, measure)]
    best = min(range(args.repeats), key=lambda i: total[i])
    count = len(frames)
    print(f"clip: {args.video.name}, {duration_s:.2f} s, {count} frames at {args.fps:g} fps, "
          f"face in {row['face_frames']}/{count}, body in {row['pose_frames']}/{count}")
    print(f"description: {row['description']}")
    print(f"decode  {decode[best]:.3f} s   measure {measure[best]:.3f} s   total {total[best]:.3f} s  "
          f"(best of {args.repeats}; median total {statistics.median(total):.3f} s)")
    print(f"cpu time per clip: {cpu_per_clip:.3f} s (load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")
    print(f"measure speed: {count / measure[best]:.1f} frames/s")
    print(f"real-time factor: {total[best] / duration_s:.2f} (processing / duration; "
          f"{duration_s / total[best]:.1f}x faster than real time)")


if __name__ == "__main__":
    main()
