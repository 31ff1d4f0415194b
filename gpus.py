"""The GPU check: a preset's memory plan against the GPU this machine has, before anything is loaded.

run_all.sh runs `plan.py gpu` right after the preset is read (a card too small, or one torch cannot use, stops the
run and names the presets that fit), `plan.py gpu --choose` picks the default preset for the card found, and
`plan.py cards` prints every preset against every Colab GPU. The memory plan is the `--dry_run` formula
(memory.py) applied to the preset's own shapes; the costs come from plan.py.
"""
from __future__ import annotations

import re
import sys

import plan

SFT_MAX_COMPLETION_LENGTH = 512     # sft.py --max_completion_length's default (run_all.sh does not set it)
# Presets run_all.sh may choose on a GPU, in order of preference: the paper's experiment as defined first, then
# its pure-bf16 variant for 40 GB cards. 7b is never chosen for the user (presets/7b.env says what it needs).
CHOOSABLE_PRESETS = ("3b", "3b_40gb")
ADVISED_PRESETS = ("3b", "3b_40gb", "7b")
# Colab's GPUs (and the H200): GiB as nvidia-smi reports it (memory.GPU_CARDS), bf16 tensor cores (compute
# capability >= 8.0), and the time relative to the H100 the plan's constants come from. The time factor is an
# ESTIMATE from public specifications, not a measurement: 2/3 of the plan is decoding (memory-bound: H100 SXM
# 3.35 TB/s over the card's bandwidth) and 1/3 training (compute-bound: 989 dense bf16 TFLOPS over the card's).
# Bandwidth / dense bf16 TFLOPS: A100-40GB 1.555 / 312, A100-80GB 2.039 / 312, L4 0.300 / 121, RTX PRO 6000
# Blackwell 1.792 / ~500 (our reading of its datasheet), H200 4.8 / 989; the T4 has no bf16.
def _time_factor(bandwidth_tbs: float, tflops: float) -> float:
    return round(2 / 3 * 3.35 / bandwidth_tbs + 1 / 3 * 989 / tflops, 2)


COLAB_GPUS = (   # (name, GiB, bf16, time factor vs the plan's H100)
    ("T4", 15.0, False, None), ("L4", 22.49, True, _time_factor(0.300, 121)),
    ("A100-40GB", 40.0, True, _time_factor(1.555, 312)), ("A100-80GB", 80.0, True, _time_factor(2.039, 312)),
    ("H100", 79.65, True, 1.0), ("G4 (RTX PRO 6000)", 95.59, True, _time_factor(1.792, 500)),
    ("H200 (not on Colab)", 140.4, True, _time_factor(4.8, 989)))
# Cards without bf16 tensor cores (compute capability < 8.0), by name, for GPU_NAME without nvidia-smi.
NO_BF16_NAMES = ("T4", "V100", "P100", "P4", "K80", "M60", "RTX 20", "TITAN V", "GTX")
NO_BF16_WHY = ("has no bf16 tensor cores (compute capability {cc}): bf16 is emulated several times slower, and "
               "fp16 is no way out, since Qwen2-family models overflow fp16's range (activations above 65,504 turn "
               "into inf/NaN). What works on it: PRESET=toy (the whole experiment on the tiny model), and at most "
               "evaluating a 3B model (eval.py, bf16 emulated, slow); training a 3B/7B model does not.")


def nvidia_smi() -> list[dict]:
    """The NVIDIA GPUs the driver lists (nvidia-smi), whatever torch sees: name, memory_mib, driver,
    compute_capability, and cuda (the newest CUDA the driver runs, from nvidia-smi's header). [] without
    nvidia-smi or when it fails. The one reader of nvidia-smi (the GPU check, runs.environment)."""
    import shutil
    import subprocess
    if not shutil.which("nvidia-smi"):
        return []
    try:
        listed = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version,compute_cap",
                                 "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=30)
        header = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    if listed.returncode != 0:
        return []
    cuda = re.search(r"CUDA Version:\s*([0-9]+\.[0-9]+)", header)
    gpus = []
    for line in listed.stdout.splitlines():
        fields = [f.strip() for f in line.split(",")]
        if len(fields) < 3 or not fields[0]:
            continue
        try:
            memory = float(fields[1])
        except ValueError:
            memory = 0.0
        gpus.append({"name": fields[0], "memory_mib": memory, "driver": fields[2],
                     "compute_capability": fields[3] if len(fields) > 3 and fields[3] not in ("", "[N/A]") else None,
                     "cuda": cuda.group(1) if cuda else None})
    return gpus


