"""Behaviour extractor on real media: the RAVDESS face video, the six CREMA-D face videos,
scikit-image's astronaut photo, and scenes composed from both with ffmpeg."""

from __future__ import annotations

import subprocess

import cv2
import numpy as np
import pytest
import skimage.data

from bemerc.extract.base import UtteranceMedia
from bemerc.extract.behavior import BehaviorExtractor, DescriptionRules
from bemerc.extract.behavior.expression import EXPRESSIONS, FerExpression, write_random_feat_checkpoint
from bemerc.extract.behavior.describe import Group
from bemerc.extract.behavior.extractor import STATS, summarize, temporal_tokens
from bemerc.extract.behavior.face import FACE_MEASURES, FaceFinder, face_measures
from bemerc.extract.media import MediaError, sample_frames
from conftest import SHARED_DATA

SMILE = FACE_MEASURES.index("smile")


@pytest.fixture(scope="module")
def extractor() -> BehaviorExtractor:
    return BehaviorExtractor(fps=4.0, tokens_k=8)


@pytest.fixture(scope="module")
def finder() -> FaceFinder:
    return FaceFinder()


@pytest.fixture(scope="module")
def ravdess_video(ravdess_dir):
    return ravdess_dir / "video" / "01-01-01-01-01-01-01.mp4"


@pytest.fixture(scope="module")
def ravdess_frames(ravdess_video):
    return sample_frames(ravdess_video, fps=4.0)


def _write_video(path, frames: np.ndarray, fps: float = 4.0) -> str:
    """Encode RGB frames (T, H, W, 3) as an H.264 mp4 with the ffmpeg command line."""
    height, width = frames.shape[1:3]
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{width}x{height}",
                    "-r", str(fps), "-i", "-", "-pix_fmt", "yuv420p", "-c:v", "libx264", str(path)],
                   input=frames.tobytes(), check=True)
    return str(path)


def test_ravdess_clip_gives_a_full_row(extractor, ravdess_video):
    [row] = extractor.extract([UtteranceMedia("ravdess-01", None, str(ravdess_video), None, None, None)])
    assert isinstance(row, dict), row
    dim = len(extractor.names)
    fields = {field.name: field for field in extractor.fields()}
    assert fields["vector"].type.list_size == len(STATS) * dim == row["vector"].shape[0]
    assert fields["tokens"].type.list_size == 8 * dim == row["tokens"].shape[0]
    assert np.isfinite(row["vector"]).all() and np.isfinite(row["tokens"]).all()
    assert row["frames"] == 13  # 3.35 s at 4 fps
    assert row["face_frames"] >= 0.8 * row["frames"]
    assert row["pose_frames"] >= 0.8 * row["frames"]
    assert row["description"].startswith("The speaker ") and row["description"].endswith(".")
    config = extractor.config()
    assert (config["tokens_k"], config["tokens_d"]) == (8, dim)


def test_span_of_the_clip_samples_fewer_frames(extractor, ravdess_video):
    [row] = extractor.extract([UtteranceMedia("span", None, str(ravdess_video), None, 1.0, 2.0)])
    assert row["frames"] == 4


def test_expression_probabilities_sum_to_one(finder, ravdess_frames):
    frames, _ = ravdess_frames
    [face] = finder.find(frames[0])
    probabilities = FerExpression().measure(frames[0], face.box)
    assert probabilities.shape == (len(EXPRESSIONS),)
    assert probabilities.min() >= 0 and probabilities.sum() == pytest.approx(1.0, abs=1e-5)


def test_smiling_photo_measures_and_reads_as_a_smile(extractor, finder, ravdess_frames):
    astronaut = skimage.data.astronaut()
    measures = extractor.measure_frames(astronaut[None], np.array([0.0]))
    assert measures.face_frames == 1
    # The RAVDESS actor reads a neutral statement: his smile measure stays below the astronaut's.
    frames, _ = ravdess_frames
    neutral = [face_measures(faces[0].landmarks)[SMILE] for faces in map(finder.find, frames) if faces]
    assert measures.column("smile")[0] > max(neutral) + 0.05
    assert measures.column("p_happy")[0] > 0.5
    description = extractor.features(measures)["description"]
    assert "smiles" in description and "looks happy" in description


