"""Prompt templates as data (``configs/prompts/*.toml``) and their encoding into token ids with
soft-token slots.

A template renders one chat turn (system + user) whose text may hold markers ``<<soft:MODALITY>>``.
:meth:`Prompter.encode` renders it with the tokenizer's chat template, splits the text at the
markers, tokenises each piece and reserves K placeholder positions per marker; the model writes the
projected features of that modality there (LLaVA-style).

>>> prompter = Prompter(tokenizer, classes=["neutral", "joy"], context=2)    # doctest: +SKIP
>>> ex = prompter.merc([Turn("Ross", "Hi.")], Turn("Rachel", "Oh my God!"), label="joy")  # doctest: +SKIP
>>> tokenizer.decode(ex.answer_ids)                                          # doctest: +SKIP
'joy<|im_end|>'
"""

from __future__ import annotations

import importlib.resources
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

MARKER = "<<soft:{}>>"
_MARKER_RE = re.compile(r"<<soft:([A-Za-z0-9_-]+)>>")
_REQUIRED = ("system", "user", "answer", "plain")


class PromptError(ValueError):
    """A template that cannot be read or rendered; the message names the template and the field."""


@dataclass(frozen=True)
class Template:
    """One prompt template: the chat turn (``system``, ``user``), the expected ``answer``, a
    ``plain`` layout for tokenizers without a chat template, and template-specific ``options``."""

    name: str
    system: str
    user: str
    answer: str
    plain: str
    options: dict = field(default_factory=dict)
    source: str = ""  # the TOML text, saved beside a trained adapter

    def option(self, key: str) -> str | dict:
        if key not in self.options:
            raise PromptError(f"prompt template {self.name!r} has no key {key!r}")
        return self.options[key]


@dataclass(frozen=True)
class Turn:
    """One utterance of a dialogue as the prompt shows it."""

    speaker: str
    text: str


@dataclass
class Encoded:
    """A tokenised prompt: ``prompt_ids`` (with placeholder ids at soft positions), the positions of
    each modality's K soft tokens, and the answer ids (empty for inference)."""

    prompt_ids: list[int]
    soft_positions: dict[str, list[int]]
    answer_ids: list[int]

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.answer_ids)


def load_template(name_or_path: str | Path) -> Template:
    """A packaged template by name (``merc``, ``align``) or any TOML file with the same keys.

    >>> load_template("merc").answer
    '{label}'
    """
    text_ref = str(name_or_path)
    if text_ref.endswith(".toml") or Path(text_ref).is_file():
        path = Path(text_ref)
        if not path.is_file():
            raise PromptError(f"prompt template {path} does not exist")
        source = path.read_text()
    else:
        packaged = importlib.resources.files("bemerc.configs") / "prompts" / f"{text_ref}.toml"
        if not packaged.is_file():
            raise PromptError(f"unknown prompt template {text_ref!r}: expected merc, align or the path of a .toml file")
        path, source = Path(str(packaged)), packaged.read_text()
    try:
        data = tomllib.loads(source)
    except tomllib.TOMLDecodeError as exc:
        raise PromptError(f"prompt template {path} is not valid TOML: {exc}") from None
    missing = [k for k in _REQUIRED if not isinstance(data.get(k), str)]
    if missing:
        raise PromptError(f"prompt template {path} lacks the string key(s) {', '.join(missing)}")
    options = {k: v for k, v in data.items() if k not in _REQUIRED}
    return Template(path.stem, data["system"], data["user"], data["answer"], data["plain"], options, source)


def _format(template: Template, key: str, pattern: str, fields: dict) -> str:
    try:
        return pattern.format(**fields)
    except (KeyError, IndexError) as exc:
        raise PromptError(f"prompt template {template.name!r}: {key} uses the unknown field {exc}; "
                          f"known: {', '.join(sorted(fields))}") from None


