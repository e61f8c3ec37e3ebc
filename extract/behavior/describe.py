"""Behaviour in words: documented rules turn per-utterance measure statistics into one English sentence.

The rules are data (``configs/behavior_rules.toml``). Each rule tests one statistic
``"<measure>.<stat>"`` (see :func:`bemerc.extract.behavior.extractor.summarize`) against ``above``
or ``below`` and contributes a verb phrase; rules that share a ``group`` are alternatives, and the
first one that holds wins. A statistic that could not be measured (NaN, e.g. face measures when no
face was seen) never holds. A ``[group.<name>]`` table may add a ``lead`` (a rule of the group holds
only when its statistic also exceeds every other statistic of the group by that much: the expression
probabilities compete) and an ``otherwise`` phrase (written when no rule of the group holds although
its statistics were measured). A rule's ``unless`` lists phrases of earlier groups that contradict
it: when one of them was written, the rule does not hold. The phrases, in the order of the groups,
are joined into "The speaker smiles, raises the eyebrows and leans forward."

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
    unless: tuple[str, ...] = ()

    def holds(self, summary: dict[str, float]) -> bool:
        """Whether the statistic is on the rule's side of its threshold(s) (never when not measured)."""
        value = summary.get(self.stat, math.nan)
        if math.isnan(value):
            return False
        return (self.above is None or value > self.above) and (self.below is None or value < self.below)


@dataclass(frozen=True)
class Group:
    """Settings shared by the rules of one group: ``above``/``below`` for its rules that set neither,
    ``lead`` over the group's other statistics, and the ``otherwise`` phrase when none of its rules
    holds but its statistics were measured."""

    above: float | None = None
    below: float | None = None
    lead: float | None = None
    otherwise: str | None = None


class DescriptionRules:
    """Ordered description rules, from ``configs/behavior_rules.toml`` or any TOML file of ``[[rule]]``
    tables (and optional ``[group.<name>]`` tables).

    >>> rules = DescriptionRules.load()
    >>> rules.describe({"smile.median": 0.15})
    'The speaker smiles.'
    """

    def __init__(self, rules: list[Rule], text: str, groups: dict[str, Group] | None = None):
        self.rules = rules
        self.text = text  # the source, hashed into the extractor config
        self.groups = groups or {}
        self.order = list(dict.fromkeys(rule.group for rule in rules))  # groups in order of first appearance

    @classmethod
    def load(cls, path: str | Path | None = None) -> "DescriptionRules":
        if path is None:
            text = resources.files("bemerc.configs").joinpath("behavior_rules.toml").read_text()
            where = "bemerc.configs/behavior_rules.toml"
        else:
            text, where = Path(path).read_text(), str(path)
        try:
            data = tomllib.loads(text)
            groups = {name: Group(**table) for name, table in data.get("group", {}).items()}
            rules = []
            for table in data.get("rule", []):
                shared = groups.get(table.get("group"), Group())
                if "above" not in table and "below" not in table:
                    table = {**table, "above": shared.above, "below": shared.below}
                rules.append(Rule(**{**table, "unless": tuple(table.get("unless", ()))}))
        except (TypeError, AttributeError, tomllib.TOMLDecodeError) as error:
            raise ValueError(f"{where}: expected [[rule]] tables with group, stat, phrase, above/below, unless and "
                             f"[group.<name>] tables with above/below, lead, otherwise ({error})") from None
        order = list(dict.fromkeys(rule.group for rule in rules))
        written = {name: {r.phrase for r in rules if r.group == name} | {getattr(groups.get(name), "otherwise", None)}
                   for name in order}
        for rule in rules:
            if rule.above is None and rule.below is None:
                raise ValueError(f"{where}: rule {rule.phrase!r} needs `above` or `below` (its own or its group's), found neither")
            earlier = set().union(*(written[name] for name in order[:order.index(rule.group)]))
            for phrase in rule.unless:
                if phrase not in earlier:
                    raise ValueError(f"{where}: rule {rule.phrase!r} has unless {phrase!r}, which no earlier group writes")
        known = {rule.group for rule in rules}
        for name, group in groups.items():
            if name not in known:
                raise ValueError(f"{where}: [group.{name}] has no [[rule]] of that group")
            if group.lead is not None and group.lead < 0:
                raise ValueError(f"{where}: [group.{name}] lead must be >= 0, found {group.lead}")
        return cls(rules, text, groups)

    def leads(self, rule: Rule, summary: dict[str, float]) -> bool:
        """Whether ``rule``'s statistic exceeds every other measured statistic of its group by the group's lead."""
        lead = self.groups.get(rule.group, Group()).lead
        if lead is None:
            return True
        value = summary.get(rule.stat, math.nan)
        others = [summary.get(r.stat, math.nan) for r in self.rules if r.group == rule.group and r.stat != rule.stat]
        return all(value - other >= lead for other in others if not math.isnan(other))

    def phrases(self, summary: dict[str, float]) -> list[str]:
        """For each group in order, the phrase of its first rule that holds (with its group's lead, and
        none of its ``unless`` phrases already written), else the group's ``otherwise`` phrase when any
        of its statistics was measured."""
        chosen: list[str] = []
        for name in self.order:
            members = [rule for rule in self.rules if rule.group == name]
            for rule in members:
                if rule.holds(summary) and self.leads(rule, summary) and not set(rule.unless) & set(chosen):
                    chosen.append(rule.phrase)
                    break
            else:
                otherwise = self.groups.get(name, Group()).otherwise
                if otherwise and any(not math.isnan(summary.get(rule.stat, math.nan)) for rule in members):
                    chosen.append(otherwise)
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
