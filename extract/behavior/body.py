"""Body pose in sampled frames: posture measures and movement energy.

:class:`PoseFinder` runs MediaPipe Pose (33 landmarks) on the region below the speaker's face
(:func:`body_region`), so in a scene with several people the body belongs to the chosen speaker.
:func:`posture_measures` turns one pose into :data:`POSTURE_MEASURES`; :func:`frame_motion` turns a
sequence of points into movement per second (used for body, hands and head).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

# MediaPipe Pose landmark ids ("left" is the subject's left).
NOSE, LEFT_EAR, RIGHT_EAR = 0, 7, 8
LEFT_SHOULDER, RIGHT_SHOULDER = 11, 12
LEFT_WRIST, RIGHT_WRIST = 15, 16
HAND_POINTS = tuple(range(15, 23))  # wrists, pinkies, index fingers, thumbs
LEFT_HIP, RIGHT_HIP = 23, 24
UPPER_BODY = tuple(range(0, 23))  # head, shoulders, arms, hands: what a seated or close shot shows

VISIBLE = 0.5  # MediaPipe visibility above which a landmark counts as seen

POSTURE_MEASURES = (
    "lean",            # radians, + = shoulders nearer the camera than the hips (leans forward)
    "shoulder_tilt",   # radians, angle of the shoulder line in the image
    "neck_length",     # ear-to-shoulder height / shoulder width (falls when the shoulders hunch up)
    "arms_crossed",    # 1 when both wrists are seen across the body midline below the shoulders, else 0
    "hand_near_face",  # 1 - (nearest visible hand point to the nose) / shoulder width, floored at 0
    "hand_height",     # highest visible wrist above the shoulder line / shoulder width; NaN if no wrist seen
    "hands_visible",   # fraction of the two wrists that are visible
)
"""Per-frame posture measures; lengths are in shoulder widths so they do not depend on image size."""


@dataclass
class BodyPose:
    """One body in one frame: ``points`` (33, 2) pixels, ``visibility`` (33,) in [0, 1],
    ``world`` (33, 3) metres from the hip centre (x right, y down, z away from the camera)."""

    points: np.ndarray
    visibility: np.ndarray
    world: np.ndarray

    @property
    def shoulder_width(self) -> float:
        return float(max(np.linalg.norm(self.points[LEFT_SHOULDER] - self.points[RIGHT_SHOULDER]), 1e-6))

    def visible_points(self, ids: tuple[int, ...]) -> np.ndarray:
        """(len(ids), 2) pixels with NaN rows for landmarks that are not visible."""
        points = self.points[list(ids)].copy()
        points[self.visibility[list(ids)] < VISIBLE] = np.nan
        return points


# The pose graphs inside the mediapipe wheel and the solutions-API option that loads each; the lite
# and heavy landmark models are not in the wheel (MediaPipe would download them at run time).
POSE_GRAPHS = {
    "pose_detection.tflite": ("detector", None),
    "pose_landmark_lite.tflite": ("model_complexity", 0),
    "pose_landmark_full.tflite": ("model_complexity", 1),
    "pose_landmark_heavy.tflite": ("model_complexity", 2),
}
DEFAULT_POSE_FILES = {"detector": "pose_detection/pose_detection.tflite", "landmarks": "pose_landmark/pose_landmark_full.tflite"}


class PoseFinder:
    """MediaPipe Pose (the full model shipped in the mediapipe wheel), one graph reused for every frame.

    >>> finder = PoseFinder()  # doctest: +SKIP
    >>> pose = finder.find(frame, region=body_region(face.box, frame.shape[:2]))  # doctest: +SKIP
    >>> pose.points.shape  # doctest: +SKIP
    (33, 2)
    """

    def __init__(self, min_confidence: float = 0.5, files: dict[str, str | Path] | None = None):
        """``files``: the profile's ``detector`` and ``landmarks`` graphs (default :data:`DEFAULT_POSE_FILES`)."""
        import mediapipe as mp

        from bemerc.extract.behavior.face import graph_option

        files = files or DEFAULT_POSE_FILES
        graph_option(POSE_GRAPHS, "pose detector", files["detector"], "detector")
        self._pose = mp.solutions.pose.Pose(
            static_image_mode=True, min_detection_confidence=min_confidence,
            model_complexity=graph_option(POSE_GRAPHS, "pose landmarks", files["landmarks"], "model_complexity"),
        )

    def find(self, frame: np.ndarray, region: np.ndarray | None = None) -> BodyPose | None:
        """The most prominent body in ``frame`` (H, W, 3) RGB, or in its ``region`` (x0, y0, x1, y1 px)."""
        x0, y0 = 0, 0
        if region is not None:
            x0, y0, x1, y1 = (int(round(v)) for v in region)
            frame = np.ascontiguousarray(frame[y0:y1, x0:x1])
        result = self._pose.process(frame)
        if result.pose_landmarks is None:
            return None
        height, width = frame.shape[:2]
        marks = result.pose_landmarks.landmark
        points = np.array([(p.x * width + x0, p.y * height + y0) for p in marks], dtype=np.float32)
        visibility = np.array([p.visibility for p in marks], dtype=np.float32)
        world = np.array([(p.x, p.y, p.z) for p in result.pose_world_landmarks.landmark], dtype=np.float32)
        return BodyPose(points, visibility, world)

    def close(self) -> None:
        self._pose.close()


