import hashlib
import io

import pandas as pd
import pytest
from fixtures_images import (
    RED,
    cmyk_jpeg,
    decompression_bomb_png,
    exif_rotated_jpeg,
    gray8_png,
    gray16_png,
    not_an_image,
    oversized_jpeg,
    palette_png_with_transparency,
    png_with_alpha,
    truncated_jpeg,
    valid_jpeg,
    zero_bytes,
)
from PIL import Image

from megapairs_dagster.synthesis import normalize as normalize_module
from megapairs_dagster.synthesis.normalize import (
    REJECT_REASONS,
    IngestRules,
    NormalizedImage,
    Reject,
)
from megapairs_dagster.synthesis.readers import CorpusReadError, RawSample


def rules(**overrides) -> IngestRules:
    """The fixtures are a few pixels wide: min_side is tested in test_ingest_rules.py."""
    return IngestRules(**{"min_side": 1, **overrides})


def normalize_sample(sample: RawSample, **overrides) -> NormalizedImage | Reject:
    return normalize_module.normalize_sample(sample, rules(**overrides))


def normalize_shard(samples, progress=None, **overrides) -> tuple[pd.DataFrame, pd.DataFrame]:
    return normalize_module.normalize_shard(samples, rules(**overrides), progress=progress)


def sample(key: str, image: bytes | None, caption: str | None = "a photo") -> RawSample:
    return RawSample(key=key, image_bytes=image, caption=caption, meta={})


def decoded(result: NormalizedImage) -> Image.Image:
    image = Image.open(io.BytesIO(result.jpeg))
    assert image.format == "JPEG"
    assert image.mode == "RGB"
    assert image.size == (result.width, result.height)
    return image


def assert_close(pixel, expected, tolerance=12):
    assert all(abs(a - b) <= tolerance for a, b in zip(pixel, expected)), (pixel, expected)


@pytest.mark.parametrize(
    ("image", "caption", "reason"),
    [
        (None, "a photo", "missing_image"),
        (zero_bytes(), "a photo", "empty_image"),
        (not_an_image(), "a photo", "not_an_image"),
        (truncated_jpeg(), "a photo", "truncated_image"),
        (decompression_bomb_png(), "a photo", "decompression_bomb"),
        (valid_jpeg(), None, "missing_caption"),
        (valid_jpeg(), " \n\t ", "empty_caption"),
    ],
)
def test_bad_inputs_become_rejects_with_their_reason(image, caption, reason):
    result = normalize_sample(sample("k1", image, caption))
    assert isinstance(result, Reject)
    assert (result.key, result.reason) == ("k1", reason)
    assert result.reason in REJECT_REASONS


def test_header_size_above_max_pixels_is_rejected_before_decoding():
    # 9000x9000 is below Pillow's own bomb limit, so only our header check can catch it.
    result = normalize_sample(sample("k", decompression_bomb_png(9000, 9000)))
    assert isinstance(result, Reject)
    assert result.reason == "decompression_bomb"
    assert "9000x9000" in result.detail


def test_truncation_is_detected_when_the_decoder_downscales():
    result = normalize_sample(sample("k", truncated_jpeg((2048, 1024))), max_side=256)
    assert isinstance(result, Reject)
    assert result.reason == "truncated_image"


def test_max_pixels_is_configurable():
    accepted = normalize_sample(sample("k", oversized_jpeg()), max_pixels=2_000_000)
    rejected = normalize_sample(sample("k", oversized_jpeg()), max_pixels=1_999_999)
    assert isinstance(accepted, NormalizedImage)
    assert isinstance(rejected, Reject) and rejected.reason == "decompression_bomb"


def test_shard_survives_bad_samples_and_keeps_input_order():
    samples = [
        sample("good-1", valid_jpeg(color=(1, 2, 3))),
        sample("truncated", truncated_jpeg()),
        sample("empty", zero_bytes()),
        sample("bomb", decompression_bomb_png()),
        sample("text", not_an_image()),
        sample("no-caption", valid_jpeg(color=(4, 5, 6)), None),
        sample("good-2", valid_jpeg(color=(7, 8, 9))),
        sample("no-image", None),
    ]
    images, rejects = normalize_shard(samples)
    assert images["key"].tolist() == ["good-1", "good-2"]
    assert dict(zip(rejects["key"], rejects["reason"])) == {
        "truncated": "truncated_image",
        "empty": "empty_image",
        "bomb": "decompression_bomb",
        "text": "not_an_image",
        "no-caption": "missing_caption",
        "no-image": "missing_image",
    }
    assert rejects["key"].tolist() == [
        "truncated",
        "empty",
        "bomb",
        "text",
        "no-caption",
        "no-image",
    ]


def test_unexpected_decoder_failure_is_unreadable(monkeypatch):
    def broken_open(*args, **kwargs):
        raise RuntimeError("decoder exploded")

    monkeypatch.setattr(Image, "open", broken_open)
    result = normalize_sample(sample("k", valid_jpeg()))
    assert isinstance(result, Reject)
    assert result.reason == "unreadable"
    assert "decoder exploded" in result.detail