def test_speaker_is_the_face_whose_lips_move(extractor, ravdess_frames, tmp_path):
    """Left: the (smaller) RAVDESS actor; right: the (larger) astronaut photo. When the actor speaks,
    his lips move and he is the speaker; when his frame is frozen, the larger face wins the tie."""
    frames, _ = ravdess_frames
    astronaut = cv2.resize(skimage.data.astronaut()[40:240, 130:330], (320, 320))

    def scene(actor: np.ndarray) -> np.ndarray:
        canvas = np.full((400, 720, 3), 128, np.uint8)
        canvas[70:322, 40:264] = cv2.resize(actor[:, 160:480], (224, 252))
        canvas[40:360, 360:680] = astronaut
        return canvas

    for name, actor_frames, speaker_on_left in (("talking", frames, True), ("frozen", frames[:1].repeat(8, 0), False)):
        video = _write_video(tmp_path / f"{name}.mp4", np.stack([scene(f) for f in actor_frames]))
        scene_frames, times_s = sample_frames(video, fps=4.0)
        measures = extractor.measure_frames(scene_frames, times_s)
        assert measures.face_tracks == 2
        centre_x = np.nanmean(measures.speaker_boxes[:, [0, 2]])
        assert (centre_x < scene_frames.shape[2] / 2) == speaker_on_left, name


def test_bad_media_become_media_errors(extractor, ravdess_dir, tmp_path):
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    audio_only = ravdess_dir / "audio" / "01-01-01-01-01-01-01_audio.wav"
    blank = _write_video(tmp_path / "blank.mp4", np.zeros((6, 120, 160, 3), np.uint8))
    items = [UtteranceMedia(uid, None, path, None, None, None) for uid, path in
             (("corrupt", str(corrupt)), ("audio", str(audio_only)), ("blank", blank), ("none", None))]
    results = extractor.extract(items)
    assert all(isinstance(result, MediaError) for result in results), results
    assert "no video stream" in str(results[1])
    assert "no face or body found in 6 frames" in str(results[2])
    assert str(results[0]).startswith(str(corrupt))


def test_tokens_cover_clips_shorter_than_k():
    values = np.array([[1.0, np.nan], [3.0, np.nan], [5.0, 2.0]], dtype=np.float32)  # T=3, D=2
    tokens = temporal_tokens(values, k=4).reshape(4, 2)
    assert np.isfinite(tokens).all()
    assert tokens[:, 0].tolist() == [1.0, 1.0, 3.0, 5.0]
    assert tokens[:, 1].tolist() == [0.0, 0.0, 0.0, 2.0]


def test_rules_pick_the_first_holding_phrase_of_each_group(tmp_path):
    rules_file = tmp_path / "rules.toml"
    rules_file.write_text("""
[[rule]]
group = "smile"
stat = "smile.mean"
above = 0.2
phrase = "grins"
[[rule]]
group = "smile"
stat = "smile.mean"
above = 0.05
phrase = "smiles"
[[rule]]
group = "lean"
stat = "lean.mean"
above = 0.4
phrase = "leans forward"
""")
    rules = DescriptionRules.load(rules_file)
    assert rules.describe({"smile.mean": 0.3, "lean.mean": 0.5}) == "The speaker grins and leans forward."
    assert rules.describe({"smile.mean": 0.1, "lean.mean": float("nan")}) == "The speaker smiles."
    rules_file.write_text('[[rule]]\ngroup = "g"\nstat = "smile.mean"\nphrase = "smiles"\n')
    with pytest.raises(ValueError, match="needs `above` or `below`"):
        DescriptionRules.load(rules_file)


def test_group_lead_otherwise_and_unless(tmp_path):
    rules_file = tmp_path / "rules.toml"
    rules_file.write_text("""
[group.expression]
above = 0.3
lead = 0.15
otherwise = "shows a mixed expression"
[[rule]]
group = "expression"
stat = "p_happy.mean"
phrase = "looks happy"
[[rule]]
group = "expression"
stat = "p_sad.mean"
phrase = "looks sad"
[[rule]]
group = "smile"
stat = "smile.median"
above = 0.1
phrase = "smiles"
unless = ["looks sad"]
""")
    rules = DescriptionRules.load(rules_file)
    assert rules.describe({"p_happy.mean": 0.6, "p_sad.mean": 0.3, "smile.median": 0.2}) == "The speaker looks happy and smiles."
    assert rules.describe({"p_happy.mean": 0.2, "p_sad.mean": 0.7, "smile.median": 0.2}) == "The speaker looks sad."
    # a lead of 0.10 < 0.15, and a top below the group's `above`: the classifier is torn
    assert rules.describe({"p_happy.mean": 0.45, "p_sad.mean": 0.35}) == "The speaker shows a mixed expression."
    assert rules.describe({"p_happy.mean": 0.29, "p_sad.mean": 0.0}) == "The speaker shows a mixed expression."
    assert rules.describe({"smile.median": 0.2}) == "The speaker smiles."  # no face measures: no `otherwise`
    rules_file.write_text('[[rule]]\ngroup = "g"\nstat = "smile.mean"\nabove = 0.1\nphrase = "smiles"\nunless = ["frowns"]\n')
    with pytest.raises(ValueError, match="unless 'frowns', which no earlier group writes"):
        DescriptionRules.load(rules_file)
    rules_file.write_text('[group.g]\nlaed = 0.1\n[[rule]]\ngroup = "g"\nstat = "smile.mean"\nabove = 0.1\nphrase = "smiles"\n')
    with pytest.raises(ValueError, match="rules.toml: expected"):
        DescriptionRules.load(rules_file)


