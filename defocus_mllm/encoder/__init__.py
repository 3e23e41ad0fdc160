"""The De-focus encoder as a Hugging Face model: its configuration and presets, the bandpass filter, the token
mixers, the model classes, the dense-prediction backbone, its image processor, the converter of the released checkpoints and the over-focus
diagnostics. Nothing here knows about language models."""

from .backbone import DefocusBackbone
from .configuration_defocus import DEFOCUS_PRESETS, DefocusVisionConfig
from .image_processing import DefocusImageProcessor
from .modeling_defocus import DefocusForImageClassification, DefocusPreTrainedModel, DefocusVisionModel

__all__ = [
    "DEFOCUS_PRESETS",
    "DefocusBackbone",
    "DefocusForImageClassification",
    "DefocusImageProcessor",
    "DefocusPreTrainedModel",
    "DefocusVisionConfig",
    "DefocusVisionModel",
]
