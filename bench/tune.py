"""MERC instruction tuning: speed of the two prompt layouts, then accuracy against zero-shot and the
majority class, in one run.

Speed: for each layout (``utterance``: one prompt per utterance with its last --context turns, the
layout before whole-dialogue tuning; ``dialogue``: one sequence per dialogue) and each thread count,
``--speed-steps`` optimiser steps of the ``merc`` stage on the whole train split (and of the
``project`` stage, for the dialogue layout of a store with soft features), in each of ``--precisions``
(fp32 and bf16 side by side where the CPU has bf16 matrix units), each in its own process; prints train
tokens per utterance, utterances and tokens per second, seconds per step, peak memory (RSS) and the
projected wall time of one epoch of all train utterances, and the bf16 / fp32 ratio; with ``--compile``
also each precision with every decoder block compiled by ``torch.compile``, and its ratio to eager; with
``--lora-modules`` each set of LoRA layers given (``all``: every linear layer, tune's default; or names,
``q_proj,v_proj``), and its ratio to the first.
Accuracy (unless ``--speed-only``): trains the chosen layouts on the first ``--train-limit`` train
utterances (default: all) and scores dev with each (in each precision), with the untouched model
(zero-shot) and the majority class. Everything goes to ``OUT/bench.json``.

Probe (``--probe``): the check that the soft-token path works, on any corpus. For each soft modality
the store holds (or ``--modalities``), the tuned LLM with that modality's soft tokens alone beside a
linear probe (the baseline's standardised, class-weighted logistic regression) on the same stored
vectors, as the LLM reads them (voice and face vectors normalised per speaker unless
``--no-speaker-norm``), and the majority class, all on dev, in one run; plus the LLM with no soft tokens (the words
alone), so "what the soft tokens add" is the difference of two rows. Tune settings are the defaults
unless given (``--epochs``, ``--lr``, ...). Prints a table and writes ``OUT/probe.json``.

    python bench/tune.py --store /tmp/ravdess --model DIR --probe             # audio: words carry nothing
    python bench/tune.py --store /tmp/meld --model DIR --probe --train-limit 2000 --eval-limit 600

    python -m bemerc ingest meld ../shared/data/meld --store /tmp/meld && python -m bemerc extract --modality text --store /tmp/meld
    python bench/tune.py --store /tmp/meld --model ~/.cache/bemerc/models/llm-*/model --speed-only
    python bench/tune.py --store /tmp/meld --model DIR --accuracy-only --layouts dialogue --train-limit 2000 --eval-limit 600
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import time
from dataclasses import replace
from pathlib import Path

import bemerc  # noqa: F401  (OpenMP wait policy before torch)

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bemerc.precision import cpu_has_bf16  # noqa: E402
from bemerc.store import Store  # noqa: E402
from bemerc.train.tune.config import SOFT_MODALITIES, parse_names, project_modalities  # noqa: E402
from bemerc.train.tune.data import load_data  # noqa: E402
from bemerc.train.tune.loop import TuneConfig, tune  # noqa: E402

DEFAULTS = TuneConfig(model="")  # the tune defaults, so the bench measures what `bemerc tune` runs


def stored_soft(store: Store) -> list[str]:
    """The soft modalities (in tune's order) that ``store`` has a feature set of."""
    stored = {fs.modality for fs in store.feature_sets()}
    return [m for m in SOFT_MODALITIES if m in stored]


def speed(store_path: str, out: Path, common: dict, layout: str, threads: int, steps: int, n_train: int, stage: str = "merc",
          precision: str = "fp32", compiled: bool = False, lora_modules: str = "all") -> dict:
    """Tokens per utterance, utterances/s and peak RSS of ``stage`` over ``steps`` steps (the first,
    warm-up, left out). Run in a process of its own (:func:`isolated`), so the peak is this run's.
    ``compiled``: every decoder block of the LLM compiled by ``torch.compile`` (inductor, dynamic shapes).
    ``lora_modules``: ``all`` or comma-separated names (``bemerc tune --lora-modules``)."""
    import resource

    if compiled:  # this process only: it runs isolated
        import bemerc.train.tune.loop as loop

        new_model = loop.new_model

        def compiled_model(*args, **kwargs):
            model, tokenizer = new_model(*args, **kwargs)
            for module in model.modules():
                if type(module).__name__.endswith("DecoderLayer"):
                    module.compile(dynamic=True)
            return model, tokenizer

        loop.new_model = compiled_model
    modules = None if lora_modules == "all" else parse_names(lora_modules)
    run_dir = out / (f"speed-{stage}-{layout}-{threads}t-{precision}{'-compiled' if compiled else ''}"
                     f"-{lora_modules.replace(',', '+')}")
    tune(Store(store_path), TuneConfig(**common, stage=stage, layout=layout, threads=threads, stop_after=steps, precision=precision,
                                       checkpoint_every=10_000, run_dir=str(run_dir), progress=False, lora_modules=modules))
    log = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()][1:]
    seconds, utterances, tokens = (sum(h[k] for h in log) for k in ("seconds", "utterances", "tokens"))
    rate = utterances / seconds
    return {"stage": stage, "layout": layout, "threads": threads, "precision": precision, "compiled": compiled,
            "lora_modules": lora_modules, "steps": len(log),
            "tokens_per_utterance": tokens / utterances, "utterances_per_s": rate, "tokens_per_s": tokens / seconds,
            "step_s_median": statistics.median(h["seconds"] for h in log), "epoch_minutes": n_train / rate / 60,
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def isolated(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` in a fresh process (spawned), so its peak memory is its own."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args, **kwargs).result()


def linear_probe(store: Store, config: TuneConfig, modality: str) -> dict:
    """Dev weighted F1 of the baseline's logistic head on one modality's soft-token inputs alone
    (the stored vectors as the tuned LLM reads them: normalised per speaker when ``config``
    normalises them), and of the majority class, on the rows the tuned LLM saw (the same --train-limit/
    --eval-limit dialogues; rows without the modality are left out of both)."""
    import numpy as np

    from bemerc.train.baseline import BaselineConfig, LogisticHead
    from bemerc.train.metrics import classification_metrics

    data = load_data(store, replace(config, modalities=[modality]))
    values, present = data.features[modality]
    y = np.array([data.classes.index(label) if label is not None else -1 for label in data.labels])
    train, dev = data.train_rows[present[data.train_rows]], data.eval_rows["dev"][present[data.eval_rows["dev"]]]
    head = LogisticHead.fit(values[train], y[train], len(data.classes), BaselineConfig())
    probe = classification_metrics(y[dev], head(values[dev]).argmax(1), data.classes)
    majority = np.bincount(y[train], minlength=len(data.classes)).argmax()
    floor = classification_metrics(y[dev], np.full(len(dev), majority), data.classes)
    return {"probe_weighted_f1": probe["weighted_f1"], "majority_weighted_f1": floor["weighted_f1"], "dev_rows": len(dev)}


def probe(store: Store, out: Path, common: dict, args) -> dict:
    """The probe table: per soft modality, the tuned LLM (that modality's soft tokens and the words),
    a linear probe on the same vectors and the majority class; and the LLM on the words alone."""

    modalities = args.modalities.split(",") if args.modalities else stored_soft(store)
    dataset = load_data(store, TuneConfig(model=args.model, zero_shot=True)).dataset
    settings = dict(common, layout=args.layouts.split(",")[-1], epochs=args.epochs, train_limit=args.train_limit,
                    eval_limit=args.eval_limit, threads=int(args.threads.split(",")[-1]), project_epochs=args.project_epochs)
    rows, start = [], time.perf_counter()
    for modality in [None, *modalities]:
        t0 = time.perf_counter()
        config = TuneConfig(**settings, modalities=[modality] if modality else [], run_dir=str(out / f"probe-{modality or 'words'}"))
        run = tune(store, config)
        row = {"soft": modality or "none (words only)", "llm_weighted_f1": run["metrics"]["dev"]["weighted_f1"],
               "llm_accuracy": run["metrics"]["dev"]["accuracy"], "minutes": (time.perf_counter() - t0) / 60,
               "epoch_minutes": run["timing"]["train_seconds"] / 60 / max(args.epochs, 1),
               "stage_minutes": {k: v / 60 for k, v in run["timing"].get("stage_seconds", {}).items()},
               "final_loss": run["timing"]["final_loss"], "run_id": run["run_id"]}
        row.update(linear_probe(store, config, modality) if modality else {"majority_weighted_f1": run["majority"]["weighted_f1"]})
        rows.append(row)
        print(f"{row['soft']:>18s}: LLM {row['llm_weighted_f1']:.3f}  linear probe "
              f"{row.get('probe_weighted_f1', float('nan')):.3f}  majority {row['majority_weighted_f1']:.3f}  "
              f"(final loss {row['final_loss']:.3f}, {row['minutes']:.1f} min)", flush=True)
    report = {"store": str(store.path), "dataset": dataset, "settings": {k: v for k, v in settings.items() if k != "model"},
              "rows": rows, "wall_seconds": time.perf_counter() - start}
    (out / "probe.json").write_text(json.dumps(report, indent=2))
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", required=True)
    parser.add_argument("--model", required=True, help="local Hugging Face folder of the LLM")
    parser.add_argument("--out", default="runs/bench-tune", help="folder of the runs and bench.json")
    parser.add_argument("--layouts", default="utterance,dialogue")
    parser.add_argument("--threads", default="1,2", help="thread counts to time (--probe: trains with the last)")
    parser.add_argument("--speed-steps", type=int, default=12)
    parser.add_argument("--speed-only", action="store_true")
    parser.add_argument("--accuracy-only", action="store_true", help="skip the speed runs (threads: the first of --threads)")
    parser.add_argument("--train-limit", type=int, default=None)
    parser.add_argument("--eval-limit", type=int, default=None)
    parser.add_argument("--context", type=int, default=DEFAULTS.context, help="utterance layout: context turns")
    parser.add_argument("--epochs", type=int, default=DEFAULTS.epochs)
    parser.add_argument("--project-epochs", type=int, default=DEFAULTS.project_epochs, help="--probe: epochs of the project stage")
    parser.add_argument("--lr", type=float, default=DEFAULTS.lr)
    parser.add_argument("--batch-size", type=int, default=DEFAULTS.batch_size)
    parser.add_argument("--demos", type=int, default=DEFAULTS.demos)
    parser.add_argument("--seed", type=int, default=DEFAULTS.seed)
    parser.add_argument("--probe", action="store_true", help="per soft modality: tuned LLM vs linear probe vs majority (see above)")
    parser.add_argument("--speaker-norm", action=argparse.BooleanOptionalAction, default=DEFAULTS.speaker_norm,
                        help="normalise voice/face soft inputs per speaker (tune's default); the probe reads the same inputs")
    parser.add_argument("--modalities", default=None, help="--probe: comma-separated soft modalities (default: every stored one)")
    parser.add_argument("--lora-dropout", type=float, default=DEFAULTS.lora_dropout)
    parser.add_argument("--compile", action="store_true",
                        help="speed: also time each precision with every decoder block compiled (torch.compile), beside eager")
    parser.add_argument("--lora-modules", nargs="+", default=["all"], metavar="MODULES",
                        help="speed: sets of LoRA layers to time, each 'all' (tune's default) or comma-separated names (q_proj,v_proj)")
    parser.add_argument("--precisions", default=None,
                        help="comma-separated: fp32,bf16 (default: both where the CPU has bf16 matrix units, else fp32)")
    args = parser.parse_args()

    store, out = Store(args.store), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    layouts, thread_counts = args.layouts.split(","), [int(t) for t in args.threads.split(",")]
    common = dict(model=args.model, context=args.context, batch_size=args.batch_size, seed=args.seed, lr=args.lr,
                  speaker_norm=args.speaker_norm, lora_dropout=args.lora_dropout)
    precisions = args.precisions.split(",") if args.precisions else ["fp32", "bf16"] if cpu_has_bf16() else ["fp32"]
    if args.probe:
        probe(store, out, common, args)
        return
    n_train = store.count("utterances", "split = 'train' AND label IS NOT NULL")
    report: dict = {"train_utterances_total": n_train, "speed": []}
    soft = bool(project_modalities(stored_soft(store)))
    for layout in [] if args.accuracy_only else layouts:
        for threads in thread_counts:
            # the project stage (soft tokens alone, dialogue layout) only where the store has a voice or behaviour modality
            for stage in ["merc", "project"] if soft and layout == "dialogue" and DEFAULTS.project_epochs else ["merc"]:
                rows = {}
                first = args.lora_modules[0]
                has_lora = stage == "merc"  # the project stage has no LoRA
                variants = itertools.product(precisions, (False, True) if args.compile else (False,),
                                             args.lora_modules if has_lora else [first])
                for precision, compiled, modules in variants:
                    row = isolated(speed, args.store, out, common, layout, threads, args.speed_steps, n_train, stage, precision,
                                   compiled, modules)
                    report["speed"].append(row)
                    rows[precision, compiled, modules] = row
                    print(f"{layout:9s} {stage:7s} {threads} thread(s) {precision}{' compiled' if compiled else ''}"
                          f"{'' if len(args.lora_modules) == 1 else f' LoRA on {modules}'}: "
                          f"{row['tokens_per_utterance']:.0f} train tokens/utterance, "
                          f"{row['utterances_per_s']:.2f} utterances/s, {row['tokens_per_s']:.0f} tokens/s, {row['step_s_median']:.2f} s/step, "
                          f"peak {row['peak_rss_gb']:.2f} GB -> one epoch of {n_train:,} train utterances in {row['epoch_minutes']:.1f} min",
                          flush=True)
                plain = {p: rows[p, False, first] for p in precisions}
                ratios = [(f"{precisions[-1]} / {precisions[0]}", plain[precisions[-1]], plain[precisions[0]])] if len(precisions) > 1 else []
                ratios += [(f"{p} compiled / eager", rows[p, True, first], plain[p]) for p in precisions if args.compile]
                ratios += [(f"{p} LoRA on {m} / on {first}", rows[p, False, m], plain[p]) for p in precisions for m in args.lora_modules[1:] if has_lora]
                for name, b, a in ratios:
                    print(f"{layout:9s} {stage:7s} {threads} thread(s): {name} {b['utterances_per_s'] / a['utterances_per_s']:.2f}x utterances/s, "
                          f"{b['step_s_median'] / a['step_s_median']:.2f}x median s/step, peak memory {b['peak_rss_gb'] / a['peak_rss_gb']:.2f}x",
                          flush=True)
    by = {(r["layout"], r["threads"]): r for r in report["speed"]
          if r["stage"] == "merc" and r["precision"] == precisions[-1] and not r["compiled"] and r["lora_modules"] == args.lora_modules[0]}
    for r in report["speed"]:
        if r["stage"] == "project":
            merc = by[(r["layout"], r["threads"])]["epoch_minutes"]
            print(f"{r['layout']} {r['threads']} thread(s): the project stage adds {r['epoch_minutes'] / merc:.0%} to a merc "
                  f"epoch ({r['epoch_minutes']:.1f} + {merc:.1f} min)")
    if ("utterance", thread_counts[0]) in by and ("dialogue", thread_counts[0]) in by:
        for t in thread_counts:
            ratio = by[("dialogue", t)]["utterances_per_s"] / by[("utterance", t)]["utterances_per_s"]
            print(f"dialogue / utterance layout, {t} thread(s): {ratio:.1f}x utterances/s")
    if not args.speed_only:
        fastest = max(thread_counts, key=lambda t: by.get((layouts[-1], t), {}).get("utterances_per_s", 0 if by else -t))
        accuracy = {}
        start = time.perf_counter()
        zero = tune(store, TuneConfig(**common, layout=layouts[-1], zero_shot=True, eval_limit=args.eval_limit,
                                      threads=fastest, run_dir=str(out / "zero-shot"), progress=False))
        accuracy["zero_shot"] = zero["metrics"]["dev"]["weighted_f1"]
        accuracy["majority"] = zero["majority"]["weighted_f1"]
        for layout in layouts:
            for precision in precisions:
                name = layout if len(precisions) == 1 else f"{layout} {precision}"
                t0 = time.perf_counter()
                run = tune(store, TuneConfig(**common, stage="all", layout=layout, threads=fastest, epochs=args.epochs,
                                             train_limit=args.train_limit, eval_limit=args.eval_limit, demos=args.demos,
                                             precision=precision, run_dir=str(out / f"tuned-{layout}-{precision}"), progress=False))
                accuracy[name] = run["metrics"]["dev"]["weighted_f1"]
                report[f"run_{name}"] = {"run_id": run["run_id"], "train_utterances": run["train_utterances"],
                                         "eval_utterances": run["eval_utterances"], "wall_minutes": (time.perf_counter() - t0) / 60,
                                         "timing": run["timing"]}
                print(f"{name}: dev weighted F1 {accuracy[name]:.3f} ({run['eval_utterances']} dev utterances, trained on "
                      f"{run['train_utterances']}), {report[f'run_{name}']['wall_minutes']:.1f} min "
                      f"({run['timing'].get('train_tokens_per_s', 0):.0f} train tokens/s)", flush=True)
        report["dev_weighted_f1"] = accuracy
        report["wall_seconds"] = time.perf_counter() - start
        print("dev weighted F1: " + ", ".join(f"{k} {v:.3f}" for k, v in accuracy.items()))
    (out / "bench.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
