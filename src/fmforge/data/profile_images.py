"""Image statistics for ``data profile`` on a prepared image directory (``data prepare-images``).

Per sample: its stored bytes' sha256 (exact duplicates), its decoded size and channels, and a 64-bit
difference hash (dHash: the image in grey, shrunk to 9x8, one bit per horizontally adjacent pair, "is the left
pixel brighter"). Two images whose dHashes differ in at most ``NEAR_BITS`` bits are perceptual duplicates —
the same picture re-encoded, resized or slightly retouched. Candidates are found by pigeonhole: two 64-bit
hashes within 3 bits share at least one of their four 16-bit quarters exactly.
"""

from __future__ import annotations

import hashlib
import io
from collections import Counter

import numpy as np
from PIL import Image

from fmforge.data.image_shards import ImageShards, ImageTooLarge, load_index

NEAR_BITS = 3
MAX_PLOTTED = 5000  # image sizes kept in profile.json for the scatter plot (the summary uses all)
HASH_SIZE = 8


def dhash(image: Image.Image) -> int:
    """64-bit difference hash of an image (any mode, any size)."""
    grey = image.convert("L").resize((HASH_SIZE + 1, HASH_SIZE), Image.Resampling.LANCZOS)
    px = np.asarray(grey, dtype=np.int16)
    bits = (px[:, :-1] > px[:, 1:]).flatten()
    return int(np.packbits(bits).view(">u8")[0])


class NearHashes:
    """Streaming perceptual-duplicate detector over 64-bit hashes (Hamming distance ≤ NEAR_BITS)."""

    def __init__(self) -> None:
        self._quarters: list[dict[int, list[int]]] = [{} for _ in range(4)]

    def is_near_duplicate(self, h: int) -> bool:
        keys = [(h >> (16 * q)) & 0xFFFF for q in range(4)]
        for q, k in enumerate(keys):
            for other in self._quarters[q].get(k, ()):
                if (h ^ other).bit_count() <= NEAR_BITS:
                    return True
        for q, k in enumerate(keys):
            self._quarters[q].setdefault(k, []).append(h)
        return False


def _channels(image: Image.Image) -> int:
    return len(image.getbands())


def profile_images(data_dir: str) -> dict:
    """The ``images`` section of profile.json for a prepared image directory (every split)."""
    index = load_index(data_dir)
    splits = sorted({s["split"] for s in index["shards"] if s.get("samples")})
    classes = index.get("classes") or []
    seen: set[bytes] = set()
    near = NearHashes()
    counts = Counter()
    by_class, sizes, channels, formats, per_split = Counter(), [], Counter(), Counter(), {}
    corrupt_examples: list[str] = []
    caption_chars: list[int] = []
    for split in splits:
        shards = ImageShards(data_dir, split)
        per_split[split] = len(shards)
        for i in range(len(shards)):
            counts["samples"] += 1
            try:
                raw, target = shards.raw(i)
                with Image.open(io.BytesIO(raw)) as im:
                    im.load()
                    sizes.append(im.size)
                    channels[_channels(im)] += 1
                    formats[im.format or "unknown"] += 1
                    h = dhash(im)
            except (ImageTooLarge, OSError, ValueError, Image.DecompressionBombError, SyntaxError) as err:
                counts["corrupt"] += 1
                if len(corrupt_examples) < 5:
                    corrupt_examples.append(f"{shards.where(i)}: {str(err)[:120]}")
                continue
            digest = hashlib.sha256(raw).digest()
            if digest in seen:
                counts["exact_duplicates"] += 1
            else:
                seen.add(digest)
                if near.is_near_duplicate(h):
                    counts["perceptual_duplicates"] += 1
            _count_target(index["mode"], target, classes, by_class, caption_chars)
    return _summary(index, counts, per_split, by_class, sizes, channels, formats, corrupt_examples, caption_chars)


def _count_target(mode: str, target: bytes, classes: list, by_class: Counter, caption_chars: list[int]) -> None:
    if mode == "classification":
        try:
            k = int(target)
            by_class[classes[k] if 0 <= k < len(classes) else f"#{k}"] += 1
        except ValueError:
            by_class["(bad label)"] += 1
    else:
        caption_chars.append(len(target.decode("utf-8", errors="replace")))


def _summary(index, counts, per_split, by_class, sizes, channels, formats, corrupt_examples, caption_chars) -> dict:
    n = max(1, counts["samples"])
    wh = np.asarray(sizes, dtype=np.int64).reshape(-1, 2)
    balance = None
    if by_class:
        values = np.array(list(by_class.values()), dtype=float)
        p = values / values.sum()
        balance = {"classes": dict(by_class.most_common()), "largest_to_smallest": float(values.max() / values.min()),
                   "normalized_entropy": float(-(p * np.log(p)).sum() / np.log(len(p))) if len(p) > 1 else 1.0}
    return {
        "mode": index["mode"], "samples": counts["samples"], "splits": per_split,
        "class_balance": balance,
        "widths": wh[:MAX_PLOTTED, 0].tolist(), "heights": wh[:MAX_PLOTTED, 1].tolist(),
        "size": {"min": wh.min(axis=0).tolist() if len(wh) else None,
                 "median": np.median(wh, axis=0).tolist() if len(wh) else None,
                 "max": wh.max(axis=0).tolist() if len(wh) else None,
                 "distinct": len({tuple(s) for s in wh.tolist()})},
        "channels": {str(k): v for k, v in sorted(channels.items())},
        "formats": dict(formats),
        "exact_duplicates": counts["exact_duplicates"], "exact_duplicate_rate": counts["exact_duplicates"] / n,
        "perceptual_duplicates": counts["perceptual_duplicates"],
        "perceptual_duplicate_rate": counts["perceptual_duplicates"] / n,
        "corrupt": counts["corrupt"], "corrupt_examples": corrupt_examples,
        "caption_chars": caption_chars or None,
    }
