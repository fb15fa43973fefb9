"""crem-hf: CREM (Compression-driven Representation Enhanced Model) on Qwen2-VL for Hugging Face Transformers.

Importing the package registers the CREM classes with the Auto classes of `configuration_crem.AUTO_CLASSES`
(`AutoConfig`, `AutoModel`, `AutoModelForImageTextToText`, `AutoProcessor`), so saved CREM folders load without
`trust_remote_code`.
"""

import transformers

from .configuration_crem import AUTO_CLASSES, CREMConfig
from .loading import load_crem
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
    "load_crem",
]


def _register_auto_classes() -> None:
    classes = {cls.__name__: cls for cls in (CREMConfig, CREMForEmbeddingAndGeneration, CREMProcessor)}
    for auto, target in AUTO_CLASSES.items():
        cls = classes[target.rsplit(".", 1)[1]]
        if auto == "AutoConfig":
            transformers.AutoConfig.register(CREMConfig.model_type, cls, exist_ok=True)
        else:
            getattr(transformers, auto).register(CREMConfig, cls, exist_ok=True)


_register_auto_classes()
