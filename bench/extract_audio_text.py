"""Speed of the text and audio extractors on this machine (offline profile).

Prints, all measured in this one run:
- text: utterances/s embedding the MELD dev utterances in fp32 and in bf16, their ratio and the cosine
  of each bf16 vector to its fp32 one (targets: bf16 >= 1.5x fp32, cosine >= 0.999; fp32 >= 200/s);
- audio: items/s and real-time factor (processing time / audio duration) of AudioExtractor on the
  RAVDESS wavs in fp32 and bf16 (ratio, cosine), then fp32 with transcription;
- Whisper encoder on 3 s of speech: stock padded-to-30 s vs true-length time (target ratio >= 8).

bf16 runs only where the CPU has bf16 matrix units (bemerc.precision.cpu_has_bf16); elsewhere the bf16
rows are skipped, and auto precision is fp32.

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
import numpy as np
import torch

from bemerc.extract.audio import AudioExtractor
from bemerc.extract.base import UtteranceMedia
from bemerc.extract.media import decode_audio
from bemerc.extract.text import TextExtractor
from bemerc.precision import cpu_has_bf16

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def best_of(fn, repeats: int) -> float:
    """Fastest of ``repeats`` timed calls, in seconds (the least disturbed by other processes)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)


def precisions() -> list[str]:
    return ["fp32", "bf16"] if cpu_has_bf16() else ["fp32"]


def bench_text(threads: int) -> None:
    with open(DATA / "meld" / "dev_sent_emo.csv", encoding="utf-8") as handle:
        texts = [row["Utterance"] for row in csv.DictReader(handle)]
    mean_words = statistics.mean(len(t.split()) for t in texts)
    rates, vectors = {}, {}
    for precision in precisions():
        extractor = TextExtractor(num_threads=threads, precision=precision)
        extractor.embed(texts[:64])  # warm-up
        seconds = best_of(lambda: extractor.embed(texts), repeats=3)
        rates[precision], vectors[precision] = len(texts) / seconds, extractor.embed(texts)
        print(f"text   {extractor.name} {precision}: {rates[precision]:7.1f} utterances/s "
              f"({len(texts)} MELD dev utterances, {mean_words:.1f} words on average, {threads} threads)")
    if "bf16" in rates:
        cos = cosines(vectors["bf16"], vectors["fp32"])
        print(f"text   bf16 / fp32: {rates['bf16'] / rates['fp32']:.2f}x utterances/s, cosine to fp32 min {cos.min():.5f}, "
              f"mean {cos.mean():.5f}")


def bench_audio(threads: int) -> None:
    wavs = sorted((DATA / "ravdess" / "audio").glob("*.wav"))
    items = [UtteranceMedia(uid=p.stem, text="given", audio_path=str(p)) for p in wavs]
    duration = sum(len(decode_audio(p)) for p in wavs) / 16_000
    rates, vectors = {}, {}
    for precision in ["fp32 in order", *precisions()]:  # the first: fp32 decoding each item in turn (before decode-ahead)
        extractor = AudioExtractor(num_threads=threads, precision=precision.split()[0])
        extractor.decode_ahead = 0 if precision == "fp32 in order" else extractor.decode_ahead
        extractor.extract(items[:1])  # warm-up
        seconds = best_of(lambda: extractor.extract(items), repeats=2)
        rates[precision] = len(items) / seconds
        vectors[precision] = np.stack([row["vector"] for row in extractor.extract(items)])
        print(f"audio  {extractor.name} {precision}: {rates[precision]:.1f} items/s, real-time factor {seconds / duration:.3f} "
              f"without transcription ({len(wavs)} RAVDESS wavs, {duration:.1f} s of audio)")
    print(f"audio  fp32 decoding ahead / in order: {rates['fp32'] / rates['fp32 in order']:.2f}x items/s")
    if "bf16" in rates:
        cos = cosines(vectors["bf16"], vectors["fp32"])
        print(f"audio  bf16 / fp32: {rates['bf16'] / rates['fp32']:.2f}x items/s, cosine to fp32 min {cos.min():.5f}, "
              f"mean {cos.mean():.5f}; bf16 decoding ahead / fp32 in order: {rates['bf16'] / rates['fp32 in order']:.2f}x")
    extractor = AudioExtractor(num_threads=threads, precision="fp32")
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
