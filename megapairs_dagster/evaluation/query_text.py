"""Query texts exactly as the MegaPairs evaluation files spell them.

Checked line by line against VectorSpaceLab/MegaPairs ``eval/data/circo_query.jsonl`` and
``eval/data/fashioniq_{dress,shirt,toptee}_query_val.jsonl``: no caption is stripped,
re-capitalised or re-punctuated; CIRCO gets one final period appended. CIRR's query is its
relative caption alone, verbatim; MegaPairs publishes no CIRR query file to check it against.
"""

from __future__ import annotations

from megapairs_dagster.evaluation.readers import CirQuery


def circo_query_text(query: CirQuery) -> str:
    """``Find a picture that also {shared_concept}, but {relative_caption}.``"""
    shared_concept, relative_caption = query.text_parts
    return f"Find a picture that also {shared_concept}, but {relative_caption}."


def cirr_query_text(query: CirQuery) -> str:
    """The relative caption, verbatim: no template."""
    (relative_caption,) = query.text_parts
    return relative_caption


def fashioniq_query_text(query: CirQuery) -> str:
    """The two relative captions joined with ``", and "``, verbatim."""
    first, second = query.text_parts
    return f"{first}, and {second}"
