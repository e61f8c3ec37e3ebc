"""One factory: a modality name and a profile -> a ready extractor (open_clip style registry)."""

from __future__ import annotations

from typing import Callable

from bemerc.extract.base import Extractor
from bemerc.models.profiles import Profile, load_profile
from bemerc.precision import DEFAULT_PRECISION


def _text(profile: Profile, device: str | None, precision: str) -> Extractor:
    from bemerc.extract.text import TextExtractor

    return TextExtractor(profile, device=device, precision=precision)


def _audio(profile: Profile, device: str | None, precision: str) -> Extractor:
    from bemerc.extract.audio import AudioExtractor

    return AudioExtractor(profile, device=device, precision=precision)


def _behavior(profile: Profile, device: str | None, precision: str) -> Extractor:
    from bemerc.extract.behavior.extractor import BehaviorExtractor

    return BehaviorExtractor.from_profile(profile, device=device)  # the device is the describer's, when there is one


def _visual(profile: Profile, device: str | None, precision: str) -> Extractor:
    from bemerc.extract.visual import ClipVisualExtractor, FaceEmbeddingExtractor

    if profile.stage("visual").kind == "files":  # bemerc's face network (role `net`): the offline default
        return FaceEmbeddingExtractor.from_profile(profile)
    return ClipVisualExtractor.from_profile(profile, device=device)


# Model libraries are imported inside each builder, so asking for text never loads mediapipe.
# The precision (bemerc.precision) is the text and speech encoders'; behaviour and visual run their
# networks as they are (ONNX/TFLite on CPUs, open_clip in fp32).
EXTRACTORS: dict[str, Callable[[Profile, str | None, str], Extractor]] = {
    "text": _text,
    "audio": _audio,
    "behavior": _behavior,
    "visual": _visual,
}


def build_extractor(modality: str, profile: Profile | str | None = None, device: str | None = None,
                    precision: str = DEFAULT_PRECISION) -> Extractor:
    """The extractor of ``modality`` configured by ``profile`` (a name or a TOML path; None: the default),
    its model on ``device`` (``auto``, ``cpu``, ``cuda``; None: ``$BEMERC_DEVICE`` or auto; see
    :func:`bemerc.extract.base.resolve_device`) in ``precision`` (``auto``, ``fp32``, ``bf16``; see
    :func:`bemerc.extract.base.resolve_precision`). The device never changes the feature set; a bf16
    precision does.

    >>> build_extractor("text").name   # doctest: +SKIP
    'all-MiniLM-L6-v2'
    """
    if modality not in EXTRACTORS:
        raise ValueError(f"unknown modality {modality!r}: expected one of {', '.join(EXTRACTORS)}")
    profile = profile if isinstance(profile, Profile) else load_profile(profile)
    return EXTRACTORS[modality](profile, device, precision)
