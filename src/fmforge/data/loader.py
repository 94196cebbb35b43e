"""Packed token windows and a deterministic, resumable global-batch order.

Documents sit in the shards as ``[bos] text [eos]`` back to back; a window is ``seq_len + 1`` consecutive
tokens (inputs and shifted targets), so documents are packed across window edges as in GPT-2/nanoGPT.

The order of global batches, and each rank's slice of them, is ``sampler.py``'s: a function of (seed,
epoch) only, the same at any world size.
"""

from __future__ import annotations

import queue
import threading
from pathlib import Path

import numpy as np
import torch

from fmforge.data.manifest import load_manifest
from fmforge.data.sampler import GlobalBatchSampler, SampledLoader
from fmforge.data.shards import check_token_ids, read_shard
from fmforge.errors import FmforgeError
from fmforge.io.paths import confined


class TokenWindows:
    """All ``seq_len + 1``-token windows of one split, stepping by ``seq_len`` inside each shard.

    Shard names come from the manifest and must stay inside ``data_dir``. Each shard's ids are checked
    against the vocabulary (``vocab_size``, default the manifest's tokenizer's; the smaller of the two when
    given) the first time a window of it is read: once per shard, and only for shards actually read."""

    def __init__(self, data_dir: str | Path, split: str, seq_len: int, vocab_size: int | None = None):
        data_dir = Path(data_dir)
        self.manifest = load_manifest(data_dir)
        self.seq_len = seq_len
        entries = [s for s in self.manifest["shards"] if s["split"] == split]
        self.names = [s["file"] for s in entries]
        self.shards = [read_shard(confined(data_dir, s["file"], f"{data_dir / 'manifest.json'} shard"))
                       for s in entries]
        vocab = self.manifest["tokenizer"]["vocab_size"]
        self.vocab_size = min(vocab, vocab_size) if vocab_size is not None else vocab
        self._checked = [False] * len(self.shards)
        counts = [max(0, (len(s) - 1) // seq_len) for s in self.shards]
        self.starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        if self.starts[-1] == 0:
            tokens = sum(len(s) for s in self.shards)
            raise FmforgeError(f"{split} split of {data_dir} has {tokens} tokens: too few for one window of "
                               f"data.seq_len + 1 = {seq_len + 1}")
        self.data_dir = data_dir

    def check_shard(self, shard: int) -> None:
        """Check shard ``shard``'s ids against the vocabulary (once; a benign race may check it twice)."""
        if not self._checked[shard]:
            check_token_ids(self.shards[shard], self.vocab_size, str(self.data_dir / self.names[shard]))
            self._checked[shard] = True

    def __len__(self) -> int:
        return int(self.starts[-1])

    def window(self, i: int) -> np.ndarray:
        shard = int(np.searchsorted(self.starts, i, side="right") - 1)
        self.check_shard(shard)
        off = (i - int(self.starts[shard])) * self.seq_len
        return self.shards[shard][off: off + self.seq_len + 1]

    def batch(self, indices) -> torch.Tensor:
        """``[len(indices), seq_len + 1]`` int64 tensor of the given windows."""
        return torch.from_numpy(np.stack([self.window(int(i)) for i in indices]).astype(np.int64))


class GlobalBatchLoader(SampledLoader):
    """Yields, for each optimizer step, this rank's micro-batches ``(inputs, targets)`` of one global batch
    of rows (token windows, or any row source with ``len()`` and ``batch(indices)``), in the order of
    ``sampler.GlobalBatchSampler``. Row sources other than windows override ``inputs_targets``."""

    what, size_key = "windows", "windows"

    def __init__(self, windows: TokenWindows, global_batch: int, micro_batch: int, seed: int,
                 rank: int = 0, world_size: int = 1):
        self.windows = windows
        self.sampler = GlobalBatchSampler(len(windows), global_batch, micro_batch, seed, rank, world_size,
                                          what=self.what, size_key=self.size_key)

    def read(self, indices: np.ndarray, epoch: int):
        return self.inputs_targets(self.windows.batch(indices))

    @staticmethod
    def inputs_targets(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A micro-batch of windows [n, T+1] as (inputs, targets): the window and the window shifted by one."""
        return rows[:, :-1], rows[:, 1:]


class Prefetcher:
    """Reads a ``GlobalBatchLoader`` ``depth`` optimizer steps ahead on a background thread (shard reads and
    tensor assembly overlap the model's step; memory-mapped reads release the GIL), pinning the batches
    when they go to a GPU. ``state_dict`` is the position after the last step *handed out*, never after the
    ones read ahead, so checkpoints and resume stay exact. ``depth=0`` reads inline."""

    def __init__(self, loader: GlobalBatchLoader, depth: int = 2, pin_memory: bool = False):
        self.loader, self.depth, self.pin_memory = loader, depth, pin_memory
        self._state = loader.state_dict()
        self._queue: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    @property
    def accum_steps(self) -> int:
        return self.loader.accum_steps

    @property
    def micro_batch(self) -> int:
        return self.loader.micro_batch

    def _read(self) -> tuple[list, dict]:
        micro = self.loader.next_step()
        if self.pin_memory:
            # Targets may be captions (a list of strings): only tensors are pinned.
            micro = [tuple(t.pin_memory() if isinstance(t, torch.Tensor) else t for t in pair) for pair in micro]
        return micro, self.loader.state_dict()

    def _work(self) -> None:
        try:
            while not self._stop.is_set():
                self._put(self._read())
        except BaseException as err:  # handed to the consumer, raised on its next call
            self._put(err)

    def _put(self, item) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def next_step(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        if self.depth == 0:
            micro, self._state = self._read()
            return micro
        if self._thread is None:
            self._queue = queue.Queue(maxsize=self.depth)
            self._stop.clear()
            self._thread = threading.Thread(target=self._work, name="fmforge-prefetch", daemon=True)
            self._thread.start()
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        micro, self._state = item
        return micro

    def close(self) -> None:
        """Stop reading ahead and put the loader back where the consumer is."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
        self.loader.load_state_dict(self._state)

    def state_dict(self) -> dict:
        return dict(self._state)

    def load_state_dict(self, state: dict) -> None:
        self.close()
        self.loader.load_state_dict(state)
        self._state = self.loader.state_dict()

    def set_micro_batch(self, micro_batch: int) -> None:
        self.close()
        self.loader.set_micro_batch(micro_batch)


def eval_windows(windows: TokenWindows, batch_size: int, max_batches: int | None = None):
    """Validation batches in file order (deterministic, every window once), optionally capped."""
    n = len(windows)
    if max_batches is not None:
        n = min(n, max_batches * batch_size)
    for start in range(0, n, batch_size):
        rows = windows.batch(range(start, min(start + batch_size, n)))
        yield rows[:, :-1], rows[:, 1:]
