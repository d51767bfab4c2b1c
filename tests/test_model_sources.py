"""Every way a model can be named loads the same weights, and recorded hashes are enforced.

A CLIP comes from (open_clip model name, pretrained) where pretrained is a tag, a weights
file or a directory; training (``MMRetCLIP.from_open_clip``) and the view encoders
(``load_clip``) must read a given source identically. ``base_encoders`` pins the view
encoders' file hashes; ``open_view_encoder`` must refuse files that changed since.
"""

import hashlib
import pickle
import shutil
import time

import pytest
import torch
from safetensors.torch import load_file, save_file
from synthetic_shapes import shape_image
from tiny_paper_models import save_tiny_dino, save_tiny_eva_clip

from megapairs_dagster.retrieval import VARIANTS, MMRetCLIP
from megapairs_dagster.synthesis import encoders
from megapairs_dagster.synthesis.encoders import (
    CLIP_CONFIG_FILE,
    CLIP_WEIGHTS_FILE,
    ModelMismatchError,
    load_clip,
    load_dino,
    resolve_device,
    save_clip,
    sha256_file,
)
from megapairs_dagster.synthesis.views import open_view_encoder

DEMO_CLIP = "megapairs-demo-clip"
CAPTIONS = ["the same shape in red", "a blue square on yellow"]


@pytest.fixture(scope="module")
def tiny_eva(tmp_path_factory):
    return save_tiny_eva_clip(tmp_path_factory.mktemp("eva"), seed=0)


@pytest.fixture(scope="module")
def images():
    return [shape_image("circle", "red", "white", size=64),
            shape_image("square", "blue", "yellow", size=64)]


def embeddings(model: MMRetCLIP, images) -> torch.Tensor:
    return model.encode(images=images, text=CAPTIONS)


def test_every_clip_source_form_gives_the_same_model(tiny_eva, images, tmp_path):
    """Hub-layout directory (as model name, bare or ``local-dir:``, or as pretrained), a
    tag-less weights file (.safetensors and a torch .pt) and this project's saved checkpoint."""
    reference_model = MMRetCLIP.from_open_clip(*tiny_eva.hub_pair)
    reference = embeddings(reference_model, images)
    pt_file = tmp_path / "tiny_eva.pt"
    torch.save(load_file(tiny_eva.weights_file), pt_file)
    architecture = f"local-dir:{tiny_eva.architecture_dir}"
    saved = MMRetCLIP.from_open_clip(*tiny_eva.file_pair).save_pretrained(tmp_path / "mmret")
    sources = {
        "file": tiny_eva.file_pair,
        "pt file": (architecture, str(pt_file)),
        "bare directory": (str(tiny_eva.hub_dir), None),
        "directory as pretrained": ("EVA02-B-16", str(tiny_eva.hub_dir)),
        "saved checkpoint": (str(saved), None),
    }
    for form, (model_name, pretrained) in sources.items():
        model = MMRetCLIP.from_open_clip(model_name, pretrained)
        torch.testing.assert_close(embeddings(model, images), reference, rtol=0, atol=0,
                                   msg=f"{form} differs")
    for directory in (tiny_eva.hub_dir, saved):  # from_pretrained opens both layouts
        torch.testing.assert_close(embeddings(MMRetCLIP.from_pretrained(directory), images),
                                   reference, rtol=0, atol=0)
    random_init = MMRetCLIP.from_open_clip(architecture, None)
    assert not torch.allclose(embeddings(random_init, images), reference)

    # The view encoders read the same pairs into the same weights.
    image_encoder, _ = load_clip(*tiny_eva.file_pair)
    with torch.no_grad():
        pixels = torch.stack([image_encoder.preprocess(image) for image in images])
        views = torch.nn.functional.normalize(image_encoder.encode(pixels), dim=-1)
    torch.testing.assert_close(views, reference_model.encode(images=images))


def test_sources_record_the_files_they_load(tiny_eva):
    weights_sha = sha256_file(tiny_eva.weights_file)
    config_sha = sha256_file(tiny_eva.hub_dir / CLIP_CONFIG_FILE)
    model = MMRetCLIP.from_open_clip(*tiny_eva.file_pair)
    assert model.mmret["base_files"] == {"tiny_eva_clip.safetensors": weights_sha,
                                         CLIP_CONFIG_FILE: config_sha}
    _, text = load_clip(*tiny_eva.hub_pair)
    assert text.identity["source"] == "dir"
    assert text.identity["files"] == {"open_clip_model.safetensors": weights_sha,
                                      CLIP_CONFIG_FILE: config_sha}


