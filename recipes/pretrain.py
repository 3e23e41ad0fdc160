"""Stage 1 of LLaVA-1.5 (feature alignment) with a De-focus vision tower: only the projector trains.

    accelerate launch recipes/pretrain.py                                      # offline default: easy-VQA captions
    accelerate launch --config_file recipes/accelerate/zero2.yaml recipes/pretrain.py \\
        --config recipes/configs/pretrain_vicuna7b.yaml

The output directory holds the whole model (loadable with `AutoModelForImageTextToText`) and `projector.safetensors`;
stage 2 starts from either (`--model_name_or_path DIR` or `--pretrain_projector DIR`). With no `--config` the offline
default `recipes/configs/pretrain_easy_vqa.yaml` is used.
"""

from pathlib import Path
from typing import Optional

from defocus_mllm.training import run_recipe

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "pretrain_easy_vqa.yaml"


def main(argv: Optional[list[str]] = None) -> dict:
    return run_recipe("pretrain", str(DEFAULT_CONFIG), argv)


if __name__ == "__main__":
    main()
