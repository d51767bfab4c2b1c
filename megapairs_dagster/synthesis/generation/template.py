"""The offline ``template`` backends: descriptions and instructions from the two captions.

No model runs: the texts are rendered from the captions' clause-level comparison
(``caption_diff.py``), so any corpus works, not just the demo one. Instructions state the
one or two strongest differences only, because instructions listing every small difference
do not look like the single-edit queries of CIR benchmarks.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence

from .base import DescriptionRequest, InstructionRequest
from .caption_diff import Change, Clause, compare_captions, fix_articles, key_changes
from .prompts import PROMPT_VERSION

# Leading words that make a clause a prepositional phrase rather than a noun phrase.
_PREPOSITIONS = frozenset(
    [
        "in",
        "on",
        "at",
        "over",
        "against",
        "near",
        "under",
        "behind",
        "above",
        "below",
        "beside",
        "inside",
        "outside",
    ]
)
MAX_PHRASE_WORDS = 12  # longest clause quoted inside an instruction


def _prose(text: str) -> str:
    """Lower-case a clause's capitalised first word (not "I" or an acronym)."""
    first, _, rest = text.partition(" ")
    if first != "I" and (len(first) == 1 or first[1:].islower()):
        first = first.lower()
    return f"{first} {rest}" if rest else first


def _capped(text: str, max_words: int) -> str:
    return " ".join(text.split()[:max_words])


def _focus(clause: Clause, around: frozenset[str], max_words: int = MAX_PHRASE_WORDS) -> str:
    """The clause, or the window of at most ``max_words`` words around the given words."""
    positions = [i for i, key in enumerate(clause.keys) if key in around]
    start = max(0, positions[0] - 3) if positions and len(clause.words) > max_words else 0
    return _prose(" ".join(fix_articles(list(clause.words[start : start + max_words]))))


def _without_preposition(phrase: str) -> str:
    words = phrase.split()
    while len(words) > 1 and words[0].lower() in _PREPOSITIONS | {"front", "of"}:
        words.pop(0)
    return " ".join(words)


def _definite(phrase: str) -> str:
    """ "a red star" → "the red star", for naming something the query already has."""
    first, _, rest = phrase.partition(" ")
    return f"the {rest}" if first.lower() in ("a", "an") and rest else phrase


# ---------------------------------------------------------------- descriptions

_BOTH_VERBS = ("show", "feature", "contain", "depict", "include")
_SHOWS = ("shows", "has", "features", "contains")
_ADD_SOURCE = ("lacks", "does not include", "does not show")
_ADD_TARGET = ("adds", "also has", "additionally shows")
_REMOVE_SOURCE = ("also includes", "additionally has", "also shows")
_REMOVE_TARGET = ("leaves out", "drops", "no longer has")
_CLOSINGS = (
    "Apart from this, the layout and the overall look of the two pictures stay much the same.",
    "Everything else, including the arrangement and the framing, is essentially unchanged.",
    "The rest of the composition matches closely, so this is the main thing that sets them apart.",
    "Otherwise the two pictures are alike in style, framing and arrangement.",
)


def _difference_phrases(change: Change, rng: random.Random, cap: int) -> tuple[str, str]:
    """What the source image and the target image each have, for one change."""
    if change.kind == "add":
        target = _capped(_without_preposition(_prose(change.target.text())), cap)
        return f"{rng.choice(_ADD_SOURCE)} {target}", f"{rng.choice(_ADD_TARGET)} {target}"
    if change.kind == "remove":
        query = _capped(_without_preposition(_prose(change.query.text())), cap)
        removed = f"{rng.choice(_REMOVE_TARGET)} {_definite(query)}"
        return f"{rng.choice(_REMOVE_SOURCE)} {query}", removed
    verb = rng.choice(_SHOWS)
    query = _capped(_prose(change.query.text()), cap)
    target = _capped(_prose(change.target.text()), cap)
    return _shows(verb, query), _shows(verb, target)


