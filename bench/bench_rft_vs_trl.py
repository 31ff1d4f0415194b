"""Throughput and memory of rft.py's GRPO step against TRL's GRPOTrainer, same model, data and settings.

Not a test: a measurement. Both run in this one process, one after the other (then in the reverse order, and so
on for --rounds; medians are printed), or each in a fresh process (--isolate), on the same model folder, the same
jigsaw rows, batch (B puzzles x G completions), completion length, beta, loss aggregation, optimizer (torch
AdamW), gradient checkpointing and number of steps. Printed for each: seconds per step, completion tokens per
second, peak memory, and the ratios. The first step of each is a warm-up and is not timed.

TRL is not a dependency of the project; install it into the venv for this bench only:
    pip install trl==1.16.0
    python bench/bench_rft_vs_trl.py --model runs/toy/init --data data/jigsaw_toy        # a CPU toy run
    python bench/bench_rft_vs_trl.py --model Qwen/Qwen2.5-VL-3B-Instruct --data data/jigsaw --steps 6
Without --model/--data it builds the tiny toy model and a 2x2 jigsaw set in a temporary folder (offline).

Memory: on CUDA torch.cuda.max_memory_allocated (reset before each run); on CPU the peak resident set size
sampled every 2 ms by a thread, minus the resident size before the run (ru_maxrss cannot be reset, and
tracemalloc does not see torch's allocations).
How TRL is fed the VLM: conversational prompts ([{"role": "user", "content": text}]) plus an `images` column,
which TRL turns into image+text messages and runs through the same processor and chat template; the reward
function reads the assistant text and calls the same jigsaw.jigsaw_reward.
"""
from __future__ import annotations

import contextlib
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
# Imported here, before any measurement, so that each run is charged only for what it allocates: TRL's run
# imports trl before its measurement starts, and rft.main imports accelerate and tqdm lazily inside its own.
import accelerate  # noqa: E402,F401
import tqdm  # noqa: E402,F401
with contextlib.suppress(ImportError):  # TRL too (much of transformers' Trainer): before either run
    import trl  # noqa: E402,F401

import common  # noqa: E402
import runs  # noqa: E402
import jigsaw  # noqa: E402
import rft  # noqa: E402


@dataclass
class Args:
    model: str = ""
    """model folder or hub id (empty: build the tiny toy model in a temporary folder)"""
    data: str = ""
    """jigsaw data set folder (empty: build a 2x2 procedural one in a temporary folder)"""
    steps: int = 6
    """optimizer steps per trainer (the first is warm-up, not timed)"""
    batch_size: int = 2
    """puzzles per step (B)"""
    group_size: int = 4
    """completions per puzzle (G)"""
    micro_batch_size: int = 4
    """sequences per forward/backward (TRL: per_device_train_batch_size; B*G/micro accumulation steps)"""
    max_new_tokens: int = 32
    """max completion length"""
    beta: float = 0.04
    """KL coefficient (both load a reference model when > 0)"""
    loss_type: str = "grpo"
    """loss aggregation for both (grpo, dapo, dr_grpo)"""
    lr: float = 1e-6
    """learning rate"""
    order: str = "rft,trl"
    """which runs, in which order (round 2, 4, .. run it reversed)"""
    rounds: int = 2
    """rounds of the runs: order A,B then B,A, ... (ABBA), so that neither trainer always runs first and gets
    the cold caches; the figures are medians over rounds (one round each: 1.12x and 1.56x on the same CPU)"""
    isolate: bool = False
    """run each trainer in a fresh subprocess instead (cleanest for CPU peak memory: resident memory a first
    run leaves behind is not charged to nor reused by the next)"""
    out: str = ""
    """write the figures as JSON here too"""


class PeakMemory:
    """Peak memory of a block: CUDA allocator peak, or sampled CPU resident set size above the start."""

    def __init__(self):
        self.cuda = torch.cuda.is_available()

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self):
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            self.start = self.peak = self._rss()
            self.running = True
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, self._rss())
            time.sleep(0.002)

    def __exit__(self, *exc):
        if self.cuda:
            self.bytes = torch.cuda.max_memory_allocated() - self.start
        else:
            self.running = False
            self.thread.join()
            self.bytes = self.peak - self.start


