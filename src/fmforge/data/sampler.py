"""THE data-order contract (DESIGN.md), written once for every loader (token windows, images, chat /
preference / labelled rows).

The sequence of global batches is a function of (seed, epoch) only: epoch e visits the samples in the
order of ``default_rng([seed, e]).permutation(n)``, G at a time. A global batch never spans epochs (the
permutation's tail that does not fill one is skipped), so every rank and world size agrees on where epochs
begin. Rank r of world w takes rows ``[r*G/w, (r+1)*G/w)`` of every global batch, split into micro-batches:
the same seed and global batch give the same data at any world size. The position is just (epoch, cursor).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np

from fmforge.errors import FmforgeError


@dataclass
class LoaderState:
    epoch: int = 0
    cursor: int = 0  # index in this epoch's permutation where the next global batch starts


class GlobalBatchSampler:
    """Indices of ``n`` samples, one optimizer step at a time: ``next_step()`` gives this rank's
    micro-batches of indices and the epoch they belong to. ``what`` names the samples in messages and
    ``size_key`` in the state dict (checkpoints record it to refuse resuming on other data)."""

    def __init__(self, n: int, global_batch: int, micro_batch: int, seed: int, rank: int = 0, world_size: int = 1,
                 what: str = "samples", size_key: str = "samples", too_few: str = "prepare more data"):
        if global_batch % (micro_batch * world_size):
            raise FmforgeError(f"global batch of {global_batch} {what} is not a multiple of micro_batch_size "
                               f"({micro_batch}) x world size ({world_size})")
        if n < global_batch:
            raise FmforgeError(f"the train split has {n} {what}, fewer than one global batch ({global_batch}); "
                               f"{too_few} or lower train.global_batch")
        if not 0 <= rank < world_size:
            raise FmforgeError(f"rank {rank} is outside world size {world_size}")
        self.n, self.global_batch, self.micro_batch = n, global_batch, micro_batch
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.what, self.size_key = what, size_key
        self.state = LoaderState()
        self._perm_epoch: int | None = None
        self._perm: np.ndarray | None = None

    @property
    def accum_steps(self) -> int:
        return self.global_batch // (self.micro_batch * self.world_size)

    @property
    def steps_per_epoch(self) -> int:
        return self.n // self.global_batch

    def permutation(self, epoch: int) -> np.ndarray:
        if self._perm_epoch != epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
            self._perm_epoch = epoch
        return self._perm

    def next_global_batch_indices(self) -> np.ndarray:
        if self.state.cursor + self.global_batch > self.n:
            self.state = LoaderState(epoch=self.state.epoch + 1, cursor=0)
        start = self.state.cursor
        indices = self.permutation(self.state.epoch)[start: start + self.global_batch]
        self.state.cursor += self.global_batch
        return indices

    def next_step(self) -> tuple[list[np.ndarray], int]:
        """(this rank's micro-batches of sample indices for the next optimizer step, their epoch)."""
        indices = self.next_global_batch_indices()
        per_rank = self.global_batch // self.world_size
        mine = indices[self.rank * per_rank: (self.rank + 1) * per_rank]
        return [mine[i: i + self.micro_batch] for i in range(0, per_rank, self.micro_batch)], self.state.epoch

    def set_micro_batch(self, micro_batch: int) -> None:
        """Split each rank's share into micro-batches of this size instead (the global batch is unchanged)."""
        per_rank = self.global_batch // self.world_size
        if micro_batch < 1 or per_rank % micro_batch:
            raise FmforgeError(f"micro-batch {micro_batch} does not divide this rank's {per_rank} {self.what} per step")
        self.micro_batch = micro_batch

    def state_dict(self) -> dict:
        return {"epoch": self.state.epoch, "cursor": self.state.cursor, "seed": self.seed,
                "global_batch": self.global_batch, self.size_key: self.n}

    def load_state_dict(self, state: dict) -> None:
        expected = {"seed": self.seed, "global_batch": self.global_batch, self.size_key: self.n}
        for key, value in expected.items():
            if state.get(key) != value:
                raise FmforgeError(f"the checkpoint's data order does not match this run: its {key} was "
                                   f"{state.get(key)}, this run's is {value}")
        self.state = LoaderState(epoch=int(state["epoch"]), cursor=int(state["cursor"]))


class SampledLoader(ABC):
    """Base of every training loader: a ``GlobalBatchSampler`` plus how to read one micro-batch of
    indices (``read``). The loop and ``Prefetcher`` rely on exactly this interface."""

    sampler: GlobalBatchSampler

    @abstractmethod
    def read(self, indices: np.ndarray, epoch: int):
        """One micro-batch: the samples at ``indices`` as they appear in ``epoch``."""

    def next_step(self) -> list:
        """This rank's micro-batches for the next optimizer step."""
        micro, epoch = self.sampler.next_step()
        return [self.read(indices, epoch) for indices in micro]

    @property
    def global_batch(self) -> int:
        return self.sampler.global_batch

    @property
    def micro_batch(self) -> int:
        return self.sampler.micro_batch

    @property
    def world_size(self) -> int:
        return self.sampler.world_size

    @property
    def accum_steps(self) -> int:
        return self.sampler.accum_steps

    @property
    def state(self) -> LoaderState:
        return self.sampler.state

    def next_global_batch_indices(self) -> np.ndarray:
        return self.sampler.next_global_batch_indices()

    def set_micro_batch(self, micro_batch: int) -> None:
        self.sampler.set_micro_batch(micro_batch)

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)