def body_region(face_box: np.ndarray, frame_size: tuple[int, int], widths: float = 5.0, heights: float = 6.0) -> np.ndarray:
    """Where the body of the person with ``face_box`` is: ``widths`` face widths wide, centred on the face,
    from half a face height above it to ``heights`` face heights down; clipped to the frame (H, W)."""
    height, width = frame_size
    face_w, face_h = face_box[2] - face_box[0], face_box[3] - face_box[1]
    centre_x = (face_box[0] + face_box[2]) / 2
    x0 = max(0.0, centre_x - widths * face_w / 2)
    x1 = min(float(width), centre_x + widths * face_w / 2)
    y0 = max(0.0, face_box[1] - face_h / 2)
    y1 = min(float(height), face_box[1] + heights * face_h)
    return np.array([x0, y0, x1, y1], dtype=np.float32)


def posture_measures(pose: BodyPose) -> np.ndarray:
    """The :data:`POSTURE_MEASURES` of one pose: float32 (7,), ``hand_height`` NaN when no wrist is seen."""
    points, seen = pose.points, pose.visibility >= VISIBLE
    shoulder_w = pose.shoulder_width
    shoulder_mid = (points[LEFT_SHOULDER] + points[RIGHT_SHOULDER]) / 2

    torso = (pose.world[LEFT_SHOULDER] + pose.world[RIGHT_SHOULDER] - pose.world[LEFT_HIP] - pose.world[RIGHT_HIP]) / 2
    lean = np.arctan2(-torso[2], -torso[1])
    across = points[LEFT_SHOULDER] - points[RIGHT_SHOULDER]
    shoulder_tilt = np.arctan2(across[1], abs(across[0]))
    ear_mid_y = (points[LEFT_EAR, 1] + points[RIGHT_EAR, 1]) / 2
    neck_length = (shoulder_mid[1] - ear_mid_y) / shoulder_w

    # A wrist is "across" when it is below the shoulders on the far side of the midline from its own shoulder.
    left_side = np.sign(across[0]) or 1.0  # image direction of the left shoulder from the midline
    crossed = [seen[wrist] and own_side * (points[wrist, 0] - shoulder_mid[0]) < 0 and points[wrist, 1] > shoulder_mid[1]
               for wrist, own_side in ((LEFT_WRIST, left_side), (RIGHT_WRIST, -left_side))]
    arms_crossed = float(all(crossed))
    visible_wrists = int(seen[LEFT_WRIST]) + int(seen[RIGHT_WRIST])

    hands = pose.visible_points(HAND_POINTS)
    hand_dist = np.nanmin(np.linalg.norm(hands - points[NOSE], axis=1)) if np.isfinite(hands).any() else np.inf
    hand_near_face = max(0.0, 1.0 - hand_dist / shoulder_w)
    wrists = pose.visible_points((LEFT_WRIST, RIGHT_WRIST))
    hand_height = np.nanmax(shoulder_mid[1] - wrists[:, 1]) / shoulder_w if visible_wrists else np.nan
    return np.array([lean, shoulder_tilt, neck_length, arms_crossed, hand_near_face, hand_height, visible_wrists / 2],
                    dtype=np.float32)


def frame_motion(points: np.ndarray, scale: np.ndarray, times_s: np.ndarray) -> np.ndarray:
    """Movement per second of a set of points, in units of ``scale``.

    ``points`` (T, P, 2) pixels with NaN where a point is not seen; ``scale`` (T,) pixels (e.g. the
    shoulder width); ``times_s`` (T,). Returns (T,): for frame t the mean displacement since frame
    t-1 of the points seen in both, divided by the mean scale and the time step. NaN for the first
    frame and where no point is seen in both frames.
    """
    motion = np.full(len(points), np.nan, dtype=np.float32)
    for t in range(1, len(points)):
        steps = np.linalg.norm(points[t] - points[t - 1], axis=-1)
        steps = steps[np.isfinite(steps)]
        unit = (scale[t] + scale[t - 1]) / 2
        if steps.size and np.isfinite(unit):
            motion[t] = steps.mean() / unit / (times_s[t] - times_s[t - 1])
    return motion
