"""Train the small demo CLIP on the corpus's image-caption pairs (demo profile only).

Offline there are no pretrained weights, so the demo's base encoders are trained here until
held-out caption retrieval stops improving. Training to the plateau matters: this model is
the baseline that fine-tuning on mined triplets is later judged against, and an
under-trained baseline would make any further training look like a gain.
"""

from __future__ import annotations

import io
import itertools
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from PIL import Image

from megapairs_dagster.synthesis.encoders import save_clip

DEMO_CLIP_NAME = "megapairs-demo-clip"


@dataclass(frozen=True)
class CurvePoint:
    step: int
    seconds: float
    loss: float  # mean training loss since the previous evaluation
    image_to_text_r1: float  # held-out, in [0, 1]
    text_to_image_r1: float

    @property
    def mean_r1(self) -> float:
        return (self.image_to_text_r1 + self.text_to_image_r1) / 2


@dataclass
class BootstrapReport:
    identity: dict
    best: CurvePoint
    stopped_because: str  # "plateau" | "max_seconds" | "max_steps"
    curve: list[CurvePoint] = field(default_factory=list)
    train_pairs: int = 0
    eval_pairs: int = 0


def _decode_all(jpegs: Sequence[bytes], preprocess: Callable) -> torch.Tensor:
    tensors = []
    for data in jpegs:
        with Image.open(io.BytesIO(data)) as image:
            tensors.append(preprocess(image.convert("RGB")))
    return torch.stack(tensors)


def _retrieval_r1(
    model: open_clip.CLIP, pixels: torch.Tensor, tokens: torch.Tensor, captions: list[str]
) -> tuple[float, float]:
    """Held-out R@1 both ways; a caption identical to the true one counts as correct,
    since the corpus can give several images the same caption."""
    with torch.inference_mode():
        image = F.normalize(model.encode_image(pixels), dim=-1)
        text = F.normalize(model.encode_text(tokens), dim=-1)
    similarity = image @ text.T
    caption_ids = np.unique(np.asarray(captions), return_inverse=True)[1]
    caption_ids = torch.as_tensor(caption_ids)
    image_to_text = (caption_ids[similarity.argmax(dim=1)] == caption_ids).float().mean()
    text_to_image = (caption_ids[similarity.argmax(dim=0)] == caption_ids).float().mean()
    return float(image_to_text), float(text_to_image)


def _shuffled_batches(
    indices: torch.Tensor, batch_size: int, generator: torch.Generator
) -> Iterator[torch.Tensor]:
    """Endless full batches, reshuffled every epoch."""
    while True:
        permutation = indices[torch.randperm(len(indices), generator=generator)]
        for begin in range(0, len(permutation) - batch_size + 1, batch_size):
            yield permutation[begin : begin + batch_size]


def _clip_loss(model: open_clip.CLIP, pixels: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    image, text, logit_scale = model(pixels, tokens)[:3]
    logits = logit_scale * image @ text.T
    labels = torch.arange(len(pixels))
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def train_demo_clip(
    jpegs: Sequence[bytes],
    captions: Sequence[str],
    out_dir: str | Path,
    *,
    model_name: str = DEMO_CLIP_NAME,
    seed: int = 0,
    batch_size: int = 128,
    lr: float = 1e-3,
    weight_decay: float = 0.1,
    warmup_steps: int = 50,
    eval_every: int = 40,
    max_seconds: float = 240.0,
    max_steps: int | None = None,
    eval_fraction: float = 0.1,
    patience: int = 4,
    min_improvement: float = 0.005,
    progress: Callable[[CurvePoint], None] | None = None,
) -> BootstrapReport:
    """Train all weights of `model_name` with symmetric InfoNCE until held-out R@1 plateaus.

    Stops when mean held-out R@1 has not improved by `min_improvement` for `patience`
    evaluations, or at `max_seconds` / `max_steps`; saves the best evaluation's weights.
    Evaluation is step-based so that, short of the time cap, a seed fixes the result.
    """
    if len(jpegs) != len(captions):
        raise ValueError(f"{len(jpegs)} images but {len(captions)} captions")
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=None)
    tokenizer = open_clip.get_tokenizer(model_name)
    pixels = _decode_all(jpegs, preprocess)
    tokens = tokenizer(list(captions))
    order = torch.randperm(len(jpegs), generator=generator)
    n_eval = max(2, round(eval_fraction * len(jpegs)))
    eval_idx, train_idx = order[:n_eval], order[n_eval:]
    eval_captions = [captions[i] for i in eval_idx.tolist()]
    batch_size = min(batch_size, len(train_idx))

    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    warmup = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warmup_steps)
    )
    curve: list[CurvePoint] = []
    best: CurvePoint | None = None
    best_state: dict[str, torch.Tensor] = {}
    evals_since_best, losses = 0, []
    batches = _shuffled_batches(train_idx, batch_size, generator)
    start = time.perf_counter()
    for step in itertools.count(1):
        batch = next(batches)
        model.train()
        loss = _clip_loss(model, pixels[batch], tokens[batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        warmup.step()
        with torch.no_grad():  # CLIP's clamp: temperature no lower than 1/100
            model.logit_scale.clamp_(0, np.log(100))
        losses.append(loss.item())
        elapsed = time.perf_counter() - start
        out_of_time = elapsed >= max_seconds
        out_of_steps = max_steps is not None and step >= max_steps
        if step % eval_every and not (out_of_time or out_of_steps):
            continue
        model.eval()
        i2t, t2i = _retrieval_r1(model, pixels[eval_idx], tokens[eval_idx], eval_captions)
        point = CurvePoint(step, round(elapsed, 2), float(np.mean(losses)), i2t, t2i)
        losses = []
        curve.append(point)
        if progress is not None:
            progress(point)
        if best is None or point.mean_r1 >= best.mean_r1 + min_improvement:
            best, evals_since_best = point, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            evals_since_best += 1
        if evals_since_best >= patience:
            stopped_because = "plateau"
        elif out_of_time:
            stopped_because = "max_seconds"
        elif out_of_steps:
            stopped_because = "max_steps"
        else:
            continue
        break

    model.load_state_dict(best_state)
    identity = save_clip(model.eval(), model_name, out_dir)
    identity["training"] = {"seed": seed, "best_step": best.step, "stopped": stopped_because}
    return BootstrapReport(
        identity=identity,
        best=best,
        stopped_because=stopped_because,
        curve=curve,
        train_pairs=len(train_idx),
        eval_pairs=n_eval,
    )
