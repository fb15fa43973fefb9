"""CREM evaluation: MMEB Precision@1, cross-domain retrieval Recall@k, compositional accuracy and QA accuracy
(native and compressed), all through the processor and `get_embedding` / `generate`."""

from .encoding import encode_items
from .generation import evaluate_generation, normalize_answer
from .mmeb import MMEB_DATASETS, evaluate_mmeb, load_mmeb_subset, markdown_table, precision_at_1, summarize
from .retrieval import evaluate_compositional, evaluate_image_text_retrieval, load_caption_rows, recall_at_k

__all__ = [
    "MMEB_DATASETS",
    "encode_items",
    "evaluate_compositional",
    "evaluate_generation",
    "evaluate_image_text_retrieval",
    "evaluate_mmeb",
    "load_caption_rows",
    "load_mmeb_subset",
    "markdown_table",
    "normalize_answer",
    "precision_at_1",
    "recall_at_k",
    "summarize",
]
