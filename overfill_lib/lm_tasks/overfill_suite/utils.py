"""Functions the overfill_suite YAMLs name with ``!function``: the data from overfill_lib.evaluation, the scoring
rule from overfill_lib.scoring."""

from overfill_lib.evaluation import family_docs, load_suite_dataset
from overfill_lib.scoring import suite_process_results

load_suite = load_suite_dataset
process_results = suite_process_results

reverse_docs = family_docs("reverse")
sort_docs = family_docs("sort")
lookup_docs = family_docs("lookup")
add_docs = family_docs("add")
count_docs = family_docs("count")
mul_docs = family_docs("mul")