def test_directory_weights_are_the_file_open_clip_prefers(tmp_path, images):
    """A folder holding the hub file and this project's file: the hub file is loaded and hashed."""
    torch.manual_seed(0)
    kept, _ = load_clip(DEMO_CLIP)
    torch.manual_seed(1)
    ignored, _ = load_clip(DEMO_CLIP)
    save_clip(ignored.model, DEMO_CLIP, tmp_path)
    state = {key: value.contiguous() for key, value in kept.model.state_dict().items()}
    save_file(state, str(tmp_path / "open_clip_model.safetensors"))
    loaded, _ = load_clip(DEMO_CLIP, str(tmp_path))
    assert set(loaded.identity["files"]) == {"open_clip_model.safetensors", CLIP_CONFIG_FILE}
    pixels = torch.stack([loaded.preprocess(image) for image in images])
    with torch.no_grad():
        assert torch.equal(loaded.encode(pixels), kept.encode(pixels))
        assert not torch.equal(loaded.encode(pixels), ignored.encode(pixels))


def test_wrong_clip_sources_fail_naming_what_was_tried(tiny_eva, tmp_path):
    architecture = f"local-dir:{tiny_eva.architecture_dir}"
    cases = [
        (("no-such-model", None), ValueError, "'no-such-model' is neither an open_clip model name"),
        ((f"local-dir:{tmp_path}/absent", None), FileNotFoundError, f"{tmp_path}/absent"),
        ((architecture, f"{tmp_path}/absent.safetensors"), FileNotFoundError,
         f"{tmp_path}/absent.safetensors do not exist"),
        ((architecture, "models/eva02.bin"), FileNotFoundError, "models/eva02.bin do not exist"),
        ((DEMO_CLIP, "no-such-tag"), ValueError, "neither a local path nor an open_clip tag"),
        ((architecture, "merged2b_s8b_b131k"), ValueError, "'merged2b_s8b_b131k' is neither"),
        ((DEMO_CLIP, str(tiny_eva.weights_file)), ValueError,
         f"cannot build open_clip '{DEMO_CLIP}' with weights {tiny_eva.weights_file}"),
        (("EVA02-B-16", str(tiny_eva.architecture_dir)), FileNotFoundError,
         "holds no CLIP weights"),
        ((str(tmp_path), None), FileNotFoundError, f"{tmp_path} is not an open_clip directory"),
    ]
    for (model_name, pretrained), error, message in cases:
        for load in (MMRetCLIP.from_open_clip, load_clip):
            with pytest.raises(error, match=message):
                load(model_name, pretrained)
    with pytest.raises(FileNotFoundError, match="from_open_clip"):
        MMRetCLIP.from_pretrained("ViT-B-16")


def test_unrecognised_weights_name_in_a_directory_is_refused(tiny_eva, tmp_path):
    """open_clip would pick an arbitrary file there; the hashed file must be the loaded one."""
    shutil.copy(tiny_eva.hub_dir / CLIP_CONFIG_FILE, tmp_path)
    shutil.copy(tiny_eva.weights_file, tmp_path / "eva02.safetensors")
    with pytest.raises(FileNotFoundError, match=r"found \['eva02.safetensors'\]"):
        MMRetCLIP.from_pretrained(tmp_path)


