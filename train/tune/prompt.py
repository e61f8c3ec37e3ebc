"""Prompt templates as data (``configs/prompts/*.toml``) and their encoding into token ids with
soft-token slots, in two layouts:

- ``utterance``: one prompt per utterance (system, the last N turns as context, the target turn), the
  answer is the label followed by the end-of-turn token, scored with its exact log-likelihood;
- ``dialogue``: one causal sequence per dialogue (split into overlapping windows when long): the system
  prompt once, then every turn followed by an answer cue where the emotion's first token is
  predicted (``configs/prompts/dialogue.toml``; or, with ``glue = "chat"``, every turn a user message
  and every answer an assistant message). The label is never part of the input, so one forward pass
  predicts every turn from all earlier turns, and a label's probability is that of its first token
  (labels must start with distinct tokens; with the packaged template and SmolLM2 every MELD and
  IEMOCAP label is one token, so this is the label's exact likelihood).

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


@dataclass(frozen=True)
class DialogueTurn:
    """One turn of a dialogue for the ``dialogue`` layout: what the prompt shows and its corpus row
    (where its soft-token features are read)."""

    speaker: str
    text: str
    description: str | None
    row: int


@dataclass
class Window:
    """One causal sequence of the ``dialogue`` layout: turns ``first..end-1`` of a dialogue.

    ``answer_positions[j]``: the position whose hidden state predicts the answer of turn
    ``first + j``; ``new[j]``: False for the turns repeated from the previous window as context (they
    are neither trained on nor scored twice). ``soft``: modality -> [(corpus row, K positions)].
    """

    ids: list[int]
    soft: dict[str, list[tuple[int, list[int]]]]
    rows: list[int]
    answer_positions: list[int]
    new: list[bool]

    def __len__(self) -> int:
        return len(self.ids)


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
    positions, filled by the model's learned "missing" embedding). With ``tokenizer=None`` only the
    text methods work (:meth:`messages`, :meth:`merc_user`, :meth:`dialogue_user`,
    :meth:`dialogue_system`, :meth:`answer_text`): the messages before any chat template, which
    ``bemerc export instructions`` writes for other trainers.
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
        if tokenizer is None:  # text only (messages, answers: what `bemerc export instructions` writes); no ids
            self.placeholder_id, self.end_ids = 0, []
            return
        # Soft positions hold any real id: the model overwrites their embeddings.
        self.placeholder_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id or 0
        self.end_ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []

    def but(self, soft_tokens: dict[str, int] | None = None, context: int | None = None) -> "Prompter":
        """This prompter with other soft tokens and/or context turns (the project stage's); the
        templates, classes and tokenizer are shared."""
        return Prompter(self.tokenizer, self.classes, self.context if context is None else context,
                        self.soft_tokens if soft_tokens is None else soft_tokens, self.merc_template,
                        self.align_template, self.max_len)

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

    @staticmethod
    def messages(template: Template, user: str) -> list[dict[str, str]]:
        """The chat turn of a prompt, before any chat template: the template's system message and ``user``."""
        return [{"role": "system", "content": template.system}, {"role": "user", "content": user}]

    def chat_text(self, template: Template, user: str) -> str:
        """The full prompt text: the tokenizer's chat template over :meth:`messages` (ending where the
        answer starts) or the template's ``plain`` layout."""
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(self.messages(template, user), tokenize=False, add_generation_prompt=True)
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

    @staticmethod
    def answer_text(template: Template, **fields) -> str:
        """The rendered answer (``answer`` of the template), e.g. the label."""
        return _format(template, "answer", template.answer, fields)

    def answer_ids(self, template: Template, **fields) -> list[int]:
        """Ids of the rendered answer followed by the end-of-turn token (so the model learns to stop
        and label scores compare whole answers)."""
        return self.tokenizer(self.answer_text(template, **fields), add_special_tokens=False)["input_ids"] + self.end_ids

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

    # -- dialogue layout ----------------------------------------------------------------------
    def _answer_prefix(self) -> str:
        """What separates the answer cue from the label's text (``answer_prefix`` of the template)."""
        default = "" if getattr(self.tokenizer, "chat_template", None) else " "
        return str(self.merc_template.options.get("answer_prefix", default))

    def answer_first_ids(self) -> list[int]:
        """The first token id of every class's answer (``dialogue`` layout), in ``classes`` order; a
        :class:`PromptError` when two classes start with the same token."""
        prefix = self._answer_prefix()
        firsts = [self.tokenizer(prefix + label, add_special_tokens=False)["input_ids"][0] for label in self.classes]
        if len(set(firsts)) < len(firsts):
            clash = [c for c, f in zip(self.classes, firsts) if firsts.count(f) > 1]
            raise PromptError(f"labels {', '.join(clash)} start with the same token for this tokenizer, so the dialogue "
                              "layout cannot tell them apart; rename a label or use --layout utterance")
        return firsts

    def _dialogue_glue(self, system: str) -> tuple[str, str, str]:
        """(head, user_to_answer, answer_to_user): the text before the first turn (the system
        message), between a turn and its answer, and between an answer and the next turn.

        ``glue = "inline"`` (the template's option): the whole dialogue is one user message, each
        turn followed by ``answer_cue`` and turns separated by ``turn_separator`` (fewest tokens);
        ``glue = "chat"``: every turn a user message and every answer an assistant message of the
        tokenizer's chat template. Without a chat template the system text simply comes first."""
        t = self.merc_template
        inline = t.options.get("glue", "chat") == "inline"
        if not getattr(self.tokenizer, "chat_template", None):
            return system + "\n\n", str(t.options.get("answer_cue", "\nEmotion:")), str(t.options.get("turn_separator", "\n\n"))
        u, a = "\ue000U{}\ue000", "\ue000A{}\ue000"
        messages = [{"role": "system", "content": "\ue000S\ue000"}]
        for i in range(2):
            messages += [{"role": "user", "content": u.format(i)}, {"role": "assistant", "content": a.format(i)}]
        text = self.tokenizer.apply_chat_template(messages, tokenize=False)
        head = text[: text.index(u.format(0))].replace("\ue000S\ue000", system)
        if inline:
            return head, str(t.option("answer_cue")), str(t.option("turn_separator"))
        user_to_answer = text[text.index(u.format(0)) + len(u.format(0)): text.index(a.format(0))]
        answer_to_user = text[text.index(a.format(0)) + len(a.format(0)): text.index(u.format(1))]
        return head, user_to_answer, answer_to_user

    def dialogue_user(self, turn: DialogueTurn, soft_only: bool = False) -> str:
        """One turn's user message (soft-token markers included); ``soft_only``: its soft tokens
        alone, in the template's ``soft_turn`` (default ``{cues}``: no speaker, words or description)."""
        t = self.merc_template
        names = t.options.get("modality_names", {})
        cues = ""
        if turn.description and not soft_only:
            cues += _format(t, "description_line", t.option("description_line"),
                            {"speaker": turn.speaker, "description": turn.description})
        for modality in self.soft_tokens:
            cues += _format(t, "soft_line", t.option("soft_line"), {
                "speaker": turn.speaker, "name": names.get(modality, modality), "tokens": MARKER.format(modality)})
        if soft_only:
            return _format(t, "soft_turn", str(t.options.get("soft_turn", "{cues}")), {"speaker": turn.speaker, "cues": cues}).rstrip("\n")
        return _format(t, "turn", t.option("turn"), {"speaker": turn.speaker, "text": turn.text, "cues": cues}).rstrip("\n")

    def dialogue_system(self, demos: list[tuple[str, str]] = ()) -> str:
        """The system message: the instruction with the label list, then any retrieved
        demonstrations ``(text, label)``."""
        t = self.merc_template
        system = _format(t, "system", t.system, {"labels": ", ".join(self.classes)})
        if demos:
            system += t.option("demos_header") + "".join(
                _format(t, "demo_line", t.option("demo_line"), {"text": text, "label": label}) for text, label in demos)
        return system

    def dialogue(self, turns: list[DialogueTurn], demos: list[tuple[str, str]] = (), overlap: int = 2,
                 soft_only: bool = False) -> list[Window]:
        """The windows of one dialogue: as many turns as fit in ``max_len`` tokens each (at least one
        new turn), each window after the first repeating up to ``overlap`` previous turns as context.
        Every turn is new in exactly one window. ``soft_only``: each turn shows only its soft tokens
        (see :meth:`dialogue_user`)."""
        head, to_answer, to_user = self._dialogue_glue(self.dialogue_system(demos))
        head_ids, _ = self.encode_text(head)
        to_answer_ids = self.tokenizer(to_answer, add_special_tokens=False)["input_ids"]
        to_user_ids = self.tokenizer(to_user, add_special_tokens=False)["input_ids"]
        pieces = [self.encode_text(self.dialogue_user(turn, soft_only)) for turn in turns]
        # turn i costs its glue from the previous answer (none for a window's first turn), its
        # message and the glue to its answer
        cost = [len(ids) + len(to_answer_ids) for ids, _ in pieces]

        def fits(first: int, end: int) -> bool:
            return len(head_ids) + sum(cost[first:end]) + len(to_user_ids) * (end - first - 1) <= self.max_len

        windows, start = [], 0
        while start < len(turns):
            first = max(0, start - overlap)
            while first < start and not fits(first, start + 1):
                first += 1
            end = start + 1
            while end < len(turns) and fits(first, end + 1):
                end += 1
            ids, soft, answers = list(head_ids), {}, []
            for i in range(first, end):
                if i > first:
                    ids += to_user_ids
                message, positions = pieces[i]
                for modality, where in positions.items():
                    soft.setdefault(modality, []).append((turns[i].row, [len(ids) + p for p in where]))
                ids += message + to_answer_ids
                answers.append(len(ids) - 1)
            windows.append(Window(ids, soft, [t.row for t in turns[first:end]], answers,
                                  [i >= start for i in range(first, end)]))
            start = end
        return windows

    def show_window(self, window: Window, labels: list[str | None] | None = None) -> str:
        """Readable text of a window: soft tokens as ``<MODALITY xK>``, and after each turn the
        answer slot ``[-> label]`` (``[-> ?]`` unlabelled; ``(context)`` marks repeated turns)."""
        marks = {p: m for m, entries in window.soft.items() for _, where in entries for p in where}
        firsts = self.answer_first_ids()
        out, run = [], []
        answer_at = {p: j for j, p in enumerate(window.answer_positions)}
        i = 0
        while i < len(window.ids):
            if i in marks:
                out.append(self.tokenizer.decode(run))
                run = []
                k = i
                while k in marks and marks[k] == marks[i]:
                    k += 1
                out.append(f"<{marks[i]} x{k - i}>")
                i = k
                continue
            run.append(window.ids[i])
            if i in answer_at:
                j = answer_at[i]
                label = (labels or [None] * len(window.rows))[j]
                token = self.tokenizer.decode([firsts[self.classes.index(label)]]) if label in self.classes else "?"
                out.append(self.tokenizer.decode(run) + f"[-> {label or '?'} (first token {token!r})"
                           + ("" if window.new[j] else ", context") + "]")
                run = []
            i += 1
        out.append(self.tokenizer.decode(run))
        return "".join(out)

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
