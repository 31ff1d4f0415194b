"""Batched vs one-by-one greedy evaluation of the tiny model: speed-up and identical predictions.

eval.py generates with left padding, prompts sorted by length, `--batch_size` prompts per generate() call.
This bench evaluates the same 64 toy prior-knowledge questions at batch size 1 and at eval.py's default batch
size, through eval.py's own generate + score path, and prints both times, the speed-up (target >= 3x) and
whether every prediction is identical (it must be: greedy decoding does not depend on the batch).

    python bench/bench_eval_batch.py                        # tiny model, 64 samples, 32 new tokens
    python bench/bench_eval_batch.py --samples 64 --max_new_tokens 64 --threads 1

The tiny random model answers "\\n" to everything; its weights are spread out first (std +0.1, seeded) so
that predictions differ between prompts and the identity check means something.
"""
from __future__ import annotations

import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(key, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import common  # noqa: E402
import eval as ev  # noqa: E402
import toy  # noqa: E402


@dataclass
class Args:
    samples: int = 64
    """toy prior-knowledge questions evaluated at both batch sizes"""
    batch_size: int = 16
    """the batched run's batch size (eval.py's default)"""
    max_new_tokens: int = 32
    """new tokens per answer (the spread-out tiny model rarely stops early, so every sample runs this long)"""
    threads: int = 0
    """torch CPU threads (0 = torch's default)"""
    repeats: int = 1
    """timed repetitions of each setting (the best time counts)"""


def main(argv=None):
    import torch
    from datasets import load_from_disk
    args = common.parse_args(Args, __doc__, argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="bench_eval_"))
    os.environ.setdefault("HF_HOME", str(work / "hf_home"))
    model_dir = toy.build_toy_model(str(work / "model"), size="tiny", seed=0)
    toy.build_prior_dataset(str(work / "prior"), train=1, test=args.samples, seed=0, pretrain=1)
    model, processor = common.load_model_and_processor(str(model_dir), "float32", None, ev.DEFAULT_MIN_PIXELS,
                                                       ev.DEFAULT_MAX_PIXELS, "cpu")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2:
                param.add_(torch.randn(param.shape, generator=generator) * 0.1)
    ctx = ev.Context()
    bench = ev.REGISTRY["toy_prior"]
    data = load_from_disk(str(work / "prior"))["test"]
    samples = [s for i in range(len(data)) for s in bench.build(data[i], ctx)]
    ev.generate_records(model, processor, samples[:2], 2, 4, ctx)  # warm-up (lazy inits, allocator)

    timings, predictions = {}, {}
    for batch_size in (1, args.batch_size):
        best = float("inf")
        for _ in range(args.repeats):
            start = time.perf_counter()
            records = ev.generate_records(model, processor, samples, batch_size, args.max_new_tokens, ctx)
            for record, s in zip(records, samples):
                record["score"] = ev.score_record(bench, {**s, **record})
            best = min(best, time.perf_counter() - start)
        timings[batch_size], predictions[batch_size] = best, [r["prediction"] for r in records]
    identical = predictions[1] == predictions[args.batch_size]
    speedup = timings[1] / timings[args.batch_size]
    print(f"samples {len(samples)}, max_new_tokens {args.max_new_tokens}, torch threads {torch.get_num_threads()}")
    print(f"batch size 1:  {timings[1]:7.2f} s  ({len(samples) / timings[1]:6.1f} samples/s)")
    print(f"batch size {args.batch_size}: {timings[args.batch_size]:7.2f} s  "
          f"({len(samples) / timings[args.batch_size]:6.1f} samples/s)")
    print(f"speed-up {speedup:.2f}x (target >= 3x); predictions identical: {identical} "
          f"({len(set(predictions[1]))} distinct predictions)")
    if not identical:
        bad = [i for i, (a, b) in enumerate(zip(predictions[1], predictions[args.batch_size])) if a != b]
        print(f"differing samples: {bad[:10]}")
    return {"speedup": speedup, "identical": identical, "timings": timings}


if __name__ == "__main__":
    main()
