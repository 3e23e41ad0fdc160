"""The steps of a LLaVA stage between parsing and training: its data, its model, what trains, and how the result is
saved. `recipes/pretrain.py` and `recipes/finetune.py` call them in order."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Optional, Sequence

from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForImageTextToText, AutoProcessor, AutoTokenizer, Trainer, TrainerCallback

from ..data.conversations import Conversation, load_hf_dataset, load_llava_json
from ..data.easy_vqa import load_easy_vqa
from ..data.supervised import SupervisedDataset
from ..encoder.configuration_defocus import DEFOCUS_PRESETS, DefocusVisionConfig
from ..files import naming_corrupt_files
from ..llava import LLAVA_V1_SYSTEM, apply_lora, build_llava, model_parts, position_limit, set_trainable
from .arguments import PROJECTOR_FILE, DataArguments, LlavaTrainingArguments, ModelArguments, parse_overrides
from .llava_trainer import LlavaTrainer
from .tiny_lm import tiny_llama_config, train_tokenizer
from .warmup import warm_up_vision_tower

logger = logging.getLogger(__name__)


def load_conversations(data_args: DataArguments, seed: int = 0) -> list[Conversation]:
    """The training conversations named by `data_args.data_path`."""
    path = data_args.data_path
    if data_args.easy_vqa_curriculum and path != "easy-vqa":
        raise ValueError(f"easy_vqa_curriculum applies to data_path=easy-vqa, not {path!r}")
    if path == "easy-vqa":
        convs = load_easy_vqa(data_args.dataset_split, turns_per_sample=data_args.easy_vqa_turns, seed=seed,
                              captions=data_args.easy_vqa_captions,
                              curriculum=data_args.easy_vqa_curriculum, limit=data_args.easy_vqa_max_images,
                              balance_yes_no=data_args.easy_vqa_balance_yes_no)
    elif Path(path).is_dir():
        convs = load_hf_dataset(path, split=data_args.dataset_split, skip_bad_samples=data_args.skip_bad_samples)
    elif Path(path).suffix in (".json", ".jsonl"):
        convs = load_llava_json(path, data_args.image_folder, skip_bad_samples=data_args.skip_bad_samples,
                                allow_images_outside_folder=data_args.allow_images_outside_folder)
    else:
        raise FileNotFoundError(f"data_path={path!r}: not 'easy-vqa', a .json/.jsonl file, or a dataset directory")
    if data_args.max_train_samples is not None:
        convs = convs[: data_args.max_train_samples]
    return convs


def corpus_for_tokenizer(conversations: Sequence[Conversation]) -> list[str]:
    """The text a from-scratch tokenizer is trained on: every message and the chat template's own words."""
    texts = [m["content"] for c in conversations for m in c.messages]
    return texts + [LLAVA_V1_SYSTEM, "USER: ASSISTANT:"]


