"""LLaVA-1.5's two training stages on the Hugging Face `Trainer`, shared by `recipes/pretrain.py` (stage 1: the
projector alone) and `recipes/finetune.py` (stage 2: projector + language model, full or LoRA).

The recipes only parse arguments (`parse_recipe_args`: a YAML file of defaults, command-line overrides) and call
`train_llava`. Optimisation, checkpointing, resuming, mixed precision and DeepSpeed belong to the `Trainer`.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import yaml
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import HfArgumentParser, LlavaForConditionalGeneration, Trainer, TrainingArguments, set_seed
from transformers.trainer_pt_utils import LengthGroupedSampler
from transformers.trainer_utils import get_last_checkpoint

from .configuration_defocus import DEFOCUS_PRESETS, DefocusVisionConfig
from .data.conversations import Conversation, load_easy_vqa, load_hf_dataset, load_llava_json
from .data.supervised import SupervisedCollator, SupervisedDataset
from .llava import LLAVA_V1_SYSTEM, apply_lora, build_llava, count_trainable_parameters, model_parts, set_trainable

logger = logging.getLogger(__name__)

PROJECTOR_FILE = "projector.safetensors"


# ------------------------------------------------------------------------------------------------------ arguments

@dataclass
class ModelArguments:
    model_name_or_path: Optional[str] = field(default=None, metadata={
        "help": "a saved LLaVA directory to continue from (e.g. the stage-1 output); else one is built from "
                "vision_tower + language_model"})
    vision_tower: str = field(default="mamba-tiny", metadata={
        "help": "De-focus encoder: preset name, or a saved / converted directory"})
    language_model: Optional[str] = field(default=None, metadata={
        "help": "local directory of a causal LM (with its tokenizer); empty: a tiny Llama with a tokenizer trained "
                "on the training text (the offline default)"})
    vision_feature_layer: int = -1
    image_size: Optional[int] = field(default=None, metadata={"help": "encoder input size (default: the encoder's)"})
    pretrain_projector: Optional[str] = field(default=None, metadata={
        "help": f"stage-1 output directory or {PROJECTOR_FILE} to load the projector from"})
    tiny_lm_hidden_size: int = field(default=128, metadata={"help": "offline default: width of the tiny Llama"})
    tiny_lm_layers: int = field(default=2, metadata={"help": "offline default: depth of the tiny Llama"})
    tiny_vocab_size: int = field(default=400, metadata={"help": "offline default: BPE vocabulary size"})
    vision_overrides: Optional[str] = field(default=None, metadata={
        "help": "encoder config overrides for a preset tower, JSON or key=value,key=value"})
    vision_warmup_epochs: float = field(default=0.0, metadata={
        "help": "offline stand-in for LLaVA's pretrained vision encoder: before training LLaVA, train a freshly built "
                "preset tower as an image classifier for this many epochs (0: off; skipped for saved models)"})
    vision_warmup_data: str = field(default="easy-vqa", metadata={
        "help": "warm-up images: 'easy-vqa' (classes '<color> <shape>' read off the training answers) or an image "
                "folder tree <root>/<class>/<image>"})
    vision_warmup_lr: float = field(default=2e-3, metadata={"help": "warm-up learning rate"})


@dataclass
class DataArguments:
    data_path: str = field(default="easy-vqa", metadata={
        "help": "'easy-vqa' (offline, from the easy-vqa package), a LLaVA .json/.jsonl file, or a Hugging Face "
                "dataset directory with messages/images columns"})
    image_folder: Optional[str] = field(default=None, metadata={"help": "root of the LLaVA JSON image paths"})
    dataset_split: str = "train"
    easy_vqa_turns: int = field(default=4, metadata={"help": "easy-VQA questions per conversation (per image)"})
    easy_vqa_captions: bool = field(default=False, metadata={"help": "easy-VQA as captions (stage-1 data)"})
    easy_vqa_curriculum: Optional[str] = field(default=None, metadata={
        "help": "easy-VQA in ordered phases, e.g. 'described*3, open, all*2': 'described' (text only, the image "
                "replaced by its description), 'open' (open questions alone), 'all'; '*N' passes; needs "
                "train_sampling_strategy=sequential"})
    easy_vqa_max_images: Optional[int] = field(default=None, metadata={
        "help": "easy-VQA: use the questions of the first N images only (every phase of a curriculum keeps them)"})
    easy_vqa_balance_yes_no: bool = field(default=False, metadata={
        "help": "keep as many 'yes' as 'no' answers (plain and negated questions apart), so that the question's form "
                "alone cannot answer them"})
    max_train_samples: Optional[int] = None
    model_max_length: int = 2048
    image_aspect_ratio: str = field(default="pad", metadata={"help": "'pad' (LLaVA-1.5: pad to square) or 'crop'"})
    skip_bad_samples: bool = field(default=False, metadata={"help": "drop bad samples (counted, reported) instead "
                                                                     "of stopping"})


@dataclass
class LlavaTrainingArguments(TrainingArguments):
    stage: str = field(default="finetune", metadata={"help": "'pretrain' (projector only) or 'finetune'"})
    projector_lr: Optional[float] = field(default=None, metadata={"help": "learning rate of the projector "
                                                                          "(default: learning_rate)"})
    vision_tower_lr: Optional[float] = field(default=None, metadata={"help": "learning rate of an unfrozen encoder"})
    train_vision_tower: bool = False
    lora_enable: bool = False
    lora_r: int = 128
    lora_alpha: int = 256
    lora_dropout: float = 0.05
    eval_easy_vqa: bool = field(default=False, metadata={"help": "after training, answer the easy-VQA test "
                                                                 "questions and print the accuracy"})
    eval_limit: Optional[int] = None
    eval_batch_size: int = 64


def parse_recipe_args(dataclass_types: Sequence[type], argv: Optional[list[str]] = None,
                      default_config: Optional[str] = None) -> tuple:
    """Parse `--config FILE.yaml` (defaults for any field; `default_config` when none is given) and command-line
    overrides (`--learning_rate 1e-3`) into the dataclasses."""
    parser = HfArgumentParser(dataclass_types)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, rest = pre.parse_known_args(sys.argv[1:] if argv is None else argv)
    config = known.config or default_config
    if config:
        with open(config) as f:
            values = yaml.safe_load(f) or {}
        if not isinstance(values, dict):
            raise ValueError(f"{config}: expected a mapping of argument names to values")
        fields = {action.dest for action in parser._actions}
        unknown = sorted(set(values) - fields)
        if unknown:
            raise ValueError(f"{config}: unknown argument(s) {unknown}")
        values = {k: json.dumps(v) if isinstance(v, dict) else v for k, v in values.items()}
        parser.set_defaults(**values)
    return parser.parse_args_into_dataclasses(args=rest)


def parse_overrides(text: Optional[str]) -> dict[str, Any]:
    """`'{"a": 1}'` (JSON) or `'a=1,b=x'` (values read as YAML scalars) into a dict."""
    if not text:
        return {}
    if text.lstrip().startswith("{"):
        return json.loads(text)
    overrides = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"overrides: {item!r} is not key=value")
        overrides[key.strip()] = yaml.safe_load(value)
    return overrides


def setup_logging(args: TrainingArguments) -> None:
    """INFO logs on the main process, warnings elsewhere (transformers' convention)."""
    import transformers

    level = logging.INFO if args.should_log else logging.WARNING
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=level)
    transformers.utils.logging.set_verbosity(level)
    logging.getLogger("defocus_mllm").setLevel(level)


