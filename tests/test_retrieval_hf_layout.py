"""Released MMRet / BGE-VL checkpoints (transformers CLIPModel layout) in, trained models out.

The hub is unreachable, so a tiny ``CLIPModel`` is built from a config and saved with its
processor files, the way the released checkpoints come: CLIP's image processor, and CLIP's
tokenizer written offline from the BPE vocabulary open_clip ships. Features are compared
twice: at tensor level (the same pixels and token ids into both models) and end to end
(transformers' own processor on its side, ``MMRetCLIP.encode`` on ours). End to end uses
images whose centre crop is exact: on an odd excess torchvision's crop (open_clip) rounds the
offset half to even where transformers floors it, a one-pixel shift.
"""

import json
import shutil
from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F
from open_clip.model import CLIPTextCfg, CLIPVisionCfg
from safetensors.torch import load_file, save_file
from synthetic_shapes import shape_image
from transformers import (
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPProcessor,
    CLIPTokenizer,
    CLIPVisionConfig,
    Dinov2Config,
)

from megapairs_dagster.retrieval import MMRetCLIP, composed_infonce, hf_clip
from megapairs_dagster.synthesis.encoders import ModelMismatchError, RecordedFiles

IMAGE_SIZE = 32
TEXTS = ["make it blue", "the same circle on a beach, at night!"]
# The demo's bootstrapped CLIP (an open_clip config shipped with the package, GELU).
DEMO_CLIP = "megapairs-demo-clip"