def test_unobtainable_hub_sources_fail_fast_naming_them(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(RuntimeError, match="ViT-B-16.*openai"):
        MMRetCLIP.from_open_clip(*VARIANTS["base"])
    with pytest.raises(RuntimeError, match="EVA02-B-16.*merged2b_s8b_b131k"):
        load_clip("EVA02-B-16", "merged2b_s8b_b131k")
    with pytest.raises(RuntimeError, match="hf-hub:nobody-here/no-such-clip"):
        MMRetCLIP.from_open_clip("hf-hub:nobody-here/no-such-clip", None)
    assert time.perf_counter() - start < 10


# --- recorded hashes ----------------------------------------------------------------------


def pinned_manifest(clip_pair: tuple[str, str | None], dino_dir) -> dict:
    """What base_encoders records in the pretrained mode (identity from the loaders)."""
    _, text = load_clip(*clip_pair)
    dino = load_dino(str(dino_dir), image_size=112)
    return {
        "clip": {"model_name": clip_pair[0], "pretrained": clip_pair[1], "stored": False,
                 "identity": text.identity},
        "dino": {"name_or_path": str(dino_dir), "stored": False, "identity": dino.identity,
                 "image_size": 112},
    }


def open_view(view: str, manifest: dict):
    return open_view_encoder(view, manifest, resolve_stored=lambda rel: rel)


def test_replaced_clip_weights_are_refused_naming_the_file(tmp_path):
    tiny = save_tiny_eva_clip(tmp_path / "eva", seed=0)
    manifest = pinned_manifest(tiny.file_pair, save_tiny_dino(tmp_path / "dino"))
    recorded = manifest["clip"]["identity"]["files"]["tiny_eva_clip.safetensors"]
    for view in ("clip_image", "clip_caption", "dino_image"):
        assert open_view(view, manifest).identity["files"] == manifest[
            "dino" if view == "dino_image" else "clip"]["identity"]["files"]

    other = save_tiny_eva_clip(tmp_path / "other", seed=1)
    shutil.copyfile(other.weights_file, tiny.weights_file)  # same size, other weights
    found = sha256_file(tiny.weights_file)
    assert found != recorded
    for view in ("clip_image", "clip_caption"):
        with pytest.raises(ModelMismatchError) as caught:
            open_view(view, manifest)
        message = str(caught.value)
        for part in (str(tiny.weights_file), recorded, found, "rematerialise base_encoders"):
            assert part in message
        assert str(pickle.loads(pickle.dumps(caught.value))) == message  # crosses processes
    open_view("dino_image", manifest)  # the other view's files did not change


def test_changed_dino_weights_and_missing_files_are_refused(tmp_path):
    tiny = save_tiny_eva_clip(tmp_path / "eva", seed=0)
    dino_dir = save_tiny_dino(tmp_path / "dino", seed=0)
    manifest = pinned_manifest(tiny.hub_pair, dino_dir)
    save_tiny_dino(tmp_path / "dino2", seed=1)
    shutil.copyfile(tmp_path / "dino2" / "model.safetensors", dino_dir / "model.safetensors")
    expected = f"DINOv2 '{dino_dir}': {dino_dir}/model.safetensors has sha256"
    with pytest.raises(ModelMismatchError, match=expected):
        open_view("dino_image", manifest)

    (tiny.hub_dir / "open_clip_model.safetensors").rename(tiny.hub_dir / CLIP_WEIGHTS_FILE)
    with pytest.raises(ModelMismatchError, match=(
        r"open_clip_model.safetensors is missing, but base_encoders recorded it with sha256 "
        r"[0-9a-f]{64}"
    )):
        open_view("clip_image", manifest)


def test_file_hashes_are_computed_once_per_file_version(tmp_path, monkeypatch):
    calls = []
    real = hashlib.sha256
    monkeypatch.setattr(encoders.hashlib, "sha256", lambda *a: calls.append(1) or real(*a))
    path = tmp_path / "weights.bin"
    path.write_bytes(b"first version")
    first = sha256_file(path)
    assert sha256_file(path) == first and len(calls) == 1
    path.write_bytes(b"second version, longer")
    assert sha256_file(path) == real(b"second version, longer").hexdigest()
    assert len(calls) == 2


# --- devices -----------------------------------------------------------------------------


def test_unavailable_device_names_the_setting(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match=(
        r"generation.device is 'cuda' but this process sees no CUDA device; "
        r"set generation.device to cpu or auto \(in the deployment config\)"
    )):
        resolve_device("cuda", setting="generation.device")
    assert resolve_device("auto", setting="compute.device") == torch.device("cpu")
    with pytest.raises(ValueError, match="compute.device is 'gpu'"):
        resolve_device("gpu", setting="compute.device")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(RuntimeError, match="'cuda:2' but this process sees only 1 CUDA"):
        resolve_device("cuda:2", setting="compute.device")


def test_view_encoder_device_error_names_compute_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    manifest = {"clip": {"model_name": DEMO_CLIP, "pretrained": None, "stored": False,
                         "identity": {"files": {}}}}
    with pytest.raises(RuntimeError, match="compute.device is 'cuda'"):
        open_view_encoder("clip_image", manifest, resolve_stored=lambda rel: rel, device="cuda")


def test_dino_refuses_a_single_weights_file(tmp_path):
    weights = tmp_path / "model.safetensors"
    save_file({"w": torch.zeros(1)}, str(weights))
    with pytest.raises(NotADirectoryError, match="save_pretrained"):
        load_dino(str(weights))