# ---------------------------------------------------------------------------------------------------- the trainer

class SeededLengthGroupedSampler(LengthGroupedSampler):
    """Length-grouped order drawn from `(seed, epoch)` alone, so that a resumed run replays the same batches (the
    stock sampler draws from the global RNG, whose state at the start of an epoch a checkpoint does not hold)."""

    def __init__(self, batch_size: int, lengths: list[int], seed: int) -> None:
        super().__init__(batch_size, lengths=lengths)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        self.generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return super().__iter__()


class LlavaTrainer(Trainer):
    """`Trainer` with LLaVA's per-part learning rates and length grouping from the dataset's precomputed lengths
    (the stock sampler would otherwise read every sample, images included, to measure it)."""

    def __init__(self, *args: Any, projector_lr: Optional[float] = None, vision_tower_lr: Optional[float] = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.projector_lr = projector_lr
        self.vision_tower_lr = vision_tower_lr

    def _get_train_sampler(self, train_dataset=None):
        dataset = self.train_dataset if train_dataset is None else train_dataset
        if self.args.train_sampling_strategy == "group_by_length" and hasattr(dataset, "lengths"):
            seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
            return SeededLengthGroupedSampler(self.args.train_batch_size * self.args.gradient_accumulation_steps,
                                              dataset.lengths, seed)
        return super()._get_train_sampler(train_dataset)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Optional[nn.Module] = None) -> None:
        # Llava checkpoints are written in the original key layout ("language_model.lm_head.*") that the stock
        # resume path hands to `load_state_dict` unconverted, silently loading nothing. `from_pretrained` converts.
        model = self.model if model is None else model
        if self.is_deepspeed_enabled or self.is_fsdp_enabled or not isinstance(model, LlavaForConditionalGeneration):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        logger.info("Loading model weights from %s", resume_from_checkpoint)
        loaded = type(model).from_pretrained(resume_from_checkpoint, dtype=model.dtype)
        model.load_state_dict(loaded.state_dict(), strict=True)

    def create_optimizer(self, model: Optional[nn.Module] = None) -> torch.optim.Optimizer:
        if self.optimizer is not None or (self.projector_lr is None and self.vision_tower_lr is None):
            return super().create_optimizer(model)
        opt_model = self.model if model is None else model
        decay = set(self.get_decay_parameter_names(opt_model))
        special = {}
        for part, lr in (("projector", self.projector_lr), ("vision_tower", self.vision_tower_lr)):
            if lr is not None:
                for module in model_parts(opt_model)[part]:
                    for param in module.parameters():
                        special[id(param)] = lr
        # PEFT keeps a trainable copy of the projector under `modules_to_save`; match those by name as well.
        groups: dict[tuple[float, bool], list] = {}
        for name, param in opt_model.named_parameters():
            if not param.requires_grad:
                continue
            lr = special.get(id(param))
            if lr is None and "multi_modal_projector" in name and self.projector_lr is not None:
                lr = self.projector_lr
            if lr is None and "vision_tower" in name and self.vision_tower_lr is not None:
                lr = self.vision_tower_lr
            groups.setdefault((lr or self.args.learning_rate, name in decay), []).append(param)
        param_groups = [{"params": params, "lr": lr, "weight_decay": self.args.weight_decay if wd else 0.0}
                        for (lr, wd), params in groups.items()]
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        optimizer_kwargs.pop("lr", None)
        self.optimizer = optimizer_cls(param_groups, lr=self.args.learning_rate, **optimizer_kwargs)
        return self.optimizer


