"""Training settings the code location reads when it loads, in a module without torch: the
modules that use them import them from here (``tests/test_import_cost.py``)."""

DEFAULT_HARD_NEGATIVES = 4
# The paper's Table 4 ablation, by name: whether the query image is a hard negative, and how
# many hard negatives an item holds counting it (the dataset loads hard_negatives - 1 mined
# ones; "none" loads none and the trainer leaves the query image out).
HARD_NEGATIVE_MODES: dict[str, tuple[bool, int]] = {
    "query_and_mined": (True, DEFAULT_HARD_NEGATIVES),
    "query": (True, 1),
    "none": (False, 1),
}

# The demo's MMRet-MLLM (mllm_configs.py builds it).
IMAGE_SIDE = 32  # what MMRet-MLLM resizes every image to (the released model: 512)
DEMO_BASE = "demo-llava-next"  # the MLLM training resource's base_model that means this model
