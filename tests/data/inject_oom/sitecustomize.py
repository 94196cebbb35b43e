"""Test fault injection for processes the tests cannot reach in-process (torchrun workers): with
FMFORGE_TEST_OOM_ABOVE=N on PYTHONPATH's front, the loss raises torch.OutOfMemoryError for any micro-batch
larger than N sequences, as a GPU that cannot fit it would."""

import os

if os.environ.get("FMFORGE_TEST_OOM_ABOVE"):
    import torch

    import fmforge.objectives.clm as clm

    _limit = int(os.environ["FMFORGE_TEST_OOM_ABOVE"])
    _real = clm.clm_loss

    def _clm_loss(logits, targets):
        if logits.size(0) > _limit:
            raise torch.OutOfMemoryError(f"injected: micro-batch {logits.size(0)} > {_limit}")
        return _real(logits, targets)

    clm.clm_loss = _clm_loss
