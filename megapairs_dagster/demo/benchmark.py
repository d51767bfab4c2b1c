"""A demo composed-image-retrieval benchmark in the CIRCO annotation format.

Each query is a reference scene plus one edit, stated in words. The gallery holds, per
query, the reference, several renderings of the edited scene (the ground truths differ
only in position jitter and noise) and a distractor with a different edit, padded with
unrelated scenes. Ground truths are recomputed over the whole gallery from the scenes,
so any image that satisfies a query counts. Images come from their own random stream
and id range, so none of them is in the training corpus.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from .captions import POSITION_PHRASES, join_phrases, object_phrase, objects_phrase
from .corpus import write_atomically
from .relations import scene_signature
from .render import jpeg_bytes, render_scene
from .scenes import EDIT_TYPES, MAX_OBJECTS, feasible_edits, make_variant, random_scene

BENCHMARK_STREAM = 1  # separates the benchmark's random streams from the corpus's
GALLERY_ID_OFFSET = 10**9  # above every 9-digit corpus key
MIN_GROUND_TRUTHS, MAX_GROUND_TRUTHS = 2, 3


def _reference_name(objects: list[dict], index: int) -> str:
    """ "red circle", or "red circle on the left" when another object shares colour and shape."""
    obj = objects[index]
    name = f"{obj['colour']} {obj['shape']}"
    twins = [o for o in objects if (o["colour"], o["shape"]) == (obj["colour"], obj["shape"])]
    return f"{name} {POSITION_PHRASES[obj['position']][0]}" if len(twins) > 1 else name


def _describe_edit(reference: dict, change: dict, rng: np.random.Generator) -> tuple[str, str]:
    """(relative caption, shared concept) for one change to the reference scene."""
    objects, edit = reference["objects"], change["edit"]
    everything = objects_phrase(objects)
    if edit == "background":
        options = [
            f"has a {change['new']} background",
            f"is set against a {change['new']} background instead",
            f"the background is {change['new']} instead of {change['old']}",
        ]
        return options[int(rng.integers(len(options)))], everything
    if edit == "add_object":
        added = object_phrase(change["new"])
        options = [f"has an extra {added.split(' ', 1)[1]}", f"also shows {added}", f"adds {added}"]
        return options[int(rng.integers(len(options)))], everything
    name = _reference_name(objects, change["object"])
    if edit == "remove_object":
        kept = [object_phrase(o) for i, o in enumerate(objects) if i != change["object"]]
        options = [f"without the {name}", f"the {name} is removed", f"no longer shows the {name}"]
        return options[int(rng.integers(len(options)))], join_phrases(kept)
    shared = object_phrase(objects[change["object"]], omit={edit})
    new = change["new"]
    if edit == "position":
        new = POSITION_PHRASES[new][0]
        options = [f"the {name} is now {new}", f"the {name} sits {new} instead"]
    elif edit == "shape":
        options = [f"the {name} becomes a {new}", f"has a {new} instead of the {name}"]
    else:
        options = [f"the {name} is {new} instead of {change['old']}", f"makes the {name} {new}"]
    return options[int(rng.integers(len(options)))], shared


def _reference_for(edit: str, rng: np.random.Generator) -> dict:
    """A random scene on which ``edit`` is possible (room to add, something to remove)."""
    if edit == "add_object":
        return random_scene(rng, int(rng.integers(1, MAX_OBJECTS)))
    if edit == "remove_object":
        return random_scene(rng, int(rng.integers(2, MAX_OBJECTS + 1)))
    return random_scene(rng)


def write_demo_benchmark(
    out_dir: str | os.PathLike, num_queries: int = 200, gallery_size: int = 1000, seed: int = 1234
) -> Path:
    """Write ``annotations/val.json``, ``images/{id:012d}.jpg`` and ``metadata.jsonl``.

    Queries are spread evenly over the edit types (recorded in ``semantic_aspects``).
    Returns ``out_dir``. Raises ValueError if the query images do not fit the gallery.
    """
    rng = np.random.default_rng([seed, BENCHMARK_STREAM])
    edits = [EDIT_TYPES[i % len(EDIT_TYPES)] for i in range(num_queries)]
    edits = [edits[i] for i in rng.permutation(num_queries)]
    gallery: list[dict] = []  # scenes; a query's images are found by their gallery position
    queries = []
    for edit in edits:
        reference = _reference_for(edit, rng)
        target, _, (change,) = make_variant(reference, rng, edits=[edit])
        other_edit = str(rng.choice([e for e in feasible_edits(reference) if e != edit]))
        distractor, _, _ = make_variant(reference, rng, edits=[other_edit])
        relative_caption, shared_concept = _describe_edit(reference, change, rng)
        queries.append(
            {
                "reference": len(gallery),
                "target": len(gallery) + 1,
                "relative_caption": relative_caption,
                "shared_concept": shared_concept,
                "edit": edit,
                "target_scene": target,
            }
        )
        ground_truths = int(rng.integers(MIN_GROUND_TRUTHS, MAX_GROUND_TRUTHS + 1))
        gallery.extend([reference, *[target] * ground_truths, distractor])
    if len(gallery) > gallery_size:
        raise ValueError(f"{num_queries} queries need a gallery of at least {len(gallery)} images")
    while len(gallery) < gallery_size:
        gallery.append(random_scene(rng))
    order = rng.permutation(gallery_size)  # gallery position -> shuffled slot
    image_ids = [GALLERY_ID_OFFSET + int(slot) for slot in order]
    ids_by_signature: dict[tuple, list[int]] = {}
    for position in np.argsort(order):
        ids_by_signature.setdefault(scene_signature(gallery[position]), []).append(
            image_ids[position]
        )

    annotations = []
    for number, query in enumerate(queries):
        target_id = image_ids[query["target"]]
        matches = ids_by_signature[scene_signature(query["target_scene"])]
        annotations.append(
            {
                "id": number,
                "reference_img_id": image_ids[query["reference"]],
                "target_img_id": target_id,
                "relative_caption": query["relative_caption"],
                "shared_concept": query["shared_concept"],
                "gt_img_ids": [target_id] + [i for i in matches if i != target_id],
                "semantic_aspects": [query["edit"]],
            }
        )

    out = Path(out_dir)
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    (out / "images").mkdir(exist_ok=True)
    metadata_lines = []
    for position in np.argsort(order):
        image_id, scene = image_ids[position], gallery[position]
        image_rng = np.random.default_rng([seed, BENCHMARK_STREAM, 1, image_id])
        payload = jpeg_bytes(render_scene(scene, image_rng))
        write_atomically(out / "images" / f"{image_id:012d}.jpg", lambda f, p=payload: f.write(p))
        metadata_lines.append(json.dumps({"image_id": image_id, "scene": scene}) + "\n")
    write_atomically(out / "metadata.jsonl", lambda f: f.write("".join(metadata_lines).encode()))
    write_atomically(
        out / "annotations" / "val.json",
        lambda f: f.write(json.dumps(annotations, indent=1).encode()),
    )
    return out
