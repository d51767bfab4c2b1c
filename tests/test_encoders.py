import pickle
import time

import numpy as np
import pytest
import torch
from synthetic_shapes import jpeg_bytes, shape_image

from megapairs_dagster.synthesis.embed import embed_images
from megapairs_dagster.synthesis.encoders import (
    CLIP_WEIGHTS_FILE,
    NeutralizeBackground,
    build_demo_dino,
    load_clip,
    load_dino,
    resolve_device,
    save_clip,
)

DEMO_CLIP = "megapairs-demo-clip"


@pytest.fixture(scope="module")
def dino_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("dino")
    build_demo_dino(out, seed=0)
    return out


def test_clip_round_trip_through_directory_and_weights_file(tmp_path):
    torch.manual_seed(0)
    image, text = load_clip(DEMO_CLIP)
    saved = save_clip(image.model, DEMO_CLIP, tmp_path)
    from_dir, text_from_dir = load_clip(DEMO_CLIP, str(tmp_path))
    from_file, _ = load_clip(DEMO_CLIP, str(tmp_path / CLIP_WEIGHTS_FILE))
    pixels = torch.randn(3, 3, 64, 64)
    tokens = text.tokenize(["a red circle", "a blue square", "a green triangle"])
    with torch.inference_mode():
        expected = image.encode(pixels)
        assert torch.equal(from_dir.encode(pixels), expected)
        assert torch.equal(from_file.encode(pixels), expected)
        assert torch.equal(text_from_dir.encode(tokens), text.encode(tokens))
    assert from_dir.identity["files"] == saved["files"]
    assert set(saved["files"]) == {"open_clip_config.json", CLIP_WEIGHTS_FILE}
    assert all(len(digest) == 64 for digest in saved["files"].values())
    assert from_file.identity["files"][CLIP_WEIGHTS_FILE] == saved["files"][CLIP_WEIGHTS_FILE]
    assert from_dir.identity["embed_dim"] == 128 and expected.shape == (3, 128)


def test_random_clips_differ_and_hashes_follow_weights(tmp_path):
    torch.manual_seed(0)
    first, _ = load_clip(DEMO_CLIP)
    second, _ = load_clip(DEMO_CLIP)
    a = save_clip(first.model, DEMO_CLIP, tmp_path / "a")
    b = save_clip(second.model, DEMO_CLIP, tmp_path / "b")
    assert a["files"][CLIP_WEIGHTS_FILE] != b["files"][CLIP_WEIGHTS_FILE]


def test_missing_hub_tag_fails_fast_naming_the_model(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(RuntimeError, match="ViT-B-32.*laion2b_s34b_b79k"):
        load_clip("ViT-B-32", "laion2b_s34b_b79k")
    assert time.perf_counter() - start < 10


def test_unknown_tag_is_a_clear_error():
    with pytest.raises(ValueError, match="neither a local path nor an open_clip tag"):
        load_clip(DEMO_CLIP, "no-such-tag")


def test_missing_dino_fails_naming_the_model(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="facebook/dinov2-no-such-model"):
        load_dino("facebook/dinov2-no-such-model")
    with pytest.raises(FileNotFoundError, match=f"{tmp_path}/absent' does not exist"):
        load_dino(str(tmp_path / "absent"))


def test_dino_round_trip_and_identity(dino_dir):
    first = load_dino(str(dino_dir), image_size=112)
    second = load_dino(str(dino_dir), image_size=112, pooling="cls+mean")
    pixels = torch.randn(2, 3, 112, 112)
    with torch.inference_mode():
        cls = first.encode(pixels)
        both = second.encode(pixels)
    assert cls.shape == (2, 128) and both.shape == (2, 256)
    assert torch.allclose(both[:, :128], cls, atol=1e-5)
    assert set(first.identity["files"]) == {"config.json", "model.safetensors"}
    assert first.identity["embed_dim"] == 128 and second.identity["embed_dim"] == 256
    assert first.preprocess(shape_image("circle", "red", "blue")).shape == (3, 112, 112)


def test_preprocess_transforms_pickle_for_dataloader_workers(dino_dir):
    image, _ = load_clip(DEMO_CLIP)
    dino = load_dino(str(dino_dir), image_size=112, foreground_only=True)
    picture = shape_image("square", "yellow", "purple", size=96)
    for transform in (image.preprocess, dino.preprocess):
        restored = pickle.loads(pickle.dumps(transform))
        assert torch.equal(restored(picture), transform(picture))


def test_neutralize_background_handles_noise_and_gradient():
    picture = shape_image("circle", "red", "blue", size=64, noise=6, gradient=25, seed=1)
    out = np.asarray(NeutralizeBackground()(picture))
    fill = np.array(NeutralizeBackground().fill)
    assert (out[0, 0] == fill).all() and (out[-1, -1] == fill).all()
    background_share = (out == fill).all(axis=-1).mean()
    assert 0.6 < background_share < 0.85  # circle of radius 0.3 covers ~28 %
    assert tuple(out[32, 32]) == tuple(np.asarray(picture)[32, 32])


def _dino_similarities(dino_dir, foreground_only: bool) -> tuple[float, float]:
    base = shape_image("circle", "red", "blue", size=128, noise=6, gradient=20, seed=0)
    other_background = shape_image("circle", "red", "green", size=128, noise=6, gradient=-20, seed=1)
    other_colour = shape_image("circle", "yellow", "blue", size=128, noise=6, gradient=20, seed=2)
    encoder = load_dino(str(dino_dir), image_size=112, foreground_only=foreground_only)
    jpegs = [jpeg_bytes(p) for p in (base, other_background, other_colour)]
    vectors = embed_images(encoder, jpegs, num_workers=0).vectors.astype(np.float32)
    return float(vectors[0] @ vectors[1]), float(vectors[0] @ vectors[2])


def test_foreground_only_view_ignores_background_but_not_object_colour(dino_dir):
    same_object, other_colour = _dino_similarities(dino_dir, foreground_only=True)
    assert same_object > 0.98
    assert other_colour < same_object - 0.1
    plain_same_object, _ = _dino_similarities(dino_dir, foreground_only=False)
    assert plain_same_object < same_object - 0.2  # the plain view does see the background


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="device is 'cuda:0' but this process sees no CUDA"):
            resolve_device("cuda:0")
