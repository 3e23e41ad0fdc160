"""defocus-mllm: De-focus Attention Networks (1D causal vision encoders) for the Hugging Face multimodal stack.

Layers, each importing only the ones before it: `images` and `files` (the one image loader of every path; errors
that name a truncated weights or data file), `ops` (scan kernels) -> `encoder` (the De-focus vision model) ->
`llava` (the multimodal model) -> `data` -> `training` -> `evaluation`. docs/architecture.md has the map.

Importing the package registers `DefocusVisionConfig` (`model_type="defocus_vision"`) with `AutoConfig`, and the
encoder with `AutoModel`, `AutoModelForImageClassification` and `AutoBackbone`, so that stock classes such as
`LlavaForConditionalGeneration` and `UperNetForSemanticSegmentation` can build it from a config.
"""

from transformers import AutoBackbone, AutoConfig, AutoImageProcessor, AutoModel, AutoModelForImageClassification

from . import encoder
from .encoder import (  # the names of encoder.__all__, re-exported (see __all__ below)
    DEFOCUS_PRESETS,  # noqa: F401
    DefocusBackbone,
    DefocusForImageClassification,
    DefocusImageProcessor,
    DefocusPreTrainedModel,  # noqa: F401
    DefocusVisionConfig,
    DefocusVisionModel,
)
from .llava import (
    build_llava,
    chat,
    count_trainable_parameters,
    freeze_language_model,
    freeze_vision_tower,
    set_trainable,
)

__version__ = "0.1.0"


def _register() -> None:
    # `exist_ok` keeps re-imports (and a future upstream registration of the same name) harmless
    AutoConfig.register(DefocusVisionConfig.model_type, DefocusVisionConfig, exist_ok=True)
    AutoModel.register(DefocusVisionConfig, DefocusVisionModel, exist_ok=True)
    AutoModelForImageClassification.register(DefocusVisionConfig, DefocusForImageClassification, exist_ok=True)
    AutoBackbone.register(DefocusVisionConfig, DefocusBackbone, exist_ok=True)
    # No torchvision: the PIL backend is the only one.
    AutoImageProcessor.register(DefocusVisionConfig, image_processor_classes={"pil": DefocusImageProcessor},
                                exist_ok=True)


_register()

__all__ = [
    *encoder.__all__,  # the encoder's public names, listed once in encoder/__init__.py
    "build_llava",
    "chat",
    "count_trainable_parameters",
    "freeze_language_model",
    "freeze_vision_tower",
    "set_trainable",
]
