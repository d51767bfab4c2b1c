import numpy as np
import pytest
import torch
from synthetic_shapes import captioned_shapes

from megapairs_dagster.demo.corpus import shard_samples
from megapairs_dagster.demo.render import jpeg_bytes, render_scene
from megapairs_dagster.synthesis.decode import split_preprocess
from megapairs_dagster.synthesis.embed import embed_images, embed_texts
from megapairs_dagster.synthesis.encoders import build_demo_dino, load_clip, load_dino


@pytest.fixture(scope="module")
def corpus():
    return captioned_shapes(24, seed=3)


@pytest.fixture(scope="module")
def clip():
    torch.manual_seed(0)
    return load_clip("megapairs-demo-clip")


@pytest.fixture(scope="module")
def dino(tmp_path_factory):
    out = tmp_path_factory.mktemp("dino")
    build_demo_dino(out)
    return load_dino(str(out), image_size=112, foreground_only=True)


def _assert_unit_float16(vectors: np.ndarray, rows: int, dim: int):
    assert vectors.dtype == np.float16 and vectors.shape == (rows, dim)
    np.testing.assert_allclose(np.linalg.norm(vectors.astype(np.float32), axis=1), 1, atol=2e-3)


@pytest.mark.parametrize("view", ["clip", "dino"])
def test_embed_images_is_normalised_row_aligned_and_worker_independent(view, corpus, clip, dino):
    encoder = clip[0] if view == "clip" else dino
    jpegs, _ = corpus
    seen = []
    result = embed_images(encoder, jpegs, batch_size=5, num_workers=0, progress=lambda d, t: seen.append((d, t)))
    _assert_unit_float16(result.vectors, len(jpegs), encoder.embed_dim)
    assert seen[-1] == (24, 24) and len(seen) == 5
    assert result.rows == 24 and result.seconds > 0

    permutation = np.random.default_rng(0).permutation(len(jpegs))
    permuted = embed_images(encoder, [jpegs[i] for i in permutation], batch_size=7, num_workers=2)
    np.testing.assert_allclose(
        permuted.vectors.astype(np.float32), result.vectors[permutation].astype(np.float32), atol=2e-3
    )
    # distinct images get distinct vectors, so the alignment check above has teeth
    assert not np.allclose(result.vectors[0], result.vectors[1], atol=1e-2)


def test_embed_images_matches_direct_encoding(corpus, clip):
    image_encoder = clip[0]
    jpegs, _ = corpus
    import io

    from PIL import Image

    pixels = torch.stack([image_encoder.preprocess(Image.open(io.BytesIO(j)).convert("RGB")) for j in jpegs[:4]])
    with torch.inference_mode():
        direct = torch.nn.functional.normalize(image_encoder.encode(pixels), dim=-1).numpy()
    batched = embed_images(image_encoder, jpegs[:4], num_workers=0).vectors.astype(np.float32)
    np.testing.assert_allclose(batched, direct, atol=2e-3)


def test_embed_texts_is_normalised_and_row_aligned(corpus, clip):
    _, captions = corpus
    text_encoder = clip[1]
    result = embed_texts(text_encoder, captions, batch_size=10)
    _assert_unit_float16(result.vectors, len(captions), 128)
    reversed_result = embed_texts(text_encoder, captions[::-1], batch_size=7)
    np.testing.assert_allclose(
        reversed_result.vectors.astype(np.float32), result.vectors[::-1].astype(np.float32), atol=2e-3
    )
    different = next(i for i in range(1, len(captions)) if captions[i] != captions[0])
    assert not np.allclose(result.vectors[0], result.vectors[different], atol=1e-2)


def test_empty_inputs_give_empty_matrices(clip, dino):
    assert embed_images(clip[0], []).vectors.shape == (0, 128)
    assert embed_images(dino, []).vectors.shape == (0, 128)
    empty_text = embed_texts(clip[1], [])
    assert empty_text.vectors.shape == (0, 128) and empty_text.vectors.dtype == np.float16


def test_embed_images_decodes_large_jpegs_at_reduced_scale(clip):
    """128 px JPEGs for a 64 px model go through synthesis.decode's reduced-DCT path, in the
    DataLoader workers, and match that decoder's pixels encoded directly."""
    image_encoder = clip[0]
    jpegs = [jpeg_bytes(render_scene(s["scene"], np.random.default_rng(i)))
             for i, s in enumerate(shard_samples(seed=0, shard_index=0, images_per_shard=6))]
    split = split_preprocess(image_encoder.preprocess)
    with torch.inference_mode():
        direct = torch.nn.functional.normalize(
            image_encoder.encode(split.to_tensor([split.decode(data) for data in jpegs])), dim=-1
        ).numpy()
    result = embed_images(image_encoder, jpegs, batch_size=4, num_workers=1)
    np.testing.assert_allclose(result.vectors.astype(np.float32), direct, atol=2e-3)
