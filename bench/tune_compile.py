"""Does torch.compile speed up a tuning step on this CPU? Eager against each decoder block compiled.

    python bench/tune_compile.py --store /tmp/meld --model DIR [--steps 8] [--mode eager|layers]

Runs the default ``merc`` stage (bf16 where the CPU has bf16 matrix units) for ``--steps`` optimiser
steps in this process, eager or with every decoder block compiled (``module.compile(dynamic=True)``,
inductor), and prints each step's seconds and the median after 3 warm-up steps. Run each mode in its own
process, back to back (docs/tune.md, Precision).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import bemerc.train.tune.loop as loop  # noqa: E402
from bemerc.store import Store  # noqa: E402
from bemerc.train.tune.loop import TuneConfig, tune  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", required=True)
    parser.add_argument("--model", required=True, help="the LLM folder (bemerc models list shows the prepared one)")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--mode", choices=("eager", "layers"), default="eager")
    args = parser.parse_args()

    new_model = loop.new_model

    def compiled(*a, **k):
        model, tokenizer = new_model(*a, **k)
        for module in model.modules():
            if type(module).__name__.endswith("DecoderLayer"):
                module.compile(dynamic=True)
        return model, tokenizer

    if args.mode == "layers":
        loop.new_model = compiled
    with tempfile.TemporaryDirectory() as run_dir:
        tune(Store(args.store), TuneConfig(model=args.model, stop_after=args.steps, checkpoint_every=10_000,
                                           run_dir=run_dir, progress=False, epochs=1))
        log = [json.loads(line) for line in open(os.path.join(run_dir, "log.jsonl"))]
    steps = [entry for entry in log if "seconds" in entry]
    tail = steps[3:]
    print(f"{args.mode}: seconds per step {[round(h['seconds'], 2) for h in steps]}; median after 3 warm-up steps "
          f"{statistics.median(h['seconds'] for h in tail):.2f} s, {sum(h['tokens'] for h in tail) / sum(h['seconds'] for h in tail):.0f} tokens/s")


if __name__ == "__main__":
    main()
