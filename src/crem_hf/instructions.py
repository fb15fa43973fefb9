"""MMEB's embedding instructions (the wordings CREM is trained on), one owner for every module that uses them: the
evaluators, the mteb encoder, the digit data, the demo and the tiny test tokenizer.

The instruction the processor gives an image that comes with none, `DEFAULT_IMAGE_INSTRUCTION` ("Represent the given
image."), is the processor's (`processing_crem`, in the Hub remote-code set).
"""

from __future__ import annotations

__all__ = ["CLASSIFY_INSTRUCTION", "I2T_INSTRUCTION", "T2I_INSTRUCTION", "VQA_INSTRUCTION"]

#: Text-to-image retrieval of everyday images (MSCOCO_t2i): the caption follows.
T2I_INSTRUCTION = "Find me an everyday image that matches the given caption:"
#: Image-to-text retrieval of everyday images (MSCOCO_i2t).
I2T_INSTRUCTION = "Find an image caption describing the given everyday image."
#: Image classification (ImageNet-1K, VOC2007, SUN397): the candidates are class names.
CLASSIFY_INSTRUCTION = "Represent the given image for classification."
#: Visual question answering as retrieval (OK-VQA, A-OKVQA): the question follows.
VQA_INSTRUCTION = "Represent the given image with the following question:"
