"""bemerc's own facial expression network: a small residual CNN trained on real faces (RAF-DB, FER2013).

One readable file: the network, its shape (:class:`ExpressionNetDims`, saved in the weights file's
metadata), the crop it reads, save / load (safetensors, for training) and the ONNX export that
extraction runs with onnxruntime (1 ms a face on one core; torch's eager calls cost several times that).
``bemerc models train-expression`` rebuilds the shipped weights (``bemerc/models/expression/``; how, on which data and how well: the MODEL_CARD.md beside them).

The crop: the face mesh's box on the frame (:class:`~bemerc.extract.behavior.face.FaceFinder`), made
square, ``box_scale`` times its longer side, resized to ``input_side`` pixels, RGB scaled to [0, 1] and
standardised with ``mean``/``std``. Training crops are cut from the same boxes on the training images,
so the network sees at training what the pipeline gives it.

Outputs: seven expression logits in :data:`EXPRESSIONS` order and, from :meth:`ExpressionNet.embed`,
the ``width[-1]``-dimensional penultimate features (pooled, before the classifier): the face embedding
the visual stage stores.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bemerc.extract.behavior.expression import EXPRESSIONS, ExpressionNetDims  # the shape lives beside the models: no torch needed to read it


class Block(nn.Module):
    """A pre-activation-free basic residual block: conv-BN-ReLU-conv-BN plus a (strided) shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


class ExpressionNet(nn.Module):
    """(N, 3, S, S) standardised face crops -> (N, n_classes) logits; :meth:`embed` gives the pooled features."""

    def __init__(self, dims: ExpressionNetDims):
        super().__init__()
        self.dims = dims
        w0 = dims.widths[0]
        # stem: 3x3 stride 2 (halves the side), then stage 1 at that side; each later stage halves it again
        self.stem = nn.Sequential(nn.Conv2d(3, w0, 3, 2, 1, bias=False), nn.BatchNorm2d(w0), nn.ReLU(inplace=True))
        stages, c_in = [], w0
        for i, (width, count) in enumerate(zip(dims.widths, dims.blocks)):
            for j in range(count):
                stages.append(Block(c_in, width, 2 if (i > 0 and j == 0) else 1))
                c_in = width
        self.stages = nn.Sequential(*stages)
        self.dropout = nn.Dropout(dims.dropout)
        self.head = nn.Linear(c_in, dims.n_classes)

    @property
    def embed_dim(self) -> int:
        return self.dims.widths[-1]

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(x)).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.embed(x)))

    def param_groups(self, weight_decay: float) -> list[dict]:
        """Weight decay on conv and linear weights only (not on BatchNorm or biases)."""
        decay = [p for n, p in self.named_parameters() if p.ndim > 1]
        other = [p for n, p in self.named_parameters() if p.ndim <= 1]
        return [{"params": decay, "weight_decay": weight_decay}, {"params": other, "weight_decay": 0.0}]

    def standardise(self, x: torch.Tensor) -> torch.Tensor:
        """RGB crops in [0, 1] (N, 3, S, S) -> the network's input: standardised with the dims' mean and std."""
        mean = torch.tensor(self.dims.mean, dtype=x.dtype).view(1, 3, 1, 1)
        std = torch.tensor(self.dims.std, dtype=x.dtype).view(1, 3, 1, 1)
        return ((x - mean) / std).contiguous(memory_format=torch.channels_last)


