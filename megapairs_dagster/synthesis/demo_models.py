"""Sizes of the demo's small encoders, without torch: the code location reads them when it
loads (``resources/profiles.py``), ``encoders.py`` builds the models."""

DEMO_DINO_IMAGE_SIZE = 112
