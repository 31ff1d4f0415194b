"""Supervised fine-tuning of Qwen2.5-VL on (images, prompt, target) rows: the SFT runs of the paper.

The loss is the cross-entropy of the target tokens only (prompt and padding masked), i.e. maximum likelihood
of the completion given the prompt. Every SFT variant of the paper is this script on a different data source (the
folders of the 3b preset's run; run_all.sh makes each):
    SFT-Non-Rea             --data runs/3b/data/jigsaw --prompt_column prompt_no_think \\
                            --completion_column target_non_rea
    SFT-Rea-4o / external   --data runs/3b/data/sources/rea_external          (built by rollout_sft.py)
    SFT-Rea-GRPO-Rollout    --data runs/3b/data/sources/rea_grpo_rollout      (built by rollout_sft.py)
    SFT-Rea-Self-Generated  --data runs/3b/data/sources/rea_self_generated    (built by rollout_sft.py)
The toy world's base model is also made with this script (on the toy prior-knowledge questions).

Run commands:
    # one GPU (Qwen2.5-VL-3B, fp32 master weights + bf16 autocast, 8-bit AdamW)
    python sft.py --model Qwen/Qwen2.5-VL-3B-Instruct --data runs/3b/data/jigsaw --prompt_column prompt_no_think \\
        --completion_column target_non_rea --output_dir runs/3b/sft_non_rea --max_steps 200 --optimizer adamw8bit \\
        --gradient_checkpointing --save_steps 50
    # several GPUs: the same script under accelerate: DDP, or FSDP2 with the shipped config (7B on 80 GB GPUs;
    # --batch_size is per process, and under FSDP the optimizer is torch AdamW whatever --optimizer says)
    accelerate launch --config_file configs/accelerate_fsdp2.yaml --num_processes 4 sft.py \\
        --model Qwen/Qwen2.5-VL-7B-Instruct --data runs/7b/data/jigsaw --batch_size 1 ...
    # memory plan before renting a GPU (no weights loaded)
    python sft.py --model Qwen/Qwen2.5-VL-7B-Instruct --dry_run --optimizer adamw8bit
    python sft.py --model Qwen/Qwen2.5-VL-7B-Instruct --dry_run --batch_size 1 --plan_processes 4   # per GPU, FSDP
On the CPU, after `bash run_all.sh` made the toy run (runs/toy/):
    # the toy base's first run, as run_all.sh's base stage runs it; after an interruption the same command
    # resumes (--resume), and other settings on the same folder are refused and named
    python sft.py --model runs/toy/toy/init --data runs/toy/toy/prior --split pretrain \\
        --output_dir runs/toy/base_pretrain --max_steps 200 --lr 1e-3 --warmup_ratio 0.05 --min_lr_ratio 0.1 \\
        --save_steps 200 --batch_size 8 --grad_accum 4 --sort_by_length --precision fp32 --optimizer adamw \\
        --min_pixels 3136 --max_pixels 12544 --resume
    # SFT-Non-Rea on the toy run's data, in a folder of its own
    python sft.py --model runs/toy/base/final --data runs/toy/data/jigsaw --prompt_column prompt_no_think \\
        --completion_column target_non_rea --output_dir /tmp/sft_non_rea --max_steps 60 --lr 1e-3 --save_steps 20
    # two CPU processes (a check of the distributed path without GPUs; `--cpu` would start only one)
    accelerate launch --multi_gpu --num_processes 2 sft.py --model runs/toy/toy/init --data runs/toy/toy/prior \\
        --split pretrain --output_dir /tmp/sft_2proc --max_steps 4

Outputs in --output_dir (runs.py's layout): run.json (settings), metrics.jsonl, checkpoint-N/ (model-only
snapshots every --save_steps, bf16 on a GPU), resume/ (the one resume state), final/ (save_pretrained).
"""
from __future__ import annotations

import contextlib
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

import common
import fsdp
import memory
import runs
import sequences


