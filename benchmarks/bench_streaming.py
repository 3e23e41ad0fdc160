"""Streaming causal encoding on the CPU: peak memory and time of a large image encoded whole vs a few patch rows at a
time, and of a video encoded whole vs frame by frame, for De-focus Mamba-S, RetNet-S and ViT-S (docs/streaming.md).

    python benchmarks/bench_streaming.py                       # the table of docs/streaming.md
    python benchmarks/bench_streaming.py --quick               # tiny models, tiny inputs: a smoke run

Random weights, fp32, batch 1, `torch.inference_mode`. A streamed run consumes each chunk's tokens as they come (as a
projector or a pooling head would) and keeps only the carried state, so its peak is the working memory of one chunk
plus the state; a whole run holds the full sequence's activations. RetNet-S is the De-focus RetNet with DeiT-S sizes
(hidden 384, 12 layers, 6 heads), as Mamba-S and ViT-S are.

The whole forward of RetNet (its parallel form, `[H, L, L]`) is quadratic in memory: at 65,536 tokens that is
~100 GiB per layer, so `--quadratic-max-tokens` caps the whole RetNet runs (larger sizes print "skipped" with the
memory it would need). The whole De-focus ViT on the CPU builds its decay bias per tile (linear memory) but its
attention costs `O(L^2)` time, as does a streamed ViT, whose key/value cache grows with the stream;
`--vit-max-tokens` caps both for time. `--tokens-per-chunk` streams a fixed number of tokens per chunk at every
image size (the rows per chunk follow the width), the clean test that a stream's peak does not grow with its length.

Peak memory is what the call adds on top of the weights (the resident-set high-water mark, as in
benchmarks/timing.py's `PeakMemory`); on a machine shared with other work times are noisy.
"""

from __future__ import annotations

import argparse
from typing import Callable, Optional

import torch

from defocus_mllm import DefocusVisionConfig, DefocusVisionModel
from defocus_mllm.encoder.modeling_defocus import DefocusStreamState
from timing import PeakMemory, time_call

MODELS = {
    "Mamba-S": ("mamba-small", {}),
    "RetNet-S": ("retnet-base", dict(hidden_size=384, intermediate_size=768, num_attention_heads=6)),
    "ViT-S": ("vit-small", {}),
}
QUICK = {
    "Mamba-S": ("mamba-tiny", {}),
    "RetNet-S": ("retnet-tiny", {}),
    "ViT-S": ("vit-tiny", {}),
}
MiB = 2**20


def build(preset: str, overrides: dict, patch_size: Optional[int]) -> DefocusVisionModel:
    if patch_size:
        overrides = {**overrides, "patch_size": patch_size}
    return DefocusVisionModel(DefocusVisionConfig.from_preset(preset, **overrides)).eval()


def whole(model: DefocusVisionModel, pixels: torch.Tensor) -> Callable[[], int]:
    def run() -> int:
        return model(pixels).last_hidden_state.shape[1]
    return run


