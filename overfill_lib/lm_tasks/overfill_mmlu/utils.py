"""Functions the overfill_mmlu YAMLs name with ``!function``; the logic lives in overfill_lib.mmlu."""

from overfill_lib.mmlu import load_mmlu_dataset

load_mmlu = load_mmlu_dataset
