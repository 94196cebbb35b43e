"""Contrastive losses across processes (gloo, 2 CPU processes): a global batch of 8 image-caption pairs split
4 + 4 gives the loss and the gradients of the same 8 pairs in one process, for CLIP's InfoNCE and SigLIP's
sigmoid loss alike, because every rank scores its rows against the features of all ranks, gathered with
gradient.

Why DDP's *average* of the ranks' gradients is the right scaling: with N = 8 pairs and n = 4 per rank, the
one-process loss is a mean over N rows, L = (1/N) sum_rows, and rank r's loss is the mean over its own
n rows, L_r = (1/n) sum_{rows of r}, so L = (1/W) sum_r L_r. Rank r's backward reaches its own features
directly and, through the gather's backward (a reduce-scatter that sums), collects what every other rank's
loss owes its features: its local gradient is sum_s dL_s/d(its features), pushed through its own batch
only. Summing over ranks covers every (loss, batch) term once, and DDP divides by W: exactly dL/dθ.
"""

import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from fmforge.models.clip import CLIP, CLIPConfig
from fmforge.models.sizes import SIGLIP_LOGIT_INIT
from fmforge.objectives.contrastive import contrastive_loss

pytestmark = pytest.mark.slow  # two gloo ranks started with mp.spawn

GLOBAL_BATCH, WORLD = 8, 2
LOSSES = ("clip", "siglip")


def make_model(loss: str) -> CLIP:
    torch.manual_seed(0)
    overrides = SIGLIP_LOGIT_INIT if loss == "siglip" else {}
    return CLIP(CLIPConfig.from_size("clip-nano", vision=dict(image_size=16, patch_size=8),
                                     text=dict(context_length=8), **overrides))


def global_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(GLOBAL_BATCH, 3, 16, 16, generator=g), torch.randint(0, 512, (GLOBAL_BATCH, 8), generator=g)


def _worker(rank: int, world: int, tmp: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=world)
    images, tokens = global_batch()
    n = GLOBAL_BATCH // world
    mine = slice(rank * n, (rank + 1) * n)  # rank r takes its slice of the global batch
    results = {}
    for loss_name in LOSSES:
        model = DDP(make_model(loss_name))
        out = model(images[mine], tokens[mine])
        loss = contrastive_loss(out)
        loss.backward()  # DDP all-reduces and averages the gradients here
        with torch.no_grad():  # what the loss would be with this rank's negatives only
            logits = out.logit_scale * out.image_features @ out.text_features.T
            labels = torch.arange(n)
            local_only = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        results[loss_name] = dict(loss=loss.detach(), local_only=local_only,
                                  grads={k: p.grad.clone() for k, p in model.module.named_parameters()})
    torch.save(results, f"{tmp}/rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()
    # Skip interpreter teardown: gloo's background threads can abort a clean exit (see fmforge/cli.py).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("contrastive")
    mp.spawn(_worker, args=(WORLD, str(tmp)), nprocs=WORLD, join=True)
    return [torch.load(tmp / f"rank{r}.pt") for r in range(WORLD)]


def one_process(loss_name: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model = make_model(loss_name)
    loss = contrastive_loss(model(*global_batch()))
    loss.backward()
    return loss.detach(), {k: p.grad for k, p in model.named_parameters()}


@pytest.mark.parametrize("loss_name", LOSSES)
def test_two_ranks_with_gathered_negatives_reproduce_the_one_process_loss_and_gradients(two_ranks, loss_name):
    loss, grads = one_process(loss_name)
    ranks = [r[loss_name] for r in two_ranks]
    # The mean of the ranks' losses (what a logger all-reduces) is the loss over the global batch.
    mean_loss = sum(r["loss"] for r in ranks) / WORLD
    assert abs(mean_loss.item() - loss.item()) < 1e-6, (mean_loss.item(), loss.item())
    for name, expected in grads.items():
        for r in ranks:
            torch.testing.assert_close(r["grads"][name], expected, rtol=1e-4, atol=1e-6, msg=name)
    assert all(expected.abs().sum() > 0 for expected in grads.values())  # every parameter was checked


def test_negatives_from_other_ranks_change_the_loss(two_ranks):
    """Guards the test above against passing vacuously: with only local negatives the loss differs."""
    loss, _ = one_process("clip")
    local = sum(r["clip"]["local_only"] for r in two_ranks) / WORLD
    assert abs(local.item() - loss.item()) > 1e-2
