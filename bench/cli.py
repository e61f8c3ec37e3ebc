"""How fast the command line answers, as ratios against baselines measured in this same run.

Prints:
- `bemerc --help` against the `--help` of a bare two-command typer app (target <= 1.5x);
- `bemerc store info` on a small store against the same bare `--help` (target <= 2x);
- a no-op `bemerc extract --modality all` on a fully extracted store against the first extraction
  of that store (target <= 10%), on the RAVDESS manifest of one video and eight wavs
  (../shared/data/ravdess). The extraction remembers what a re-run prints, so a re-run on the
  unchanged store answers from that summary; the same re-run with the summary deleted (it reads
  the store through LanceDB, as after another process's write) is timed too.
  Model preparation (`bemerc models prepare`) runs before, untimed.

Each command runs as a fresh process, the way a user types it; the quick commands run in
interleaved rounds (bare, help, info, bare, ...) and each takes its median, so a change in the
machine's load touches all three alike. Usage: HF_HUB_OFFLINE=1 .venv/bin/python bench/cli.py [--repeats 7]
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bemerc.store.summary import SUMMARY_FILE

ROOT = Path(__file__).resolve().parents[1]
RAVDESS = ROOT.parent / "shared" / "data" / "ravdess"
BEMERC = [sys.executable, "-m", "bemerc"]
RAVDESS_EMOTIONS = {"01": "neutral", "02": "calm", "03": "happy", "04": "sad", "05": "angry", "06": "fearful",
                    "07": "disgust", "08": "surprised"}

BARE_APP = '''
import typer

app = typer.Typer(help="A bare two-command app.")


@app.command()
def hello(name: str) -> None:
    """Say hello."""
    print(f"hello {name}")


@app.command()
def bye(name: str) -> None:
    """Say goodbye."""
    print(f"bye {name}")


app()
'''


def timed(cmd: list[str], env: dict[str, str]) -> float:
    """Wall seconds of one run of ``cmd``; a failing command stops the bench with its output."""
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return seconds


def interleaved_medians(cmds: dict[str, list[str]], env: dict[str, str], repeats: int) -> dict[str, float]:
    """Median wall seconds of each command, run in ``repeats`` rounds of one run each (after one
    warm-up round for the file and bytecode caches)."""
    times: dict[str, list[float]] = {name: [] for name in cmds}
    for round_ in range(repeats + 1):
        for name, cmd in cmds.items():
            seconds = timed(cmd, env)
            if round_:
                times[name].append(seconds)
    return {name: statistics.median(values) for name, values in times.items()}


def ravdess_manifest(folder: Path) -> Path:
    """One video and eight wavs of RAVDESS actor 01 as a manifest: one dialogue per file."""
    files = sorted((RAVDESS / "video").glob("*.mp4")) + sorted((RAVDESS / "audio").glob("*.wav"))
    if len(files) != 9:
        sys.exit(f"expected 1 video and 8 wavs under {RAVDESS}, found {len(files)} files")
    path = folder / "manifest.csv"
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["dialogue_id", "turn", "speaker", "text", "label", "split", "video", "audio"])
        for i, media in enumerate(files):
            emotion = RAVDESS_EMOTIONS[media.name.split("-")[2]]
            video, audio = (str(media), "") if media.suffix == ".mp4" else ("", str(media))
            writer.writerow([f"r{i}", 0, "actor01", "Kids are talking by the door.", emotion,
                             ("train", "dev", "test")[i % 3], video, audio])
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7, help="runs of each quick command (median taken)")
    args = parser.parse_args()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (other work slows every number)")
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        bare = tmp_path / "bare.py"
        bare.write_text(BARE_APP)
        store = tmp_path / "store"
        env["BEMERC_STORE"] = str(store)
        labels = ",".join(RAVDESS_EMOTIONS.values())
        timed([*BEMERC, "ingest", "manifest", str(ravdess_manifest(tmp_path)), "--labels", labels, "--dataset", "ravdess"], env)
        timed([*BEMERC, "models", "prepare"], env)
        first_s = timed([*BEMERC, "extract", "--modality", "all"], env)
        noop_s = statistics.median(timed([*BEMERC, "extract", "--modality", "all"], env) for _ in range(3))
        (store / SUMMARY_FILE).unlink()
        read_s = timed([*BEMERC, "extract", "--modality", "all"], env)

        quick = interleaved_medians({"bare": [sys.executable, str(bare), "--help"], "help": [*BEMERC, "--help"],
                                     "info": [*BEMERC, "store", "info"]}, env, args.repeats)
        bare_s, help_s, info_s = quick["bare"], quick["help"], quick["info"]
        print(f"bare typer --help {bare_s:.3f} s; bemerc --help {help_s:.3f} s = {help_s / bare_s:.2f}x (target <= 1.5x)")
        print(f"bemerc store info {info_s:.3f} s = {info_s / bare_s:.2f}x bare typer --help (target <= 2x)")
        print(f"extract --modality all, RAVDESS 1 video + 8 wavs: first {first_s:.1f} s; no-op re-run {noop_s:.2f} s = "
              f"{100 * noop_s / first_s:.1f}% (target <= 10%); the same reading the store (summary deleted) "
              f"{read_s:.2f} s = {100 * read_s / first_s:.1f}%")


if __name__ == "__main__":
    main()
