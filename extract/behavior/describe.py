"""Behaviour in words: documented rules turn per-utterance measure statistics into one English sentence.

The rules are data (``configs/behavior_rules.toml``). Each rule tests one statistic
``"<measure>.<stat>"`` (see :func:`bemerc.extract.behavior.extractor.summarize`) against ``above``
or ``below`` and contributes a verb phrase; rules that share a ``group`` are alternatives, and the
first one that holds wins. A statistic that could not be measured (NaN, e.g. face measures when no
face was seen) never holds. The phrases are joined into "The speaker smiles broadly, raises the
eyebrows and leans forward."

:class:`VlmDescriber` is the alternative BeMERC itself uses, for users with a GPU: a vision-language
model looks at a few frames of the utterance and writes the description. A profile with a
``describer`` stage (the ``gpu`` profile: Qwen2-VL-2B-Instruct) turns it on for behaviour extraction
(:class:`VlmSpec`); its model, prompt and decoding are part of the feature set.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

NOTHING_SEEN = "shows no clear facial or body behaviour"


@dataclass(frozen=True)
class Rule:
    group: str
    stat: str
    phrase: str
    above: float | None = None
    below: float | None = None

    def holds(self, summary: dict[str, float]) -> bool:
        value = summary.get(self.stat, math.nan)
        if math.isnan(value):
            return False
        return (self.above is None or value > self.above) and (self.below is None or value < self.below)


class DescriptionRules:
    """Ordered description rules, from ``configs/behavior_rules.toml`` or any TOML file of ``[[rule]]`` tables.

    >>> rules = DescriptionRules.load()
    >>> rules.describe({"smile.mean": 0.15})
    'The speaker smiles broadly.'
    """

    def __init__(self, rules: list[Rule], text: str):
        self.rules = rules
        self.text = text  # the source, hashed into the extractor config

    @classmethod
    def load(cls, path: str | Path | None = None) -> "DescriptionRules":
        if path is None:
            text = resources.files("bemerc.configs").joinpath("behavior_rules.toml").read_text()
            where = "bemerc.configs/behavior_rules.toml"
        else:
            text, where = Path(path).read_text(), str(path)
        try:
            rules = [Rule(**table) for table in tomllib.loads(text).get("rule", [])]
        except (TypeError, tomllib.TOMLDecodeError) as error:
            raise ValueError(f"{where}: expected [[rule]] tables with group, stat, phrase, above/below ({error})") from None
        for rule in rules:
            if rule.above is None and rule.below is None:
                raise ValueError(f"{where}: rule {rule.phrase!r} needs `above` or `below`, found neither")
        return cls(rules, text)

    def phrases(self, summary: dict[str, float]) -> list[str]:
        """The phrases of the first holding rule of each group, in file order."""
        used: set[str] = set()
        chosen = []
        for rule in self.rules:
            if rule.group not in used and rule.holds(summary):
                used.add(rule.group)
                chosen.append(rule.phrase)
        return chosen

    def describe(self, summary: dict[str, float]) -> str:
        phrases = self.phrases(summary) or [NOTHING_SEEN]
        listed = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
        return f"The speaker {listed}."


@dataclass(frozen=True)
class VlmSpec:
    """Which vision-language model describes behaviour, and how (hashed into the feature set).

    ``path`` is the local folder of the model and its processor; ``frames`` evenly spaced sampled
    frames of the utterance are shown; decoding is greedy, at most ``max_new_tokens``.
    """

    path: str
    model_id: str
    source: str = ""
    weights_sha256: tuple[tuple[str, str], ...] = ()
    frames: int = 4
    max_new_tokens: int = 60

    def config(self) -> dict:
        return {"model": self.model_id, "source": self.source, "weights_sha256": dict(self.weights_sha256),
                "prompt": VlmDescriber.PROMPT, "frames": self.frames, "max_new_tokens": self.max_new_tokens,
                "decoding": "greedy"}


class VlmDescriber:
    """Describe the speaker's behaviour with a vision-language model (GPU recommended; not used offline).

    ``model_id`` is a Hugging Face image-text-to-text model such as "Qwen/Qwen2-VL-2B-Instruct";
    ``frames`` are a few RGB frames (T, H, W, 3) of the utterance, shown to the model as images.

    >>> describer = VlmDescriber("Qwen/Qwen2-VL-2B-Instruct", device="cuda")  # doctest: +SKIP
    >>> describer.describe(frames[::4])  # doctest: +SKIP
    'The speaker frowns and crosses his arms.'
    """

    PROMPT = ("These are frames of one person speaking. In one sentence starting with 'The speaker', describe "
              "their facial expression, gaze, posture and gestures. Do not guess what they say.")

    def __init__(self, model_id: str, device: str = "cuda", max_new_tokens: int = 60):
        from transformers import AutoModelForImageTextToText, AutoProcessor

        try:
            self.processor = AutoProcessor.from_pretrained(model_id)
            self.model = AutoModelForImageTextToText.from_pretrained(model_id, dtype="auto").to(device).eval()
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot load a vision-language describer from {model_id}: {exc}") from exc
        self.max_new_tokens = max_new_tokens

    def describe(self, frames: np.ndarray) -> str:
        from PIL import Image

        images = [Image.fromarray(frame) for frame in frames]
        messages = [{"role": "user", "content": [*({"type": "image"} for _ in images), {"type": "text", "text": self.PROMPT}]}]
        prompt = self.processor.apply_chat_template(messages, add_generation_prompt=True)
        inputs = self.processor(text=[prompt], images=images, return_tensors="pt").to(self.model.device)
        import torch

        with torch.inference_mode():
            output = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        return self.processor.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0].strip()
