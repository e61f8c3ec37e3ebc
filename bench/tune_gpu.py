"""LoRA tuning speed and memory of a Qwen2.5-7B-shaped LLM on a GPU, with random weights (nothing
is downloaded): 20 optimiser steps of the ``dialogue`` layout (MELD-like windows of several turns,
one soft text token per turn, every turn answered) through bemerc's own model, collate and loss,
with bf16 autocast, SDPA attention and gradient checkpointing, as ``bemerc tune`` runs on CUDA.
Prints step time, tokens/s, utterances/s and peak GPU memory, and writes them as JSON.

    python bench/tune_gpu.py                  # on a machine with a CUDA GPU
    python bench/tune_gpu.py --tiny --steps 3 # a 2-block model of the same family, on any machine (smoke test)
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import bemerc  # noqa: F401  (OpenMP wait policy before torch)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bemerc.train.tune.data import SoftInput, collate_windows  # noqa: E402
from bemerc.train.tune.model import LoraSettings, build_model  # noqa: E402
from bemerc.train.tune.prompt import Window  # noqa: E402

QWEN25_7B = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                 num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768, rope_theta=1e6,
                 rms_norm_eps=1e-6, tie_word_embeddings=False)
TINY = dict(QWEN25_7B, vocab_size=4096, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2)


def windows(n: int, turns: int, tokens_per_turn: int, head: int, vocab: int, rng: np.random.Generator) -> list[Window]:
    """``n`` windows of ``turns`` turns each (MELD: 9.6 turns per dialogue on average, about 36
    tokens per turn in the dialogue layout) with one text soft token per turn."""
    out = []
    for i in range(n):
        ids = rng.integers(100, vocab, head).tolist()
        soft, answers, rows = [], [], []
        for t in range(turns):
            ids += rng.integers(100, vocab, tokens_per_turn).tolist()
            soft.append((i * turns + t, [len(ids) - 3]))
            answers.append(len(ids) - 1)
            rows.append(i * turns + t)
        out.append(Window(ids, {"text": soft}, rows, answers, [True] * turns))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=4, help="dialogue windows per step")
    parser.add_argument("--turns", type=int, default=12, help="turns per window")
    parser.add_argument("--tokens-per-turn", type=int, default=36)
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--tiny", action="store_true", help="a 2-block model of the same shape family (smoke test, CPU)")
    parser.add_argument("--out", default=None, help="write the figures as JSON here")
    args = parser.parse_args()

    from transformers import Qwen2Config, Qwen2ForCausalLM

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    shape = TINY if args.tiny else QWEN25_7B
    if not cuda and not args.tiny:
        raise SystemExit("no CUDA GPU here: run with --tiny for a CPU smoke test")
    start = time.perf_counter()
    torch.manual_seed(0)
    with device:
        llm = Qwen2ForCausalLM(Qwen2Config(**shape, attn_implementation="sdpa")).to(dtype)
    build_s = time.perf_counter() - start
    model = build_model(llm, [SoftInput("text", "vector", 1, 384, "text/bench@0")], LoraSettings(r=args.lora_r, alpha=2 * args.lora_r))
    model.projectors.to(device)
    if cuda:
        model.causal_lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    rng = np.random.default_rng(0)
    n_rows = args.batch_size * args.turns
    features = {"text": (rng.standard_normal((n_rows, 384)).astype(np.float32), np.ones(n_rows, dtype=bool))}
    answers = {r: int(rng.integers(100, shape["vocab_size"])) for r in range(n_rows)}
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times, tokens = [], 0
    model.train()
    for step in range(args.steps):
        batch = collate_windows(windows(args.batch_size, args.turns, args.tokens_per_turn, 40, shape["vocab_size"], rng),
                                features, 0, answers).to(device)
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            loss = model.loss(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        tokens = batch.tokens
        print(f"step {step + 1}/{args.steps}: loss {loss.item():.3f}, {times[-1]:.2f} s", flush=True)
    steady = times[1:] or times
    step_s = statistics.median(steady)
    result = {
        "model": "tiny Qwen2 (2 blocks)" if args.tiny else "Qwen2.5-7B shape, random weights",
        "device": torch.cuda.get_device_name() if cuda else "cpu", "dtype": str(dtype), "lora_r": args.lora_r,
        "batch_windows": args.batch_size, "tokens_per_step": tokens, "utterances_per_step": n_rows,
        "step_s_median": step_s, "tokens_per_s": tokens / step_s, "utterances_per_s": n_rows / step_s,
        "meld_train_epoch_minutes": 9989 / (n_rows / step_s) / 60, "build_s": build_s,
        "peak_gpu_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
    }
    print(json.dumps(result, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
