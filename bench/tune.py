"""MERC instruction tuning on a MELD subset against the same LLM zero-shot and the majority class.

Trains LoRA (and the soft-token projectors of any audio/behaviour features stored) on the first
``--train-limit`` train utterances for one epoch, then scores the first ``--eval-limit`` dev
utterances; the zero-shot run scores the same dev utterances with the untouched model. Prints dev
weighted F1 of all three, step time and tokens per second, and writes them as JSON.

    python -m bemerc ingest meld ../shared/data/meld --store /tmp/tune_store
    python bench/tune.py --store /tmp/tune_store --model /path/to/smollm2 --train-limit 1500 --eval-limit 300

On 2 shared CPU cores this takes about 35-45 minutes (one torch thread).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bemerc.store import Store  # noqa: E402
from bemerc.train.tune.loop import TuneConfig, tune  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", required=True)
    parser.add_argument("--model", required=True, help="local Hugging Face folder of the LLM")
    parser.add_argument("--out", default="runs/bench-tune", help="folder of the two runs and bench.json")
    parser.add_argument("--train-limit", type=int, default=1500)
    parser.add_argument("--eval-limit", type=int, default=300)
    parser.add_argument("--context", type=int, default=2)
    parser.add_argument("--lora-layers", type=int, default=None, help="LoRA on the top N blocks only (default all)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--balance", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    store, out = Store(args.store), Path(args.out)
    common = dict(model=args.model, train_limit=args.train_limit, eval_limit=args.eval_limit, context=args.context,
                  batch_size=args.batch_size, seed=args.seed)
    start = time.perf_counter()
    zero = tune(store, TuneConfig(**common, zero_shot=True, run_dir=str(out / "zero-shot")))
    tuned = tune(store, TuneConfig(**common, stage="all", lr=args.lr, lora_layers=args.lora_layers,
                                  balance=args.balance, run_dir=str(out / "tuned")))
    timing = tuned["timing"]
    report = {
        "train_utterances": tuned["train_utterances"],
        "eval_utterances": tuned["eval_utterances"],
        "dev_weighted_f1": {"tuned": tuned["metrics"]["dev"]["weighted_f1"], "zero_shot": zero["metrics"]["dev"]["weighted_f1"],
                            "majority": tuned["majority"]["weighted_f1"]},
        "dev_accuracy": {"tuned": tuned["metrics"]["dev"]["accuracy"], "zero_shot": zero["metrics"]["dev"]["accuracy"],
                         "majority": tuned["majority"]["accuracy"]},
        "train": {k: timing[k] for k in ("steps", "step_s_median", "train_seconds", "train_tokens_per_s", "final_loss")},
        "eval_tokens_per_s": timing["eval"]["tokens_per_s"],
        "wall_seconds": time.perf_counter() - start,
        "runs": {"tuned": tuned["run_id"], "zero_shot": zero["run_id"]},
    }
    (out / "bench.json").write_text(json.dumps(report, indent=2))
    f1 = report["dev_weighted_f1"]
    print(f"dev weighted F1 ({report['eval_utterances']} utterances; trained on {report['train_utterances']}): "
          f"tuned {f1['tuned']:.3f}, zero-shot {f1['zero_shot']:.3f}, majority {f1['majority']:.3f}")
    print(f"train: {timing['steps']} steps, {timing['step_s_median']:.2f} s/step (median), "
          f"{timing['train_tokens_per_s']:.0f} tokens/s; eval {report['eval_tokens_per_s']:.0f} prompt tokens/s; "
          f"wall {report['wall_seconds'] / 60:.1f} min")


if __name__ == "__main__":
    main()
