"""Stage 2 of LLaVA-1.5 (instruction tuning) with a De-focus vision tower: projector + language model, full or LoRA.

    accelerate launch recipes/finetune.py                                      # offline default: easy-VQA on CPU
    accelerate launch --config_file recipes/accelerate/zero3.yaml recipes/finetune.py \\
        --config recipes/configs/finetune_vicuna7b.yaml

With no `--config` the offline default `recipes/configs/finetune_easy_vqa.yaml` is used: a tiny De-focus encoder and
a tiny Llama with a tokenizer trained on easy-VQA's text, trained on the CPU, saved, then scored on the 9,673 easy-VQA
test questions. Any field of `defocus_mllm.training.{ModelArguments, DataArguments, LlavaTrainingArguments}` (the
last extends `transformers.TrainingArguments`) can be set in the YAML file and overridden on the command line.
"""

from pathlib import Path
from typing import Optional

from defocus_mllm.training import run_recipe

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "finetune_easy_vqa.yaml"


def main(argv: Optional[list[str]] = None) -> dict:
    return run_recipe("finetune", str(DEFAULT_CONFIG), argv)


if __name__ == "__main__":
    main()
