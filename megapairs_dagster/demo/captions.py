"""Natural-language captions and object phrases for demo scenes.

Captions vary in template, synonyms and clause order (like web alt-texts) but always
name every object's colour and shape and the background, so caption similarity tracks
scene content.
"""

from __future__ import annotations

from collections.abc import Collection

import numpy as np

_SIZE_WORDS = {
    "small": ("small", "little", "tiny"),
    "medium": ("medium-sized", "mid-sized", "medium"),
    "large": ("large", "big"),
}
_TEXTURE_ADJECTIVES = {
    "solid": ("solid", "plain"),
    "striped": ("striped",),
    "dotted": ("dotted", "polka-dot", "spotted"),
    "checkered": ("checkered", "chequered"),
}
_TEXTURE_SUFFIXES = {
    "striped": ("with stripes",),
    "dotted": ("with dots", "covered in dots"),
    "checkered": ("with a checkered pattern",),
}
POSITION_PHRASES = {
    "top left": ("in the top left corner", "at the top left"),
    "top": ("at the top", "near the top"),
    "top right": ("in the top right corner", "at the top right"),
    "left": ("on the left", "at the left side"),
    "center": ("in the center", "in the middle"),
    "right": ("on the right", "at the right side"),
    "bottom left": ("in the bottom left corner", "at the bottom left"),
    "bottom": ("at the bottom", "near the bottom"),
    "bottom right": ("in the bottom right corner", "at the bottom right"),
}
_BACKGROUND_CLAUSES = (
    "on a {} background",
    "against a {} backdrop",
    "over a {} background",
    "in front of a {} background",
)
_COUNT_WORDS = {1: "One", 2: "Two", 3: "Three"}
_OBJECT_NOUNS = ("shape", "object", "figure")
_LEAD_INS = ("an image of", "a picture showing", "a drawing of")


def with_article(phrase: str) -> str:
    """Prefix "a" or "an" according to the first word's initial vowel."""
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def join_phrases(phrases: list[str]) -> str:
    """Join as English prose: "x", "x and y", "x, y and z"."""
    if len(phrases) <= 2:
        return " and ".join(phrases)
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def _pick(options: tuple[str, ...], rng: np.random.Generator | None) -> str:
    return options[0] if rng is None else options[int(rng.integers(len(options)))]


def _include(rng: np.random.Generator | None, probability: float) -> bool:
    return rng is None or rng.random() < probability


def object_phrase(
    obj: dict, rng: np.random.Generator | None = None, omit: Collection[str] = ()
) -> str:
    """Noun phrase with article for one object, e.g. "a large red striped circle on the left".

    With ``rng`` the wording varies and size, texture and position are occasionally left
    out; without it the plain full form is returned. Attributes named in ``omit`` are not
    mentioned (an omitted shape becomes the noun "shape").
    """
    words = []
    if "size" not in omit and _include(rng, 0.9):
        words.append(_pick(_SIZE_WORDS[obj["size"]], rng))
    if "colour" not in omit:
        words.append(obj["colour"])
    texture_suffix = ""
    if "texture" not in omit and _include(rng, 0.6 if obj["texture"] == "solid" else 0.95):
        if obj["texture"] in _TEXTURE_SUFFIXES and rng is not None and rng.random() < 0.3:
            texture_suffix = _pick(_TEXTURE_SUFFIXES[obj["texture"]], rng)
        else:
            words.append(_pick(_TEXTURE_ADJECTIVES[obj["texture"]], rng))
    words.append("shape" if "shape" in omit else obj["shape"])
    if texture_suffix:
        words.append(texture_suffix)
    if "position" not in omit and _include(rng, 0.85):
        words.append(_pick(POSITION_PHRASES[obj["position"]], rng))
    return with_article(" ".join(words))


def objects_phrase(objects: list[dict], rng: np.random.Generator | None = None) -> str:
    """All objects as one phrase, in shuffled order when ``rng`` is given."""
    order = list(range(len(objects))) if rng is None else rng.permutation(len(objects))
    return join_phrases([object_phrase(objects[i], rng) for i in order])


def _capitalised(text: str) -> str:
    return text[0].upper() + text[1:]


def caption_for_scene(scene: dict, rng: np.random.Generator) -> str:
    """A varied one-sentence caption naming every object and the background."""
    objects = objects_phrase(scene["objects"], rng)
    background = scene["background"]
    clause = _pick(_BACKGROUND_CLAUSES, rng).format(background)
    count = len(scene["objects"])
    noun = _pick(_OBJECT_NOUNS, rng) + ("s" if count > 1 else "")
    template = int(rng.integers(5))
    if template == 0:
        text = f"{objects}, {clause}."
    elif template == 1:
        text = f"{_COUNT_WORDS[count]} {noun} {clause}: {objects}."
    elif template == 2:
        text = f"{with_article(background)} background with {objects}."
    elif template == 3:
        text = f"{_pick(_LEAD_INS, rng)} {objects} {clause}."
    else:
        text = f"{_capitalised(clause)}, {objects}."
    return _capitalised(text)
