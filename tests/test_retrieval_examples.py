"""The retrieval-examples picture (query, instruction, top 5, ground truths framed), the
evaluators' choice of examples, and the notebook that draws one for any image."""

import json
from pathlib import Path

import pytest
from PIL import Image
from test_evaluation_evaluate import (
    CIRCO_NAMES,
    CIRCO_ORDERS,
    CIRCO_QUERIES,
    HandChosenEncoder,
    circo_images,
)

from megapairs_dagster.evaluation.evaluate import collecting_examples, evaluate_circo_format
from megapairs_dagster.evaluation.examples import (
    FRAME,
    GROUND_TRUTH,
    TILE,
    TOP,
    Candidate,
    RetrievalExample,
    draw_examples,
    picture_size,
    tile_origin,
)

NOTEBOOK = Path(__file__).resolve().parents[1] / "docs" / "retrieval_demo.ipynb"


def test_picture_has_a_row_per_query_and_frames_the_ground_truths():
    blue, red = Image.new("RGB", (40, 20), (0, 0, 255)), Image.new("RGB", (9, 9), (255, 0, 0))
    examples = [
        RetrievalExample(blue, "make it red", [Candidate(blue, "a", False),
                                               Candidate(red, "b", True)]
                         + [Candidate(blue, str(n), False) for n in range(4)]),  # 6: 5 shown
        RetrievalExample(None, "a text-only query", [Candidate(None, "tench", True)]),
    ]
    picture = draw_examples(examples)
    assert picture.size == picture_size(2) == ((1 + TOP) * (TILE + 6) + 6, 2 * (TILE + 54) + 6)

    def corner(row, column):  # inside a ground truth's frame, or the background around a tile
        left, top = tile_origin(row, column)
        return picture.getpixel((left + FRAME // 2, top + FRAME // 2))

    def centre(row, column):
        left, top = tile_origin(row, column)
        return picture.getpixel((left + TILE // 2, top + TILE // 2))

    framed = {(row, column) for row in range(2) for column in range(1 + TOP)
              if corner(row, column) == GROUND_TRUTH}
    assert framed == {(0, 2), (1, 1)}
    assert centre(0, 0) == (0, 0, 255) and centre(0, 2) == (255, 0, 0)  # scaled up to the tile
    assert centre(1, 0) == centre(1, 1) == (235, 235, 235)  # no image: a grey tile
    assert centre(1, 2) == (255, 255, 255)  # fewer than 5 candidates: nothing drawn
    with pytest.raises(ValueError, match="no examples"):
        draw_examples([])


def test_evaluators_keep_the_first_queries_top_5_with_ground_truths():
    model, load = HandChosenEncoder(CIRCO_NAMES, CIRCO_ORDERS), circo_images().__getitem__
    with collecting_examples() as examples:
        evaluate_circo_format(model, CIRCO_QUERIES, CIRCO_NAMES, load)
        evaluate_circo_format(model, CIRCO_QUERIES, CIRCO_NAMES, load)  # full at 3
    assert [(model.name_of(e.image), e.text) for e in examples] == [
        ("1", "Find a picture that also two cats, but is darker."),
        ("4", "Find a picture that also a dog, but runs."),
        ("1", "Find a picture that also two cats, but is darker."),
    ]
    assert [(c.label, c.correct) for c in examples[0].retrieved] == [
        ("1", False), ("2", True), ("6", False), ("3", True), ("4", False)]
    assert [(c.label, c.correct) for c in examples[1].retrieved] == [
        ("5", True), ("1", False), ("2", False), ("3", False), ("4", False)]
    assert [model.name_of(c.image) for c in examples[1].retrieved] == ["5", "1", "2", "3", "4"]


def test_the_notebook_is_valid_and_its_code_compiles():
    notebook = json.loads(NOTEBOOK.read_text())
    assert notebook["nbformat"] == 4 and notebook["metadata"]["kernelspec"]["language"] == "python"
    code = [cell for cell in notebook["cells"] if cell["cell_type"] == "code"]
    assert len(code) == 3
    for cell in code:
        assert cell["outputs"] == [] and cell["execution_count"] is None  # nothing committed
        compile("".join(cell["source"]), f"{NOTEBOOK.name}:{cell['id']}", "exec")
    source = "".join(line for cell in code for line in cell["source"])
    assert "MMRetCLIP.from_pretrained(CHECKPOINT)" in source and "draw_examples(" in source