@dataclass
class Args:
    # --- model ---
    model: str = "Qwen/Qwen2.5-VL-3B-Instruct"
    """hub id or local save_pretrained folder of the model to fine-tune (the paper: Qwen2.5-VL-3B/7B-Instruct)"""
    precision: str = "auto"
    """auto (bf16_mixed on CUDA, fp32 on CPU) | bf16_mixed (fp32 master weights + bf16 autocast) | bf16 (pure
    bf16 weights: half the memory; updates of lr~1e-5..1e-6 mostly round to zero unless --optimizer
    adamw8bit_sr) | fp32"""
    attn_implementation: str = ""
    """attention kernel passed to from_pretrained (e.g. sdpa, flash_attention_2); empty = transformers' default"""
    min_pixels: int = 0
    """min pixels per image for the processor (0 = the processor's own setting)"""
    max_pixels: int = 0
    """max pixels per image; fixes the image-token count (Jigsaw-R1 style runs keep images small; 0 = processor's)"""
    freeze_vision_tower: bool = False
    """freeze the ViT blocks (the merger stays trainable unless --freeze_merger)"""
    freeze_merger: bool = False
    """freeze the vision-language merger (the MLP that maps patch features into the LLM)"""
    gradient_checkpointing: bool = False
    """recompute activations in backward (non-reentrant); needed for 7B on one 80 GB GPU"""
    # --- data ---
    data: str = "data/jigsaw"
    """a datasets folder (save_to_disk) or a .jsonl file with images, a prompt column and a target column"""
    split: str = "train"
    """split to train on when --data holds several"""
    prompt_column: str = "prompt"
    """column holding the user-turn text (images are put before it)"""
    completion_column: str = "completion"
    """column holding the assistant-turn target (the only tokens in the loss; TRL's prompt-completion naming)"""
    max_completion_length: int = 512
    """targets longer than this are cut (Jigsaw-R1's 512-token completions; prompts are never cut: image tokens
    must match the image)"""
    # --- optimisation ---
    max_steps: int = 0
    """optimizer steps; 0 = use --num_epochs"""
    num_epochs: float = 1.0
    """passes over the data when --max_steps is 0"""
    batch_size: int = 4
    """rows per micro-batch per process"""
    grad_accum: int = 1
    """micro-batches per optimizer step (effective batch = batch_size * grad_accum * processes)"""
    sort_by_length: bool = False
    """with --grad_accum > 1: sort the step's rows by token length before cutting them into micro-batches, so
    each pads to rows of a similar length. The step reads the same rows and its gradient is the same sum (the
    loss is normalised by the step's tokens); only the padding computed shrinks (toy base: a fifth of its rows
    are 3-4x longer than the rest)"""
    lr: float = 1e-5
    """peak learning rate (SFT of Qwen2.5-VL on this task is typically run at 1e-5: paper.md)"""
    min_lr_ratio: float = 0.0
    """cosine decays to this fraction of --lr"""
    warmup_ratio: float = 0.03
    """share of steps with linear warmup (TRL/HF SFT default range)"""
    weight_decay: float = 0.0
    """AdamW weight decay (TRL's SFTConfig default 0)"""
    max_grad_norm: float = 1.0
    """gradient clipping (HF Trainer default)"""
    optimizer: str = "adamw"
    """adamw (fp32 states, 8 B/param) | adamw8bit | paged_adamw8bit (bitsandbytes, 2 B/param) | adamw8bit_sr
    (torchao, 2 B/param, stochastic rounding for --precision bf16; requirements-torchao.txt)"""
    seed: int = 0
    """seed of data order, dropout and init of anything new"""
    # --- logging / saving ---
    output_dir: str = "runs/sft"
    """where run.json, metrics.jsonl, checkpoint-N/, resume/ and final/ go"""
    logging_steps: int = 1
    """write metrics.jsonl every N optimizer steps"""
    save_steps: int = 0
    """every N optimizer steps: a model-only snapshot checkpoint-N/ and the resume state (0 = only at the end)"""
    save_at: str = ""
    """extra model-only snapshots at these steps, comma-separated (e.g. 5,10,20: the early points of the
    accuracy/forgetting curve, where SFT climbs fastest)"""
    save_total_limit: int = 0
    """keep only the newest N snapshots (0 = keep all: evaluation along training and analyze.py read them)"""
    resume: bool = False
    """continue the run in --output_dir from its resume state (exact: weights, optimizer, schedule, RNG, data
    order); refused when the recorded settings differ"""
    overwrite: bool = False
    """start again in an --output_dir that already holds a run (removes that run's checkpoints and metrics)"""
    report_to: str = "none"
    """experiment tracking besides metrics.jsonl: none | tensorboard | wandb (HF Trainer's flag; off by default)"""
    dry_run: bool = False
    """print the parameter counts and memory plan for these options and exit (no weights loaded)"""
    plan_prompt_length: int = 512
    """prompt tokens (image + text) assumed by the --dry_run activation estimate (Jigsaw-R1: 512)"""
    plan_processes: int = 1
    """GPUs the --dry_run plan shards the model over with FSDP (accelerate launch --config_file
    configs/accelerate_fsdp2.yaml --num_processes N): the plan per GPU. 1: one GPU (DDP too: a whole copy each)"""


