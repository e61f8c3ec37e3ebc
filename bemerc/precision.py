"""Numeric precision of the neural stages (tuning, the text and speech encoders, prediction).

``--precision auto`` picks bf16 where the hardware multiplies bf16 matrices natively (a CUDA GPU that
supports bf16, or a CPU that reports AMX or AVX512-BF16 in ``/proc/cpuinfo``) and fp32 elsewhere, so a
machine without bf16 support runs exactly as before. Light (torch is imported only to ask about a GPU).

>>> resolve("fp32", "cpu")
'fp32'
>>> resolve("bf16", "cpu")
'bf16'
"""

from __future__ import annotations

import functools
from pathlib import Path

PRECISIONS = ("auto", "fp32", "bf16")
DEFAULT_PRECISION = "auto"
CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # /proc/cpuinfo flags of bf16 matrix instructions


@functools.cache
def cpu_has_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """True when the CPU reports bf16 matrix instructions (AMX or AVX512-BF16); False where it cannot be read."""
    try:
        flags = Path(cpuinfo).read_text()
    except OSError:
        return False
    return any(flag in flags for flag in CPU_BF16_FLAGS)


def torch_dtype(precision: str):
    """The torch dtype of a resolved precision (``fp32`` or ``bf16``)."""
    import torch

    return torch.bfloat16 if precision == "bf16" else torch.float32


def resolve(precision: str, device: str = "cpu") -> str:
    """``auto`` | ``fp32`` | ``bf16`` -> ``fp32`` or ``bf16`` for ``device`` (``cpu`` or ``cuda``)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, found {precision!r}")
    if precision != "auto":
        return precision
    if device.startswith("cuda"):
        import torch

        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_bf16() else "fp32"
