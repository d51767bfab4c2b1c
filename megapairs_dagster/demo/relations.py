"""Which attributes differ between two demo scenes.

Later stages use this to report, per similarity view, how often each kind of attribute
differs between an image and its mined neighbours; the demo corpus and benchmark use it
to check that every variant differs from its base exactly as recorded.
"""

from __future__ import annotations

from itertools import permutations

RELATION_TYPES = ("background", "colour", "shape", "size", "position", "texture", "count")
OBJECT_ATTRIBUTES = ("shape", "colour", "size", "position", "texture")


def _differing_attributes(object_a: dict, object_b: dict) -> set[str]:
    return {name for name in OBJECT_ATTRIBUTES if object_a[name] != object_b[name]}


def match_objects(objects_a: list[dict], objects_b: list[dict]) -> list[tuple[int, int]]:
    """Pair objects of two scenes so that the fewest attributes differ.

    Scenes hold a handful of objects, so trying every assignment is cheap and exact.
    When the counts differ, the surplus objects of the larger scene stay unmatched.
    Returns (index in a, index in b) pairs.
    """
    swapped = len(objects_a) > len(objects_b)
    small, large = (objects_b, objects_a) if swapped else (objects_a, objects_b)
    best_pairs: list[tuple[int, int]] = []
    best_cost = None
    for chosen in permutations(range(len(large)), len(small)):
        cost = sum(len(_differing_attributes(small[i], large[j])) for i, j in enumerate(chosen))
        if best_cost is None or cost < best_cost:
            best_cost = cost
            best_pairs = list(enumerate(chosen))
    return [(j, i) for i, j in best_pairs] if swapped else best_pairs


def attribute_differences(scene_a: dict, scene_b: dict) -> set[str]:
    """Kinds of attribute (from RELATION_TYPES) that differ between two scenes.

    Objects are matched by fewest differing attributes; "count" means the scenes hold a
    different number of objects, and the unmatched surplus adds nothing else.
    """
    differences: set[str] = set()
    if scene_a["background"] != scene_b["background"]:
        differences.add("background")
    objects_a, objects_b = scene_a["objects"], scene_b["objects"]
    if len(objects_a) != len(objects_b):
        differences.add("count")
    for i, j in match_objects(objects_a, objects_b):
        differences |= _differing_attributes(objects_a[i], objects_b[j])
    return differences


def scene_signature(scene: dict) -> tuple:
    """Hashable form of a scene, equal for two scenes exactly when nothing differs."""
    objects = sorted(tuple(obj[name] for name in OBJECT_ATTRIBUTES) for obj in scene["objects"])
    return (scene["background"], tuple(objects))