# Flags that do not change the trajectory: a --resume may change them (runs.prepare_run compares the rest).
OPERATIONAL = ("logging_steps", "save_steps", "save_at", "save_total_limit", "report_to", "dry_run",
               "plan_prompt_length", "plan_processes")
RANGES = {"max_steps": ">= 0", "num_epochs": "> 0", "batch_size": ">= 1", "grad_accum": ">= 1", "lr": "> 0",
          "min_lr_ratio": "[0, 1]", "warmup_ratio": "[0, 1]", "weight_decay": ">= 0", "max_grad_norm": "> 0",
          "max_completion_length": ">= 1", "logging_steps": ">= 1", "save_steps": ">= 0", "save_total_limit": ">= 0",
          "min_pixels": ">= 0", "max_pixels": ">= 0", "plan_prompt_length": ">= 1",
          "plan_processes": ">= 1"}


def check_args(args: Args) -> None:
    common.check_ranges(args, RANGES)
    common.check_attn_implementation(args.attn_implementation)
    common.check_optimizer(args.optimizer, args.precision)
    if args.max_pixels and args.min_pixels > args.max_pixels:
        common.fail(f"--min_pixels {args.min_pixels} is larger than --max_pixels {args.max_pixels}.")
    if args.sort_by_length and args.grad_accum == 1:
        print("[sft] note: --sort_by_length has nothing to sort with --grad_accum 1 (one micro-batch per step)",
              file=sys.stderr)


