"""Weight-space merges that put safety back into a fine-tuned model (EnchTable stage 2, RESTA, TIES,
DARE, Breadcrumbs, Safe LoRA, TSV-Merge, Model Stock, linear/SLERP pre/post-tuning merges, SOMF masks).

Streaming: tensors are read one at a time from safetensors shards and written straight into the
output shards; the output appears atomically with a ``merge_card.json`` describing how it was made.
See METHODS.md sections 1-3 for the formulas.
"""

from steer.merge.checkpoint import MergeError
from steer.merge.methods import ALIASES, METHODS
from steer.merge.run import MergeRequest, run_merge

__all__ = ["ALIASES", "METHODS", "MergeError", "MergeRequest", "run_merge"]