def save_expression_net(model: ExpressionNet, path: str | Path, extra: dict | None = None) -> Path:
    """Weights as safetensors, the dims (and ``extra``: training facts) in its metadata."""
    from safetensors.torch import save_file

    state = {k: v.detach().float().contiguous() for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    metadata = {"dims": json.dumps(asdict(model.dims)), **({"training": json.dumps(extra)} if extra else {})}
    save_file(state, str(path), metadata=metadata)
    return Path(path)


class _Deployed(nn.Module):
    """What the ONNX file computes: uint8-valued RGB crops (N, S, S, 3) as float32 -> (probabilities, embedding).
    With ``dims.flip_average`` each crop is read with its mirror image in one batch, and the two readings'
    probabilities and embeddings are averaged (training flips faces at random, so both are faces it knows)."""

    def __init__(self, model: ExpressionNet):
        super().__init__()
        self.model = model

    def forward(self, crops: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.model.standardise(crops.permute(0, 3, 1, 2) / 255.0)
        if not self.model.dims.flip_average:
            embedding = self.model.embed(x)
            return self.model.head(embedding).softmax(-1), embedding
        n = x.shape[0]
        embeddings = self.model.embed(torch.cat([x, x.flip(-1)]))
        probabilities = self.model.head(embeddings).softmax(-1)
        return (probabilities[:n] + probabilities[n:]) / 2, (embeddings[:n] + embeddings[n:]) / 2


def export_onnx(model: ExpressionNet, path: str | Path, extra: dict | None = None) -> Path:
    """The network as ONNX (what extraction runs, with onnxruntime): input ``crops`` float32 (N, S, S, 3)
    RGB 0-255, outputs ``probabilities`` (N, 7) and ``embedding`` (N, widths[-1]); the dims (and
    ``extra``) in its metadata. Needs the ``onnx`` package (training only)."""
    import onnx

    model = model.eval().to(memory_format=torch.contiguous_format)
    side = model.dims.input_side
    tmp = Path(path).with_suffix(".tmp.onnx")
    torch.onnx.export(_Deployed(model), (torch.zeros(2, side, side, 3),), str(tmp), input_names=["crops"],
                      output_names=["probabilities", "embedding"], dynamic_axes={"crops": {0: "n"}}, opset_version=17,
                      dynamo=False)
    graph = onnx.load(str(tmp))
    for key, value in {"dims": json.dumps(asdict(model.dims)), **({"training": json.dumps(extra)} if extra else {})}.items():
        graph.metadata_props.add(key=key, value=value)
    onnx.save(graph, str(tmp))
    tmp.replace(path)
    return Path(path)


def quantize_onnx(src: str | Path, dst: str | Path, calibration: np.ndarray) -> Path:
    """An int8 copy of an exported network, with the source's metadata: ONNX QDQ, the convolutions'
    weights int8 per output channel (7-bit, so CPUs without VNNI cannot saturate) and their inputs uint8,
    ranges calibrated on ``calibration`` (float32 crops (N, S, S, 3) 0-255, as the network reads them;
    99.999th percentile); pooling, head and softmax stay float, so probabilities and embeddings are not
    rounded to 1/255. onnxruntime runs it about twice as fast as the fp32 file on one core
    (``bench/expression.py`` measures both). Needs the ``onnx`` package (training only)."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Crops(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"crops": calibration[i : i + 1].astype(np.float32)} for i in range(len(calibration))])

        def get_next(self):
            return next(self.batches, None)

    dst = Path(dst)
    prepared, tmp = dst.with_suffix(".pre.onnx"), dst.with_suffix(".tmp.onnx")
    try:
        quant_pre_process(str(src), str(prepared))
        quantize_static(str(prepared), str(tmp), Crops(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        reduce_range=True, op_types_to_quantize=["Conv"],
                        calibrate_method=CalibrationMethod.Percentile)
        graph = onnx.load(str(tmp))
        del graph.metadata_props[:]
        for prop in onnx.load(str(src)).metadata_props:
            graph.metadata_props.add(key=prop.key, value=prop.value)
        graph.metadata_props.add(key="quantized", value="int8 QDQ convolutions (per-channel 7-bit weights, uint8 inputs); float pooling, head, softmax")
        onnx.save(graph, str(tmp))
        tmp.replace(dst)
    finally:
        prepared.unlink(missing_ok=True)
        tmp.unlink(missing_ok=True)
    return dst


def load_expression_net(path: str | Path) -> ExpressionNet:
    """The network saved by :func:`save_expression_net`, in eval mode; ValueError naming the file when
    it is not such a file."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), "pt") as handle:
            metadata = handle.metadata() or {}
        dims = ExpressionNetDims.from_json(metadata["dims"])
        model = ExpressionNet(dims)
        missing, unexpected = model.load_state_dict(load_file(str(path)), strict=False)
    except (OSError, KeyError, json.JSONDecodeError, TypeError, RuntimeError) as error:
        raise ValueError(f"{path}: not a bemerc expression network ({type(error).__name__}: {error})") from None
    if unexpected or [k for k in missing if not k.endswith("num_batches_tracked")]:
        raise ValueError(f"{path}: weights do not match the saved dims (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model.eval()
