"""Functions the overfill_chat YAML names with ``!function``: the data from overfill_lib.evaluation, the scoring
rules from overfill_lib.scoring."""

from overfill_lib.evaluation import load_chat_dataset
from overfill_lib.scoring import chat_process_results, token_mean  # noqa: F401  (the YAML names utils.token_mean)

load_chat = load_chat_dataset
process_results = chat_process_results
