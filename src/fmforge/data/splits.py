"""Which documents are held out for validation, and whether the split realized what was asked.

The rule: documents are ordered by their content hash (uniform, a pure function of the text); the first
ones in that order go to validation, as many as bring the validation share of bytes nearest to
``val_fraction`` (at least one when ``val_fraction > 0`` and there are two documents, never all). The same
inputs therefore give the same split, a document's place depends only on its own text and where the
threshold falls, and the realized share is the requested one up to one document's size.

The realized share (documents, tokens, bytes) is reported beside the request. A realized share more than
``UNEVEN_FACTOR`` times off the request, or an empty validation split when one was asked for, is a one-line
error unless the caller allows an uneven split.
"""

from __future__ import annotations

from array import array

import numpy as np

from fmforge.errors import FmforgeError

UNEVEN_FACTOR = 2.0
RULE = "lowest content hash first, up to the requested share of bytes"


def choose_val(u: array, n_bytes: array, val_fraction: float) -> np.ndarray:
    """A boolean mask over documents: True for the validation ones (see the module's rule)."""
    n = len(u)
    is_val = np.zeros(n, dtype=bool)
    if val_fraction <= 0 or n < 2:
        return is_val
    order = np.lexsort((np.arange(n), np.frombuffer(u, dtype=np.float64)))  # ties (never, in practice) by position
    cum = np.concatenate([[0], np.cumsum(np.frombuffer(n_bytes, dtype=np.int64)[order])])
    k = int(np.argmin(np.abs(cum - val_fraction * cum[-1])))
    k = min(max(k, 1), n - 1)
    is_val[order[:k]] = True
    return is_val


def shares(train: dict[str, int], val: dict[str, int]) -> dict[str, float]:
    """The validation share of each measure ("documents", "tokens", "bytes") given per-split counts."""
    return {key: val[key] / max(1, train[key] + val[key]) for key in val}


def uneven_problem(val_fraction: float, n_val: int, share: float, what: str) -> str | None:
    """Why a split with ``n_val`` validation documents and ``share`` of ``what`` misses the request, or None."""
    if val_fraction <= 0:
        return None
    if n_val == 0:
        return f"val_fraction {val_fraction:g} asks for a validation split, but it is empty"
    if not val_fraction / UNEVEN_FACTOR <= share <= val_fraction * UNEVEN_FACTOR:
        return (f"val_fraction {val_fraction:g} asks for {val_fraction:.2%} of the {what}, but the validation "
                f"split holds {share:.2%} ({_documents(n_val)})")
    return None


def _documents(n: int) -> str:
    return f"{n} document" + ("" if n == 1 else "s")


def check_split(val_fraction: float, n_val: int, n_docs: int, share: float, what: str, allow: bool) -> None:
    """Raise a one-line FmforgeError when the split misses the request and ``allow`` is False."""
    problem = uneven_problem(val_fraction, n_val, share, what)
    if problem is None or allow:
        return
    raise FmforgeError(f"{problem}: {_documents(n_docs)} cannot be split that finely; pass --allow-uneven-split "
                       "to accept it, lower --document-bytes to cut large files into more documents, or change "
                       "--val-fraction")
