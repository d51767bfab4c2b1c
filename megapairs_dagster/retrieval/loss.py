"""MMRet's InfoNCE over the global batch, and the optional image-caption term.

Candidates of every query are ALL positives and ALL hard negatives of the global batch
(every process's): with batch B and K hard negatives per query that is B·(1+K) candidates,
of which one is the query's own positive. This is our reading of the paper's "InfoNCE over
in-batch candidates plus 1 positive and 4 hard negatives per query": the in-batch
candidates are the other queries' positives and hard negatives. Two queries sharing an
image (one's target is another's negative) make a false negative; like the paper, we do not
mask them. The image-caption term is CLIP's own loss, open_clip's ``ClipLoss``.

Across processes, both terms take this process's rows against the global batch, gathered by
open_clip's all-gather with gradient flowing back to each row's owner (its backward sums
the gradient of every process's loss), so with DistributedDataParallel averaging parameter
gradients, W processes x batch b train exactly like one process with batch W·b.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from open_clip.loss import ClipLoss, gather_features


def world() -> tuple[int, int]:
    """(rank, world size) of the default process group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


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


def training_loss(
    embeddings: dict[str, torch.Tensor], *, temperature: float, caption_loss_weight: float
) -> torch.Tensor:
    """The trainer's objective for this process's normalised embeddings: composed InfoNCE
    (``queries``, ``positives``, ``negatives``) plus
    ``caption_loss_weight`` x CLIP's loss of images against ``captions``; a caption-only
    batch (``images``, ``captions``) has only the caption term.

    The caption term is kept as an option because training on triplets alone erodes plain
    caption retrieval (a previous experiment here halved its R@1)."""
    rank, world_size = world()
    loss = torch.zeros((), device=next(iter(embeddings.values())).device)
    if "queries" in embeddings:
        queries, positives, negatives = (
            embeddings["queries"], embeddings["positives"], embeddings["negatives"]
        )
        if world_size > 1:
            positives, negatives = gather_features(
                positives, negatives, local_loss=True, gather_with_grad=True,
                rank=rank, world_size=world_size,
            )
        loss = loss + composed_infonce(
            queries, positives, negatives,
            temperature=temperature, query_offset=rank * len(queries),
        )
    if caption_loss_weight:
        images = embeddings["query_images"] if "queries" in embeddings else embeddings["images"]
        clip_loss = ClipLoss(
            local_loss=True, gather_with_grad=True, rank=rank, world_size=world_size
        )
        loss = loss + caption_loss_weight * clip_loss(
            images, embeddings["captions"], 1 / temperature
        )
    return loss
