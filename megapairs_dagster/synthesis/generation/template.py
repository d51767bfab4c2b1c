"""The offline ``template`` backends: descriptions and instructions from the two captions.

No model runs: the captions are split into clauses, clauses are matched by their content
words, and what is left unmatched (or matched with different words) is the pair's
difference. Only the captions are used, so any corpus works, not just the demo one.
Instructions state the one or two strongest differences only, because instructions listing
every small difference do not look like the single-edit queries of CIR benchmarks.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

from .base import DescriptionRequest, InstructionRequest
from .prompts import PROMPT_VERSION

_CLAUSE_BREAK = re.compile(
    r"[.;:!?]+(?:\s|$)|,|\s(?:and|but|while|whereas)\s"
    r"|\swith\s(?=(?:a|an|the|one|two|three|some|several|many)\s)"
    r"|\s(?=(?:on|against|over)\s(?:a|an)\s|in front of\s)",
    re.IGNORECASE,
)
_WORD = re.compile(r"[A-Za-z0-9]+(?:[-'][A-Za-z0-9]+)*")
_LEAD_IN_WORDS = frozenset(
    [
        "image",
        "picture",
        "photo",
        "photograph",
        "drawing",
        "illustration",
        "painting",
        "render",
        "rendering",
        "view",
        "showing",
        "shows",
        "depicts",
        "depicting",
        "features",
        "featuring",
        "of",
    ]
)
_FUNCTION_WORDS = _LEAD_IN_WORDS | frozenset(
    [
        "a",
        "an",
        "the",
        "in",
        "on",
        "at",
        "to",
        "for",
        "from",
        "by",
        "with",
        "into",
        "onto",
        "over",
        "against",
        "front",
        "near",
        "and",
        "or",
        "but",
        "while",
        "whereas",
        "is",
        "are",
        "was",
        "were",
        "be",
        "been",
        "being",
        "has",
        "have",
        "had",
        "this",
        "that",
        "these",
        "those",
        "it",
        "its",
        "there",
        "their",
        "them",
        "they",
        "he",
        "she",
        "his",
        "her",
        "him",
        "we",
        "you",
        "i",
        "some",
        "very",
        "also",
        "which",
        "where",
        "who",
        "images",
        "pictures",
        "photos",
        "show",
        "shown",
        "visible",
        "seen",
        "appears",
        "can",
    ]
)
_ARTICLES = frozenset({"a", "an", "the"})
_NUMBER_WORDS = frozenset(
    ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
)
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
# General-English variants folded together so rewordings do not look like changes.
_SYNONYMS = {
    "big": "large",
    "huge": "large",
    "little": "small",
    "tiny": "small",
    "medium-sized": "medium",
    "mid-sized": "medium",
    "mid": "medium",
    "backdrop": "background",
    "middle": "center",
    "centre": "center",
    "chequered": "checkered",
    "polka-dot": "dotted",
    "spotted": "dotted",
    "dot": "dotted",
    "stripe": "striped",
    "solid": "plain",
    "gray": "grey",
    "colour": "color",
}
MIN_MATCH = 0.2  # Jaccard similarity of content words below which clauses are unrelated
ALIGNED_GAP = 0.25  # relative positions closer than this make two word runs a swap
SECOND_CHANGE_STRENGTH = 0.75  # a further edit is stated only when this clearly different
MAX_PHRASE_WORDS = 12  # longest clause quoted inside an instruction


def _canonical(word: str) -> str:
    word = _SYNONYMS.get(word.lower(), word.lower())
    if word.endswith("ies") and len(word) > 4:
        word = word[:-3] + "y"
    elif word.endswith(("ches", "shes", "xes")):
        word = word[:-2]
    elif word.endswith("s") and len(word) > 3 and not word.endswith(("ss", "us", "is")):
        word = word[:-1]
    return _SYNONYMS.get(word, word)


def _without_lead_in(words: list[str]) -> list[str]:
    """Drop an opening like "An image of" or "A picture showing"."""
    end = 0
    for i, word in enumerate(words):
        lowered = word.lower()
        if lowered in _LEAD_IN_WORDS:
            end = i + 1
        elif lowered not in _ARTICLES:
            break
    return words[end:]


@dataclass(frozen=True)
class Clause:
    """One clause of a caption: its words as written and their comparable forms."""

    words: tuple[str, ...]
    keys: tuple[str | None, ...]  # canonical content word per word, None for function words

    @classmethod
    def parse(cls, text: str) -> Clause:
        words = tuple(_without_lead_in(_WORD.findall(text)))
        keys = tuple(None if w.lower() in _FUNCTION_WORDS else _canonical(w) for w in words)
        return cls(words, keys)

    @property
    def content(self) -> frozenset[str]:
        return frozenset(k for k in self.keys if k is not None)

    def text(self, drop: frozenset[str] = frozenset()) -> str:
        """The clause as prose, without the words whose canonical form is in ``drop``."""
        kept = [(w, k) for w, k in zip(self.words, self.keys) if k is None or k not in drop]
        while kept and kept[-1][1] is None:  # no dangling "in the" once its object is gone
            kept.pop()
        return " ".join(_fix_articles([w for w, _ in kept]))

    def runs(self, keys: frozenset[str]) -> list[tuple[float, str]]:
        """Consecutive words whose forms are in ``keys``: (relative position, text)."""
        runs: list[tuple[float, str]] = []
        current: list[int] = []
        for i, key in enumerate([*self.keys, None]):
            if key is not None and key in keys:
                current.append(i)
            elif current:
                middle = (current[0] + current[-1] + 1) / 2 / len(self.words)
                runs.append((middle, " ".join(self.words[j] for j in current)))
                current = []
        return runs


def _fix_articles(words: list[str]) -> list[str]:
    """Re-choose a/an after words were dropped, and drop an article left at the end."""
    fixed = list(words)
    for i, word in enumerate(fixed[:-1]):
        if word.lower() in ("a", "an"):
            article = "an" if fixed[i + 1][0].lower() in "aeiou" else "a"
            fixed[i] = article.capitalize() if word[0].isupper() else article
    while fixed and fixed[-1].lower() in _ARTICLES:
        fixed.pop()
    return fixed


def split_clauses(caption: str) -> list[Clause]:
    """Clauses of a caption (split at sentence ends, commas, "and", "with a", "on a", …)."""
    clauses = (Clause.parse(part) for part in _CLAUSE_BREAK.split(caption))
    return [clause for clause in clauses if clause.content]


def _similarity(a: frozenset[str], b: frozenset[str]) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


@dataclass(frozen=True)
class Change:
    """One difference: a changed clause, a clause only in the target, or one only in the query."""

    kind: str  # "change" | "add" | "remove"
    query: Clause | None
    target: Clause | None
    strength: float
    swap: tuple[str, str] | None = None  # (old words, new words) in the same slot of a clause

    @property
    def new(self) -> frozenset[str]:
        return self.target.content - (self.query.content if self.query else frozenset())

    @property
    def old(self) -> frozenset[str]:
        return self.query.content - (self.target.content if self.target else frozenset())


@dataclass(frozen=True)
class CaptionComparison:
    shared: tuple[str, ...]  # shared content as phrases, in target order
    changes: tuple[Change, ...]  # strongest first


def _aligned_swap(query: Clause, target: Clause) -> tuple[str, str] | None:
    """The old and new word runs at the same relative place in a matched clause pair.

    "pink" → "orange" before the same noun is a swap; "bottom right" at the end of one
    caption and "large" at the start of the other are two omitted details, not a swap.
    """
    old_runs = query.runs(query.content - target.content)
    new_runs = target.runs(target.content - query.content)
    pairs = [(abs(o[0] - n[0]), o[1], n[1]) for o in old_runs for n in new_runs]
    if not pairs:
        return None
    gap, old, new = min(pairs)
    return (old, new) if gap <= ALIGNED_GAP else None


def _lone_clause_strength(clause: Clause) -> float:
    """How much a clause only one caption has counts: short count summaries barely count."""
    size = len(clause.content)
    if size <= 2 and clause.words[0].lower() in _NUMBER_WORDS:
        return 0.5
    return 0.6 + 0.1 * min(size, 4)


def _matched_change(query: Clause, target: Clause, similarity: float) -> Change:
    swap = _aligned_swap(query, target)
    strength = 1.0 + 0.2 * (1.0 - similarity) if swap else 0.5 * (1.0 - similarity)
    return Change("change", query, target, strength, swap)


def compare_captions(query_caption: str, target_caption: str) -> CaptionComparison:
    """Match clauses one to one (most similar first) and rank what differs.

    A word swapped in place ("sand" → "night") counts more than a clause only one caption
    has, which counts more than a detail only one caption mentions (captions often leave
    details out).
    """
    queries, targets = split_clauses(query_caption), split_clauses(target_caption)
    scored = sorted(
        (
            (_similarity(q.content, t.content), qi, ti)
            for qi, q in enumerate(queries)
            for ti, t in enumerate(targets)
        ),
        key=lambda item: (-item[0], item[1], item[2]),
    )
    matches: dict[int, tuple[int, float]] = {}
    used_queries: set[int] = set()
    for similarity, qi, ti in scored:
        if similarity < MIN_MATCH:
            break
        if qi not in used_queries and ti not in matches:
            matches[ti] = (qi, similarity)
            used_queries.add(qi)
    changes, shared = [], []
    for ti, target in enumerate(targets):
        if ti not in matches:
            changes.append(Change("add", None, target, _lone_clause_strength(target)))
            continue
        qi, similarity = matches[ti]
        query = queries[qi]
        new = target.content - query.content
        if new or query.content - target.content:
            changes.append(_matched_change(query, target, similarity))
        if target.content - new:
            shared.append(target.text(drop=new))
    for qi, query in enumerate(queries):
        if qi not in used_queries:
            changes.append(Change("remove", query, None, _lone_clause_strength(query) - 0.05))
    changes.sort(key=lambda change: -change.strength)
    return CaptionComparison(tuple(shared), tuple(changes))


def caption_changes(query_caption: str, target_caption: str) -> int:
    """How many clause-level differences the two captions show (strong or weak)."""
    return len(compare_captions(query_caption, target_caption).changes)


def key_changes(comparison: CaptionComparison, limit: int = 2) -> tuple[Change, ...]:
    """The strongest change, plus up to ``limit - 1`` more only if they are also strong."""
    first, rest = comparison.changes[:1], comparison.changes[1:limit]
    return first + tuple(c for c in rest if c.strength >= SECOND_CHANGE_STRENGTH)


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
    return _prose(" ".join(_fix_articles(list(clause.words[start : start + max_words]))))


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
