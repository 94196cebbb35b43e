"""Sentence embeddings from an fmforge encoder run: a BERT-family encoder (mean of the final hidden states
over ``[CLS] text [SEP]``, L2-normalized: the sentence-transformers recipe an imported all-MiniLM-L6-v2 was
trained with, and the one ``finetune.task=pairs`` trains) or a CLIP text tower (its own normalized embedding). Nearest-shot selection and retrieval both
embed through here, so an index and its queries always share one recipe."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch

from fmforge.device import pick_device
from fmforge.errors import FmforgeError
from fmforge.objectives.contrastive import CaptionTokens
from fmforge.objectives.text_pairs import encode_rows, mean_pool
from fmforge.runs import family_of, load_pretrained, read_model_config

EMBEDDING_FAMILIES = ("bert", "clip")
_HASH_CHUNK = 4 << 20


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while block := f.read(_HASH_CHUNK):
                digest.update(block)
    except OSError as err:
        raise FmforgeError(f"cannot read {path}: {err.strerror or err}") from None
    return digest.hexdigest()


def check_encoder_run(run_dir: str | Path) -> str:
    """The family of ``run_dir`` if it can embed text; a decoder or vision run is a one-line error."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FmforgeError(f"encoder run directory not found: {run_dir}")
    family = family_of(read_model_config(run_dir))
    if family not in EMBEDDING_FAMILIES:
        raise FmforgeError(f"{run_dir} holds a {family} model, which does not embed text; embeddings come from "
                           "a BERT-family encoder (e.g. `fmforge import hf` of all-MiniLM-L6-v2) or a CLIP "
                           "text tower")
    if not (run_dir / "tokenizer.json").is_file():
        raise FmforgeError(f"{run_dir} has no tokenizer.json: an encoder needs the tokenizer it was trained with")
    return family


class TextEncoder:
    """``encode(texts) -> float32 [n, d]`` unit vectors, plus the identity an index is checked against
    (``fingerprint``: hashes of the weights and of the tokenizer)."""

    def __init__(self, run_dir: str | Path, device: str = "auto", batch_size: int = 32, max_tokens: int = 256):
        self.run_dir = Path(run_dir)
        self.family = check_encoder_run(self.run_dir)
        self.device = pick_device(device)
        self.model, self.tokenizer = load_pretrained(self.run_dir, self.device)
        if batch_size < 1:
            raise FmforgeError(f"batch size must be at least 1 (got {batch_size})")
        self.batch_size = batch_size
        cfg = self.model.cfg
        self.context = cfg.text.context_length if self.family == "clip" else cfg.max_seq_len
        self.max_tokens = min(max_tokens, self.context)
        self.fingerprint = {"family": self.family,
                            "weights_sha256": file_sha256(self.run_dir / "model.safetensors"),
                            "tokenizer_sha256": self.tokenizer.sha256}

    def token_ids(self, texts: list[str]) -> list[list[int]]:
        """The text tokens (no special tokens) of each text."""
        return self.tokenizer.encode_batch(list(texts))

    def _bert_rows(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask = encode_rows(self.tokenizer, texts, self.max_tokens)
        width = int(mask.sum(1).max())  # padded to the longest text of the batch, not to max_tokens
        return ids[:, :width], mask[:, :width]

    def embed_tensor(self, model, texts: list[str]) -> torch.Tensor:
        """Unit embeddings [n, d] of ``texts`` by ``model`` (this encoder's, or a copy being fine-tuned), with
        gradients if enabled: the one pooling recipe training and indexing share."""
        if self.family == "clip":
            return model.encode_text(CaptionTokens(self.tokenizer, self.max_tokens)(texts).to(self.device))
        ids, mask = self._bert_rows(texts)
        ids, mask = ids.to(self.device), mask.to(self.device)
        return mean_pool(model(ids, attention_mask=mask).float(), mask)

    def encode(self, texts: list[str]) -> np.ndarray:
        texts = list(texts)
        dim = self.model.cfg.embed_dim if self.family == "clip" else self.model.cfg.d_model
        out = np.zeros((len(texts), dim), dtype=np.float32)
        # Similar lengths share a batch: less padding, same vectors (padding is masked out).
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        with torch.inference_mode():
            for start in range(0, len(texts), self.batch_size):
                idx = order[start:start + self.batch_size]
                out[idx] = self.embed_tensor(self.model, [texts[i] for i in idx]).cpu().numpy()
        return out