# An oracle independent of the rules file: phrases (or their beginnings: "smiles" covers "smiles
# slightly") that cannot both be true of one face.
CONTRADICTIONS = [({"looks angry", "looks sad", "looks afraid", "looks disgusted", "keeps a neutral face"}, {"smiles"}),
                  ({"looks happy"}, {"turns the mouth corners down"}),
                  ({"keeps the body still"}, {"moves the body a lot", "moves the hands a lot"})]


@pytest.fixture(scope="module")
def real_faces(extractor, ravdess_video) -> list[tuple[str, dict[str, float], str]]:
    """(clip, measure statistics, description) of the real stage on the six CREMA-D faces and the RAVDESS one."""
    clips = sorted((SHARED_DATA / "cremad").glob("1001_DFA_*_XX.flv")) + [ravdess_video]
    assert len(clips) == 7, f"six CREMA-D face videos expected in {SHARED_DATA / 'cremad'}"
    results = []
    for clip in clips:
        measures = extractor.measure_frames(*sample_frames(clip, extractor.fps, extractor.max_side))
        results.append((clip.name, summarize(measures), extractor.features(measures, str(clip))["description"]))
    return results


def test_real_faces_get_self_consistent_descriptions(extractor, real_faces):
    """Every phrase of the descriptions of real faces has its measure on its side of the threshold
    (and, for an expression, a clear lead over the others); no two phrases contradict each other."""
    rules = extractor.rules
    by_phrase: dict[str, list] = {}
    for rule in rules.rules:
        by_phrase.setdefault(rule.phrase, []).append(rule)
    otherwise = {group.otherwise: name for name, group in rules.groups.items() if group.otherwise}

    def qualifies(rule, summary) -> bool:  # the rule's own test, recomputed from the statistics
        value, group = summary[rule.stat], rules.groups.get(rule.group, Group())
        rivals = [summary[r.stat] for r in rules.rules if r.group == rule.group and r.stat != rule.stat]
        return (np.isfinite(value) and (rule.above is None or value > rule.above)
                and (rule.below is None or value < rule.below)
                and (group.lead is None or all(value - other >= group.lead for other in rivals if np.isfinite(other))))

    for clip, summary, description in real_faces:
        assert description.startswith("The speaker ") and description.endswith("."), (clip, description)
        phrases = description.removeprefix("The speaker ").removesuffix(".").replace(" and ", ", ").split(", ")
        groups = []
        for phrase in phrases:
            if phrase in otherwise:  # no rule of the group qualifies
                groups.append(otherwise[phrase])
                assert not any(qualifies(r, summary) for r in rules.rules if r.group == otherwise[phrase]), (clip, phrase)
            else:
                assert any(qualifies(r, summary) for r in by_phrase[phrase]), (clip, phrase, summary)
                groups.append(by_phrase[phrase][0].group)
        assert len(groups) == len(set(groups)), (clip, description)  # one phrase per group
        assert "expression" in groups, (clip, description)  # a face in every frame: the expression is read
        named = [r.stat for r in rules.rules if r.group == "expression" and r.phrase in phrases]
        expressions = [r.stat for r in rules.rules if r.group == "expression"]
        assert named in ([], [max(expressions, key=summary.get)]), (clip, description)  # only the top class is named
        for left, right in CONTRADICTIONS + [({u}, {r.phrase}) for r in rules.rules for u in r.unless]:
            assert not (said(left, phrases) and said(right, phrases)), (clip, description)
    assert rules.groups["expression"].lead > 0  # an expression is named only with a margin over the runner-up


