"""Masked language modelling (Devlin et al. 2019): hide 15% of the tokens and predict them from both sides."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fmforge.models.bert import Bert
from fmforge.objectives.clm import IGNORE_INDEX, clm_loss


def mask_tokens(input_ids: torch.Tensor, *, mask_token_id: int, vocab_size: int,
                special_token_ids: Sequence[int] = (), attention_mask: torch.Tensor | None = None,
                generator: torch.Generator | None = None, mask_prob: float = 0.15, replace_prob: float = 0.8,
                random_prob: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's corruption: each non-special, non-padding token is selected with probability ``mask_prob``;
    a selected token becomes [MASK] with probability ``replace_prob``, a uniformly random token with
    ``random_prob``, and stays itself otherwise (80/10/10). Keeping some tokens and randomizing others
    means the model cannot learn that only [MASK] positions need a prediction, since [MASK] never appears
    at fine-tuning time. Returns (inputs, labels): labels hold the original token at selected positions
    and -100 (ignored by the loss) elsewhere. ``generator`` (on the ids' device) makes it reproducible."""
    kw = dict(generator=generator, device=input_ids.device)
    candidates = ~torch.isin(input_ids, torch.as_tensor(list(special_token_ids), dtype=input_ids.dtype,
                                                        device=input_ids.device))
    if attention_mask is not None:
        candidates &= attention_mask.bool()
    selected = (torch.rand(input_ids.shape, **kw) < mask_prob) & candidates
    labels = torch.where(selected, input_ids, IGNORE_INDEX)
    action = torch.rand(input_ids.shape, **kw)  # one draw splits the selected tokens three ways
    to_mask = selected & (action < replace_prob)
    to_random = selected & (action >= replace_prob) & (action < replace_prob + random_prob)
    random_tokens = torch.randint(vocab_size, input_ids.shape, dtype=input_ids.dtype, **kw)
    inputs = torch.where(to_mask, mask_token_id, input_ids)
    inputs = torch.where(to_random, random_tokens, inputs)
    return inputs, labels


def mlm_loss(model: Bert, inputs: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor | None = None,
             token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Mean cross-entropy (fp32) over the selected positions. The vocabulary head runs only on those ~15%
    of positions: it is the largest matmul of the model, and the rest would be thrown away."""
    selected = labels != IGNORE_INDEX
    return clm_loss(model(inputs, attention_mask, token_type_ids, mlm_select=selected), labels[selected])