# ------------------------------------------------------------------------------------------------- data and model

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
        convs = load_hf_dataset(path, split=data_args.dataset_split)
    elif Path(path).suffix in (".json", ".jsonl"):
        convs = load_llava_json(path, data_args.image_folder)
    else:
        raise FileNotFoundError(f"data_path={path!r}: not 'easy-vqa', a .json/.jsonl file, or a dataset directory")
    if data_args.max_train_samples is not None:
        convs = convs[: data_args.max_train_samples]
    return convs


def corpus_for_tokenizer(conversations: Sequence[Conversation]) -> list[str]:
    """The text a from-scratch tokenizer is trained on: every message and the chat template's own words."""
    texts = [m["content"] for c in conversations for m in c.messages]
    return texts + [LLAVA_V1_SYSTEM, "USER: ASSISTANT:"]


def build_model(model_args: ModelArguments, data_args: DataArguments, conversations: Sequence[Conversation]):
    """`(model, processor)` from a saved directory, or assembled by `build_llava` (the offline default when no
    language model is named: a tiny Llama and a tokenizer trained on `conversations`)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    if model_args.model_name_or_path:
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
            from .testing import tiny_llama_config, train_tokenizer

            corpus = corpus_for_tokenizer(conversations)
            if data_args.data_path == "easy-vqa":
                # Both stages must share one vocabulary: stage 2 continues from the stage-1 directory.
                corpus += corpus_for_tokenizer(load_easy_vqa(data_args.dataset_split,
                                                             captions=not data_args.easy_vqa_captions))
            tokenizer = train_tokenizer(corpus, vocab_size=model_args.tiny_vocab_size)
            lm_config = tiny_llama_config(len(tokenizer), hidden_size=model_args.tiny_lm_hidden_size,
                                          num_hidden_layers=model_args.tiny_lm_layers,
                                          max_position_embeddings=data_args.model_max_length)
            model, processor = build_llava(vision, lm_config, tokenizer=tokenizer,
                                           vision_feature_layer=model_args.vision_feature_layer,
                                           image_size=model_args.image_size)
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
    state = load_file(str(path))
    missing, unexpected = projector.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path} does not fit this model's projector: missing {missing}, unexpected {unexpected}")


def configure_trainable(model: nn.Module, args: LlavaTrainingArguments) -> nn.Module:
    """Stage 1: the projector alone. Stage 2: projector + LM (full, or LoRA adapters), encoder when asked."""
    if args.stage == "pretrain":
        set_trainable(model, vision_tower=False, projector=True, language_model=False)
        return model
    if args.stage != "finetune":
        raise ValueError(f"stage={args.stage!r} must be 'pretrain' or 'finetune'")
    if args.lora_enable:
        return apply_lora(model, r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout,
                          train_vision_tower=args.train_vision_tower)
    set_trainable(model, vision_tower=args.train_vision_tower, projector=True, language_model=True)
    return model


def warm_up_vision_tower(model: nn.Module, image_processor: Any, model_args: ModelArguments,
                         args: LlavaTrainingArguments) -> dict[str, float]:
    """Train the LLaVA's (fresh) vision tower in place as an image classifier, the offline stand-in for the
    pretrained encoder LLaVA starts from. Returns the warm-up's training metrics.

    From scratch, a tiny encoder learns what the questions ask about (shapes above all) far more slowly through a
    language model's answers than from labels. A few epochs as a '<color> <shape>' classifier (the same training
    images, their labels read off the training answers) give stage 2 features worth reading. Not for DeepSpeed runs.
    """
    from .data.conversations import load_easy_vqa_labels
    from .data.image_classification import ImageClassificationCollator, ImageFolderDataset, ImageListDataset
    from .encoder_pretraining import EncoderPretrainingTrainer
    from .modeling_defocus import DefocusForImageClassification

    if args.deepspeed or os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        raise ValueError("vision_warmup_epochs > 0 runs without DeepSpeed: warm the encoder up in a plain run (or with "
                         "recipes/pretrain_encoder.py) and pass the result as vision_tower")

    def transform(image):  # the LLaVA processor's own preprocessing, so stage 2 sees the same inputs
        return image_processor(image, return_tensors="pt")["pixel_values"][0]

    if model_args.vision_warmup_data == "easy-vqa":
        paths, labels, classes = load_easy_vqa_labels("train")
        dataset: Any = ImageListDataset(list(zip(paths, labels)), transform, classes)
    else:
        dataset = ImageFolderDataset(model_args.vision_warmup_data, transform)
    tower = model_parts(model)["vision_tower"][0]
    config = copy.deepcopy(tower.config)
    config.num_labels = len(dataset.classes)
    classifier = DefocusForImageClassification(config)
    classifier.defocus = tower  # shared, so training the classifier trains the LLaVA's tower in place
    warmup_args = TrainingArguments(
        output_dir=str(Path(args.output_dir) / "vision-warmup"), num_train_epochs=model_args.vision_warmup_epochs,
        learning_rate=model_args.vision_warmup_lr, per_device_train_batch_size=args.per_device_train_batch_size,
        lr_scheduler_type="cosine", warmup_steps=args.warmup_steps, weight_decay=0.0, seed=args.seed,
        logging_steps=args.logging_steps, save_strategy="no", report_to=args.report_to, use_cpu=args.use_cpu,
        bf16=args.bf16, dataloader_num_workers=args.dataloader_num_workers, disable_tqdm=args.disable_tqdm)
    trainer = EncoderPretrainingTrainer(model=classifier, args=warmup_args, train_dataset=dataset,
                                       data_collator=ImageClassificationCollator())
    logger.info("vision warm-up: %d images in %d classes, %.1f epochs", len(dataset), len(dataset.classes),
                model_args.vision_warmup_epochs)
    metrics = trainer.train().metrics
    return {f"vision_warmup_{k}": v for k, v in metrics.items()}


# ------------------------------------------------------------------------------------------------------- the run

def train_llava(model_args: ModelArguments, data_args: DataArguments, args: LlavaTrainingArguments,
                callbacks: Optional[list] = None) -> dict[str, Any]:
    """Build (or load) the model, train it, save a directory `AutoModelForImageTextToText` loads, and optionally
    evaluate on easy-VQA. Returns the metrics. `callbacks` are extra `TrainerCallback`s."""
    started = time.time()
    set_seed(args.seed)
    conversations = load_conversations(data_args, seed=args.seed)
    if data_args.easy_vqa_curriculum and args.train_sampling_strategy != "sequential":
        logger.warning("easy_vqa_curriculum orders the data, but train_sampling_strategy=%s shuffles it: "
                       "set it to 'sequential' to keep the curriculum", args.train_sampling_strategy)
    model, processor = build_model(model_args, data_args, conversations)
    image_processor = processor.image_processor
    resume = args.resume_from_checkpoint
    if resume == "last":  # newest checkpoint-* in output_dir; a fresh start when there is none
        resume = get_last_checkpoint(args.output_dir) if os.path.isdir(args.output_dir) else None
    warmup_metrics: dict[str, float] = {}
    if model_args.vision_warmup_epochs > 0:
        if model_args.model_name_or_path or model_args.vision_tower not in DEFOCUS_PRESETS or resume:
            logger.info("vision warm-up skipped: the vision tower is not a fresh preset (or the run resumes)")
        else:
            warmup_metrics = warm_up_vision_tower(model, image_processor, model_args, args)
    num_image_tokens = (image_processor.crop_size["height"] // processor.patch_size) * (
        image_processor.crop_size["width"] // processor.patch_size) + processor.num_additional_image_tokens
    dataset = SupervisedDataset(conversations, processor.tokenizer, image_processor, model.config.image_token_id,
                                num_image_tokens, model_max_length=data_args.model_max_length,
                                skip_bad_samples=data_args.skip_bad_samples,
                                show_progress=args.process_index == 0)
    if args.activation_checkpointing:
        model.config.use_cache = False
        model.enable_input_require_grads()
    model = configure_trainable(model, args)
    trainable, total = count_trainable_parameters(model)
    logger.info("%s: %d conversations, %d image tokens per image; %.2fM of %.2fM parameters trainable",
                args.stage, len(dataset), num_image_tokens, trainable / 1e6, total / 1e6)

    trainer = LlavaTrainer(model=model, args=args, train_dataset=dataset,
                           data_collator=SupervisedCollator(processor.tokenizer.pad_token_id),
                           processing_class=processor, projector_lr=args.projector_lr,
                           vision_tower_lr=args.vision_tower_lr, callbacks=callbacks)
    result = trainer.train(resume_from_checkpoint=resume)
    metrics: dict[str, Any] = {**warmup_metrics, **result.metrics}

    final = model.merge_and_unload() if args.lora_enable else model
    if trainer.is_world_process_zero():
        final.config.use_cache = True
    trainer.model = final
    trainer.save_model(args.output_dir)
    if trainer.is_world_process_zero():
        processor.save_pretrained(args.output_dir)
        save_projector(final, args.output_dir)
    metrics["train_time_s"] = time.time() - started
    metrics["skipped_samples"] = len(dataset.skipped)
    logger.info(dataset.report())
    if dataset.skipped and trainer.is_world_process_zero():
        with open(Path(args.output_dir) / "skipped_samples.txt", "w") as f:
            f.write("\n".join(dataset.skipped) + "\n")
        print(f"{len(dataset.skipped)} bad sample(s) were skipped; see {args.output_dir}/skipped_samples.txt")

    if args.eval_easy_vqa:
        from .evaluation import run_benchmark

        final.eval()
        report = run_benchmark(final, processor, "easy-vqa", limit=args.eval_limit, batch_size=args.eval_batch_size,
                               output_dir=Path(args.output_dir) / "eval-easy-vqa",
                               show_progress=args.process_index == 0)
        metrics["easy_vqa_accuracy"] = report["metrics"]["accuracy"]
        metrics["easy_vqa_vqa_accuracy"] = report["metrics"]["vqa_accuracy"]
        metrics["easy_vqa_questions"] = report["num_questions"]
    metrics["total_time_s"] = time.time() - started
    trainer.log_metrics("final", metrics)
    trainer.save_metrics("final", metrics)
    if "easy_vqa_accuracy" in metrics and trainer.is_world_process_zero():
        print(f"easy-VQA accuracy: {metrics['easy_vqa_accuracy']:.2f}% on {metrics['easy_vqa_questions']} test "
              f"questions (VQA accuracy {metrics['easy_vqa_vqa_accuracy']:.2f}); {metrics['total_time_s'] / 60:.1f} "
              f"min in total; model saved to {args.output_dir}")
    return metrics


def run_recipe(stage: str, default_config: str, argv: Optional[list[str]] = None) -> dict[str, Any]:
    """What `recipes/pretrain.py` and `recipes/finetune.py` do: parse the arguments, set up logging, train."""
    model_args, data_args, training_args = parse_recipe_args(
        (ModelArguments, DataArguments, LlavaTrainingArguments), argv, default_config=default_config)
    training_args.stage = stage
    setup_logging(training_args)
    return train_llava(model_args, data_args, training_args)


__all__ = [
    "DataArguments",
    "LlavaTrainer",
    "LlavaTrainingArguments",
    "ModelArguments",
    "build_model",
    "configure_trainable",
    "load_conversations",
    "load_projector",
    "parse_overrides",
    "parse_recipe_args",
    "run_recipe",
    "save_projector",
    "setup_logging",
    "train_llava",
    "warm_up_vision_tower",
]
