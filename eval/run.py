#!/usr/bin/env python
"""Run a VQA benchmark on a saved model directory, or summarise finished runs.

    python eval/run.py --model DIR --benchmark pope --data playground/data/eval/pope --output out/pope
    accelerate launch --num_processes 8 eval/run.py --model DIR --benchmark vqav2 --data ... --output ...
    python eval/run.py --model DIR --benchmark easy-vqa            # no data needed
    python eval/run.py --summary out/pope out/gqa out/mme          # Markdown table of several runs

Benchmarks: vqav2, gqa, textvqa, vizwiz, pope, scienceqa, mme, mmbench, easy-vqa. ``--data`` is a
LLaVA-1.5 eval folder (``playground/data/eval/<benchmark>``) or a local lmms-lab dataset folder;
docs/evaluation.md lists the files each benchmark needs. Re-running with the same ``--output``
resumes: questions already answered there are not asked again, provided the folder's ``run.json``
shows the same model weights, processor, benchmark split and generation settings (otherwise the run
stops and says what differs; ``--overwrite`` discards the old answers instead).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# the library does the work; this script only parses arguments and loads the model
from defocus_mllm.evaluation import (
    BENCHMARKS,
    is_main_process,
    load_model,
    model_fingerprint,
    results_row,
    run_benchmark,
    summarize_dirs,
)
from defocus_mllm.training import distributed_exit


def _positive_int(text: str) -> int:
    """argparse type of counts (``--limit``, ``--batch-size``, ``--max-new-tokens``): a negative ``--limit`` would
    slice from the end and a zero ``--max-new-tokens`` would fall back to the default, so both are refused."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--summary", nargs="+", metavar="DIR", help="print a table of finished runs and exit")
    p.add_argument("--model", help="saved model directory (AutoModelForImageTextToText + AutoProcessor)")
    p.add_argument("--benchmark", choices=sorted(BENCHMARKS))
    p.add_argument("--data", help="LLaVA-1.5 eval folder, lmms-lab dataset folder, or a question/parquet file")
    p.add_argument("--split", help="lmms-lab split as published: validation, testdev_balanced_instructions, "
                                   "ScienceQA-IMG/test, en/dev, ... (docs/evaluation.md)")
    p.add_argument("--question-file", help="override the LLaVA question file (default: the one LLaVA-1.5 uses)")
    p.add_argument("--image-folder", help="override the LLaVA image folder")
    p.add_argument("--annotation-file", help="ground truth for splits LLaVA scores elsewhere (e.g. VQAv2 val)")
    p.add_argument("--limit", type=_positive_int,
                   help="answer only the first N questions (MMBench: N questions with all their copies)")
    p.add_argument("--batch-size", type=_positive_int, default=8)
    p.add_argument("--max-new-tokens", type=_positive_int, help="default: the benchmark's (128; 16 for easy-VQA)")
    p.add_argument("--output", help="output folder (default: outputs/eval/<model folder>-<fingerprint>/<benchmark>, "
                                    "the fingerprint being a hash of the model's weights and config)")
    p.add_argument("--overwrite", action="store_true",
                   help="if --output holds answers of another model or other settings, delete them and start afresh "
                        "(default: stop with an error saying what differs)")
    p.add_argument("--skip-bad-images", action="store_true",
                   help="score a question whose image cannot be read or processed as unanswered (listed in "
                        "metrics.json) instead of stopping")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto: bfloat16 on a GPU that supports it, else float32")
    p.add_argument("--model-name", help="name shown in results tables (default: the model folder's name)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.summary is None and (args.model is None or args.benchmark is None):
        p.error("--model and --benchmark are required (or --summary DIR ...)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.summary is not None:
        try:
            print(summarize_dirs(args.summary))
        except (FileNotFoundError, ValueError) as err:
            print(f"error: --summary: {err}", file=sys.stderr)
            return 2
        return 0
    model, processor = load_model(args.model, args.dtype)
    name = args.model_name or Path(args.model).resolve().name
    output = args.output
    if output is None:
        # the folder name alone (`final`, `checkpoint-500`) is shared by many models: the fingerprint tells them apart
        folder = f"{Path(args.model).resolve().name}-{model_fingerprint(model)[:10]}"
        output = str(Path("outputs") / "eval" / folder / args.benchmark)
    report = run_benchmark(
        model, processor, args.benchmark, args.data,
        split=args.split, limit=args.limit, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
        output_dir=output, model_name=name, question_file=args.question_file, image_folder=args.image_folder,
        annotation_file=args.annotation_file, show_progress=not args.quiet,
        skip_bad_images=args.skip_bad_images, overwrite=args.overwrite,
    )
    if is_main_process():
        print(results_row(report, header=True))
        print(json.dumps(report["headline"]))
        if report["unanswered"]["count"]:
            print(f"{report['unanswered']['count']} question(s) unanswered (bad images), scored as wrong: "
                  f"see 'unanswered' in {Path(output) / 'metrics.json'}")
        print(f"outputs in {output}")
    return 0


if __name__ == "__main__":
    with distributed_exit():
        status = main()
    sys.exit(status)