def checkpoint_tokenizer(checkpoint: str | os.PathLike) -> Optional[Any]:
    """The tokenizer a Trainer checkpoint was saved with (the Trainer saves its `processing_class`), or None."""
    path = Path(checkpoint)
    if not any((path / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        return None
    return AutoTokenizer.from_pretrained(path)


def check_resume_tokenizer(checkpoint: str | os.PathLike, tokenizer: Any) -> None:
    """A resumed run must tokenise as the checkpoint's embeddings were trained: the same token for the same id.
    Raises naming the checkpoint and how many ids differ (a checkpoint without a tokenizer is not checked)."""
    saved = checkpoint_tokenizer(checkpoint)
    if saved is None:
        return
    old, new = saved.get_vocab(), tokenizer.get_vocab()
    if old != new:
        by_id_old, by_id_new = {i: t for t, i in old.items()}, {i: t for t, i in new.items()}
        changed = sorted(i for i in set(by_id_old) | set(by_id_new) if by_id_old.get(i) != by_id_new.get(i))
        raise ValueError(f"--resume_from_checkpoint {checkpoint}: its tokenizer differs from this run's ({len(changed)} "
                         f"token id(s) mean another token, e.g. id {changed[0]}: {by_id_old.get(changed[0])!r} there, "
                         f"{by_id_new.get(changed[0])!r} now); resume with the language model it was trained with")


def build_llava_model(model_args: ModelArguments, data_args: DataArguments, conversations: Sequence[Conversation],
                      resume: Optional[str] = None):
    """`(model, processor)` from a saved directory, or assembled by `build_llava` (the offline default when no
    language model is named: a tiny Llama and a tokenizer trained on `conversations`).

    With `resume` (the checkpoint the Trainer will load), the offline default takes the checkpoint's tokenizer instead
    of training one on this run's data (other data would give other token ids under the same embeddings), and any
    other tokenizer must equal the checkpoint's (:func:`check_resume_tokenizer`)."""
    if model_args.model_name_or_path:
        with naming_corrupt_files(model_args.model_name_or_path, "weights file"):
            model = AutoModelForImageTextToText.from_pretrained(model_args.model_name_or_path)
        processor = AutoProcessor.from_pretrained(model_args.model_name_or_path)
    else:
        vision: Any = model_args.vision_tower
        overrides = parse_overrides(model_args.vision_overrides)
        if overrides:
            if not isinstance(vision, str) or Path(vision).is_dir():
                raise ValueError("vision_overrides apply to a preset vision_tower only")
            vision = DefocusVisionConfig.from_preset(vision, **overrides)
        if model_args.language_model:
            model, processor = build_llava(vision, model_args.language_model,
                                           vision_feature_layer=model_args.vision_feature_layer,
                                           image_size=model_args.image_size)
        else:
            tokenizer = checkpoint_tokenizer(resume) if resume else None
            if resume and tokenizer is None:
                raise ValueError(f"--resume_from_checkpoint {resume}: the checkpoint holds no tokenizer, and the offline "
                                 f"tiny language model's tokenizer is trained on the data; a resumed run must use the "
                                 f"one its embeddings were trained with")
            if tokenizer is None:
                corpus = corpus_for_tokenizer(conversations)
                if data_args.data_path == "easy-vqa":
                    # Both stages must share one vocabulary: stage 2 continues from the stage-1 directory.
                    corpus += corpus_for_tokenizer(load_easy_vqa(data_args.dataset_split,
                                                                 captions=not data_args.easy_vqa_captions))
                tokenizer = train_tokenizer(corpus, vocab_size=model_args.tiny_vocab_size)
            else:
                logger.info("resuming from %s: its tokenizer is used, not one trained on this run's data", resume)
            lm_config = tiny_llama_config(len(tokenizer), hidden_size=model_args.tiny_lm_hidden_size,
                                          num_hidden_layers=model_args.tiny_lm_layers,
                                          max_position_embeddings=data_args.model_max_length)
            model, processor = build_llava(vision, lm_config, tokenizer=tokenizer,
                                           vision_feature_layer=model_args.vision_feature_layer,
                                           image_size=model_args.image_size)
    if resume:
        check_resume_tokenizer(resume, processor.tokenizer)
    processor.image_processor.do_pad = data_args.image_aspect_ratio == "pad"
    if model_args.pretrain_projector:
        load_projector(model, model_args.pretrain_projector)
    return model, processor


def save_projector(model: nn.Module, output_dir: str | os.PathLike) -> Path:
    """Write the projector weights alone (LLaVA's `mm_projector.bin`, as safetensors)."""
    projector = model_parts(model)["projector"][0]
    path = Path(output_dir) / PROJECTOR_FILE
    save_file({k: v.detach().cpu().contiguous() for k, v in projector.state_dict().items()}, str(path))
    return path


def load_projector(model: nn.Module, source: str | os.PathLike) -> None:
    """Load projector weights from a stage-1 output directory or a `projector.safetensors` file (never a pickle)."""
    path = Path(source)
    path = path / PROJECTOR_FILE if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"Projector weights not found: {path}")
    projector = model_parts(model)["projector"][0]
    with naming_corrupt_files(path, "projector weights file"):
        state = load_file(str(path))
    missing, unexpected = projector.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path} does not fit this model's projector: missing {missing}, unexpected {unexpected}")


def configure_trainable(model: nn.Module, args: LlavaTrainingArguments) -> nn.Module:
    """Stage 1 (`stage='pretrain'`): the projector, and the encoder when asked (`train_vision_tower`). Stage 2
    (`'finetune'`): projector + LM (full, or LoRA adapters), and the encoder when asked."""
    if args.stage not in ("pretrain", "finetune"):
        raise ValueError(f"stage={args.stage!r} must be 'pretrain' or 'finetune' (the LLaVA recipes set it)")
    if args.stage == "pretrain":
        if args.lora_enable:  # would otherwise be ignored: stage 1 never trains the language model
            raise ValueError("lora_enable=True: LoRA adapts the language model, which stage 1 (stage='pretrain') "
                             "keeps frozen; use it with stage 2 (recipes/finetune.py)")
        set_trainable(model, vision_tower=args.train_vision_tower, projector=True, language_model=False)
        return model
    if args.lora_enable:
        return apply_lora(model, r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout,
                          train_vision_tower=args.train_vision_tower)
    set_trainable(model, vision_tower=args.train_vision_tower, projector=True, language_model=True)
    return model


