"""Which parts of the models gain from bf16 on this machine: each part timed in fp32 and in bf16 (its
weights held in bf16) in one run, and the ratio.

Parts: the offline LLM's (SmolLM2-135M) attention block, MLP block and LM head, forward and backward
over --tokens tokens (what tuning runs; the LM head over the answer positions only in tuning, here over
every token as an upper bound); LoRA dropout on the MLP input (what peft's dropout draws per module); the
Whisper encoder's convolutions and transformer blocks on 4 s of audio and MiniLM on 32 utterances
(inference, what extraction runs). bf16 runs where the CPU has bf16 matrix units
(bemerc.precision.cpu_has_bf16); elsewhere the script says so and stops.

Usage: HF_HUB_OFFLINE=1 python bench/precision.py [--threads 2] [--tokens 1024]
"""

from __future__ import annotations

import argparse
import copy
import os
import time

import bemerc  # noqa: F401  (the OpenMP wait policy before torch)

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from bemerc.precision import cpu_has_bf16  # noqa: E402


def best_ms(fn, repeats: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * min(times)


def train_step(module, x, *extra):
    def step():
        inp = x.detach().requires_grad_(True)
        out = module(inp, *extra)
        out = out[0] if isinstance(out, tuple) else out
        out.float().sum().backward()
    return step


def llm_parts(tokens: int) -> list[tuple[str, float, float]]:
    from bemerc.models.profiles import load_profile, prepare_stage
    from bemerc.train.tune.model import load_llm

    path = prepare_stage(load_profile("offline").stage("llm"), lambda stage, message: None)
    rows = []
    models = {dtype: load_llm(path, dtype)[0] for dtype in (torch.float32, torch.bfloat16)}
    hidden = models[torch.float32].config.hidden_size
    x32 = torch.randn(4, tokens // 4, hidden)
    for name in ("attention", "mlp", "lm_head"):
        ms = {}
        for dtype, model in models.items():
            layer = model.model.layers[0]
            x = x32.to(dtype)
            if name == "attention":
                rotary = model.model.rotary_emb
                positions = torch.arange(x.shape[1])[None].expand(x.shape[0], -1)
                cos_sin = rotary(x, positions)
                ms[dtype] = best_ms(train_step(lambda h, cs=cos_sin, a=layer.self_attn: a(h, position_embeddings=cs, attention_mask=None), x))
            elif name == "mlp":
                ms[dtype] = best_ms(train_step(layer.mlp, x))
            else:
                ms[dtype] = best_ms(train_step(model.lm_head, x[:1, :256]))
        rows.append((f"LLM {name} (fwd+bwd)", ms[torch.float32], ms[torch.bfloat16]))
    drop = torch.nn.Dropout(0.05).train()
    wide = torch.randn(tokens, models[torch.float32].config.intermediate_size)
    rows.append(("LoRA dropout 0.05 on the down_proj input", best_ms(lambda: drop(wide)), best_ms(lambda: drop(wide.bfloat16()))))
    return rows


def whisper_parts() -> list[tuple[str, float, float]]:
    import torch.nn.functional as F

    from bemerc.extract.audio import AudioExtractor

    extractor = AudioExtractor(precision="fp32")
    encoder = extractor.model.encoder
    half = copy.deepcopy(encoder)
    for module in half.modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv1d)):
            module.to(torch.bfloat16)
    mel = torch.randn(1, extractor.model.dims.n_mels, 400)  # 4 s

    def convs(enc, dtype):
        def run():
            with torch.inference_mode():
                F.gelu(enc.conv2(F.gelu(enc.conv1(mel.to(dtype)))))
        return run

    with torch.inference_mode():
        states = F.gelu(encoder.conv2(F.gelu(encoder.conv1(mel)))).permute(0, 2, 1)

    def blocks(enc, dtype):
        def run():
            with torch.inference_mode():
                x = states.to(dtype)
                for block in enc.blocks:
                    x = block(x)
        return run

    return [("Whisper convolutions (4 s)", best_ms(convs(encoder, torch.float32)), best_ms(convs(half, torch.bfloat16))),
            ("Whisper blocks (4 s)", best_ms(blocks(encoder, torch.float32)), best_ms(blocks(half, torch.bfloat16)))]


def minilm() -> list[tuple[str, float, float]]:
    from bemerc.extract.text import TextExtractor

    texts = ["I can't believe you said that to her, after all this time!"] * 32
    fp32, bf16 = TextExtractor(precision="fp32"), TextExtractor(precision="bf16")
    return [("MiniLM, 32 utterances", best_ms(lambda: fp32.embed(texts)), best_ms(lambda: bf16.embed(texts)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=1024)
    args = parser.parse_args()
    if not cpu_has_bf16():
        print("this CPU has no bf16 matrix units (AMX or AVX512-BF16): auto precision is fp32, nothing to compare")
        return
    torch.set_num_threads(args.threads)
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores, {args.threads} threads")
    print(f"{'part':45s} {'fp32 ms':>9s} {'bf16 ms':>9s} {'bf16 gain':>9s}")
    for name, a, b in llm_parts(args.tokens) + whisper_parts() + minilm():
        print(f"{name:45s} {a:9.1f} {b:9.1f} {a / b:8.2f}x", flush=True)


if __name__ == "__main__":
    main()
