"""defocus-mllm: De-focus Attention Networks (1D causal vision encoders) for the Hugging Face multimodal stack.

Importing the package registers `DefocusVisionConfig` (`model_type="defocus_vision"`) with `AutoConfig`, and the
encoder with `AutoModel` and `AutoModelForImageClassification`, so that stock classes such as
`LlavaForConditionalGeneration` can build it from a config.
"""

from transformers import AutoConfig, AutoModel, AutoModelForImageClassification

from .configuration_defocus import DEFOCUS_PRESETS, DefocusVisionConfig
from .modeling_defocus import DefocusForImageClassification, DefocusPreTrainedModel, DefocusVisionModel

__version__ = "0.1.0"


def _register() -> None:
    # `exist_ok` keeps re-imports (and a future upstream registration of the same name) harmless
    AutoConfig.register(DefocusVisionConfig.model_type, DefocusVisionConfig, exist_ok=True)
    AutoModel.register(DefocusVisionConfig, DefocusVisionModel, exist_ok=True)
    AutoModelForImageClassification.register(DefocusVisionConfig, DefocusForImageClassification, exist_ok=True)


_register()

__all__ = [
    "DEFOCUS_PRESETS",
    "DefocusForImageClassification",
    "DefocusPreTrainedModel",
    "DefocusVisionConfig",
    "DefocusVisionModel",
]
