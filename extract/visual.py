"""Visual scene embedding: open_clip image embeddings of sampled frames, mean-pooled per utterance.

Offline there are no CLIP weights, so the default is a small architecture (ViT-S-32, 22 M visual
parameters) with random weights drawn from a fixed seed: the pipeline runs end to end, the rows are
reproducible, and ``random_weights`` marks them so no report treats them as a real embedding. With
network, pass a pretrained tag, e.g. ``ClipVisualExtractor("ViT-B-32", "laion2b_s34b_b79k")``.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
from pathlib import Path
from functools import cached_property

import numpy as np
import pyarrow as pa

from bemerc.extract.base import MEDIA_INPUTS, TorchDevice, UtteranceMedia, vector_field
from bemerc.extract.behavior.extractor import rows_from_video
from bemerc.extract.media import FRAME_SAMPLING, MediaError, evenly_spaced
from bemerc.models.profiles import Profile


def open_clip_config(model_name: str) -> dict | None:
    """open_clip's architecture config of ``model_name`` (its ``model_configs/NAME.json``), read
    without importing open_clip, so asking for the extractor's config stays cheap; None if unknown.

    >>> open_clip_config("ViT-S-32")["embed_dim"]
    384
    """
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("open_clip is not installed: run `make setup`")
    path = Path(list(spec.submodule_search_locations)[0]) / "model_configs" / f"{model_name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


class ClipVisualExtractor(TorchDevice):
    """One L2-normalised open_clip image embedding per utterance (modality "visual").

    Frames are sampled at ``fps`` (at most ``max_frames``, evenly spread over the utterance), each is
    embedded by the image tower, the embeddings are averaged and the mean is L2-normalised.

    >>> extractor = ClipVisualExtractor("ViT-S-32", pretrained=None)  # doctest: +SKIP
    >>> [row] = extractor.extract([UtteranceMedia("u1", video_path="clip.mp4")])  # doctest: +SKIP
    >>> row["vector"].shape  # doctest: +SKIP
    (384,)
    """

    modality = "visual"
    inputs = MEDIA_INPUTS
    FRAME_SIDE = 448  # frames are decoded this large; open_clip's preprocess resizes them to the model's input

    def __init__(
        self,
        model_name: str = "ViT-S-32",
        pretrained: str | None = None,
        fps: float = 2.0,
        max_frames: int = 8,
        seed: int = 0,
        num_threads: int = 2,
        device: str | None = None,
    ):
        model_config = open_clip_config(model_name)
        if model_config is None:
            raise ValueError(f"unknown open_clip model {model_name!r}; expected one of open_clip.list_models()")
        self.model_name = model_name
        self.pretrained = None if pretrained in (None, "", "none") else pretrained
        self.fps = fps
        self.max_frames = max_frames
        self.seed = seed
        self.num_threads = num_threads
        self.requested_device = device  # resolved with the model: a run with nothing to do imports no torch
        self.random_weights = self.pretrained is None
        self.name = f"openclip-{model_name}" + (f"-{self.pretrained}" if self.pretrained else "-random")
        self.dim = int(model_config["embed_dim"])

    @classmethod
    def from_profile(cls, profile: Profile, **options) -> "ClipVisualExtractor":
        """The extractor of a profile's ``visual`` stage (an ``open-clip`` entry)."""
        entry = profile.stage("visual")
        return cls(entry.source, entry.options.get("pretrained"), **options)

    @cached_property
    def _model(self):
        """(image tower, preprocess): built once; random weights come from ``seed``."""
        import open_clip
        import torch

        torch.set_num_threads(self.num_threads)
        with torch.random.fork_rng():
            torch.manual_seed(self.seed)
            model, _, preprocess = open_clip.create_model_and_transforms(self.model_name, pretrained=self.pretrained)
        return model.visual.to(self.device).eval(), preprocess

    def config(self) -> dict:
        """Model, weights and sampling: everything that changes the vectors."""
        return {
            "model": self.model_name, "pretrained": self.pretrained, "seed": self.seed if self.random_weights else None,
            "weights_sha256": self._weights_sha256(), "fps": self.fps, "frame_sampling": FRAME_SAMPLING, "max_frames": self.max_frames, "dim": self.dim,
        }

    def _weights_sha256(self) -> str:
        """sha256 of the image tower's parameters (names and bytes), so a changed download is a new feature set.

        Cached in the models folder by everything that decides the weights, so that asking for the
        config (to find what is already stored) does not build the model each time.
        """
        from bemerc.models.profiles import models_dir

        versions = f"oc{importlib.metadata.version('open_clip_torch')}-torch{importlib.metadata.version('torch')}"
        key = f"{self.model_name}-{self.pretrained}-{self.seed}-{versions}"
        cache = models_dir() / "visual-weights-sha256" / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.txt"
        if cache.is_file():
            return cache.read_text().strip()
        digest = hashlib.sha256()
        for name, tensor in self._model[0].state_dict().items():
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.with_suffix(".tmp").write_text(digest.hexdigest())
        cache.with_suffix(".tmp").replace(cache)
        return digest.hexdigest()

    def fields(self) -> list[pa.Field]:
        return [vector_field("vector", self.dim), pa.field("frames", pa.int32())]

    def extract(self, items: list[UtteranceMedia]) -> list[dict | MediaError]:
        """One row (or a MediaError naming the file and the problem) per item, in order."""
        return rows_from_video(items, self.fps, self.FRAME_SIDE, lambda frames, _times, _path: {
            "vector": self.embed(frames), "frames": min(len(frames), self.max_frames)})

    def embed(self, frames: np.ndarray) -> np.ndarray:
        """RGB frames (T, H, W, 3) uint8 -> float32 (dim,) unit-length mean embedding of up to ``max_frames``."""
        import torch
        from PIL import Image

        tower, preprocess = self._model
        batch = torch.stack([preprocess(Image.fromarray(frame)) for frame in evenly_spaced(frames, self.max_frames)]).to(self.device)
        with torch.inference_mode():
            mean = tower(batch).float().mean(dim=0)
        return (mean / mean.norm().clamp_min(1e-12)).cpu().numpy().astype(np.float32)