def main(argv=None):
    args = common.parse_args(Args, __doc__, argv)
    check_args(args)
    save_at = runs.parse_save_at(args.save_at)

    # ======================================================================================================
    # Config: precision. Pure bf16 weights lose most updates at lr 1e-5..1e-6 (bf16 keeps ~3 significant
    # digits and bitsandbytes' 8-bit optimizers do not round stochastically), so the default on GPU keeps fp32
    # master weights and runs the forward/backward under bf16 autocast (accelerate's mixed_precision="bf16").
    # ======================================================================================================
    precision = common.resolve_precision(args.precision, cuda=True if args.dry_run else None)
    mixed, load_dtype = common.PRECISIONS[precision]

    if args.dry_run:
        return memory.stage_plan(
            args.model, f"SFT memory plan: {args.model}, precision {precision}, optimizer {args.optimizer}, batch "
                        f"{args.batch_size} x ({args.plan_prompt_length} + {args.max_completion_length}) tokens, "
                        f"gradient checkpointing {args.gradient_checkpointing}", args.optimizer, precision,
            args.batch_size, args.plan_prompt_length + args.max_completion_length, args.max_completion_length,
            args.gradient_checkpointing, args.plan_processes, (args.freeze_vision_tower, args.freeze_merger))

    # ======================================================================================================
    # The output folder (writable, ours, locked: a second sft.py on it stops here) and the model folder
    # (complete weights), then the data: checked (columns, every image decoded) before any model is loaded
    # ======================================================================================================
    runs.claim_output_dir(args.output_dir, "sft.py", args.overwrite)
    common.check_model_path(args.model)
    dataset = common.load_rows(args.data, args.split, required=(args.prompt_column, args.completion_column),
                               verify_images=True)
    if len(dataset) == 0:
        common.fail(f"data {args.data} (split {args.split}) has no rows.")
    base_dir = Path(args.data).parent if Path(args.data).is_file() else None

    output_dir = Path(args.output_dir)
    accelerator = runs.make_accelerator(mixed, args.report_to, output_dir)
    resume_from = runs.prepare_run(accelerator, output_dir, "sft.py", asdict(args), args.resume, args.overwrite,
                                     OPERATIONAL)
    common.seed_everything(args.seed + accelerator.process_index)

    world, rank = accelerator.num_processes, accelerator.process_index
    rows_per_step = args.batch_size * args.grad_accum * world
    max_steps = args.max_steps or max(1, math.ceil(args.num_epochs * len(dataset) / rows_per_step))

    # ======================================================================================================
    # Model, optimizer, schedule
    # ======================================================================================================
    model, processor = common.load_model_and_processor(args.model, load_dtype, args.attn_implementation or None,
                                                       args.min_pixels or None, args.max_pixels or None,
                                                       str(accelerator.device))
    common.freeze_vision(model, args.freeze_vision_tower, args.freeze_merger)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    # A frozen vision tower needs no explicit no_grad: none of its inputs or weights require grad, so autograd
    # keeps none of its activations.
    trainable, frozen = common.count_parameters(model)
    optimizer = common.make_optimizer(model.parameters(), args.optimizer, args.lr, args.weight_decay,
                                      sharded=fsdp.is_sharded(accelerator), quiet=not accelerator.is_main_process)
    scheduler = common.warmup_cosine(optimizer, round(args.warmup_ratio * max_steps), max_steps, args.min_lr_ratio)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    # transformers checkpoints a layer only while the module is in training mode, and from_pretrained returns it
    # in eval mode: without this --gradient_checkpointing would silently do nothing.
    model.train()

    # Data position = global rows consumed; rank r of a micro-batch reads rows [position + r*B, position + (r+1)*B)
    # of the one seeded order (common.data_indices), so any position is recomputed on resume without replay.
    state = runs.start_or_resume(accelerator, resume_from, output_dir, args.resume, "sft")
    step, position = state["step"], state["data_position"]
    if args.report_to != "none":
        accelerator.init_trackers("sft", config={k: v for k, v in asdict(args).items() if isinstance(v, (int, float, str, bool))})
    logger = runs.MetricsLogger(output_dir / "metrics.jsonl", enabled=accelerator.is_main_process,
                                accelerator=accelerator)
    snapshot_dtype = runs.snapshot_dtype(precision)
    accelerator.print(f"[sft] {len(dataset)} rows, {trainable:,} trainable / {frozen:,} frozen parameters, "
                      f"{max_steps} steps of {rows_per_step} rows, precision {precision}, {world} process(es)"
                      + fsdp.sharding_note(accelerator, model))

    def row_length(row: dict) -> int:
        """--sort_by_length's key: text tokens (a row's image tokens are fixed by the pixel budget)."""
        return len(processor.tokenizer(row[args.prompt_column] + row[args.completion_column])["input_ids"])

    # ======================================================================================================
    # Loop: grad_accum micro-batches per optimizer step; loss = mean over the step's completion tokens
    # ======================================================================================================
    progress = tqdm(total=max_steps, initial=step, desc="sft", disable=not accelerator.is_main_process)
    while step < max_steps:
        started = time.time()
        step_rows = []   # this rank's rows of the step, one list per micro-batch
        for _ in range(args.grad_accum):
            indices = common.data_indices(len(dataset), args.seed, position + rank * args.batch_size, args.batch_size)
            position += args.batch_size * world
            step_rows.append([dataset[i] for i in indices])
        if args.sort_by_length and args.grad_accum > 1:
            flat = sorted((r for rows in step_rows for r in rows), key=row_length)
            step_rows = [flat[k * args.batch_size:(k + 1) * args.batch_size] for k in range(args.grad_accum)]
        micro_batches = [sequences.build_batch(
            processor, [r[args.prompt_column] for r in rows], [common.row_images(r, base_dir) for r in rows],
            completions=[r[args.completion_column] for r in rows], max_completion_tokens=args.max_completion_length)
            for rows in step_rows]
        # Normalise by the tokens of the whole step (not per micro-batch), so grad_accum=k equals one k-times
        # larger batch; summed across processes by the gradient all-reduce (which averages, hence * world).
        step_tokens = sum(int(b["completion_mask"].sum()) for b in micro_batches)
        step_tokens_all = int(accelerator.reduce(torch.tensor(step_tokens, device=accelerator.device), "sum"))
        loss_sum = 0.0
        for k, batch in enumerate(micro_batches):
            batch = sequences.to_device(batch, accelerator.device)
            sync = accelerator.no_sync(model) if k < len(micro_batches) - 1 else contextlib.nullcontext()
            with sync, accelerator.autocast():
                logprobs = sequences.completion_logprobs(model, batch)
                token_loss_sum = -(logprobs * batch["completion_mask"]).sum()
                loss = token_loss_sum * world / max(1, step_tokens_all)
                accelerator.backward(loss)
            loss_sum += float(token_loss_sum.detach())
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1

        loss_value = float(accelerator.reduce(torch.tensor(loss_sum, device=accelerator.device), "sum")) \
            / max(1, step_tokens_all)
        seconds = time.time() - started
        record = {"step": step, "loss": loss_value, "lr": scheduler.get_last_lr()[0],
                  "grad_norm": float(grad_norm), "tokens": step_tokens_all, "tokens_per_s": step_tokens_all / seconds,
                  "epoch": position / len(dataset),
                  "peak_memory_gib": torch.cuda.max_memory_allocated() / memory.GiB if torch.cuda.is_available() else None}
        if step % args.logging_steps == 0 or step == max_steps:
            logger.log(record)
        progress.update(1)
        progress.set_postfix(loss=f"{loss_value:.4f}", lr=f"{record['lr']:.2e}", tok_s=f"{record['tokens_per_s']:.0f}")
        if not math.isfinite(loss_value):
            common.fail(f"loss is {loss_value} at step {step}; lower --lr, or use --precision bf16_mixed/fp32. "
                        f"The last good checkpoint in {output_dir} is untouched.")
        snapshot, resume_due = runs.snapshot_due(step, max_steps, args.save_steps, save_at)
        if snapshot:
            runs.save_checkpoint(accelerator, model, processor, output_dir, step, snapshot_dtype,
                                 {"data_position": position} if resume_due else None,
                                 keep_snapshots=args.save_total_limit)
    progress.close()

    # ======================================================================================================
    # Save: the resume state of the last step (a rerun with --resume finds the run finished) and final/
    # (save_pretrained in the snapshots' dtype; it is the last step's snapshot, so no checkpoint-N/ copy of it)
    # ======================================================================================================
    final = runs.finish_run(accelerator, model, processor, output_dir, step, snapshot_dtype,
                            {"data_position": position},
                            {"rows_seen": position, "data": args.data, "completion_column": args.completion_column,
                             "model": args.model})
    accelerator.print(f"[sft] done: {step} steps; model in {final}")
    return final


if __name__ == "__main__":
    main()
