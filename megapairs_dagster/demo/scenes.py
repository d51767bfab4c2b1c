"""Attribute vocabularies, random scenes and attribute edits of the demo corpus.

A scene is a plain dict, ``{"background": name, "objects": [{"shape", "colour", "size",
"position", "texture"}, ...]}``, so it can be stored as JSON metadata unchanged.
"""

from __future__ import annotations

import copy

import numpy as np

from .relations import attribute_differences

SHAPES = ("circle", "square", "triangle", "star", "diamond", "cross", "hexagon")
# Object colours are saturated; background colours are pale, neutral or dark, so the two
# never coincide and a border-based background estimate cannot pick up an object.
OBJECT_COLOURS = {
    "red": (215, 35, 35),
    "orange": (245, 135, 15),
    "yellow": (240, 210, 20),
    "green": (20, 140, 50),
    "blue": (35, 70, 215),
    "purple": (135, 45, 175),
    "pink": (240, 110, 180),
    "brown": (115, 70, 30),
}
BACKGROUNDS = {
    "sky blue": (140, 195, 235),
    "grass green": (155, 205, 125),
    "sand": (225, 205, 160),
    "night": (22, 26, 58),
    "white": (245, 245, 242),
    "grey": (128, 128, 128),
    "lavender": (205, 195, 232),
}
SIZES = ("small", "medium", "large")
TEXTURES = ("solid", "striped", "dotted", "checkered")
# Cells of a 3x3 grid as (column, row); one object per cell keeps objects apart.
POSITIONS = {
    "top left": (0, 0),
    "top": (1, 0),
    "top right": (2, 0),
    "left": (0, 1),
    "center": (1, 1),
    "right": (2, 1),
    "bottom left": (0, 2),
    "bottom": (1, 2),
    "bottom right": (2, 2),
}
MAX_OBJECTS = 3

OBJECT_EDITS = ("colour", "shape", "size", "position", "texture")
EDIT_TYPES = ("background", *OBJECT_EDITS, "add_object", "remove_object")
EDIT_TO_RELATION = {
    **{edit: edit for edit in ("background", *OBJECT_EDITS)},
    "add_object": "count",
    "remove_object": "count",
}
# Background edits are weighted up: without them, unrelated scenes that share a
# background crowd family members out of every KNN view.
EDIT_WEIGHTS = {
    "background": 4.0,
    "colour": 2.0,
    "shape": 2.0,
    "size": 1.5,
    "position": 1.5,
    "texture": 1.5,
    "add_object": 1.25,
    "remove_object": 1.25,
}
_ATTRIBUTE_VALUES = {
    "shape": SHAPES,
    "colour": tuple(OBJECT_COLOURS),
    "size": SIZES,
    "texture": TEXTURES,
}


def _choice(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def _free_positions(objects: list[dict]) -> list[str]:
    taken = {obj["position"] for obj in objects}
    return [name for name in POSITIONS if name not in taken]


def random_object(rng: np.random.Generator, free_positions: list[str]) -> dict:
    """One object with every attribute drawn uniformly, placed in one of the free cells."""
    return {
        "shape": _choice(rng, SHAPES),
        "colour": _choice(rng, tuple(OBJECT_COLOURS)),
        "size": _choice(rng, SIZES),
        "position": _choice(rng, free_positions),
        "texture": _choice(rng, TEXTURES),
    }


def random_scene(rng: np.random.Generator, num_objects: int | None = None) -> dict:
    """A scene of 1..MAX_OBJECTS objects (or exactly ``num_objects``) on a random background."""
    count = int(rng.integers(1, MAX_OBJECTS + 1)) if num_objects is None else num_objects
    objects: list[dict] = []
    for _ in range(count):
        objects.append(random_object(rng, _free_positions(objects)))
    return {"background": _choice(rng, tuple(BACKGROUNDS)), "objects": objects}


def feasible_edits(scene: dict) -> list[str]:
    """Edits that can be applied to this scene while keeping 1..MAX_OBJECTS objects."""
    count = len(scene["objects"])
    return [
        edit
        for edit in EDIT_TYPES
        if not (edit == "add_object" and count >= MAX_OBJECTS)
        and not (edit == "remove_object" and count <= 1)
    ]


def sample_edits(rng: np.random.Generator, scene: dict, two_edit_probability: float) -> list[str]:
    """One edit, or two different ones, drawn by EDIT_WEIGHTS (never add and remove together)."""
    options = feasible_edits(scene)
    weights = np.array([EDIT_WEIGHTS[edit] for edit in options])
    wanted = 2 if rng.random() < two_edit_probability else 1
    edits = [
        str(e) for e in rng.choice(options, size=wanted, replace=False, p=weights / weights.sum())
    ]
    if {"add_object", "remove_object"} <= set(edits):
        edits.remove("remove_object")
    return sorted(edits)


def apply_edits(scene: dict, edits: list[str], rng: np.random.Generator) -> tuple[dict, list[dict]]:
    """Copy of ``scene`` with each named edit applied, plus a record of each change.

    Attribute edits pick a random object and a new value; a removal spares objects
    already edited; an addition places a new object in a free cell. Change records are
    ``{"edit", "object": index in the original scene or the added object, "old", "new"}``.
    """
    edited = copy.deepcopy(scene)
    objects = edited["objects"]
    changes: list[dict] = []
    touched: set[int] = set()
    for edit in (e for e in edits if e in OBJECT_EDITS):
        index = int(rng.integers(len(objects)))
        touched.add(index)
        old = objects[index][edit]
        if edit == "position":
            options = _free_positions(objects)
        else:
            options = [value for value in _ATTRIBUTE_VALUES[edit] if value != old]
        objects[index][edit] = _choice(rng, options)
        changes.append({"edit": edit, "object": index, "old": old, "new": objects[index][edit]})
    if "background" in edits:
        old = edited["background"]
        edited["background"] = _choice(rng, [name for name in BACKGROUNDS if name != old])
        changes.append({"edit": "background", "old": old, "new": edited["background"]})
    if "remove_object" in edits:
        spare = [i for i in range(len(objects)) if i not in touched] or list(range(len(objects)))
        index = _choice(rng, spare)
        changes.append({"edit": "remove_object", "object": index, "old": objects[index]})
        edited["objects"] = objects = [obj for i, obj in enumerate(objects) if i != index]
    if "add_object" in edits:
        added = random_object(rng, _free_positions(objects))
        objects.append(added)
        changes.append({"edit": "add_object", "object": added, "new": added})
    return edited, changes


def make_variant(
    base: dict,
    rng: np.random.Generator,
    edits: list[str] | None = None,
    two_edit_probability: float = 0.25,
    max_attempts: int = 100,
) -> tuple[dict, list[str], list[dict]]:
    """A variant of ``base`` that differs from it in exactly the recorded edits.

    Edits are sampled unless given. A random application can occasionally look like a
    different edit under object matching (e.g. a new object that copies a removed one),
    so each try is checked with ``attribute_differences`` and redrawn if it does not match.
    Returns (variant scene, sorted edit names, change records).
    """
    for _ in range(max_attempts):
        chosen = (
            sorted(edits) if edits is not None else sample_edits(rng, base, two_edit_probability)
        )
        variant, changes = apply_edits(base, chosen, rng)
        if attribute_differences(base, variant) == {EDIT_TO_RELATION[e] for e in chosen}:
            return variant, chosen, changes
    raise RuntimeError(f"could not apply edits {edits} to scene {base}")
