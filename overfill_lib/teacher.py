"""Deprecated: the offline default's full model now lives in :mod:`overfill_lib.full_model`.

"teacher" named two things: the model that prefills (now "full model" everywhere) and a distillation teacher (the
only meaning "teacher" keeps). This module re-exports ``overfill_lib.full_model`` under its old names so code written
against it still runs; it warns once on import. Use ``full_model.FullModelConfig`` / ``full_model.train_full_model``.
"""

import warnings

from overfill_lib import scoring
from overfill_lib.full_model import *  # the whole public surface, as before
from overfill_lib.full_model import (  # noqa: F401 (names star-import leaves out or that callers named here)
    CHARS,
    CHAT_TEMPLATE,
    SPECIAL_TOKENS,
    FullModelConfig,
    build_model,
    build_tokenizer,
    cache_shapes,
    compare_checkpoints,
    describe,
    encode_examples,
    train_full_model,
)

warnings.warn("overfill_lib.teacher is now overfill_lib.full_model (TeacherConfig is FullModelConfig, train_teacher "
              "is train_full_model); import it from there", DeprecationWarning, stacklevel=2)

TeacherConfig = FullModelConfig
train_teacher = train_full_model
# Where these lived before scoring.py: code that names them here still works.
greedy_answers, evaluate_exact_match = scoring.greedy_answers, scoring.exact_match