def _shows(verb: str, phrase: str) -> str:
    """ "shows a red star", but "is set on a sand background" for a setting."""
    return f"is set {phrase}" if phrase.split()[0].lower() in _PREPOSITIONS else f"{verb} {phrase}"


def _join(phrases: Sequence[str]) -> str:
    if len(phrases) <= 2:
        return " and ".join(phrases)
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def _shared_sentence(phrases: Sequence[str], verb: str) -> str:
    nouns = [p for p in phrases if p.split()[0].lower() not in _PREPOSITIONS]
    settings = [p for p in phrases if p.split()[0].lower() in _PREPOSITIONS]
    if nouns:
        return f"Both images {verb} {_join(nouns)}" + "".join(f", {s}" for s in settings) + "."
    if settings:
        return f"Both images are set {_join(settings)}."
    return "Both images have a similar overall look."


def _word_count(text: str) -> int:
    return len(text.split())


def describe_pair(query_caption: str, target_caption: str, word_budget: int, seed: int) -> str:
    """A "Both images … However, the source image …, whereas the target image …" text.

    Differences come first in the budget, then shared phrases, then closing remarks, each
    added only while the total stays within ``word_budget`` words.
    """
    rng = random.Random(seed)
    comparison = compare_captions(query_caption, target_caption)
    cap = max(6, word_budget // 7)
    verb = rng.choice(_BOTH_VERBS)
    shared = [_capped(_prose(p), cap) for p in comparison.shared]
    differences = [_difference_phrases(c, rng, cap) for c in key_changes(comparison, limit=3)]
    if not differences:
        differences = [("is framed one way", "is framed slightly differently")]

    def render(n_shared: int, n_differences: int, closings: Sequence[str]) -> str:
        chosen = differences[:n_differences]
        source = " and ".join(s for s, _ in chosen)
        target = " and ".join(t for _, t in chosen)
        parts = [
            _shared_sentence(shared[:n_shared], verb),
            f"However, the source image {source}, whereas the target image {target}.",
            *closings,
        ]
        return " ".join(parts)

    n_shared, n_differences = min(1, len(shared)), 1
    while (
        n_differences < len(differences)
        and _word_count(render(n_shared, n_differences + 1, ())) <= word_budget
    ):
        n_differences += 1
    while (
        n_shared < len(shared)
        and _word_count(render(n_shared + 1, n_differences, ())) <= word_budget
    ):
        n_shared += 1
    closings: list[str] = []
    for closing in rng.sample(_CLOSINGS, 2):
        if _word_count(render(n_shared, n_differences, [*closings, closing])) <= word_budget:
            closings.append(closing)
    return render(n_shared, n_differences, closings)


# ---------------------------------------------------------------- instructions

_SAME = (
    "the same scene",
    "the same picture",
    "the same setup",
    "the same composition",
    "the same shot",
)
_THIS = ("this picture", "this scene", "this image", "this shot", "this photo")
_SIMILAR = (
    "a similar picture",
    "a similar shot",
    "a similar image",
    "a comparable scene",
    "something like this",
)
# {with}: the change as a modifier ("on a night background", "without the red star").
_WITH_TEMPLATES = (
    "Show {same} but {with}",
    "Find {similar} {with}",
    "Can I see {this} {with}?",
    "I'd like {this} {with}",
    "Looking for {similar} {with}",
    "{Same}, only {with}",
    "Show me {similar} {with}",
    "Search for {similar} {with}",
    "I want {same} {with}",
)
# {do}: the change as an imperative ("change the sand to night", "add a red star").
_DO_TEMPLATES = (
    "{Do} in {this}",
    "Take {this} and {do}",
    "{Do}, keeping the rest of {this}",
    "Keep {same} but {do}",
    "Use {this}, just {do}",
    "Start from {this} and {do}",
)
_SWAP_VERBS = (
    "change the {old} to {new}",
    "make it {new} instead of {old}",
    "swap the {old} for {new}",
    "replace the {old} with {new}",
    "turn the {old} into {new}",
)
_ADD_VERBS = ("add {phrase}", "put in {phrase}", "include {phrase}")
_REMOVE_VERBS = ("remove {phrase}", "take out {phrase}", "leave out {phrase}")
_DROP_DETAIL_VERBS = ("drop the {old} detail", "leave out the {old} part")
_MORE_DETAIL_VERBS = ("make it {new}", "have it {new}")


def _with_phrase(change: Change) -> str:
    if change.kind == "remove":
        return f"without {_definite(_without_preposition(_focus(change.query, change.old)))}"
    phrase = _focus(change.target, change.new)
    if change.kind == "add":
        return f"with {_without_preposition(phrase)} as well"
    return phrase if phrase.split()[0].lower() in _PREPOSITIONS else f"with {phrase}"


def _do_phrase(change: Change, rng: random.Random) -> str:
    if change.kind == "add":
        phrase = _without_preposition(_focus(change.target, change.new))
        return rng.choice(_ADD_VERBS).format(phrase=phrase)
    if change.kind == "remove":
        phrase = _definite(_without_preposition(_focus(change.query, change.old)))
        return rng.choice(_REMOVE_VERBS).format(phrase=phrase)
    if change.swap:
        old, new = change.swap
        return rng.choice(_SWAP_VERBS).format(old=old.lower(), new=new.lower())
    new_runs = change.target.runs(change.new)
    if new_runs:
        return rng.choice(_MORE_DETAIL_VERBS).format(new=new_runs[0][1].lower())
    old = change.query.runs(change.old)[0][1]
    return rng.choice(_DROP_DETAIL_VERBS).format(old=old.lower())


def _capitalised(text: str) -> str:
    return text[0].upper() + text[1:]


def _fill(template: str, slots: dict[str, str]) -> str:
    for name, value in slots.items():
        template = template.replace("{" + name + "}", value)
        template = template.replace("{" + _capitalised(name) + "}", _capitalised(value))
    return _capitalised(template)


def instruct_pair(query_caption: str, target_caption: str, seed: int) -> list[str]:
    """Three or four distinct instructions stating the key change, phrased by ``seed``."""
    rng = random.Random(seed)
    changes = key_changes(compare_captions(query_caption, target_caption))
    if not changes:  # captions say the same: ask for another take on the scene
        with_text, do_text = "from another angle", "show it from another angle"
    else:
        with_text = " and ".join(_with_phrase(c) for c in changes)
        do_text = " and ".join(_do_phrase(c, rng) for c in changes)
    count = rng.choice((3, 4))
    n_with = rng.randint(1, count - 1)
    templates = rng.sample(_WITH_TEMPLATES, n_with) + rng.sample(_DO_TEMPLATES, count - n_with)
    rng.shuffle(templates)
    instructions = []
    for template in templates:
        slots = {
            "same": rng.choice(_SAME),
            "this": rng.choice(_THIS),
            "similar": rng.choice(_SIMILAR),
            "with": with_text,
            "do": do_text,
        }
        instructions.append(_fill(template, slots))
    return instructions


class TemplateDescriber:
    """Description backend that needs no model: compares the two captions."""

    def __init__(self) -> None:
        self.identity = {"backend": "template", "prompt_version": PROMPT_VERSION}

    def describe(self, requests: Sequence[DescriptionRequest]) -> list[str]:
        return [
            describe_pair(r.pair.query_caption, r.pair.target_caption, r.word_budget, r.seed)
            for r in requests
        ]


class TemplateInstructor:
    """Instruction backend that needs no model: states the captions' key difference.

    It reads the captions rather than the description: the template description is itself
    derived from them, and captions are what every corpus has.
    """

    def __init__(self) -> None:
        self.identity = {"backend": "template", "prompt_version": PROMPT_VERSION}

    def instruct(self, requests: Sequence[InstructionRequest]) -> list[str]:
        return [
            json.dumps(instruct_pair(r.pair.query_caption, r.pair.target_caption, r.seed))
            for r in requests
        ]