def card_of(name: str, gib: float) -> tuple | None:
    """The COLAB_GPUS row of a GPU by its name as torch/nvidia-smi give it (None for a card not in the table)."""
    upper = name.upper()
    for row in COLAB_GPUS:
        key = {"A100-40GB": "A100", "A100-80GB": "A100", "G4 (RTX PRO 6000)": "RTX PRO 6000",
               "H200 (not on Colab)": "H200"}.get(row[0], row[0])
        if re.search(rf"\b{re.escape(key)}\b", upper) and (key != "A100" or (gib > 60) == (row[0] == "A100-80GB")):
            return row
    return None


def memory_peaks(settings: dict) -> dict:
    """GPU bytes of the preset's phases, by the formula of every --dry_run (memory.memory_plan_of_counts +
    memory.activation_plan): SFT (the sft_non_rea, sft_sources and toy base stages), GRPO (rft), and decoding
    (eval, sources and the KL sampling of analyze; bf16 weights + the KV cache of one decode call). Each value is
    a memory_plan dict; analyze's per-sample gradients are not modelled (ANALYZE_PROJ_DIM keeps them small)."""
    import memory
    import types
    s = settings
    config, _ = plan.model_config(s)
    text = config.get("text_config") or config
    counts = plan.count_params(config)
    trainable, frozen = counts["total"], 0   # run_all.sh trains every parameter (no preset freezes the tower)
    cfg = types.SimpleNamespace(**{k: text.get(k) for k in ("num_hidden_layers", "hidden_size", "vocab_size",
                                                             "num_attention_heads", "num_key_value_heads", "head_dim")})
    cfg.vocab_size = cfg.vocab_size or config.get("vocab_size")
    precision, optimizer = s.get("PRECISION", "bf16_mixed"), s.get("OPTIMIZER", "adamw8bit")
    precision = "bf16_mixed" if precision == "auto" else precision
    checkpointing = s.get("GRADIENT_CHECKPOINTING", "1") == "1"
    prompt = plan.prompt_tokens(s)
    sft_acts = memory.activation_plan(cfg, plan._i(s, "BATCH_SIZE", 4), prompt + SFT_MAX_COMPLETION_LENGTH,
                                      SFT_MAX_COMPLETION_LENGTH, checkpointing)
    group = plan._i(s, "RFT_BATCH", 4) * plan._i(s, "GROUP_SIZE", 8)
    cap = plan._i(s, "RFT_MAX_COMPLETION_LENGTH", 512)
    rft_acts = memory.activation_plan(cfg, min(plan._i(s, "RFT_MICRO_BATCH", 2), group), prompt + cap, cap, checkpointing,
                                      generation_sequences=group)
    beta = float(s.get("BETA") or 0.04)
    # decoding: the largest call of eval.py (a benchmark's image tokens + its cap), rollout_sft.py and analyze.py
    calls = [(plan._i(s, "ROLLOUT_BATCH_SIZE", 64), prompt + cap),
             (plan._i(s, "EVAL_BATCH_SIZE", 16), prompt + plan._i(s, "JIGSAW_MAX_COMPLETION_LENGTH", 512))]
    for name in [b for b in s.get("BENCHMARKS", "").split(",") if b]:
        image_tokens = plan.BENCHMARKS.get(name, (0, 600))[1]
        calls.append((plan._i(s, "EVAL_BATCH_SIZE", 16), image_tokens + 60 + plan.BENCH_DECODE_TOKENS.get(name, 128)))
    kv = max(memory.activation_plan(cfg, 1, length, 1, True, generation_sequences=n)["generation"] for n, length in calls)
    # sft.py and rft.py under LAUNCH with FSDP: per GPU, the states split over the processes plus the units gathered
    # for compute (two decoder layers and the embeddings), as `--dry_run --plan_processes N` plans them
    launch = plan.launcher(s)
    shards = launch["processes"] if launch and launch["fsdp"] else 1
    fsdp = {"shards": shards, "layer_params": counts["layer"], "end_params": counts["ends"]}
    peaks = {"sft": memory.memory_plan_of_counts(trainable, frozen, optimizer, precision,
                                                 activations_bytes=sft_acts["peak"], **fsdp),
             "rft": memory.memory_plan_of_counts(trainable, frozen, optimizer, precision, reference_model=beta != 0.0,
                                                 activations_bytes=rft_acts["peak"], **fsdp),
             "decode": memory.memory_plan_of_counts(0, counts["total"], optimizer, "bf16", activations_bytes=kv)}
    if s.get("ROLLOUT_BACKEND") == "vllm":
        peaks["rollout"] = vllm_rollout_peak(peaks["rft"])
    return peaks


