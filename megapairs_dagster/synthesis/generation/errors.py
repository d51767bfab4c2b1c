"""Errors that end a generation step instead of rejecting one batch."""

from __future__ import annotations


class BackendUnavailable(RuntimeError):
    """The generator itself is gone (an endpoint unreachable or failing after its retries).

    The driver (``run.py``) rejects a batch whose backend call raises anything else and goes
    on; this error is raised through instead, so the step fails, the chunks saved so far are
    kept, and a rerun resumes after them rather than recording every later pair as rejected.
    """
