"""MegaPairs on Dagster: heterogeneous pair mining, instruction synthesis, MMRet training."""

__version__ = "0.1.0"