def test_keyboard_interrupt_is_not_swallowed(monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(Image, "open", interrupted)
    with pytest.raises(KeyboardInterrupt):
        normalize_shard([sample("k", valid_jpeg())])


def test_rgba_is_composited_on_white():
    result = normalize_sample(sample("k", png_with_alpha((40, 20))))
    image = decoded(result)
    assert image.size == (40, 20)
    assert_close(image.getpixel((5, 10)), RED)
    assert_close(image.getpixel((35, 10)), (255, 255, 255))


def test_palette_transparency_is_composited_on_white():
    image = decoded(normalize_sample(sample("k", palette_png_with_transparency())))
    assert_close(image.getpixel((10, 10)), (255, 255, 255))


def test_cmyk_becomes_rgb():
    image = decoded(normalize_sample(sample("k", cmyk_jpeg())))
    assert_close(image.getpixel((16, 16)), (0, 255, 255), tolerance=20)


def test_sixteen_bit_gray_is_scaled_not_clipped():
    image = decoded(normalize_sample(sample("k", gray16_png((64, 8)))))
    assert_close(image.getpixel((8, 4)), (255, 255, 255), tolerance=3)
    assert_close(image.getpixel((56, 4)), (128, 128, 128), tolerance=3)


def test_eight_bit_gray_becomes_rgb():
    image = decoded(normalize_sample(sample("k", gray8_png(value=100))))
    assert_close(image.getpixel((8, 8)), (100, 100, 100), tolerance=3)


def test_exif_orientation_is_applied():
    result = normalize_sample(sample("k", exif_rotated_jpeg((80, 40))))
    image = decoded(result)
    assert image.size == (40, 80)
    assert_close(image.getpixel((37, 2)), RED, tolerance=40)
    assert_close(image.getpixel((2, 2)), (0, 0, 255), tolerance=40)


def test_large_images_are_downscaled_and_small_ones_kept():
    large = normalize_sample(sample("k", oversized_jpeg((2000, 1000))), max_side=512)
    assert (large.width, large.height) == (512, 256)
    decoded(large)
    small = normalize_sample(sample("k", valid_jpeg((64, 48))), max_side=512)
    assert (small.width, small.height) == (64, 48)


def test_rotated_large_image_fits_max_side():
    result = normalize_sample(sample("k", exif_rotated_jpeg((800, 400))), max_side=100)
    assert (result.width, result.height) == (50, 100)
    assert_close(decoded(result).getpixel((47, 2)), RED, tolerance=40)


def test_image_id_is_content_hash_and_caption_is_cleaned():
    data = valid_jpeg()
    result = normalize_sample(sample("k", data, "  a  red\n\tcar  "))
    digest = hashlib.sha256(data).digest()
    assert result.sha256 == digest.hex()
    assert result.image_id == int.from_bytes(digest[:8], "big") & (2**63 - 1)
    assert 0 <= result.image_id < 2**63
    assert result.caption == "a red car"
    assert normalize_sample(sample("other-key", data)).image_id == result.image_id


def test_duplicates_in_a_shard_are_rejected_naming_the_first_key():
    data = valid_jpeg()
    images, rejects = normalize_shard(
        [
            sample("first", data, None),  # rejected: does not count as the first copy
            sample("second", data),
            sample("third", data),
            sample("other", valid_jpeg(color=(9, 9, 9))),
        ]
    )
    assert images["key"].tolist() == ["second", "other"]
    assert rejects["reason"].tolist() == ["missing_caption", "duplicate_image"]
    assert rejects["key"].tolist() == ["first", "third"]
    assert "'second'" in rejects["detail"].iloc[1]


def test_frame_dtypes_and_empty_shard():
    images, rejects = normalize_shard([sample("a", valid_jpeg())])
    empty_images, empty_rejects = normalize_shard([])
    assert list(images.columns) == [
        "image_id",
        "key",
        "sha256",
        "width",
        "height",
        "caption",
        "jpeg",
        "repairs",
        "source_caption_chars",
    ]
    assert list(rejects.columns) == ["key", "reason", "detail"]
    assert len(empty_images) == 0 and len(empty_rejects) == 0
    assert empty_images.dtypes.to_dict() == images.dtypes.to_dict()
    assert empty_rejects.dtypes.to_dict() == rejects.dtypes.to_dict()
    assert images["image_id"].dtype == "int64"
    assert images["width"].dtype == "int64"
    assert isinstance(images["jpeg"].iloc[0], bytes)


def test_progress_is_reported_every_hundred_samples():
    calls = []
    samples = [sample(f"k{i}", None) for i in range(250)]
    normalize_shard(samples, progress=calls.append)
    assert calls == [100, 200]


def test_reader_errors_propagate_after_earlier_samples():
    def failing_reader():
        yield sample("a", valid_jpeg())
        raise CorpusReadError("shard '00000' is corrupt")

    with pytest.raises(CorpusReadError, match="00000"):
        normalize_shard(failing_reader())


def test_shard_rules_reach_normalize_sample():
    images, _ = normalize_shard([sample("a", oversized_jpeg())], max_side=64)
    assert (images["width"].iloc[0], images["height"].iloc[0]) == (64, 32)
    assert isinstance(images, pd.DataFrame)
