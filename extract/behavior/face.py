"""Faces in sampled frames: detect, measure, follow across frames, and pick the speaker.

For one utterance (frames from :func:`bemerc.extract.media.sample_frames`):

1. :meth:`FaceFinder.find` runs MediaPipe's full-range face detector on the frame (it finds faces down
   to about 50 px at 640 px frame width, which TV scenes need); when it finds none, the short-range
   detector (close-ups: it finds 98% of RAF-DB's and FER2013's photo crops, the full-range one 64%
   and 59%); then the 478-point face mesh on a square crop around each detected face.
2. :func:`track_faces` links the faces of consecutive frames by box overlap (IoU) into tracks.
3. :func:`pick_speaker` chooses the speaker's track (rule in its docstring).
4. :func:`face_measures` turns the speaker's landmarks of one frame into scale-free facial action
   measures and head angles (:data:`FACE_MEASURES`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

# MediaPipe face-mesh vertex ids. "Right" is the subject's right (image left for a frontal face).
RIGHT_EYE_CORNERS = (33, 133)  # outer, inner
LEFT_EYE_CORNERS = (263, 362)
RIGHT_EYE_LIDS = ((160, 144), (159, 145), (158, 153))  # (upper, lower) pairs
LEFT_EYE_LIDS = ((385, 380), (386, 374), (387, 373))
RIGHT_BROW = (63, 105, 66)  # upper brow arch
LEFT_BROW = (293, 334, 296)
INNER_BROWS = (55, 285)
MOUTH_CORNERS = (61, 291)
UPPER_LIP_OUTER, UPPER_LIP_INNER, LOWER_LIP_INNER, LOWER_LIP_OUTER = 0, 13, 14, 17
FOREHEAD, CHIN = 10, 152

FACE_MEASURES = (
    "brow_raise",     # brow arch height above the eye line
    "brow_gap",       # distance between the inner brow ends (falls when the brows knit)
    "eye_open",       # eyelid gap / eye width (eye aspect ratio), both eyes averaged
    "mouth_open",     # inner-lip gap
    "mouth_width",    # corner-to-corner width (rises with a smile or a stretch)
    "smile",          # height of the mouth corners above the lip midline (negative: corners down)
    "lip_thickness",  # visible red of both lips (falls when the lips press together)
    "head_yaw",       # radians, + = the face turns towards the image right
    "head_pitch",     # radians, + = the chin moves away from the camera (head bows)
    "head_roll",      # radians, + = the eye line tilts clockwise in the image
)
"""Per-frame face measures. Lengths are divided by the inter-ocular distance (between the eye
centres), so they do not depend on face size or distance from the camera."""


@dataclass
class Face:
    """One face in one frame: ``box`` (4,) x0, y0, x1, y1 in pixels; ``landmarks`` (478, 3) x, y in
    pixels and z (depth, same scale as x, smaller = nearer the camera)."""

    box: np.ndarray
    landmarks: np.ndarray

    @property
    def area(self) -> float:
        return float((self.box[2] - self.box[0]) * (self.box[3] - self.box[1]))


@dataclass
class FaceTrack:
    """The same face followed through an utterance: ``faces`` maps a frame index to its :class:`Face`."""

    faces: dict[int, Face] = field(default_factory=dict)

    @property
    def last_box(self) -> np.ndarray:
        return self.faces[max(self.faces)].box

    def mouth_motion(self) -> float:
        """Standard deviation over frames of the inner-lip gap / inter-ocular distance (0 for one frame)."""
        mouth_open = FACE_MEASURES.index("mouth_open")
        return float(np.std([face_measures(face.landmarks)[mouth_open] for face in self.faces.values()]))

    def mean_area(self) -> float:
        return float(np.mean([face.area for face in self.faces.values()]))

    def centre_offset(self, frame_size: tuple[int, int]) -> float:
        """Mean distance of the face centre from the frame centre, as a fraction of the frame diagonal."""
        height, width = frame_size
        centres = np.array([(f.box[:2] + f.box[2:]) / 2 for f in self.faces.values()])
        return float(np.mean(np.hypot(centres[:, 0] - width / 2, centres[:, 1] - height / 2)) / np.hypot(width, height))

    def box_near(self, index: int) -> np.ndarray:
        """The track's box in frame ``index``, or in the nearest frame where the face was found."""
        nearest = min(self.faces, key=lambda i: abs(i - index))
        return self.faces[nearest].box


