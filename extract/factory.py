"""One factory: a modality name and a profile -> a ready extractor (open_clip style registry)."""

from __future__ import annotations

from typing import Callable

from bemerc.extract.base import Extractor
from bemerc.models.profiles import Profile, load_profile


def _text(profile: Profile) -> Extractor:
    from bemerc.extract.text import TextExtractor

    return TextExtractor(profile)


def _audio(profile: Profile) -> Extractor:
    from bemerc.extract.audio import AudioExtractor

    return AudioExtractor(profile)


def _behavior(profile: Profile) -> Extractor:
    from bemerc.extract.behavior.extractor import BehaviorExtractor

    return BehaviorExtractor.from_profile(profile)


def _visual(profile: Profile) -> Extractor:
    from bemerc.extract.visual import ClipVisualExtractor

    return ClipVisualExtractor.from_profile(profile)


# Model libraries are imported inside each builder, so asking for text never loads mediapipe.
EXTRACTORS: dict[str, Callable[[Profile], Extractor]] = {
    "text": _text,
    "audio": _audio,
    "behavior": _behavior,
    "visual": _visual,
}


def build_extractor(modality: str, profile: Profile | str | None = None) -> Extractor:
    """The extractor of ``modality`` configured by ``profile`` (a name or a TOML path; None: the default).

    >>> build_extractor("text").name   # doctest: +SKIP
    'all-MiniLM-L6-v2'
    """
    if modality not in EXTRACTORS:
        raise ValueError(f"unknown modality {modality!r}: expected one of {', '.join(EXTRACTORS)}")
    profile = profile if isinstance(profile, Profile) else load_profile(profile)
    return EXTRACTORS[modality](profile)
