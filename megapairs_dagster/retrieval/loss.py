"""MMRet's InfoNCE over the global batch, and the optional image-caption alignment term.

Candidates of every query are ALL positives and ALL hard negatives of the global batch
(every process's): with batch B and K hard negatives per query that is B·(1+K) candidates,
of which one is the query's own positive. This is our reading of the paper's "InfoNCE over
in-batch candidates plus 1 positive and 4 hard negatives per query": the in-batch
candidates are the other queries' positives and hard negatives. Two queries sharing an
image (one's target is another's negative) make a false negative; like the paper, we do not
mask them.

Across processes, ``gather_global`` concatenates embeddings with gradient flowing back to
their owner (all-gather backward sums the gradient of every process's loss), so with
DistributedDataParallel averaging parameter gradients, W processes x batch b train exactly
like one process with batch W·b.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
import torch.nn.functional as F


def world() -> tuple[int, int]:
    """(rank, world size) of the default process group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_global(local: torch.Tensor) -> torch.Tensor:
    """Concatenate every process's ``local`` (rank order), differentiably."""
    if world()[1] == 1:
        return local
    return torch.cat(dist_fn.all_gather(local.contiguous()))


def composed_infonce(
    queries: torch.Tensor,
    positives: torch.Tensor,
    negatives: torch.Tensor,
    *,
    temperature: float,
    query_offset: int = 0,
) -> torch.Tensor:
    """Mean InfoNCE of ``queries`` [B, D] against every positive [G, D] and hard negative
    [G, K, D] (G >= B: the global batch); query i's positive is ``positives[query_offset+i]``.
    All inputs are L2-normalised."""
    candidates = torch.cat([positives, negatives.reshape(-1, negatives.shape[-1])])
    logits = queries @ candidates.T / temperature
    labels = torch.arange(len(queries), device=queries.device) + query_offset
    return F.cross_entropy(logits, labels)


def image_caption_infonce(
    images: torch.Tensor,
    captions: torch.Tensor,
    all_images: torch.Tensor,
    all_captions: torch.Tensor,
    *,
    temperature: float,
    query_offset: int = 0,
) -> torch.Tensor:
    """CLIP's symmetric image<->caption InfoNCE for the local rows against the global batch.

    Kept as an optional term because training on triplets alone erodes plain caption
    retrieval (a previous experiment here halved its R@1)."""
    labels = torch.arange(len(images), device=images.device) + query_offset
    image_to_text = F.cross_entropy(images @ all_captions.T / temperature, labels)
    text_to_image = F.cross_entropy(captions @ all_images.T / temperature, labels)
    return (image_to_text + text_to_image) / 2