# The share of the GPU the colocated vLLM engine takes while awake (rft.py's gpu_memory_utilization=0.3, TRL's
# colocate default); it sleeps (weights offloaded, KV cache freed) while the trainer runs.
VLLM_GPU_SHARE = 0.3


def vllm_rollout_peak(grpo: dict) -> dict:
    """GRPO's rollout phase with ROLLOUT_BACKEND=vllm, from GRPO's plan: the trainer's weights, optimizer states and
    reference model stay on the GPU (gradients are freed by zero_grad, no activations) while the engine holds
    VLLM_GPU_SHARE of the card, so the card must be at least states / (1 - share): the plan is that card size."""
    states = grpo["total"] - grpo["gradients"] - grpo["activations_estimate"]
    return {**grpo, "gradients": 0, "activations_estimate": states * VLLM_GPU_SHARE / (1 - VLLM_GPU_SHARE),
            "total": states / (1 - VLLM_GPU_SHARE)}


def needed_gib(peaks: dict) -> tuple[float, str]:
    """(GiB the preset needs with the plan's headroom, the phase that sets it)."""
    import memory
    phase = max(peaks, key=lambda k: peaks[k]["total"])
    return peaks[phase]["total"] * memory.MEMORY_HEADROOM / memory.GiB, phase


def find_gpu(environ: dict, probe_torch: bool = True) -> dict:
    """What the run will get: {"gpu": the GPU torch will use or None, "listed": what nvidia-smi lists}.
    GPU_MEMORY_GB (GiB) overrides the memory (GPU_NAME its name): to plan for another card, or where the
    memory is misread; it is also how the tests fake a card."""
    listed = nvidia_smi()
    gpu = None
    if (listed or probe_torch) and _torch_cuda():
        import torch
        props = torch.cuda.get_device_properties(0)
        gpu = {"name": props.name, "gib": props.total_memory / 1024 ** 3,
               "compute_capability": f"{props.major}.{props.minor}", "source": "torch",
               "driver": listed[0]["driver"] if listed else None, "cuda_driver": listed[0]["cuda"] if listed else None,
               "cuda_torch": torch.version.cuda}
    if environ.get("GPU_MEMORY_GB"):
        name = environ.get("GPU_NAME") or (gpu or {}).get("name") or "a GPU given by GPU_MEMORY_GB"
        cc = (gpu or {}).get("compute_capability") if not environ.get("GPU_NAME") else None
        gpu = {**(gpu or {}), "name": name, "gib": float(environ["GPU_MEMORY_GB"]), "source": "GPU_MEMORY_GB",
               "compute_capability": cc}
    return {"gpu": gpu, "listed": listed}


def _torch_cuda() -> bool:
    """torch.cuda.is_available() (its import costs ~2 s: a CPU preset on a machine whose nvidia-smi lists no
    GPU skips it)."""
    import torch
    return torch.cuda.is_available()


def has_bf16(gpu: dict) -> tuple[bool, str]:
    """(bf16 tensor cores?, the compute capability or '?'), from the capability, else from the card's name."""
    cc = gpu.get("compute_capability")
    if cc:
        return float(cc) >= 8.0, cc if float(cc) >= 8.0 else f"{cc} < 8.0"
    name = gpu.get("name", "").upper()
    bf16 = not any(n.upper() in name for n in NO_BF16_NAMES)
    return bf16, "8.0 or above by its name" if bf16 else "below 8.0 by its name"


