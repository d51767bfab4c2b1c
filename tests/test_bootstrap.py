import random

import numpy as np
import pytest
import torch
from synthetic_shapes import jpeg_bytes, shape_image

from megapairs_dagster.synthesis.bootstrap import train_demo_clip
from megapairs_dagster.synthesis.embed import embed_images, embed_texts
from megapairs_dagster.synthesis.encoders import load_clip

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def corpus():
    """Four captions (object colour only), so a few dozen steps can learn them."""
    rng = random.Random(0)
    colours = ["red", "green", "blue", "yellow"]
    chosen = [rng.choice(colours) for _ in range(160)]
    jpegs = [
        jpeg_bytes(shape_image("circle", colour, "white", centre=(rng.uniform(0.3, 0.7), 0.5)))
        for colour in chosen
    ]
    return jpegs, [f"a {colour} circle" for colour in chosen]


def test_training_beats_chance_and_saves_a_loadable_best_checkpoint(corpus, tmp_path):
    jpegs, captions = corpus
    points = []
    report = train_demo_clip(
        jpegs, captions, tmp_path, batch_size=16, lr=1e-3, warmup_steps=5, eval_every=10,
        max_steps=40, max_seconds=15, eval_fraction=0.25, patience=3, progress=points.append,
    )
    assert report.eval_pairs == 40 and report.train_pairs == 120
    assert points == report.curve and report.curve[-1].step >= report.best.step
    assert report.stopped_because in {"plateau", "max_seconds", "max_steps"}
    assert report.best.mean_r1 == max(point.mean_r1 for point in report.curve)
    # chance: the top caption is the right colour ~1/4 of the time
    assert report.best.mean_r1 > 0.4

    image_encoder, text_encoder = load_clip("megapairs-demo-clip", str(tmp_path))
    assert image_encoder.identity["files"] == report.identity["files"]
    images = embed_images(image_encoder, jpegs, num_workers=0).vectors.astype(np.float32)
    texts = embed_texts(text_encoder, captions).vectors.astype(np.float32)
    paired = float(np.mean(np.sum(images * texts, axis=1)))
    shuffled = float(np.mean(np.sum(images * np.roll(texts, 1, axis=0), axis=1)))
    assert paired > shuffled + 0.05


def test_seed_fixes_the_run(corpus, tmp_path):
    jpegs, captions = corpus
    runs = [
        train_demo_clip(
            jpegs[:80], captions[:80], tmp_path / str(i), batch_size=16, eval_every=3,
            max_steps=3, max_seconds=60, seed=7,
        )
        for i in range(2)
    ]
    assert runs[0].stopped_because == "max_steps"
    assert runs[0].curve[0].loss == runs[1].curve[0].loss
    assert runs[0].identity["files"] == runs[1].identity["files"]


def test_mismatched_inputs_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="captions"):
        train_demo_clip([b"x"], [], tmp_path)
    assert torch.get_num_threads() >= 1
