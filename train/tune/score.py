"""Label scoring: the log-likelihood of every label's answer, for all labels at once.

``utterance`` layout (:func:`label_scores`): the prompt goes through the LLM once (keeping its
key/value cache); the cache is repeated once per label and all label continuations run in one
batched pass. ``dialogue`` layout (:func:`answer_scores`): one pass over each window; at every answer
position the log-probability of each label's first token (the whole answer of that layout).
Either way the answer is always a valid label and a softmax over the C label scores gives a
probability per class.

>>> scores = label_scores(model, batch, label_ids)        # doctest: +SKIP
>>> scores.shape                                          # (B, C)
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from bemerc.train.tune.data import Batch, pad_ids
from bemerc.train.tune.model import MercModel


@torch.no_grad()
def label_scores(model: MercModel, batch: Batch, label_ids: list[list[int]], normalize: bool = False) -> torch.Tensor:
    """(B, C) summed log-probabilities of each label's tokens after each prompt of ``batch`` (a
    prompt-only batch); ``normalize`` divides each sum by the label's token count."""
    device = batch.input_ids.device
    labels, label_mask = (t.to(device) for t in pad_ids(label_ids, pad_id=0))
    n, (c, width) = batch.input_ids.shape[0], labels.shape
    rows = torch.arange(n, device=device)

    out = model.decoder(inputs_embeds=model.embed(batch.input_ids, batch.soft),
                        attention_mask=batch.attention_mask, use_cache=True)
    last = out.last_hidden_state[rows, batch.prompt_lengths - 1]  # (B, H)
    first = F.log_softmax(model.lm_head(last).float(), dim=-1)[:, labels[:, 0]]  # (B, C)
    token_logp = [first.reshape(n * c, 1)]

    if width > 1:
        # Label tokens 0..L-2 continue every prompt (positions right after its last real token);
        # each predicts the next label token. Prompt padding stays masked inside the cache.
        cache = out.past_key_values
        cache.batch_repeat_interleave(c)
        inputs = labels[:, :-1].repeat(n, 1)  # (B*C, L-1)
        mask = torch.cat([batch.attention_mask.repeat_interleave(c, 0), label_mask[:, :-1].repeat(n, 1)], dim=1)
        positions = batch.prompt_lengths.repeat_interleave(c)[:, None] + torch.arange(width - 1, device=device)
        hidden = model.decoder(input_ids=inputs, attention_mask=mask, position_ids=positions,
                               past_key_values=cache, use_cache=True).last_hidden_state
        logp = F.log_softmax(model.lm_head(hidden).float(), dim=-1)  # (B*C, L-1, V)
        token_logp.append(logp.gather(-1, labels[:, 1:].repeat(n, 1)[..., None])[..., 0])

    mask = label_mask.repeat(n, 1).float()
    total = (torch.cat(token_logp, dim=1) * mask).sum(1)
    if normalize:
        total = total / mask.sum(1)
    return total.view(n, c)


def label_probabilities(scores: torch.Tensor) -> np.ndarray:
    """(B, C) scores -> (B, C) float32 probabilities (softmax over the labels; rows sum to 1)."""
    return F.softmax(scores.float(), dim=-1).cpu().numpy().astype(np.float32)


@torch.no_grad()
def answer_scores(model: MercModel, batch: Batch, windows: list, first_ids: list[int]) -> tuple[torch.Tensor, list[int]]:
    """(M, C) log-probabilities of each label's first token at the answer positions of the turns
    that are new in ``windows`` (the ``dialogue`` layout), and their M corpus rows, in window order."""
    device = batch.input_ids.device
    where = [(b, p, row) for b, w in enumerate(windows) for row, p, new in zip(w.rows, w.answer_positions, w.new) if new]
    index = torch.tensor([[b, p] for b, p, _ in where], device=device)
    logits = model.logits_at(batch, (index[:, 0], index[:, 1])).float()  # (M, V)
    labels = torch.tensor(first_ids, device=device)
    return F.log_softmax(logits, dim=-1)[:, labels], [row for _, _, row in where]
