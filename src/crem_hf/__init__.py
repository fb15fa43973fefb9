"""crem-hf: CREM (Compression-driven Representation Enhanced Model) on Qwen2-VL for Hugging Face Transformers.

Importing the package registers the CREM classes with the Auto classes (`AutoConfig`, `AutoModel`,
`AutoModelForImageTextToText`, `AutoProcessor`), so saved CREM folders load without `trust_remote_code`.
"""

from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor

from .configuration_crem import CREMConfig
from .modeling_crem import ChorusLayout, CREMCompressedContext, CREMForEmbeddingAndGeneration, CREMOutput
from .processing_crem import CREMProcessor, chorus_token_strings

__version__ = "0.1.0"

__all__ = [
    "ChorusLayout",
    "CREMCompressedContext",
    "CREMConfig",
    "CREMForEmbeddingAndGeneration",
    "CREMOutput",
    "CREMProcessor",
    "chorus_token_strings",
]

AutoConfig.register(CREMConfig.model_type, CREMConfig, exist_ok=True)
AutoModel.register(CREMConfig, CREMForEmbeddingAndGeneration, exist_ok=True)
AutoModelForImageTextToText.register(CREMConfig, CREMForEmbeddingAndGeneration, exist_ok=True)
AutoProcessor.register(CREMConfig, CREMProcessor, exist_ok=True)
