"""Masked language modelling (Devlin et al. 2019): hide 15% of the tokens and predict them from both sides.

BERT pretraining runs on the same token shards as the causal LM: each window of seq_len tokens (documents
packed and separated by end-of-text, as RoBERTa's FULL-SENTENCES) is corrupted 80/10/10 at
``model.mask_prob`` of its positions and the selected tokens are predicted. The global batch counts tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from fmforge.data.loader import eval_windows
from fmforge.data.tokenizer import load_tokenizer
from fmforge.errors import FmforgeError
from fmforge.models.bert import Bert
from fmforge.objectives.base import Sums, encoder_flops, evaluating, round_up
from fmforge.objectives.clm import IGNORE_INDEX, CausalLMTask, clm_loss


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


def mask_token_id(tokenizer, vocab_size: int) -> tuple[int, bool]:
    """The id [MASK] gets: the tokenizer's own mask token when it has one (WordPiece's [MASK], RoBERTa's
    <mask>), else the first row past its vocabulary, which the padded embedding already holds and the
    tokenizer never emits. Returns (id, whether it is an extra row)."""
    for name in ("[MASK]", "<mask>", "<|mask|>"):
        tid = tokenizer.tokenizer.token_to_id(name)
        if tid is not None:
            return tid, False
    return vocab_size, True


class MaskedLMTask(CausalLMTask):
    """The causal LM's windows and loader; BERT's model, corruption and loss."""

    def resolve_model(self, tok_info: dict):
        tok = load_tokenizer(self.data_dir / "tokenizer.json")
        self.tok_vocab = tok.vocab_size
        self.mask_id, extra = mask_token_id(tok, tok.vocab_size)
        added = tok.tokenizer.get_added_tokens_decoder()
        self.special_ids = sorted({i for i, t in added.items() if t.special} |
                                  {i for i in (tok.eos_id, tok.bos_id, tok.pad_id) if i is not None})
        m, seq_len = self.cfg.model, self.cfg.data.seq_len
        needed = tok.vocab_size + int(extra)
        if "vocab_size" in m.model_fields_set:
            if m.vocab_size < needed:
                raise FmforgeError(f"model.vocab_size ({m.vocab_size}) is smaller than the tokenizer's vocabulary"
                                   f"{' plus a [MASK] row' if extra else ''} ({needed})")
            vocab = m.vocab_size
        else:
            vocab = round_up(needed, m.vocab_multiple)
        if seq_len > m.max_seq_len:
            raise FmforgeError(f"data.seq_len ({seq_len}) exceeds model.max_seq_len ({m.max_seq_len})")
        return type(m)(**{**m.model_dump(), "vocab_size": vocab})

    def build_model(self) -> nn.Module:
        return Bert(self.model_cfg)

    def flops_per_unit(self, model: nn.Module) -> float:
        m, seq_len = self.model_cfg, self.cfg.data.seq_len
        head = m.d_model * m.d_model + m.d_model * m.vocab_size  # run only on the selected positions
        return encoder_flops(model.blocks, seq_len, m.n_layer, m.d_model) / seq_len + 6.0 * m.mask_prob * head

    def _masked(self, inputs: torch.Tensor, generator=None):
        return mask_tokens(inputs, mask_token_id=self.mask_id, vocab_size=self.tok_vocab,
                           special_token_ids=self.special_ids, generator=generator, mask_prob=self.model_cfg.mask_prob)

    def loss(self, model, batch, device, amp):
        inputs = batch[0].to(device, non_blocking=True)
        inputs, labels = self._masked(inputs)  # torch's RNG: checkpointed, so a resumed run masks the same
        with amp():
            return mlm_loss(model, inputs, labels)

    def validate(self, model, micro_batch, device, amp):
        if self.val_windows is None:
            return None
        sums = Sums()
        with evaluating(model):
            g = torch.Generator(device).manual_seed(0)  # the same masks at every validation: comparable losses
            for inputs, _ in eval_windows(self.val_windows, micro_batch, self.cfg.train.eval_batches):
                inputs, labels = self._masked(inputs.to(device), generator=g)
                selected = labels != IGNORE_INDEX
                with amp():
                    logits = model(inputs, mlm_select=selected)
                sums.add("val_loss", F.cross_entropy(logits.float(), labels[selected], reduction="sum").item(),
                         int(selected.sum()))
        return sums.means()