# The CUDA builds of torch on its wheel index (download.pytorch.org/whl/cuXYZ), newest first: a driver runs
# a build whose CUDA version is at most the one nvidia-smi's header names.
TORCH_CUDA_BUILDS = ("13.0", "12.9", "12.8", "12.6", "12.4", "12.1", "11.8")


def torch_build_advice(listed: list[dict]) -> str:
    """Why torch sees no GPU although nvidia-smi lists one, and which torch build the driver runs."""
    import torch
    gpu = listed[0]
    driver_cuda = gpu.get("cuda")
    fits = [b for b in TORCH_CUDA_BUILDS if driver_cuda and tuple(map(int, b.split("."))) <=
            tuple(map(int, driver_cuda.split(".")))]
    build = f"cu{fits[0].replace('.', '')}" if fits else None
    built = torch.version.cuda
    lines = [f"nvidia-smi lists {gpu['name']} ({gpu['memory_mib'] / 1024:.1f} GiB, driver {gpu['driver']}, CUDA "
             f"{driver_cuda or '?'} at most), but torch {torch.__version__} sees no GPU "
             + (f"(it is built for CUDA {built}, newer than this driver runs)." if built else "(a CPU-only build).")]
    if build:
        lines.append(f"Install the torch build this driver runs: pip install --force-reinstall torch torchvision "
                     f"--index-url https://download.pytorch.org/whl/{build}")
    else:
        lines.append("This driver's CUDA version is unknown or older than any current torch build: update the driver.")
    lines.append("Do not install with `-c constraints.txt` on this machine: it pins the CUDA 13 build the tests ran "
                 "with, which needs driver 580 or newer. IGNORE_GPU_PLAN=1 runs anyway (on the CPU).")
    return " ".join(lines)


def advice(gib: float, exclude: str = "") -> str:
    """Which presets fit `gib` GiB (ADVISED_PRESETS' order), as a sentence that ends with the command to run."""
    fitting, needs = [], {}
    for name in ADVISED_PRESETS:
        if name != exclude and (plan.ROOT / "presets" / f"{name}.env").is_file():
            needs[name], _ = needed_gib(memory_peaks(plan.preset_settings(name)))
            if needs[name] <= gib:
                fitting.append(name)
    if fitting:
        return (f"Presets whose plan fits this GPU: {', '.join(fitting)} (PRESET={fitting[0]} bash run_all.sh; "
                "presets/README.md compares them).")
    smallest = min(needs, key=needs.get)
    return (f"No preset of the 3B/7B experiment fits {gib:.1f} GiB (the smallest, {smallest}, needs "
            f"{needs[smallest]:.1f} GiB). PRESET=toy runs the whole experiment on the tiny model; evaluating a "
            "3B model alone fits (eval.py, bf16 weights ~7 GiB + the KV cache).")