def run_rft(args: Args, model_path: str, data_path: str, workdir: Path) -> dict:
    """rft.main itself (the real script, in process); per-step times and tokens from its metrics.jsonl."""
    out = workdir / "rft"
    argv = ["--model", model_path, "--data", data_path, "--output_dir", str(out), "--max_steps", str(args.steps),
            "--batch_size", str(args.batch_size), "--num_generations", str(args.group_size),
            "--micro_batch_size", str(args.micro_batch_size), "--max_completion_length", str(args.max_new_tokens),
            "--beta", str(args.beta), "--loss_type", args.loss_type, "--lr", str(args.lr), "--optimizer", "adamw",
            "--eval_steps", "0", "--save_steps", "0", "--overwrite", "--log_completions", "0",
            "--gradient_checkpointing"]  # TRL runs with gradient_checkpointing=True too (below): like for like
    with PeakMemory() as mem:
        rft.main(argv)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in records if "reward" in r][1:]
    seconds = sum(r["time_generation"] + r["time_training"] for r in timed)
    tokens = sum(r["completion_length"] * args.batch_size * args.group_size for r in timed)
    return {"seconds_per_step": seconds / len(timed), "tokens_per_second": tokens / seconds,
            "generation_share": sum(r["time_generation"] for r in timed) / seconds,
            "peak_memory_mib": mem.bytes / 2 ** 20, "mean_completion_tokens": tokens / len(timed)}


def run_trl(args: Args, model_path: str, data_path: str, workdir: Path) -> dict:
    from datasets import Dataset
    from transformers import TrainerCallback
    try:
        from trl import GRPOConfig, GRPOTrainer
    except ImportError:
        common.fail("this bench compares against TRL, which is not a dependency of the kit: "
                    "pip install trl==1.16.0 (the version it was measured with), then rerun.")

    rows = common.load_rows(data_path, "train", required=("prompt", "answer", "images"))
    # TRL wants raw conversational prompts and applies the chat template (with the images) itself.
    train = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}], "images": r["images"],
                                "answer": r["answer"]} for r in rows])
    tokens = {"n": 0}

    def jigsaw_reward(completions, answer, completion_ids, **kwargs):
        tokens["n"] += sum(len(ids) for ids in completion_ids)
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return [jigsaw.jigsaw_reward(t, list(a))["reward"] for t, a in zip(texts, answer)]

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times, self.tokens = [], []

        def on_step_begin(self, *a, **k):
            self.t0, self.n0 = time.perf_counter(), tokens["n"]

        def on_step_end(self, *a, **k):
            self.times.append(time.perf_counter() - self.t0)
            self.tokens.append(tokens["n"] - self.n0)

    cuda = torch.cuda.is_available()
    sequences = args.batch_size * args.group_size
    config = GRPOConfig(
        output_dir=str(workdir / "trl"), max_steps=args.steps, learning_rate=args.lr, beta=args.beta,
        loss_type=args.loss_type, num_generations=args.group_size, max_completion_length=args.max_new_tokens,
        per_device_train_batch_size=args.micro_batch_size,
        gradient_accumulation_steps=sequences // args.micro_batch_size,  # one generation batch per step
        temperature=1.0, top_p=1.0, gradient_checkpointing=True, optim="adamw_torch", bf16=cuda,
        use_cpu=not cuda, report_to="none", save_strategy="no", logging_steps=1, seed=0,
        dataloader_num_workers=0, shuffle_dataset=True, disable_tqdm=True)
    timer = StepTimer()
    with PeakMemory() as mem:
        model, processor = common.load_model_and_processor(model_path, "float32")
        trainer = GRPOTrainer(model=model, reward_funcs=jigsaw_reward, args=config, train_dataset=train,
                              processing_class=processor, callbacks=[timer])
        trainer.train()
    times, toks = timer.times[1:], timer.tokens[1:]
    return {"seconds_per_step": sum(times) / len(times), "tokens_per_second": sum(toks) / sum(times),
            "peak_memory_mib": mem.bytes / 2 ** 20, "mean_completion_tokens": sum(toks) / len(toks)}


