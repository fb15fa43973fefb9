"""crem-hf: CREM (Compression-driven Representation Enhanced Model) on Qwen2-VL, Qwen2.5-VL and Qwen3-VL for Hugging
Face Transformers.

Importing the package registers the CREM classes of every backbone with the Auto classes of
`configuration_crem.BACKBONE_AUTO_CLASSES` (`AutoConfig`, `AutoModel`, `AutoModelForImageTextToText`,
`AutoProcessor`), so saved CREM folders load without `trust_remote_code`.

    model, processor = crem_hf.load_crem("path/to/crem")
    scores = crem_hf.similarity(
        crem_hf.encode(model, processor, texts=["a cat"]), crem_hf.encode(model, processor, images=["cat.jpg"])
    )
"""

import transformers

from .configuration_crem import AUTO_CLASSES, BACKBONE_AUTO_CLASSES, CREMConfig, CREMQwen2_5_VLConfig, CREMQwen3VLConfig
from .encoding import encode, similarity
from .loading import load_crem
from .modeling_crem import (
    ChorusLayout,
    CREMCompressedContext,
    CREMForEmbeddingAndGeneration,
    CREMMixin,
    CREMOutput,
    CREMQwen2_5_VLForEmbeddingAndGeneration,
    CREMQwen3VLForEmbeddingAndGeneration,
)
from .processing_crem import CREMProcessor, chorus_token_strings

__version__ = "0.1.0"

__all__ = [
    "AUTO_CLASSES",
    "ChorusLayout",
    "CREMCompressedContext",
    "CREMConfig",
    "CREMForEmbeddingAndGeneration",
    "CREMMixin",
    "CREMOutput",
    "CREMProcessor",
    "CREMQwen2_5_VLConfig",
    "CREMQwen2_5_VLForEmbeddingAndGeneration",
    "CREMQwen3VLConfig",
    "CREMQwen3VLForEmbeddingAndGeneration",
    "chorus_token_strings",
    "encode",
    "load_crem",
    "similarity",
]


def _register_auto_classes() -> None:
    configs = (CREMConfig, CREMQwen2_5_VLConfig, CREMQwen3VLConfig)
    models = (
        CREMForEmbeddingAndGeneration,
        CREMQwen2_5_VLForEmbeddingAndGeneration,
        CREMQwen3VLForEmbeddingAndGeneration,
    )
    classes = {cls.__name__: cls for cls in (*configs, *models, CREMProcessor)}
    for model_type, autos in BACKBONE_AUTO_CLASSES.items():
        config = next(config for config in configs if config.model_type == model_type)
        for auto, target in autos.items():
            cls = classes[target.rsplit(".", 1)[1]]
            if auto == "AutoConfig":
                transformers.AutoConfig.register(model_type, cls, exist_ok=True)
            else:
                getattr(transformers, auto).register(config, cls, exist_ok=True)


_register_auto_classes()
