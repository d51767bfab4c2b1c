"""What differs between a pair's two captions, clause by clause.

Each caption is split into clauses, clauses are matched one to one by their content words,
and what is left unmatched (or matched with different words) is the pair's difference,
ranked by how much it counts. The ``template`` backends (``template.py``) render their texts
from this comparison; the driver (``run.py``) uses it whatever the backend, to reject pairs
whose captions differ in more clauses than an instruction states (``max_caption_changes``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

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
        return " ".join(fix_articles([w for w, _ in kept]))

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


def fix_articles(words: list[str]) -> list[str]:
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