class Prompter:
    """Turns dialogues into :class:`Encoded` prompts for one tokenizer, label set and soft-token layout.

    ``soft_tokens`` maps each modality the model projects to its number of soft tokens K; its
    markers appear in every MERC prompt (a modality missing for an utterance still takes its K
    positions, filled by the model's learned "missing" embedding).
    """

    def __init__(
        self,
        tokenizer,
        classes: list[str],
        context: int = 3,
        soft_tokens: dict[str, int] | None = None,
        merc: Template | str = "merc",
        align: Template | str = "align",
        max_len: int = 512,
    ):
        self.tokenizer = tokenizer
        self.classes = list(classes)
        self.context = context
        self.soft_tokens = dict(soft_tokens or {})
        self.merc_template = merc if isinstance(merc, Template) else load_template(merc)
        self.align_template = align if isinstance(align, Template) else load_template(align)
        self.max_len = max_len
        # Soft positions hold any real id: the model overwrites their embeddings.
        self.placeholder_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id or 0
        self.end_ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []

    # -- text ---------------------------------------------------------------------------------
    def merc_user(self, context: list[Turn], target: Turn, description: str | None = None) -> str:
        """The user message of a MERC prompt (soft-token markers included) for the given context turns."""
        t = self.merc_template
        lines = [_format(t, "context_line", t.option("context_line"), {"speaker": c.speaker, "text": c.text})
                 for c in context]
        cues = ""
        if description:
            cues += _format(t, "description_line", t.option("description_line"),
                            {"speaker": target.speaker, "description": description})
        names = t.options.get("modality_names", {})
        for modality in self.soft_tokens:
            cues += _format(t, "soft_line", t.option("soft_line"), {
                "speaker": target.speaker, "name": names.get(modality, modality), "tokens": MARKER.format(modality)})
        fields = {"context": "\n".join(lines) if lines else t.option("empty_context"), "speaker": target.speaker,
                  "text": target.text, "cues": cues, "labels": ", ".join(self.classes)}
        return _format(t, "user", t.user, fields)

    def chat_text(self, template: Template, user: str) -> str:
        """The full prompt text: the tokenizer's chat template (ending where the answer starts) or
        the template's ``plain`` layout."""
        if getattr(self.tokenizer, "chat_template", None):
            messages = [{"role": "system", "content": template.system}, {"role": "user", "content": user}]
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return _format(template, "plain", template.plain, {"system": template.system, "user": user})

    # -- ids ----------------------------------------------------------------------------------
    def encode_text(self, text: str) -> tuple[list[int], dict[str, list[int]]]:
        """Token ids of ``text`` with K placeholder ids per ``<<soft:MODALITY>>`` marker, and the
        positions of each modality's placeholders."""
        ids: list[int] = []
        positions: dict[str, list[int]] = {}
        pieces = _MARKER_RE.split(text)  # text, modality, text, modality, ..., text
        for i, piece in enumerate(pieces):
            if i % 2 == 0:
                if piece:
                    ids += self.tokenizer(piece, add_special_tokens=False)["input_ids"]
                continue
            if piece not in self.soft_tokens:
                raise PromptError(f"the prompt has soft tokens for {piece!r} but the model projects only "
                                  f"{', '.join(self.soft_tokens) or 'no modality'}")
            k = self.soft_tokens[piece]
            positions[piece] = list(range(len(ids), len(ids) + k))
            ids += [self.placeholder_id] * k
        return ids, positions

    def answer_ids(self, template: Template, **fields) -> list[int]:
        """Ids of the rendered answer followed by the end-of-turn token (so the model learns to stop
        and label scores compare whole answers)."""
        answer = _format(template, "answer", template.answer, fields)
        return self.tokenizer(answer, add_special_tokens=False)["input_ids"] + self.end_ids

    def label_ids(self) -> list[list[int]]:
        """The answer ids of every class, in ``classes`` order."""
        return [self.answer_ids(self.merc_template, label=label) for label in self.classes]

    def merc(self, context: list[Turn], target: Turn, description: str | None = None, label: str | None = None) -> Encoded:
        """A MERC example; without ``label`` the answer is empty (inference). Context turns are
        dropped, oldest first, while the prompt is longer than ``max_len`` tokens."""
        context = context[-self.context:] if self.context else []
        while True:
            ids, positions = self.encode_text(self.chat_text(self.merc_template, self.merc_user(context, target, description)))
            if len(ids) <= self.max_len or not context:
                break
            context = context[1:]
        answer = self.answer_ids(self.merc_template, label=label) if label is not None else []
        return Encoded(ids, positions, answer)

    def align(self, description: str, modality: str = "behavior") -> Encoded:
        """A behaviour-alignment example: the modality's soft tokens in, its description out."""
        t = self.align_template
        user = _format(t, "user", t.user, {"tokens": MARKER.format(modality)})
        ids, positions = self.encode_text(self.chat_text(t, user))
        return Encoded(ids, positions, self.answer_ids(t, description=description))

    def show(self, encoded: Encoded) -> str:
        """Readable text of an example, each run of soft tokens shown as ``<MODALITY x K>``."""
        ids = list(encoded.prompt_ids)
        spans = sorted((pos[0], pos[-1], m) for m, pos in encoded.soft_positions.items())
        parts, start = [], 0
        for first, last, modality in spans:
            parts += [self.tokenizer.decode(ids[start:first]), f"<{modality} x{last - first + 1}>"]
            start = last + 1
        parts.append(self.tokenizer.decode(ids[start:]))
        return "".join(parts) + self.tokenizer.decode(encoded.answer_ids)