# The face graphs inside the mediapipe wheel, and the option of MediaPipe's solutions API that loads
# each (the API takes options, not file paths): a profile's `face` stage names two of these files.
FACE_GRAPHS = {
    "face_detection_short_range.tflite": ("model_selection", 0),  # faces within ~2 m
    "face_detection_full_range_sparse.tflite": ("model_selection", 1),  # down to ~50 px (TV scenes)
    "face_landmark.tflite": ("refine_landmarks", False),  # 468 points
    "face_landmark_with_attention.tflite": ("refine_landmarks", True),  # 478: refined lips, eyes, irises
}
DEFAULT_FACE_FILES = {"detector": "face_detection/face_detection_full_range_sparse.tflite",
                      "close_detector": "face_detection/face_detection_short_range.tflite",
                      "landmarks": "face_landmark/face_landmark_with_attention.tflite"}


def graph_option(graphs: dict[str, tuple[str, object]], role: str, path: str | Path, option: str) -> object:
    """The solutions-API value of ``option`` that loads the graph file ``path`` (its file name must
    be one mediapipe ships: the API cannot load other files)."""
    name = Path(path).name
    if name not in graphs or graphs[name][0] != option:
        known = ", ".join(n for n, (o, _) in graphs.items() if o == option)
        raise ValueError(f"{role} graph {path}: MediaPipe's solutions API loads only its packaged graphs ({known})")
    return graphs[name][1]


class FaceFinder:
    """MediaPipe full-range face detection, then the 478-point face mesh on a crop around each face.

    The MediaPipe graphs are built once and reused for every frame (building them costs ~50 ms).

    >>> finder = FaceFinder(max_faces=4)  # doctest: +SKIP
    >>> faces = finder.find(frame)  # frame: uint8 (H, W, 3) RGB  # doctest: +SKIP
    >>> faces[0].landmarks.shape  # doctest: +SKIP
    (478, 3)
    """

    CROP_SIDE = 256  # face crops are resized to this before meshing: small faces need the upscale
    CROP_SCALE = 2.0  # crop side / detected box side; the mesh's own detector needs context
    RETRY_CROP_SCALE = 1.6  # the second try when the mesh finds no face in the first crop
    # The mesh re-detects the face inside the detector's crop. When it finds none at either scale, it tries
    # both again accepting a less sure detection (0.3, chosen on RAF-DB train faces: docs/expression.md,
    # "Finding the face in a photo"); faces found before are found as before.
    LENIENT_MESH_CONFIDENCE = 0.3

    def __init__(self, max_faces: int = 4, min_confidence: float = 0.5, files: dict[str, str | Path] | None = None,
                 lenient_confidence: float | None = LENIENT_MESH_CONFIDENCE):
        """``files``: the profile's ``detector`` and ``landmarks`` graphs and an optional
        ``close_detector`` tried when the detector finds no face (default: the full-range detector, the
        short-range one for close-ups, and the attention mesh, :data:`DEFAULT_FACE_FILES`).
        ``min_confidence``: the detectors' and the mesh's; ``lenient_confidence``: the mesh's in its last
        tries (None: no such tries)."""
        import mediapipe as mp

        files = files or DEFAULT_FACE_FILES
        self.max_faces = max_faces
        self._detector = mp.solutions.face_detection.FaceDetection(
            model_selection=graph_option(FACE_GRAPHS, "face detector", files["detector"], "model_selection"),
            min_detection_confidence=min_confidence,
        )
        self._close_detector = None
        if files.get("close_detector"):
            self._close_detector = mp.solutions.face_detection.FaceDetection(
                model_selection=graph_option(FACE_GRAPHS, "close-up face detector", files["close_detector"], "model_selection"),
                min_detection_confidence=min_confidence,
            )
        self._meshes = [mp.solutions.face_mesh.FaceMesh(
            static_image_mode=True, max_num_faces=1, min_detection_confidence=confidence,
            refine_landmarks=graph_option(FACE_GRAPHS, "face landmarks", files["landmarks"], "refine_landmarks"),
        ) for confidence in (min_confidence, lenient_confidence) if confidence is not None]

    @classmethod
    def settings(cls, lenient_confidence: float | None = LENIENT_MESH_CONFIDENCE) -> dict:
        """What decides the faces found besides the graphs, for a finder made with ``lenient_confidence``
        (part of every face stage's feature-set key and of train-expression's crop cache key)."""
        return {"crop_scale": cls.CROP_SCALE, "retry_crop_scale": cls.RETRY_CROP_SCALE, "lenient_mesh_confidence": lenient_confidence}

    def find(self, frame: np.ndarray) -> list[Face]:
        """Faces in one RGB frame (H, W, 3), most confident first, at most ``max_faces``."""
        height, width = frame.shape[:2]
        detections = self._detector.process(frame).detections or []
        if not detections and self._close_detector is not None:
            detections = self._close_detector.process(frame).detections or []
        faces = []
        for detection in sorted(detections, key=lambda d: -d.score[0])[: self.max_faces]:
            rel = detection.location_data.relative_bounding_box
            box = np.array([rel.xmin * width, rel.ymin * height, (rel.xmin + rel.width) * width,
                            (rel.ymin + rel.height) * height])
            face = self._mesh_in_box(frame, box)
            if face is not None:
                faces.append(face)
        return faces

    def _mesh_in_box(self, frame: np.ndarray, box: np.ndarray) -> Face | None:
        """The mesh on a crop around a detected ``box``; when it finds no face there, once more on a
        tighter crop (:data:`RETRY_CROP_SCALE`: it recovers about a third of the photo faces the
        first crop misses); then both crops again with the lenient mesh."""
        for mesh in self._meshes:
            for crop_scale in (self.CROP_SCALE, self.RETRY_CROP_SCALE):
                if (face := self._mesh_at_scale(mesh, frame, box, crop_scale)) is not None:
                    return face
        return None

    def _mesh_at_scale(self, mesh, frame: np.ndarray, box: np.ndarray, crop_scale: float) -> Face | None:
        side = crop_scale * max(box[2] - box[0], box[3] - box[1])
        crop, (x0, y0) = square_crop(frame, (box[:2] + box[2:]) / 2, side, self.CROP_SIDE)
        result = mesh.process(crop).multi_face_landmarks
        if not result:
            return None
        scale = side / self.CROP_SIDE
        points = np.array([(p.x, p.y, p.z) for p in result[0].landmark], dtype=np.float32) * self.CROP_SIDE * scale
        points[:, 0] += x0
        points[:, 1] += y0
        centre = points[:, :2].mean(axis=0)
        # The crop may hold a neighbour's face too: keep the mesh only if it lies on the detected face.
        if not (box[0] <= centre[0] <= box[2] and box[1] <= centre[1] <= box[3]):
            return None
        mesh_box = np.concatenate([points[:, :2].min(axis=0), points[:, :2].max(axis=0)])
        return Face(box=mesh_box, landmarks=points)

    def close(self) -> None:
        self._detector.close()
        if self._close_detector is not None:
            self._close_detector.close()
        for mesh in self._meshes:
            mesh.close()


