"""Functions the overfill_chat YAML names with ``!function``; the logic lives in overfill_lib.evaluation."""

from overfill_lib.evaluation import chat_process_results, load_chat_dataset, token_mean

load_chat = load_chat_dataset
process_results = chat_process_results
token_mean = token_mean
