"""Speed of the text and audio extractors on this machine (offline profile).

Prints, all measured in this one run:
- text: utterances/s embedding the MELD dev utterances (target >= 200/s for MiniLM on 2 cores);
- audio: real-time factor (processing time / audio duration) of AudioExtractor on the RAVDESS wavs,
  without and with transcription;
- Whisper encoder on 3 s of speech: stock padded-to-30 s vs true-length time (target ratio >= 8).

Usage: HF_HUB_OFFLINE=1 python bench/extract_audio_text.py [--threads N]
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import time
from pathlib import Path

import bemerc  # noqa: F401  (first: it sets the OpenMP wait policy before torch loads)
import torch

from bemerc.extract.audio import AudioExtractor
from bemerc.extract.base import UtteranceMedia
from bemerc.extract.media import decode_audio
from bemerc.extract.text import TextExtractor

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def best_of(fn, repeats: int) -> float:
    """Fastest of ``repeats`` timed calls, in seconds (the least disturbed by other processes)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def bench_text(threads: int) -> None:
    with open(DATA / "meld" / "dev_sent_emo.csv", encoding="utf-8") as handle:
        texts = [row["Utterance"] for row in csv.DictReader(handle)]
    extractor = TextExtractor(num_threads=threads)
    extractor.embed(texts[:64])  # warm-up
    seconds = best_of(lambda: extractor.embed(texts), repeats=3)
    mean_words = statistics.mean(len(t.split()) for t in texts)
    print(f"text   {extractor.name}: {len(texts) / seconds:7.1f} utterances/s "
          f"({len(texts)} MELD dev utterances, {mean_words:.1f} words on average, {threads} threads)")


def bench_audio(threads: int) -> None:
    wavs = sorted((DATA / "ravdess" / "audio").glob("*.wav"))
    items = [UtteranceMedia(uid=p.stem, text="given", audio_path=str(p)) for p in wavs]
    extractor = AudioExtractor(num_threads=threads)
    extractor.extract(items[:1])  # warm-up
    duration = sum(len(decode_audio(p)) for p in wavs) / 16_000
    seconds = best_of(lambda: extractor.extract(items), repeats=2)
    print(f"audio  {extractor.name}: real-time factor {seconds / duration:.3f} without transcription "
          f"({len(wavs)} RAVDESS wavs, {duration:.1f} s of audio)")
    untranscribed = [UtteranceMedia(uid=i.uid, audio_path=i.audio_path) for i in items]
    seconds = best_of(lambda: extractor.extract(untranscribed), repeats=1)
    print(f"audio  {extractor.name}: real-time factor {seconds / duration:.3f} with transcription")

    import whisper

    audio = decode_audio(wavs[0])[: 3 * 16_000]
    mel = whisper.log_mel_spectrogram(torch.from_numpy(audio), n_mels=extractor.model.dims.n_mels)
    padded = whisper.pad_or_trim(mel, 3000)[None]

    def stock() -> None:
        with torch.inference_mode():
            extractor.model.encoder(padded)

    stock()
    padded_s = best_of(stock, repeats=3)
    true_s = best_of(lambda: extractor.encode(audio), repeats=5)
    print(f"encoder on 3 s: padded-30 s {padded_s * 1000:.0f} ms, true-length {true_s * 1000:.0f} ms, "
          f"ratio {padded_s / true_s:.1f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    # Other processes slow every number below: the load average says how busy the machine was.
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    bench_text(args.threads)
    bench_audio(args.threads)


if __name__ == "__main__":
    main()