def square_crop(image: np.ndarray, centre: np.ndarray, side: float, out_side: int) -> tuple[np.ndarray, tuple[int, int]]:
    """A ``side`` x ``side`` square of ``image`` around ``centre``, resized to ``out_side``.

    Parts outside the image are filled by repeating the border. Returns the crop and the crop's
    top-left corner in image pixels (to map crop coordinates back).
    """
    side_px = max(int(round(side)), 2)
    x0 = int(round(centre[0] - side_px / 2))
    y0 = int(round(centre[1] - side_px / 2))
    height, width = image.shape[:2]
    pad = max(0, -x0, -y0, x0 + side_px - width, y0 + side_px - height)
    if pad:
        image = cv2.copyMakeBorder(image, pad, pad, pad, pad, cv2.BORDER_REPLICATE)
    crop = image[y0 + pad : y0 + pad + side_px, x0 + pad : x0 + pad + side_px]
    interpolation = cv2.INTER_AREA if side_px > out_side else cv2.INTER_LINEAR
    return cv2.resize(crop, (out_side, out_side), interpolation=interpolation), (x0, y0)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    inter_w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    inter_h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = inter_w * inter_h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def track_faces(faces_per_frame: list[list[Face]], min_iou: float = 0.3) -> list[FaceTrack]:
    """Link faces across frames: each face joins the track whose latest box overlaps it most
    (IoU >= ``min_iou``, best pairs first), else it starts a new track."""
    tracks: list[FaceTrack] = []
    for index, faces in enumerate(faces_per_frame):
        pairs = sorted(
            ((_iou(face.box, track.last_box), f, t) for f, face in enumerate(faces) for t, track in enumerate(tracks)),
            key=lambda pair: -pair[0],
        )
        used_faces: set[int] = set()
        used_tracks: set[int] = set()
        for overlap, f, t in pairs:
            if overlap < min_iou:
                break
            if f in used_faces or t in used_tracks:
                continue
            tracks[t].faces[index] = faces[f]
            used_faces.add(f)
            used_tracks.add(t)
        tracks += [FaceTrack({index: face}) for f, face in enumerate(faces) if f not in used_faces]
    return tracks