def streamed(model: DefocusVisionModel, chunks: list[torch.Tensor], result: dict, peak: PeakMemory
             ) -> Callable[[], int]:
    """Feed the chunks one after the other, dropping each chunk's output once produced. `result["quarter_mib"]` is
    the peak after the first quarter of the chunks: a stream whose memory does not grow peaks as high there as at
    its end."""
    def run() -> int:
        state, tokens = DefocusStreamState(len(model.blocks)), 0
        for i, chunk in enumerate(chunks):
            out = model(chunk, past_state=state, use_cache=True, finalize=i == len(chunks) - 1)
            state = out.past_state
            tokens += out.last_hidden_state.shape[1]
            del out
            if i == max(0, len(chunks) // 4 - 1):
                result["quarter_mib"] = peak.so_far()
        result["state_bytes"] = state.num_bytes()
        return tokens
    return run


def quadratic_bytes(model: DefocusVisionModel, tokens: int) -> int:
    """The `[H, L, L]` fp32 tensor of a whole RetNet / ViT forward (several exist at once)."""
    return model.config.num_attention_heads * tokens * tokens * 4


def measure(fn: Callable[[], int], peak: PeakMemory) -> tuple[float, Optional[float], int]:
    result = {}

    def timed() -> None:
        result["seconds"] = time_call(lambda: result.__setitem__("tokens", fn()))

    with torch.inference_mode():
        mib = peak.measure(timed)
    return result["seconds"], mib, result["tokens"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny models and inputs (a smoke run)")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--image-sizes", nargs="+", type=int, default=[1024, 2048, 4096],
                        help="square image sides in pixels, streamed (and whole where allowed) (default: %(default)s)")
    parser.add_argument("--rows-per-chunk", type=int, default=4, help="patch rows per streamed chunk")
    parser.add_argument("--tokens-per-chunk", type=int, default=0,
                        help="stream about this many tokens per chunk at every size: whole patch rows, at least one "
                             "(0: --rows-per-chunk rows)")
    parser.add_argument("--frames", type=int, default=64, help="video length in frames")
    parser.add_argument("--frame-size", type=int, default=128, help="video frame side in pixels")
    parser.add_argument("--whole-max-tokens", type=int, default=65536,
                        help="most patch tokens of a whole Mamba forward (linear memory)")
    parser.add_argument("--quadratic-max-tokens", type=int, default=4096,
                        help="most patch tokens of a whole RetNet forward ([H, L, L] memory)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch intra-op threads (0: torch's default); 1 avoids thread barriers on a loaded machine")
    parser.add_argument("--vit-max-tokens", type=int, default=4096,
                        help="most patch tokens of a whole or streamed ViT run (O(L^2) attention time)")
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    models = QUICK if args.quick else MODELS
    patch = None
    if args.quick:
        args.image_sizes, args.frames, args.frame_size, patch = [32, 64], 4, 16, 8
    peak = PeakMemory("cpu")
    chunking = f"~{args.tokens_per_chunk} tokens" if args.tokens_per_chunk else f"{args.rows_per_chunk} patch rows"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, batch 1, "
          f"{chunking} per chunk, video {args.frames} x {args.frame_size}^2")
    header = (f"{'model':9s} {'input':>16s} {'tokens':>7s} {'mode':>12s} {'per chunk':>9s} {'time s':>8s} "
              f"{'peak MiB':>9s} {'at 1/4':>7s} {'state MiB':>10s}")
    print(header)
    print("-" * len(header))

    def row(name: str, what: str, tokens: int, mode: str, seconds: Optional[float], mib: Optional[float],
            state: Optional[int], note: str = "", per_chunk: Optional[int] = None,
            quarter: Optional[float] = None) -> None:
        c = f"{per_chunk:9d}" if per_chunk is not None else f"{'-':>9s}"
        t = f"{seconds:8.2f}" if seconds is not None else f"{'-':>8s}"
        m = f"{mib:9.0f}" if mib is not None else f"{'-':>9s}"
        q = f"{quarter:7.0f}" if quarter is not None else f"{'-':>7s}"
        s = f"{state / MiB:10.2f}" if state is not None else f"{'-':>10s}"
        print(f"{name:9s} {what:>16s} {tokens:7d} {mode:>12s} {c} {t} {m} {q} {s} {note}".rstrip(), flush=True)

    for name in args.models:
        preset, overrides = models[name]
        torch.manual_seed(0)
        model = build(preset, overrides, patch)
        p = model.config.patch_size
        attention = model.config.mixer == "attention"
        quadratic = model.config.mixer == "retention"  # whole forward's memory; the ViT's is linear (per-tile bias)
        for side in args.image_sizes:
            pixels = torch.randn(1, 3, side, side)
            grid = side // p
            tokens = grid ** 2 + 1
            what = f"image {side}^2"
            rows = max(1, args.tokens_per_chunk // grid) if args.tokens_per_chunk else args.rows_per_chunk
            mode = f"rows x{rows}"
            if attention and tokens - 1 > args.vit_max_tokens:
                row(name, what, tokens, "whole", None, None, None, "(skipped: over --vit-max-tokens; O(L^2) time)")
            elif quadratic and tokens - 1 > args.quadratic_max_tokens:
                row(name, what, tokens, "whole", None, None, None,
                    f"(skipped: [H, L, L] fp32 is {quadratic_bytes(model, tokens) / 2**30:.1f} GiB)")
            elif tokens - 1 > args.whole_max_tokens:
                row(name, what, tokens, "whole", None, None, None, "(skipped: over --whole-max-tokens)")
            else:
                row(name, what, tokens, "whole", *measure(whole(model, pixels), peak)[:2], None)
            if attention and tokens - 1 > args.vit_max_tokens:
                row(name, what, tokens, mode, None, None, None,
                    "(skipped: over --vit-max-tokens; attention cost grows with the stream)")
                continue
            step = rows * p
            chunks = [pixels[:, :, top:top + step] for top in range(0, side, step)]
            result = {}
            seconds, mib, count = measure(streamed(model, chunks, result, peak), peak)
            row(name, what, count, mode, seconds, mib, result["state_bytes"], per_chunk=rows * grid,
                quarter=result["quarter_mib"])
        video = torch.randn(1, args.frames, 3, args.frame_size, args.frame_size)
        tokens = args.frames * (args.frame_size // p) ** 2 + 1
        what = f"video {args.frames}x{args.frame_size}^2"
        limit = args.quadratic_max_tokens if quadratic else args.vit_max_tokens if attention else args.whole_max_tokens
        if tokens - 1 <= limit:
            row(name, what, tokens, "whole", *measure(whole(model, video), peak)[:2], None)
        else:
            row(name, what, tokens, "whole", None, None, None, "(skipped: over the whole-forward cap)")
        result = {}
        seconds, mib, count = measure(streamed(model, list(video.split(1, dim=1)), result, peak), peak)
        row(name, what, count, "frame x1", seconds, mib, result["state_bytes"],
            per_chunk=(args.frame_size // p) ** 2, quarter=result["quarter_mib"])
    print("\nwhole: one forward over all tokens; rows xN / frame x1: streamed with past_state, N patch rows or one "
          "frame per chunk, chunk outputs dropped; state: the carried past_state at the end (Mamba / RetNet: fixed "
          "size; ViT: its key/value cache, which grows); at 1/4: a stream's peak after its first quarter of chunks (as high "
          "as its whole peak where memory does not grow with the stream). Whole runs are the reference the streams equal (vs the "
          "streamed rows of the same input).")


if __name__ == "__main__":
    main()