def run_isolated(args: Args, name: str, model_path: str, data_path: str, workdir: Path) -> dict:
    """One trainer, one round, in a fresh Python process running this script; its JSON comes back."""
    out = workdir / "result.json"
    workdir.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, __file__, "--model", model_path, "--data", data_path, "--order", name, "--rounds", "1",
            "--out", str(out)]
    for field in ("steps", "batch_size", "group_size", "micro_batch_size", "max_new_tokens", "beta", "loss_type",
                  "lr"):
        argv += [f"--{field}", str(getattr(args, field))]
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())[name]


def main(argv=None):
    args = common.parse_args(Args, __doc__, argv)
    if (args.batch_size * args.group_size) % args.micro_batch_size:
        common.fail("--micro_batch_size must divide batch_size * group_size (TRL's accumulation needs it).")
    workdir = Path(tempfile.mkdtemp(prefix="bench_rft_trl_"))
    model_path, data_path = args.model, args.data
    if not model_path:
        import toy
        model_path = str(toy.build_toy_model(str(workdir / "toy"), size="tiny", seed=0))
    if not data_path:
        data_path = str(workdir / "jigsaw")
        jigsaw.build_dataset(jigsaw.BuildArgs(source="procedural", grid="2x2", train=32, test=4, output_dir=data_path,
                                              image_size=56))
    if torch.cuda.is_available():
        # cuBLAS keeps a workspace per handle (forward thread, autograd's backward thread) allocated through the
        # caching allocator for the rest of the process: allocate them once here, so that whichever trainer runs
        # first is not charged ~tens of MiB the second one then gets for free.
        w = torch.randn(64, 64, device="cuda", requires_grad=True)
        for dtype in (torch.float32, torch.bfloat16):
            with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
                (w @ w).sum().backward()
        del w
    # Open the data once before measuring: the first open imports `datasets` and maps the files, which would
    # be charged to whichever trainer opens it first (rft.main opens it inside its measurement, TRL's run before).
    # Likewise load the model and processor once: the first processor load imports torchvision's image code
    # (~180 MiB resident on CPU, measured), a one-time library cost that is not the trainer's memory.
    # (With --isolate each child process does this itself.)
    if not args.isolate:
        common.load_rows(data_path, "train")
        common.load_model_and_processor(model_path, "float32")
        gc.collect()
    names = args.order.split(",")
    measured = {name: [] for name in names}
    for r in range(args.rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            if args.isolate:
                measured[name].append(run_isolated(args, name, model_path, data_path, workdir / f"{name}{r}"))
            else:
                torch.manual_seed(0)
                measured[name].append((run_rft if name == "rft" else run_trl)(args, model_path, data_path,
                                                                          workdir / f"{name}{r}"))
    results = {name: {key: statistics.median(run[key] for run in rs) for key in rs[0]} for name, rs in measured.items()}
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    print(f"\nGRPO step, {device}: model {model_path}, B={args.batch_size} G={args.group_size} "
          f"micro={args.micro_batch_size} max_new_tokens={args.max_new_tokens} beta={args.beta} "
          f"loss={args.loss_type}, {args.steps - 1} timed steps; medians over {args.rounds} round(s)"
          f"{', each run in its own process' if args.isolate else ''}")
    print(f"{'':6}{'s/step':>10}{'tokens/s':>12}{'peak MiB':>12}{'tokens/step':>14}")
    for name, r in results.items():
        print(f"{name:6}{r['seconds_per_step']:>10.3f}{r['tokens_per_second']:>12.1f}{r['peak_memory_mib']:>12.1f}"
              f"{r['mean_completion_tokens']:>14.1f}")
    if "rft" in results and "trl" in results:
        ratio = results["rft"]["tokens_per_second"] / results["trl"]["tokens_per_second"]
        memory = results["rft"]["peak_memory_mib"] / max(results["trl"]["peak_memory_mib"], 1e-9)
        results["throughput_ratio_rft_over_trl"] = ratio
        results["memory_ratio_rft_over_trl"] = memory
        print(f"throughput rft/trl: {ratio:.2f}x (target >= 1.5x); peak memory rft/trl: {memory:.2f}x")
    if args.out:
        files.write_json_atomic(args.out, {"device": device, "args": vars(args), **results})
    return results


if __name__ == "__main__":
    main()