def pick_speaker(
    tracks: list[FaceTrack], frame_size: tuple[int, int], min_presence: float = 0.5, tie_margin: float = 0.02
) -> FaceTrack | None:
    """The track most likely to be the speaker, or None when there are no tracks.

    Rule (MELD scenes often show several people):

    1. Candidates are the tracks seen in at least ``min_presence`` times as many frames as the most
       persistent track, so a face glimpsed in one frame cannot win.
    2. The speaker moves their lips: each candidate scores the standard deviation over frames of
       its inner-lip gap / inter-ocular distance (:meth:`FaceTrack.mouth_motion`).
    3. Candidates within ``tie_margin`` of the best score are tied (a still image, or nobody
       talking); the tie goes to the largest mean face box, then to the face nearest the frame centre.
    """
    if not tracks:
        return None
    longest = max(len(track.faces) for track in tracks)
    candidates = [track for track in tracks if len(track.faces) >= min_presence * longest]
    best = max(track.mouth_motion() for track in candidates)
    tied = [track for track in candidates if track.mouth_motion() >= best - tie_margin]
    return max(tied, key=lambda track: (track.mean_area(), -track.centre_offset(frame_size)))


def _eye_centres(landmarks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    right = landmarks[list(RIGHT_EYE_CORNERS), :2].mean(axis=0)
    left = landmarks[list(LEFT_EYE_CORNERS), :2].mean(axis=0)
    return right, left


def _eye_aspect_ratio(landmarks: np.ndarray, corners: tuple[int, int], lids: tuple[tuple[int, int], ...]) -> float:
    width = np.linalg.norm(landmarks[corners[0], :2] - landmarks[corners[1], :2])
    gaps = [np.linalg.norm(landmarks[upper, :2] - landmarks[lower, :2]) for upper, lower in lids]
    return float(np.mean(gaps) / max(width, 1e-6))


def head_angles(landmarks: np.ndarray) -> tuple[float, float, float]:
    """(yaw, pitch, roll) in radians from the 3-D mesh: the eye line gives yaw (its depth slope) and
    roll (its image slope); the forehead-to-chin line, made perpendicular to the eye line, gives pitch."""
    right, left = landmarks[RIGHT_EYE_CORNERS[0]], landmarks[LEFT_EYE_CORNERS[0]]
    across = left - right
    across /= np.linalg.norm(across)
    down = landmarks[CHIN] - landmarks[FOREHEAD]
    down -= down.dot(across) * across
    down /= np.linalg.norm(down)
    yaw = np.arctan2(across[2], across[0])
    pitch = np.arctan2(down[2], down[1])
    roll = np.arctan2(across[1], across[0])
    return float(yaw), float(pitch), float(roll)


def face_measures(landmarks: np.ndarray) -> np.ndarray:
    """The :data:`FACE_MEASURES` of one face: float32 (10,) from landmarks (478, 3).

    Points are first expressed in a face frame: origin between the eye centres, u along the eye
    line, v perpendicular to it pointing to the chin, unit = inter-ocular distance. Head roll and
    face size therefore do not change the lengths.
    """
    right_eye, left_eye = _eye_centres(landmarks)
    origin = (right_eye + left_eye) / 2
    axis_u = left_eye - right_eye
    iod = max(float(np.linalg.norm(axis_u)), 1e-6)
    axis_u = axis_u / iod
    axis_v = np.array([-axis_u[1], axis_u[0]])  # u rotated +90 degrees: points down the face
    flat = (landmarks[:, :2] - origin) / iod
    u, v = flat @ axis_u, flat @ axis_v

    brow_raise = -float(np.mean(v[list(RIGHT_BROW + LEFT_BROW)]))
    brow_gap = float(u[INNER_BROWS[1]] - u[INNER_BROWS[0]])
    eye_open = (_eye_aspect_ratio(landmarks, RIGHT_EYE_CORNERS, RIGHT_EYE_LIDS)
                + _eye_aspect_ratio(landmarks, LEFT_EYE_CORNERS, LEFT_EYE_LIDS)) / 2
    mouth_open = max(float(v[LOWER_LIP_INNER] - v[UPPER_LIP_INNER]), 0.0)
    mouth_width = float(u[MOUTH_CORNERS[1]] - u[MOUTH_CORNERS[0]])
    lip_midline = (v[UPPER_LIP_INNER] + v[LOWER_LIP_INNER]) / 2
    smile = float(lip_midline - v[list(MOUTH_CORNERS)].mean())
    lip_thickness = float((v[UPPER_LIP_INNER] - v[UPPER_LIP_OUTER]) + (v[LOWER_LIP_OUTER] - v[LOWER_LIP_INNER]))
    yaw, pitch, roll = head_angles(landmarks)
    return np.array([brow_raise, brow_gap, eye_open, mouth_open, mouth_width, smile, lip_thickness, yaw, pitch, roll],
                    dtype=np.float32)


def inter_ocular_distance(landmarks: np.ndarray) -> float:
    """Distance in pixels between the eye centres (the unit of all face lengths)."""
    right, left = _eye_centres(landmarks)
    return float(np.linalg.norm(left - right))