def said(beginnings: set[str], phrases: list[str]) -> bool:
    return any(phrase.startswith(beginning) for beginning in beginnings for phrase in phrases)


@pytest.mark.slow
def test_py_feat_path_runs_with_a_random_checkpoint(ravdess_frames, tmp_path):
    weights = write_random_feat_checkpoint(tmp_path / "multitask.safetensors")
    extractor = BehaviorExtractor(expression="feat", expression_weights=weights, expression_random_weights=True)
    frames, times_s = ravdess_frames
    row = extractor.features(extractor.measure_frames(frames[:3], times_s[:3]))
    assert extractor.random_weights and extractor.name == "mediapipe-feat"
    assert "au12" in extractor.names and len(extractor.names) == len(BehaviorExtractor().names) + 20
    assert row["vector"].shape == (len(STATS) * len(extractor.names),) and np.isfinite(row["vector"]).all()
    happy_to_neutral = [extractor.names.index(f"p_{label}") for label in EXPRESSIONS]
    assert row["vector"][happy_to_neutral].sum() == pytest.approx(1.0, abs=1e-4)  # mean probabilities


def test_profile_face_files_choose_the_graphs_and_the_feature_set(tmp_path, ravdess_frames, models_cache):
    from bemerc.extract.base import config_hash
    from bemerc.models.profiles import load_profile

    short_range = tmp_path / "short-range.toml"
    short_range.write_text(
        'extends = "offline"\n[stages.face]\nkind = "files"\nsource = "package:mediapipe/modules"\n'
        'files = { detector = "face_detection/face_detection_short_range.tflite", landmarks = "face_landmark/face_landmark.tflite" }\n'
    )
    offline = BehaviorExtractor.from_profile(load_profile("offline"))
    plain = BehaviorExtractor.from_profile(load_profile(short_range))
    graphs = plain.config()["mediapipe_models"]
    assert "face_detection/face_detection_short_range.tflite" in graphs and "face_landmark/face_landmark.tflite" in graphs
    assert "face_landmark/face_landmark_with_attention.tflite" in offline.config()["mediapipe_models"]
    assert config_hash(plain) != config_hash(offline)  # other graphs: another feature set
    faces = plain._faces.find(ravdess_frames[0][6])
    assert len(faces) == 1 and faces[0].landmarks.shape == (468, 3)  # the plain mesh, no refined irises
    assert np.isfinite(face_measures(faces[0].landmarks)).all()


def test_a_graph_the_solutions_api_cannot_load_is_refused():
    with pytest.raises(ValueError, match="loads only its packaged graphs"):
        FaceFinder(files={"detector": "my_detector.tflite", "landmarks": "face_landmark/face_landmark.tflite"})


def test_a_profile_describer_writes_the_descriptions(tiny_vlm, ravdess_video, tmp_path, models_cache):
    """A `describer` stage (here a tiny random Qwen2-VL) writes each description from the clip's
    frames; the measures are those of the plain extractor, the feature set is another."""
    from bemerc.extract.base import UtteranceMedia, config_hash, uses_gpu
    from bemerc.extract.behavior.describe import VlmDescriber
    from bemerc.extract.factory import build_extractor
    from bemerc.extract.media import evenly_spaced, sample_frames

    user = tmp_path / "described.toml"
    user.write_text(f'extends = "offline"\n[stages.describer]\nkind = "hf"\nsource = "{tiny_vlm}"\n'
                    'model_id = "tiny-vlm"\nframes = 2\nmax_new_tokens = 6\n')
    described, plain = build_extractor("behavior", str(user), "cpu"), build_extractor("behavior", "offline")
    assert described.name == "mediapipe-bemerc-tiny-vlm" and config_hash(described) != config_hash(plain)
    assert described.config()["describer"]["frames"] == 2 and uses_gpu(described) and not uses_gpu(plain)
    item = UtteranceMedia("u1", video_path=str(ravdess_video))
    [row], [rule_row] = described.extract([item]), plain.extract([item])
    np.testing.assert_array_equal(row["vector"], rule_row["vector"])
    frames, _ = sample_frames(ravdess_video, described.fps, described.max_side)
    expected = VlmDescriber(str(described.describer.path), "cpu", 6).describe(evenly_spaced(frames, described.describer.frames))
    assert row["description"] == expected and expected and expected != rule_row["description"]
