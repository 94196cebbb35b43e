"""Pseudo-log-likelihood of text under a masked LM (BERT): how likely the encoder finds a sentence, which
it cannot say directly because it sees every token at once.

PLL (Salazar et al. 2020, "Masked Language Model Scoring") masks each token in turn and sums the
log-probability the model gives the true token at the mask, the rest of the sentence visible. CrowS-Pairs
(Nangia et al. 2020) scores a pair by the PLL of the tokens the two sentences *share*, each sentence
conditioned on its own differing words, so that rarer group words themselves do not decide the comparison.

A sequence is wrapped as BERT saw text in pretraining: ``[CLS] ... [SEP]`` when the tokenizer has those
tokens (an imported Hugging Face BERT), else ``eos ... eos`` (fmforge's masked-LM pretraining packs
documents separated by eos). One masked copy per scored token; copies of many sentences are batched,
right-padded with a key-padding mask, and the vocabulary head runs only at the masked positions. The
log-softmax spans the model's whole vocabulary (padded rows included), as transformers' BertForMaskedLM.
"""

from __future__ import annotations

import difflib

import torch

from fmforge.errors import FmforgeError
from fmforge.models.bert import Bert
from fmforge.objectives.mlm import mask_token_id


class MaskedLMScorer:
    """Pseudo-log-likelihoods of ``model`` (an fmforge ``Bert``) under ``tokenizer`` (TextTokenizer)."""

    def __init__(self, model: Bert, tokenizer, device, *, batch_size: int = 64):
        if batch_size < 1:
            raise FmforgeError(f"batch size must be at least 1 (got {batch_size})")
        if not isinstance(model, Bert):
            raise FmforgeError("pseudo-log-likelihood needs a BERT-family masked LM")
        self.model, self.tokenizer = model, tokenizer
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.mask_id, _ = mask_token_id(tokenizer, tokenizer.vocab_size)
        if self.mask_id >= model.cfg.vocab_size:
            raise FmforgeError(f"the tokenizer's [MASK] id {self.mask_id} is outside the model's vocabulary "
                               f"({model.cfg.vocab_size})")
        vocab = tokenizer.tokenizer
        cls, sep = vocab.token_to_id("[CLS]"), vocab.token_to_id("[SEP]")
        self.prefix = [cls] if cls is not None else [tokenizer.eos_id]
        self.suffix = [sep] if sep is not None else [tokenizer.eos_id]
        self.pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
        self.max_tokens = model.cfg.max_seq_len - len(self.prefix) - len(self.suffix)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, cut to what fits between the wrapping tokens."""
        return [ids[:self.max_tokens] for ids in self.tokenizer.encode_batch(list(texts))]

    # ------------------------------------------------------------------------------------------------ requests

    def sentences(self, texts: list[str]) -> list[tuple[float, int]]:
        """(PLL of every token, number of tokens) for each text."""
        seqs = self.encode_batch(texts)
        return list(zip(self.pll_tokens(seqs, [range(len(s)) for s in seqs]), map(len, seqs)))

    def shared(self, pairs: list[tuple[str, str]]) -> list[tuple[float, float]]:
        """For each (a, b): the PLL of the tokens a and b share (difflib's matching blocks on token ids),
        in a and in b. CrowS-Pairs' score."""
        seqs = self.encode_batch([t for pair in pairs for t in pair])
        positions = []
        for a, b in zip(seqs[0::2], seqs[1::2]):
            blocks = difflib.SequenceMatcher(None, a, b, autojunk=False).get_matching_blocks()
            positions.append([blk.a + k for blk in blocks for k in range(blk.size)])
            positions.append([blk.b + k for blk in blocks for k in range(blk.size)])
        scores = self.pll_tokens(seqs, positions)
        return list(zip(scores[0::2], scores[1::2]))

    def continuations(self, requests: list[tuple[str, str]]) -> list[float]:
        """For each (context, continuation): the PLL of the continuation's tokens in ``context +
        continuation`` (each continuation token masked in turn, the context and the other continuation
        tokens visible). The split follows the decoder scorer's: trailing context spaces move to the
        continuation, whose tokens are those of the whole past the context's; a request longer than the
        model's context loses context tokens on the left."""
        contexts, wholes = [], []
        for context, continuation in requests:
            stripped = context.rstrip()
            contexts.append(stripped)
            wholes.append(stripped + context[len(stripped):] + continuation)
        encoded = self.tokenizer.encode_batch(contexts + wholes)
        seqs, positions = [], []
        for i in range(len(requests)):
            ctx, whole = encoded[i], encoded[len(requests) + i]
            start = len(ctx) if whole[:len(ctx)] == ctx else _common_prefix(ctx, whole)
            cut = max(0, len(whole) - self.max_tokens)  # too long: the context loses tokens on the left
            seqs.append(whole[cut:])
            positions.append(range(max(0, start - cut), len(whole) - cut))
        return self.pll_tokens(seqs, positions)

    # ------------------------------------------------------------------------------------------------ scoring

    def pll_tokens(self, seqs: list[list[int]], positions: list) -> list[float]:
        """Sum over ``positions[i]`` (indices into ``seqs[i]``) of log p(token | sequence with it masked)."""
        jobs = [(i, p) for i, pos in enumerate(positions) for p in pos if 0 <= p < len(seqs[i])]
        jobs.sort(key=lambda job: (len(seqs[job[0]]), job))
        totals = torch.zeros(len(seqs), dtype=torch.float64)
        model = self.model
        was_training = model.training
        model.eval()
        try:
            with torch.inference_mode():
                for start in range(0, len(jobs), self.batch_size):
                    batch = jobs[start:start + self.batch_size]
                    lps = self._score(seqs, batch)
                    totals.index_add_(0, torch.tensor([i for i, _ in batch]), lps)
        finally:
            model.train(was_training)
        return totals.tolist()

    def _score(self, seqs: list[list[int]], batch: list[tuple[int, int]]) -> torch.Tensor:
        """log p(true token) at the masked position of each (sequence, position) row, float64 on the CPU."""
        offset = len(self.prefix)
        rows = [self.prefix + seqs[i] + self.suffix for i, _ in batch]
        width = max(map(len, rows))
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        attention = torch.zeros(len(rows), width, dtype=torch.long)
        for r, row in enumerate(rows):
            ids[r, :len(row)] = torch.tensor(row)
            attention[r, :len(row)] = 1
        where = torch.tensor([offset + p for _, p in batch])
        target = ids[torch.arange(len(rows)), where].clone()
        ids[torch.arange(len(rows)), where] = self.mask_id
        select = torch.zeros(len(rows), width, dtype=torch.bool)
        select[torch.arange(len(rows)), where] = True  # one per row: the logits come back in row order
        dev = self.device
        logits = self.model(ids.to(dev), attention.to(dev), mlm_select=select.to(dev)).float()
        return logits.log_softmax(-1).gather(1, target.to(dev)[:, None])[:, 0].double().cpu()


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def head_is_untrained(model: Bert) -> bool:
    """True when the masked-LM head still holds BERT's initialization exactly (bias all zero, norm weight
    all one): what an import of a checkpoint without a head (BertModel, sentence-transformers) gets."""
    return bool((model.mlm_bias == 0).all() and (model.mlm_norm.weight == 1).all()
                and (model.mlm_norm.bias == 0).all())
