"""CREM evaluation: MMEB Precision@1, cross-domain retrieval Recall@k, compositional accuracy and QA accuracy
(native and compressed), all through `crem_hf.encode` (the processor and `get_embedding`) and `generate`.

The public API is listed in `__all__`; the scorers the `evaluate_*` functions call (`mmeb.precision_at_1`,
`retrieval.recall_at_k`, `generation.normalize_answer`) are internals.
"""

from .generation import evaluate_generation
from .mmeb import MMEB_DATASETS, evaluate_mmeb, load_mmeb_subset, markdown_table, summarize
from .retrieval import evaluate_compositional, evaluate_image_text_retrieval, load_caption_rows

__all__ = [
    "MMEB_DATASETS",
    "evaluate_compositional",
    "evaluate_generation",
    "evaluate_image_text_retrieval",
    "evaluate_mmeb",
    "load_caption_rows",
    "load_mmeb_subset",
    "markdown_table",
    "summarize",
]
