"""Tokenizers: train a byte-level BPE on the corpus, or load a pretrained one (tokenizer.json / HF directory).

Everything downstream (shards, training, eval, generate) talks to ``TextTokenizer``: a thin wrapper over a
Hugging Face ``tokenizers.Tokenizer`` that pins down the ids of bos/eos/pad and never adds special tokens
by itself — fmforge decides where documents start and end.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from fmforge.errors import FmforgeError

SPECIAL_TOKENS = {"bos": "<|bos|>", "eos": "<|eos|>", "pad": "<|pad|>"}
# Tried in order when a tokenizer's config does not name its end-of-sequence token.
EOS_FALLBACKS = ("<|eos|>", "<|endoftext|>", "</s>", "<eos>", "[SEP]")


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte → printable character table, the alphabet of every byte-level BPE."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


class TextTokenizer:
    """A ``tokenizers.Tokenizer`` plus the special-token ids fmforge needs (``eos_id`` always exists)."""

    def __init__(self, tokenizer: Tokenizer, *, eos_id: int, bos_id: int | None = None, pad_id: int | None = None):
        self.tokenizer = tokenizer
        # Documents are pretraining data, not prompts: a literal "<|eos|>" in a file is text, and must not
        # become the end-of-document id (which would also break decode(encode(text)) == text).
        self.tokenizer.encode_special_tokens = True
        self.eos_id = eos_id
        self.bos_id = bos_id
        self.pad_id = pad_id
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Encode many texts at once: the Rust side spreads the batch over every core."""
        fast = getattr(self.tokenizer, "encode_batch_fast", None)  # skips offset tracking (tokenizers ≥ 0.20.1)
        encodings = (fast or self.tokenizer.encode_batch)(list(texts), add_special_tokens=False)
        return [e.ids for e in encodings]

    def decode(self, ids: Iterable[int]) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)

    def decode_batch(self, seqs: list[np.ndarray]) -> list[str]:
        """Decode many integer arrays at once (in Rust, over the cores ``TOKENIZERS_PARALLELISM`` allows)."""
        return self.tokenizer.decode_batch([np.asarray(s, dtype=np.int64).tolist() for s in seqs],
                                           skip_special_tokens=True)

    def token_bytes(self) -> np.ndarray:
        """UTF-8 length of each token id (int64); special tokens count 0. Bits-per-byte needs this.

        Exact for byte-level BPE (each character of a token is one byte under GPT-2's table). Other tokenizer
        types fall back to decoding each id alone, which is approximate (e.g. WordPiece's "##" and spaces).
        """
        n = self.vocab_size
        out = np.zeros(n, dtype=np.int64)
        added = self.tokenizer.get_added_tokens_decoder()
        if isinstance(self.tokenizer.decoder, decoders.ByteLevel):
            byte_of = {c: b for b, c in bytes_to_unicode().items()}
            for i in range(n):
                token = self.tokenizer.id_to_token(i)
                if token is None or i in added:
                    continue
                out[i] = len(token) if all(c in byte_of for c in token) else len(token.encode())
        else:
            texts = self.tokenizer.decode_batch([[i] for i in range(n)], skip_special_tokens=True)
            out[:] = [len(t.encode()) for t in texts]
        # Added tokens are stored as plain text, not in the byte alphabet; special ones decode to nothing.
        for i, tok in added.items():
            if i < n:
                out[i] = 0 if tok.special else len(tok.content.encode())
        return out

    def special_tokens_map(self) -> dict[str, str]:
        """The bos/eos/pad roles by token text, as Hugging Face's special_tokens_map.json writes them: saved
        beside tokenizer.json so a reload resolves the same ids even where no fallback name would."""
        roles = {"bos_token": self.bos_id, "eos_token": self.eos_id, "pad_token": self.pad_id}
        return {role: self.tokenizer.id_to_token(i) for role, i in roles.items() if i is not None}

    def to_json(self) -> str:
        return self.tokenizer.to_str()

    @property
    def sha256(self) -> str:
        """Hash of the serialized tokenizer: equals the sha256 of the file ``save`` writes."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()

    def save(self, path: str | Path) -> None:
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:  # bytes, so the file hashes exactly like ``sha256`` on every OS
            f.write(self.to_json().encode("utf-8"))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)


def train_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> TextTokenizer:
    """Train a byte-level BPE (GPT-2 style) whose first ids are <|bos|>=0, <|eos|>=1, <|pad|>=2.

    Byte-level means no unknown tokens and exact round trips: decode(encode(text)) == text for any string.
    No normalizer: cleaning already normalized the corpus, and a tokenizer-side normalizer would break the
    round trip for text that was not cleaned the same way.
    """
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise FmforgeError(f"vocab size {vocab_size} is too small: a byte-level BPE needs at least "
                           f"{256 + len(SPECIAL_TOKENS)} (256 bytes + {len(SPECIAL_TOKENS)} special tokens)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=list(SPECIAL_TOKENS.values()),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    ids = {name: tok.token_to_id(token) for name, token in SPECIAL_TOKENS.items()}
    return TextTokenizer(tok, eos_id=ids["eos"], bos_id=ids["bos"], pad_id=ids["pad"])


def read_json_object(path: Path) -> dict:
    """A JSON file that must hold an object; anything else is a one-line error naming the file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise FmforgeError(f"cannot read {path}: {str(err).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise FmforgeError(f"cannot read {path}: expected a JSON object")
    return data


def _token_content(value) -> str | None:
    """HF configs write a special token either as a string or as an AddedToken dict with "content"."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def load_tokenizer(path: str | Path) -> TextTokenizer:
    """Load a ``tokenizer.json`` file or a Hugging Face tokenizer directory (tokenizer.json plus optional
    tokenizer_config.json / special_tokens_map.json naming bos/eos/pad; for a file, those beside it)."""
    path = Path(path)
    if not path.exists():
        raise FmforgeError(f"tokenizer not found: {path}")
    if path.is_dir():
        file = path / "tokenizer.json"
        if not file.is_file():
            raise FmforgeError(f"no tokenizer.json in {path} (fmforge reads Hugging Face 'fast' tokenizers)")
    else:
        file = path
    config: dict = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the later file wins
        if (file.parent / name).is_file():
            config.update(read_json_object(file.parent / name))
    try:
        tok = Tokenizer.from_file(str(file))
    except Exception as err:  # tokenizers raises a bare Exception for bad JSON or an unknown model type
        raise FmforgeError(f"cannot read tokenizer {file}: {str(err).splitlines()[0] if str(err) else err}") from None
    # Pretrained tokenizer.json files often carry truncation/padding for their original model (MiniLM: 128
    # tokens); applied here they would silently cut every document.
    tok.no_truncation()
    tok.no_padding()

    def resolve(name: str, fallbacks: tuple[str, ...]) -> int | None:
        named = _token_content(config.get(f"{name}_token"))
        if named is not None:
            tid = tok.token_to_id(named)
            if tid is None:
                raise FmforgeError(f"tokenizer {path}: {name}_token {named!r} is not in its vocabulary")
            return tid
        for token in fallbacks:
            tid = tok.token_to_id(token)
            if tid is not None:
                return tid
        return None

    eos_id = resolve("eos", EOS_FALLBACKS)
    if eos_id is None:
        raise FmforgeError(f"tokenizer {path} has no end-of-sequence token (no eos_token in its config and none "
                           f"of {', '.join(EOS_FALLBACKS)} in its vocabulary)")
    return TextTokenizer(tok, eos_id=eos_id, bos_id=resolve("bos", (SPECIAL_TOKENS["bos"],)),
                         pad_id=resolve("pad", (SPECIAL_TOKENS["pad"],)))