def gpu_check(settings: dict, preset: str, environ: dict, warn_only: bool = False) -> int:
    """run_all.sh's GPU check. Exit 2 (unless warn_only or IGNORE_GPU_PLAN=1) when nvidia-smi lists a GPU torch
    cannot use, when a preset's plan does not fit the GPU found (naming presets that do), when a preset trains
    a real model in bf16 on a card without bf16. Without any GPU, a preset that trains a >1B model gets a note, not
    an error."""
    gpu_preset = settings.get("PLAN_DEVICE", "gpu") == "gpu"
    found = find_gpu(environ, probe_torch=gpu_preset)
    gpu, listed = found["gpu"], found["listed"]
    ignore = environ.get("IGNORE_GPU_PLAN") == "1"
    problems = []
    if listed and gpu is None:
        problems.append(torch_build_advice(listed))
    params = lambda: plan.count_params(plan.model_config(settings)[0])["total"]   # noqa: E731 (the toy's builds a tokenizer)
    if gpu is not None:
        bf16, cc = has_bf16(gpu)
        driver = f", driver {gpu['driver']}, CUDA {gpu.get('cuda_driver') or '?'} (torch built for " \
                 f"{gpu.get('cuda_torch')})" if gpu.get("driver") else ""
        print(f"[run_all] GPU: {gpu['name']}, {gpu['gib']:.1f} GiB ({gpu['source']}), compute capability {cc}{driver}")
        if gpu_preset:
            import memory
            peaks = memory_peaks(settings)
            need, phase = needed_gib(peaks)
            print(f"[run_all] memory plan of preset {preset}: " + ", ".join(
                f"{k} {v['total'] / memory.GiB:.1f} GiB" for k, v in peaks.items())
                + f"; x{memory.MEMORY_HEADROOM} headroom -> {need:.1f} GiB needed ({phase}), {gpu['gib']:.1f} GiB here")
            if not bf16 and settings.get("PRECISION") in ("bf16", "bf16_mixed") and params() > 1e8:
                problems.append(f"{gpu['name']} " + NO_BF16_WHY.format(cc=cc))
            elif need > gpu["gib"]:
                problems.append(f"preset {preset} needs {need:.1f} GiB of GPU memory ({phase}, with "
                                f"{memory.MEMORY_HEADROOM}x headroom) and {gpu['name']} has {gpu['gib']:.1f} GiB: it "
                                f"would run out of memory. " + advice(gpu["gib"], exclude=preset))
    elif gpu_preset and not listed and (count := params()) > 1e9:
        print(f"[run_all] note: no CUDA GPU found; preset {preset} trains a {count / 1e9:.1f}B-parameter model, "
              "which on a CPU takes weeks (PRESET=toy runs the experiment on the CPU)", file=sys.stderr)
    if not problems:
        return 0
    for problem in problems:
        print(("warning: " if warn_only or ignore else "error: ") + problem, file=sys.stderr)
    if ignore and not warn_only:
        print("[run_all] IGNORE_GPU_PLAN=1: running anyway", file=sys.stderr)
    return 0 if warn_only or ignore else 2


def choose_preset(environ: dict) -> tuple[str, str]:
    """(the preset run_all.sh runs when PRESET is not set, why): the first CHOOSABLE preset whose plan fits the
    GPU found, else toy (no GPU, no bf16, or too little memory for any)."""
    found = find_gpu(environ)
    gpu = found["gpu"]
    if gpu is None:
        return "toy", "no CUDA GPU: preset toy (tiny Qwen2.5-VL built locally, offline, on the CPU)"
    bf16, cc = has_bf16(gpu)
    label = f"{gpu['name']} ({gpu['gib']:.1f} GiB)"
    if not bf16:
        return "toy", f"{label} " + NO_BF16_WHY.format(cc=cc) + " Preset toy."
    for name in CHOOSABLE_PRESETS:
        need, _ = needed_gib(memory_peaks(plan.preset_settings(name)))
        if need <= gpu["gib"]:
            return name, f"CUDA GPU {label}: preset {name} (its plan needs {need:.1f} GiB)"
    return "toy", (f"CUDA GPU {label}: no preset of the 3B experiment fits it ({name} needs {need:.1f} GiB): "
                   "preset toy")


def cards_table(presets: list[str]) -> str:
    """Every preset against every card of COLAB_GPUS: memory verdict and GPU-hours (the plan's H100 hours x the
    card's estimated time factor)."""
    header = "| preset | needs (GiB, with headroom) | H100 plan (GPU-h) | " + " | ".join(g[0] for g in COLAB_GPUS) + " |"
    lines = [header, "|" + "---|" * (3 + len(COLAB_GPUS))]
    for name in presets:
        settings = plan.preset_settings(name)
        if settings.get("PLAN_DEVICE") != "gpu":
            continue
        need, phase = needed_gib(memory_peaks(settings))
        hours = sum(r["seconds"] for r in plan.plan(settings, list(plan.experiment_stages()))["rows"].values()) / 3600
        cells = []
        for card, gib, bf16, factor in COLAB_GPUS:
            if not bf16:
                cells.append("no (no bf16)")
            elif need > gib:
                cells.append("no (memory)")
            else:
                cells.append(f"yes, ~{hours * factor:.0f} h")
        launch = plan.launcher(settings)
        label = f"{name} ({launch['processes']} GPUs; per GPU, hours of all)" if launch and launch["processes"] > 1 else name
        lines.append(f"| {label} | {need:.1f} ({phase}) | {hours:.1f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