def wants_vision_warmup(model_args: ModelArguments, resume: Optional[str]) -> bool:
    """The warm-up trains a freshly built preset tower only: not a saved model, and not again on resume."""
    if model_args.vision_warmup_epochs <= 0:
        return False
    if model_args.model_name_or_path or model_args.vision_tower not in DEFOCUS_PRESETS or resume:
        logger.info("vision warm-up skipped: the vision tower is not a fresh preset (or the run resumes)")
        return False
    return True


def warm_up_fresh_vision_tower(model: nn.Module, processor: Any, model_args: ModelArguments,
                               args: LlavaTrainingArguments, resume: Optional[str] = None) -> dict[str, float]:
    """The LLaVA recipes' warm-up step: :func:`warm_up_vision_tower` when :func:`wants_vision_warmup` says so.
    Returns the warm-up's metrics, or an empty dict when it was skipped."""
    if not wants_vision_warmup(model_args, resume):
        return {}
    return warm_up_vision_tower(model, processor.image_processor, model_args, args)


def build_supervised_dataset(conversations: Sequence[Conversation], model: nn.Module, processor: Any,
                             data_args: DataArguments, args: LlavaTrainingArguments) -> SupervisedDataset:
    """Tokenised conversations with their images, as many `<image>` placeholders per image as the tower has tokens.
    Samples are cut at `model_max_length`, or at the language model's positions when it has fewer (warned)."""
    image_processor = processor.image_processor
    num_image_tokens = (image_processor.crop_size["height"] // processor.patch_size) * (
        image_processor.crop_size["width"] // processor.patch_size) + processor.num_additional_image_tokens
    max_length, limit = data_args.model_max_length, position_limit(model, processor.tokenizer)
    if limit is not None and max_length > limit:
        logger.warning("model_max_length=%d is more than the language model's %d positions; samples are cut at %d",
                       max_length, limit, limit)
        max_length = limit
    return SupervisedDataset(conversations, processor.tokenizer, image_processor, model.config.image_token_id,
                             num_image_tokens, model_max_length=max_length,
                             skip_bad_samples=data_args.skip_bad_samples, show_progress=args.process_index == 0,
                             image_cache_bytes=int(data_args.image_cache_gb * 2**30))


def build_llava_trainer(model: nn.Module, processor: Any, dataset: SupervisedDataset, args: LlavaTrainingArguments,
                        callbacks: Optional[list[TrainerCallback]] = None) -> LlavaTrainer:
    """The `LlavaTrainer` of both stages: it trains the parts `args.stage` trains (:func:`configure_trainable`, LoRA
    applied there), at the per-part learning rates of `args` (`projector_lr`, `vision_tower_lr`; unset:
    `learning_rate`), with the dataset's collator and the processor saved with every checkpoint. `trainer.model` is
    the model to count and save."""
    model = configure_trainable(model, args)
    return LlavaTrainer(model=model, args=args, train_dataset=dataset, data_collator=dataset.collator(),
                        processing_class=processor, projector_lr=args.projector_lr,
                        vision_tower_lr=args.vision_tower_lr, callbacks=callbacks)


def save_llava(trainer: Trainer, processor: Any, dataset: SupervisedDataset, args: LlavaTrainingArguments) -> nn.Module:
    """Save a directory `AutoModelForImageTextToText` loads (LoRA merged first), the processor, the projector alone
    (`projector.safetensors`, what stage 2 may start from) and the list of skipped samples. Returns the saved model."""
    model = trainer.model.merge_and_unload() if args.lora_enable else trainer.model
    if trainer.is_world_process_zero():
        model.config.use_cache = True
    trainer.model = model
    if args.world_size > 1:  # each process found its own bad images; list them all
        from accelerate.utils import gather_object

        dataset.record_skipped(gather_object(dataset.skipped))
    trainer.save_model(args.output_dir)
    if trainer.is_world_process_zero():
        processor.save_pretrained(args.output_dir)
        save_projector(model, args.output_dir)
    logger.info(dataset.report())
    if dataset.skipped and trainer.is_world_process_zero():
        with open(Path(args.output_dir) / "skipped_samples.txt", "w") as f:
            f.write("\n".join(dataset.skipped) + "\n")
        print(f"{len(dataset.skipped)} bad sample(s) were skipped; see {args.output_dir}/skipped_samples.txt")
    return model


__all__ = [
    "build_llava_model",
    "build_llava_trainer",
    "build_supervised_dataset",
    "check_resume_tokenizer",
    "checkpoint_tokenizer",
    "configure_trainable",
    "corpus_for_tokenizer",
    "load_conversations",
    "load_projector",
    "save_llava",
    "save_projector",
    "wants_vision_warmup",
    "warm_up_fresh_vision_tower",
]