def tiny_clip_config(eos_token_id: int = 2) -> CLIPConfig:
    """OpenAI CLIP's architecture, shrunk; the text tower keeps CLIP's vocabulary and context
    so that the BPE's ids are valid. eos_token_id 2 is the released configs' (argmax pooling)."""
    tower = {"hidden_size": 32, "intermediate_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 2, "hidden_act": "quick_gelu"}
    return CLIPConfig(
        vision_config={**tower, "image_size": IMAGE_SIZE, "patch_size": 8},
        text_config={**tower, "vocab_size": 49408, "max_position_embeddings": 77,
                     "eos_token_id": eos_token_id},
        projection_dim=16,
    )


def clip_tokenizer(tmp_path) -> CLIPTokenizer:
    """CLIPTokenizer from vocab.json / merges.txt written from open_clip's BPE."""
    vocab, merges = hf_clip.clip_bpe()
    folder = tmp_path / "bpe"
    folder.mkdir(exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return CLIPTokenizer.from_pretrained(folder, model_max_length=77)


def save_released_layout(directory, tmp_path, *, eos_token_id: int = 2, seed: int = 0):
    """A tiny CLIPModel saved as the released checkpoints are: weights, config, the image
    processor's preprocessor_config.json and the tokenizer's files."""
    torch.manual_seed(seed)
    model = CLIPModel(tiny_clip_config(eos_token_id)).eval()
    with torch.no_grad():  # a trained-looking scale rather than the init value
        model.logit_scale.fill_(4.0)
    model.save_pretrained(directory)
    CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    ).save_pretrained(directory)
    clip_tokenizer(tmp_path).save_pretrained(directory)
    for name in ("vocab.json", "merges.txt"):  # newer transformers keep only tokenizer.json
        (directory / name).write_text((tmp_path / "bpe" / name).read_text())
    return model


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """(directory, CLIPModel) of a tiny released-layout checkpoint; tests that change files
    work on a copy (``released_copy``)."""
    root = tmp_path_factory.mktemp("released")
    model = save_released_layout(root / "released", root)
    return root / "released", model


@pytest.fixture
def released_copy(released, tmp_path):
    return Path(shutil.copytree(released[0], tmp_path / "released"))


def images(size: int) -> list:
    """Images whose resize and centre crop agree in both libraries (see the module note)."""
    return [
        shape_image("circle", "red", "white", size=size),
        shape_image("square", "blue", "yellow", size=80).resize((80, 64)).resize(
            (size * 5 // 4, size)
        ),
    ]


def hf_features(model: CLIPModel, pixels=None, tokens=None):
    with torch.no_grad():
        image = None if pixels is None else model.get_image_features(pixel_values=pixels)
        text = None if tokens is None else model.get_text_features(input_ids=tokens)
    pooled = [None if out is None else getattr(out, "pooler_output", out) for out in (image, text)]
    return tuple(pooled)


def assert_same_features(mmret: MMRetCLIP, hf: CLIPModel, image_size: int):
    """Tensor level: the same pixels and token ids into both models."""
    torch.manual_seed(1)
    pixels = torch.randn(2, 3, image_size, image_size)
    tokens = mmret.tokenize(TEXTS)
    with torch.no_grad():
        ours = mmret.clip.encode_image(pixels), mmret.clip.encode_text(tokens)
    theirs = hf_features(hf, pixels, tokens)
    torch.testing.assert_close(ours[0], theirs[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours[1], theirs[1], atol=1e-5, rtol=1e-5)


def assert_same_encodings(mmret: MMRetCLIP, hf: CLIPModel, processor: CLIPProcessor):
    """End to end: transformers' processor and model against MMRetCLIP.encode."""
    size = mmret.model_cfg["vision_cfg"]["image_size"]
    pictures = images(size)
    inputs = processor(text=TEXTS, images=pictures, padding=True, return_tensors="pt")
    # The two preprocessings agree on these images, and the tokenizers on these texts.
    ours_pixels = torch.stack([mmret.preprocess(picture) for picture in pictures])
    torch.testing.assert_close(ours_pixels, inputs["pixel_values"], atol=1e-5, rtol=1e-5)
    hf_image, hf_text = hf_features(hf, inputs["pixel_values"], inputs["input_ids"])
    expected = F.normalize(hf_image + hf_text, dim=-1)
    torch.testing.assert_close(mmret.encode(images=pictures, text=TEXTS), expected,
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mmret.encode(images=pictures), F.normalize(hf_image, dim=-1),
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mmret.encode(text=TEXTS), F.normalize(hf_text, dim=-1),
                               atol=1e-5, rtol=1e-5)


def test_clip_tokenizer_from_open_clip_bpe_tokenizes_like_open_clip(tmp_path):
    """open_clip's tokenizer is OpenAI CLIP's BPE, as CLIPTokenizer is: the same ids up to the
    end-of-text token (open_clip pads with 0 after it, transformers with end-of-text)."""
    tokenizer = clip_tokenizer(tmp_path)
    texts = [*TEXTS, "Find the SAME dog   on a snowy park, 3 cafés & 42 mugs.", "word " * 100]
    ours = open_clip.tokenizer.SimpleTokenizer(context_length=77)(texts)
    theirs = tokenizer(texts, padding="max_length", max_length=77, truncation=True,
                       return_tensors="pt")["input_ids"]
    for row, (mine, hfs) in enumerate(zip(ours, theirs)):
        end = int((mine == 49407).nonzero()[0])
        assert mine[: end + 1].tolist() == hfs[: end + 1].tolist(), texts[row]
    assert tokenizer.eos_token_id == 49407 and tokenizer.bos_token_id == 49406


@pytest.mark.parametrize("eos_token_id", [2, 49407], ids=["argmax-eos", "first-eos"])
def test_released_checkpoint_encodes_as_transformers_does(tmp_path, eos_token_id):
    hf = save_released_layout(tmp_path / "released", tmp_path, eos_token_id=eos_token_id)
    model = MMRetCLIP.from_pretrained(tmp_path / "released")

    assert model.model_cfg["quick_gelu"] is True
    assert model.model_cfg["text_cfg"].get("pool_type", "argmax") == (
        "argmax" if eos_token_id == 2 else "eos"
    )
    assert_same_features(model, hf, IMAGE_SIZE)
    assert_same_encodings(model, hf, CLIPProcessor.from_pretrained(tmp_path / "released"))
    torch.testing.assert_close(model.clip.logit_scale, hf.logit_scale)
    # What was loaded is recorded, as for open_clip starts.
    assert model.mmret["base_layout"] == "transformers"
    files = model.mmret["base_files"]
    assert {"config.json", "model.safetensors", "preprocessor_config.json",
            "vocab.json", "merges.txt"} <= set(files)
    assert all(len(digest) == 64 for digest in files.values())

    # The open_clip layout keeps the model: the pipeline's CLIP loaders open it too.
    model.save_pretrained(tmp_path / "as_open_clip")
    reloaded = MMRetCLIP.from_pretrained(tmp_path / "as_open_clip")
    pictures = images(IMAGE_SIZE)
    torch.testing.assert_close(reloaded.encode(images=pictures, text=TEXTS),
                               model.encode(images=pictures, text=TEXTS), atol=0, rtol=0)
    assert reloaded.mmret == model.mmret


def test_from_open_clip_starts_from_a_transformers_directory(released_copy):
    """A training run's start (model name, pretrained) may name a released checkpoint."""
    direct = MMRetCLIP.from_pretrained(released_copy)
    pictures = images(IMAGE_SIZE)
    for name, pretrained in [(str(released_copy), None), (f"local-dir:{released_copy}", None),
                             ("ViT-B-16", str(released_copy))]:
        model = MMRetCLIP.from_open_clip(name, pretrained)
        assert model.mmret["base_model"] == name and model.mmret["base_pretrained"] == pretrained
        assert model.mmret["base_files"] == direct.mmret["base_files"]
        torch.testing.assert_close(model.encode(images=pictures, text=TEXTS),
                                   direct.encode(images=pictures, text=TEXTS), atol=0, rtol=0)
    # Pinned hashes: a changed processor config is refused.
    pinned = RecordedFiles(direct.mmret["base_files"], "base_encoders")
    MMRetCLIP.from_open_clip(str(released_copy), None, expected_files=pinned)
    processor = released_copy / "preprocessor_config.json"
    settings = json.loads(processor.read_text())
    processor.write_text(json.dumps({**settings, "image_mean": [0.5, 0.5, 0.5]}))
    with pytest.raises(ModelMismatchError, match="preprocessor_config.json"):
        MMRetCLIP.from_pretrained(released_copy, expected_files=pinned)


def trained_demo_model() -> MMRetCLIP:
    """The demo's open_clip CLIP after one optimiser step of the composed-query loss."""
    torch.manual_seed(0)
    model = MMRetCLIP.from_open_clip(DEMO_CLIP, None)
    before = {k: v.clone() for k, v in model.clip.state_dict().items()}
    pixels = torch.stack([model.preprocess(picture) for picture in images(64)])
    image_features, text_features = model(pixels, model.tokenize(TEXTS))
    queries = model.fuse(image_features, text_features)
    targets = model.fuse(image_features.roll(1, dims=0), None)
    loss = composed_infonce(queries, targets, targets.roll(1, dims=0)[:, None], temperature=0.02)
    loss.backward()
    torch.optim.SGD(model.parameters(), lr=1.0).step()
    model.zero_grad()
    after = model.clip.state_dict()
    assert not torch.equal(before["text_projection"], after["text_projection"])
    assert not torch.equal(before["visual.proj"], after["visual.proj"])
    return model


def test_trained_model_saved_in_transformers_layout_loads_in_transformers(tmp_path):
    model = trained_demo_model()
    out = model.save_pretrained(tmp_path / "hf", layout="transformers")

    hf, info = CLIPModel.from_pretrained(out, output_loading_info=True)
    hf.eval()
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert not info["mismatched_keys"] and not info["error_msgs"]
    assert hf.config.text_config.hidden_act == "gelu"  # the demo CLIP is not QuickGELU
    assert hf.config.mmret == model.mmret
    processor = CLIPProcessor.from_pretrained(out)
    assert processor.tokenizer.model_max_length == 32  # the demo CLIP's context
    assert_same_features(model, hf, 64)
    assert_same_encodings(model, hf, processor)

    # Back through the transformers layout: the same model, architecture and mmret section.
    loaded = MMRetCLIP.from_pretrained(out)
    assert loaded.model_name == DEMO_CLIP
    assert loaded.model_cfg == model.model_cfg
    assert loaded.mmret == model.mmret
    pictures = images(64)
    torch.testing.assert_close(loaded.encode(images=pictures, text=TEXTS),
                               model.encode(images=pictures, text=TEXTS), atol=0, rtol=0)
    # Weights only in safetensors, named as transformers names them.
    names = set(load_file(str(out / "model.safetensors")))
    assert names == set(hf.state_dict())
    assert not list(out.glob("*.bin")) and not list(out.glob("*.pt"))


def test_weights_are_read_from_safetensors_only(released, tmp_path, monkeypatch):
    directory, hf = released
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((directory / "config.json").read_text())
    torch.save(hf.state_dict(), pickled / "pytorch_model.bin")

    def no_unpickling(*args, **kwargs):
        raise AssertionError("torch.load called: a checkpoint was unpickled")

    monkeypatch.setattr(torch, "load", no_unpickling)
    with pytest.raises(FileNotFoundError, match=r"only pickled weights \(pytorch_model.bin\)"):
        MMRetCLIP.from_pretrained(pickled)
    whole = MMRetCLIP.from_pretrained(directory)  # loads without torch.load
    # Sharded safetensors (an index and its shards) load the same weights.
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="300KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    sharded = MMRetCLIP.from_pretrained(tmp_path / "sharded")
    for key, value in whole.clip.state_dict().items():
        assert torch.equal(sharded.clip.state_dict()[key], value), key


def test_non_clip_checkpoints_are_refused_clearly(tmp_path):
    Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2).save_pretrained(
        tmp_path / "dino"
    )
    with pytest.raises(ValueError, match=r"type 'dinov2'.*model_type 'clip', CLIPModel"):
        MMRetCLIP.from_pretrained(tmp_path / "dino")
    with pytest.raises(ValueError, match=r"type 'dinov2'"):
        MMRetCLIP.from_open_clip(str(tmp_path / "dino"), None)
    CLIPVisionConfig().save_pretrained(tmp_path / "vision_only")
    with pytest.raises(ValueError, match=r"type 'clip_vision_model'"):
        MMRetCLIP.from_pretrained(tmp_path / "vision_only")


def test_weights_that_do_not_match_are_listed(released_copy):
    weights = released_copy / "model.safetensors"
    state = load_file(str(weights))
    # Older transformers saved the position-id buffers; they hold no weights and are passed.
    with_buffers = {**state,
                    "text_model.embeddings.position_ids": torch.arange(77)[None],
                    "vision_model.embeddings.position_ids": torch.arange(17)[None]}
    save_file(with_buffers, str(weights), metadata={"format": "pt"})
    MMRetCLIP.from_pretrained(released_copy)

    broken = dict(state)
    del broken["text_projection.weight"]
    broken["text_model.pooler.weight"] = torch.zeros(2)
    save_file(broken, str(weights), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing 1 \(text_projection.weight\); "
                                         r"unexpected 1 \(text_model.pooler.weight\)"):
        MMRetCLIP.from_pretrained(released_copy)

    wrong_shape = {**state, "visual_projection.weight": torch.zeros(8, 32)}
    save_file(wrong_shape, str(weights), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="do not fit its config.json"):
        MMRetCLIP.from_pretrained(released_copy)


def test_a_tokenizer_other_than_clips_is_refused(released_copy):
    vocab_file = released_copy / "vocab.json"
    vocab = json.loads(vocab_file.read_text())
    vocab["hello</w>"], vocab["world</w>"] = vocab["world</w>"], vocab["hello</w>"]
    vocab_file.write_text(json.dumps(vocab))
    with pytest.raises(ValueError, match="vocab.json is not OpenAI CLIP's BPE"):
        MMRetCLIP.from_pretrained(released_copy)


# The released configs' sizes (OpenAI CLIP ViT-B/16 and ViT-L/14, as MMRet-CLIP base / large).
RELEASED = {
    "ViT-B-16": ({"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                  "num_attention_heads": 12, "patch_size": 16},
                 {"hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 12,
                  "num_attention_heads": 8}, 512),
    "ViT-L-14": ({"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
                  "num_attention_heads": 16, "patch_size": 14},
                 {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                  "num_attention_heads": 12}, 768),
}


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_released_architectures_are_open_clips_openai_models(name):
    vision, text, projection = RELEASED[name]
    config = CLIPConfig(
        vision_config={**vision, "image_size": 224, "hidden_act": "quick_gelu"},
        text_config={**text, "hidden_act": "quick_gelu", "eos_token_id": 2},
        projection_dim=projection,
    )
    model_cfg = hf_clip.open_clip_model_cfg(config)
    expected = open_clip.get_model_config(name)
    assert model_cfg["embed_dim"] == expected["embed_dim"] and model_cfg["quick_gelu"] is True
    assert CLIPVisionCfg(**model_cfg["vision_cfg"]) == CLIPVisionCfg(**expected["vision_cfg"])
    assert CLIPTextCfg(**model_cfg["text_cfg"]) == CLIPTextCfg(**expected["text_cfg"])
    back = hf_clip.clip_config({**expected, "quick_gelu": True})
    shared = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "hidden_act", "layer_norm_eps")
    for tower, keys in (("vision_config", (*shared, "image_size", "patch_size")),
                        ("text_config", (*shared, "vocab_size", "max_position_embeddings",
                                         "eos_token_id"))):
        for key in keys:
            assert getattr(getattr(back, tower), key) == getattr(getattr(config, tower), key)
    assert back.projection_dim == projection


def test_models_and_settings_transformers_cannot_express_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"vision_cfg.layers=\[3, 4, 6, 3\] \(a ResNet\)"):
        hf_clip.clip_config(open_clip.get_model_config("RN50"))
    demo = open_clip.get_model_config(DEMO_CLIP)
    pooled = {**demo, "vision_cfg": {**demo["vision_cfg"], "attentional_pool": True}}
    with pytest.raises(ValueError, match="vision_cfg.attentional_pool=True"):
        hf_clip.clip_config(pooled)
    first = {**demo, "text_cfg": {**demo["text_cfg"], "pool_type": "first"}}
    with pytest.raises(ValueError, match="text_cfg.pool_type='first'"):
        hf_clip.clip_config(first)
    # Preprocessing: a resize beyond the crop has no open_clip equivalent; bilinear has.
    with pytest.raises(ValueError, match="shortest_edge.*256"):
        hf_clip.preprocess_cfg_from_processor(
            {"size": {"shortest_edge": 256}, "crop_size": {"height": 224, "width": 224}}, 224
        )
    assert hf_clip.preprocess_cfg_from_processor({"resample": 2}, 224)["interpolation"] == (
        "bilinear"
    )
    # One layout per directory, and only the two layouts.
    model = MMRetCLIP.from_open_clip(DEMO_CLIP, None)
    model.save_pretrained(tmp_path / "open_clip")
    with pytest.raises(ValueError, match="another layout"):
        model.save_pretrained(tmp_path / "open_clip", layout="transformers")
    with pytest.raises(ValueError, match="layout must be one of"):
        model.save_pretrained(tmp_path / "x", layout="onnx")
