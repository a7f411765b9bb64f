"""Fidelity to the full model's own answers now lives in :mod:`overfill_lib.scoring`, with every other measure.

These names stay importable from here for the tests and notebooks that name them; new code imports ``scoring``.
"""

from overfill_lib.scoring import (  # noqa: F401
    answer_fidelity,
    bootstrap_paired,
    bootstrap_ratio,
    split_perplexity,
    split_records,
    summarize_answers,
)