class FaceEmbeddingExtractor:
    """The speaker's face embedding per utterance (modality "visual"; the offline profile's default).

    Frames are sampled at ``fps`` (at most ``max_frames``, evenly spread); the behaviour stage's face
    finder and speaker rule pick the speaker's face in each; bemerc's expression network
    (:class:`~bemerc.extract.behavior.expression.NetExpression`) embeds each face crop (its pooled
    penultimate features); the mean over frames is L2-normalised.
    An utterance where no face is found is a :class:`MediaError` (no row: the modality is absent).

    It lives in the visual stage because that is what the visual vector is for downstream (baseline,
    tune and /predict read it like any other modality), and offline it replaces an image tower of
    random weights with one trained on real faces.
    """

    modality = "visual"
    inputs = MEDIA_INPUTS
    random_weights = False
    gpu_capable = False  # MediaPipe and a 1 ms network on CPU cores: a Ray actor asks for no GPU

    def __init__(self, weights_path: str | Path | None = None, fps: float = 2.0, max_frames: int = 8, max_side: int = 640,
                 face_files: dict[str, str | Path] | None = None, num_threads: int = 1):
        from bemerc.extract.behavior.extractor import mediapipe_graphs
        from bemerc.extract.behavior.face import DEFAULT_FACE_FILES

        self.weights_path = weights_path
        self.fps = fps
        self.max_frames = max_frames
        self.max_side = max_side
        self.num_threads = num_threads
        self.face_files = mediapipe_graphs(face_files or DEFAULT_FACE_FILES)
        self.name = "bemerc-face"

    @classmethod
    def from_profile(cls, profile: Profile, **options) -> "FaceEmbeddingExtractor":
        """The extractor of a profile's ``visual`` stage of kind ``files`` with the role ``net``, finding
        faces with the profile's ``face`` stage."""
        from bemerc.models.profiles import prepare_stage, stage_files

        for stage in ("face", "visual"):
            prepare_stage(profile.stage(stage))
        options.pop("device", None)  # runs on CPU: a small network
        return cls(stage_files(profile.stage("visual"))["net"], face_files=stage_files(profile.stage("face")), **options)

    @cached_property
    def _net(self):
        from bemerc.extract.behavior.expression import NetExpression

        return NetExpression(self.weights_path, num_threads=self.num_threads)

    @cached_property
    def _faces(self):
        from bemerc.extract.behavior.face import FaceFinder

        return FaceFinder(files=self.face_files)

    @property
    def dim(self) -> int:
        return self._net.embed_dim

    def config(self) -> dict:
        from bemerc.extract.behavior.extractor import graph_digests, mediapipe_version
        from bemerc.extract.behavior.face import FaceFinder

        graphs = graph_digests(self.face_files.values())
        return {"model": self.name, "net": self._net.config(), "fps": self.fps, "frame_sampling": FRAME_SAMPLING,
                "max_frames": self.max_frames, "max_side": self.max_side, "mediapipe": mediapipe_version(),
                "mediapipe_models": graphs, "face_finder": FaceFinder.settings(), "speaker_rule": "mouth-motion-then-area", "dim": self.dim}

    def fields(self) -> list[pa.Field]:
        return [vector_field("vector", self.dim), pa.field("frames", pa.int32())]

    def extract(self, items: list[UtteranceMedia]) -> list[dict | MediaError]:
        """One row (or a MediaError naming the file and the problem) per item, in order."""
        return rows_from_video(items, self.fps, self.max_side, self._row)

    def _row(self, frames: np.ndarray, _times: np.ndarray, path: str) -> dict:
        vector, count = self.embed(frames)
        if vector is None:
            raise MediaError(path, f"no face found in {len(frames)} frames")
        return {"vector": vector, "frames": count}

    def embed(self, frames: np.ndarray) -> tuple[np.ndarray | None, int]:
        """(unit-length mean face embedding float32 (dim,) or None when no face is found, faces used)."""
        from bemerc.extract.behavior.face import pick_speaker, track_faces

        frames = evenly_spaced(frames, self.max_frames)
        speaker = pick_speaker(track_faces([self._faces.find(frame) for frame in frames]), frames.shape[1:3])
        if speaker is None:
            return None, 0
        crops = np.stack([self._net.crop(frames[t], face.box) for t, face in sorted(speaker.faces.items())])
        mean = self._net.probabilities_and_embeddings(crops)[1].mean(axis=0)
        return (mean / max(float(np.linalg.norm(mean)), 1e-12)).astype(np.float32), len(crops)
