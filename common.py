"""What every stage does the same way before its own algorithm starts: arguments, errors and range checks,
seeding, precision, model/processor loading, the optimizer and schedule, data loading with its seeded order,
and the Pearson correlation analyze.py and report.py both report.

Every stage script (sft.py, rft.py, rollout_sft.py, eval.py, analyze.py) shows its own algorithm top to bottom;
only what must be identical across stages lives in the shared modules, split by concept:
    common.py      this file
    sequences.py   batches (prompt + completion layout), per-token log-probs, the decode loop
    runs.py        the run folder's life cycle: markers, snapshots, resume, metrics
    files.py       atomic writes, shards, one writer per folder, a full disk
    fsdp.py        FSDP2 through accelerate
    memory.py      the memory plan of --dry_run and of plan.py's GPU check
    jigsaw.py      the task itself (puzzles, prompts, answer parsing, rewards)
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import json
import math
import os
import random
import sys
import textwrap
from pathlib import Path

import torch

# ----------------------------------------------------------------------------------------------------------
# Arguments: a dataclass whose field docstrings are the --help (cleanRL style, without extra dependencies)
# ----------------------------------------------------------------------------------------------------------


def _field_docs(cls) -> dict[str, str]:
    """Read the string literal under each dataclass field from the source (they are not kept at runtime)."""
    docs = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body
        for node, nxt in zip(body, body[1:] + [None]):
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(nxt, ast.Expr) \
                    and isinstance(getattr(nxt, "value", None), ast.Constant) and isinstance(nxt.value.value, str):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def parse_args(cls, description: str | None = None, argv=None):
    """Build an argparse parser from a dataclass: `--name value` per field, `--flag` / `--no_flag` for bools
    (the --no_ form is accepted but kept out of --help to keep it short)."""
    docs = _field_docs(cls)
    # allow_abbrev=False: a retired flag such as --out must fail, not silently match --output_dir by its prefix.
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    hints = {f.name: f.type for f in dataclasses.fields(cls)}
    try:
        import typing
        hints = typing.get_type_hints(cls)
    except Exception:
        pass
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        help_text = f"{docs.get(f.name, '')} (default: {default!r})".replace("%", "%%")
        hint = hints.get(f.name, str)
        args = typing.get_args(hint)
        base = next((a for a in args if a is not type(None)), hint) if args else hint
        if base is bool:
            parser.add_argument(f"--{f.name}", action="store_true", default=default, help=help_text)
            parser.add_argument(f"--no_{f.name}", f"--no-{f.name}", dest=f.name, action="store_false",
                                help=argparse.SUPPRESS)
        elif base in (int, float, str):
            parser.add_argument(f"--{f.name}", type=base, default=default, help=help_text)
        else:  # lists and anything else: a comma-separated string the stage parses itself
            parser.add_argument(f"--{f.name}", type=str, default=default, help=help_text)
    namespace = parser.parse_args(argv)
    return cls(**vars(namespace))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np
        np.random.seed(seed)
    except ImportError:
        pass


def fail(message: str) -> None:
    """Stop with a clear message (no traceback) before any GPU time is spent."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


# ----------------------------------------------------------------------------------------------------------
# Model and processor
# ----------------------------------------------------------------------------------------------------------
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


# --precision of every training stage -> (accelerate mixed_precision, dtype the weights are loaded in).
# bf16_mixed: fp32 master weights + bf16 autocast. Pure bf16 weights lose most updates at lr 1e-5..1e-6 (bf16
# keeps ~3 significant digits and bitsandbytes' 8-bit optimizers do not round stochastically), so it is the
# default on a GPU; bf16 halves weight/gradient memory for those who accept that.
PRECISIONS = {"bf16_mixed": ("bf16", "float32"), "bf16": ("no", "bfloat16"), "fp32": ("no", "float32")}


def resolve_precision(name: str, cuda: bool | None = None) -> str:
    """'auto' -> bf16_mixed on CUDA, fp32 on CPU (pass cuda=True to plan for a GPU from a CPU machine)."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    name = {"amp_bf16": "bf16_mixed"}.get(name, name)
    if name == "auto":
        name = "bf16_mixed" if cuda else "fp32"
    if name not in PRECISIONS:
        fail(f"--precision {name} unknown; choose auto, {', '.join(PRECISIONS)}.")
    return name


def resolve_dtype(name: str, device: str, flag: str = "--dtype") -> str:
    """Dtype of a model that is only run, never trained (evaluation, sampling, the GRPO reference): 'auto' is
    bfloat16 on CUDA (frozen weights have no rounding trap) and float32 on the CPU."""
    dtype = ("bfloat16" if str(device).startswith("cuda") else "float32") if name == "auto" else name
    if dtype not in DTYPES:
        fail(f"{flag} {name} unknown; choose auto, {', '.join(DTYPES)}.")
    return dtype


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def check_model_path(name_or_path: str, what: str = "--model") -> None:
    """A local-looking path that does not exist is a typo, not a hub id: say so before loading anything."""
    looks_local = name_or_path.startswith((".", "/", "~")) or os.sep in name_or_path.strip("/").split("/", 1)[-1] \
        or name_or_path.count("/") != 1
    if looks_local and not Path(name_or_path).expanduser().exists():
        fail(f"{what} {name_or_path}: no such folder. Give a hub id (e.g. Qwen/Qwen2.5-VL-3B-Instruct) or the "
             "folder of a checkpoint saved with save_pretrained (e.g. runs/toy/base).")
    if Path(name_or_path).is_dir() and not (Path(name_or_path) / "config.json").exists():
        fail(f"{what} {name_or_path}: folder has no config.json; point at a save_pretrained folder "
             "(a training checkpoint's final/ or the base model folder).")
    if Path(name_or_path).is_dir():
        check_weights(Path(name_or_path), what)


def check_weights(folder: Path, what: str = "--model") -> None:
    """A model folder holds complete safetensors weights: model.safetensors, or every shard its index names,
    each with a readable header whose tensors end exactly where the file does (a copy cut short, a download
    interrupted). Reads the headers only (kilobytes, however large the model), before anything is loaded."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            fail(f"{what} {folder}: {index.name} cannot be read ({err.__class__.__name__}); copy the model folder "
                 "again.")
    elif (folder / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        others = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt")
                        or p.name.endswith(".safetensors"))
        fail(f"{what} {folder}: no weights (no model.safetensors or model.safetensors.index.json"
             + (f"; it holds {others[:4]}, and this kit loads safetensors only: re-save the model with "
                "save_pretrained(..., safe_serialization=True)" if others else
                ": a folder with the config alone, or a save that did not finish") + "). Point at a complete "
             "save_pretrained folder, or copy the model again.")
    for name in files:
        check_safetensors(folder / name, what)


def check_safetensors(path: Path, what: str = "--model") -> None:
    """The safetensors layout (an 8-byte little-endian header length, a JSON header, then the tensors' bytes):
    the header parses and the last tensor ends at the end of the file."""
    if not path.exists():
        fail(f"{what} {path.parent}: {path.name} is missing (the index names it); copy the model folder again.")
    size = path.stat().st_size
    problem = None
    try:
        with path.open("rb") as f:
            head = f.read(8)
            length = int.from_bytes(head, "little") if len(head) == 8 else None
            if length is None or length > size - 8 or length > 100 << 20:
                problem = f"its header is cut short ({size} bytes in all)"
            else:
                header = json.loads(f.read(length))
                ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
                expected = 8 + length + max(ends, default=0)
                if expected != size:
                    problem = (f"it holds {size:,} bytes where its header says {expected:,}"
                               + (" (truncated)" if size < expected else ""))
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError) as err:
        problem = f"its header cannot be read ({err.__class__.__name__})"
    if problem:
        fail(f"{what} {path.parent}: {path.name} is not a complete safetensors file: {problem}. Copy or download "
             "the model again (or point at another checkpoint).")


def check_attn_implementation(name: str | None, flag: str = "--attn_implementation") -> None:
    """An attention kernel transformers knows (eager, sdpa, flash_attention_N, flex_attention; or a hub kernel
    org/name), and for flash attention the package installed: otherwise from_pretrained fails after the data
    were read, with a ValueError naming a `attn_implementation=` keyword the user never typed."""
    if not name or "/" in name:  # empty: transformers' default (sdpa); org/name: a hub kernel transformers fetches
        return
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    valid = ["eager"] + [k for k in ALL_ATTENTION_FUNCTIONS.valid_keys() if "|" not in k]
    if name not in valid:
        fail(f"{flag} {name} unknown; choose one of {', '.join(valid)} (or leave it empty for transformers' "
             "default, sdpa).")
    version = name[len("flash_attention_"):] if name.startswith("flash_attention_") else None
    if version:
        import transformers.utils as tu
        available = getattr(tu, f"is_flash_attn_{version}_available", lambda: False)
        if not available():
            fail(f"{flag} {name} needs the flash-attn {version} package and a CUDA GPU it supports, which this "
                 "machine lacks; install it or use sdpa.")


def load_processor(name_or_path: str, min_pixels: int | None = None, max_pixels: int | None = None):
    """AutoProcessor with fixed min/max pixels and LEFT padding (generation with batch > 1 needs it)."""
    from transformers import AutoProcessor
    try:
        processor = AutoProcessor.from_pretrained(name_or_path)
    except OSError as err:
        fail(f"no processor could be loaded from {name_or_path} ({err}). A checkpoint folder must hold the "
             "processor files (saved by processor.save_pretrained next to the model).")
    if min_pixels is not None or max_pixels is not None:
        size = dict(processor.image_processor.size)
        if min_pixels is not None:
            size["shortest_edge"] = min_pixels
        if max_pixels is not None:
            size["longest_edge"] = max_pixels
        processor.image_processor.size = size
    processor.tokenizer.padding_side = "left"
    return processor


def load_model(name_or_path: str, dtype: str = "float32", attn_implementation: str | None = None,
               device: str | None = None):
    """AutoModelForImageTextToText by hub id or local path; safetensors only, no remote code.

    With a device, the weights stream from the safetensors files straight onto it (device_map={"": device}):
    loading to the CPU first and then moving would hold the whole model in host RAM, 15 GB for 3B in fp32 and
    33 GB for 7B, more than a Colab VM (12.7 GB) or many rented boxes have."""
    from transformers import AutoModelForImageTextToText
    kwargs = {"dtype": DTYPES[dtype], "use_safetensors": True}
    if attn_implementation:
        check_attn_implementation(attn_implementation)
        kwargs["attn_implementation"] = attn_implementation
    if device:
        kwargs["device_map"] = {"": str(device)}
    try:
        return AutoModelForImageTextToText.from_pretrained(name_or_path, **kwargs)
    except (OSError, ValueError, ImportError) as err:  # what check_model_path cannot see: a hub id offline, ...
        fail(f"model {name_or_path} could not be loaded: {err.__class__.__name__}: {str(err)[:400]}. Check the "
             "path or hub id (offline: a local save_pretrained folder), and that its weights are complete.")


def load_model_and_processor(name_or_path: str, dtype: str = "float32", attn_implementation: str | None = None,
                             min_pixels: int | None = None, max_pixels: int | None = None,
                             device: str | None = None):
    check_model_path(name_or_path)
    processor = load_processor(name_or_path, min_pixels, max_pixels)
    model = load_model(name_or_path, dtype, attn_implementation, device)
    return model, processor


def vision_modules(model) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(vision tower without merger, merger) of a Qwen2.5-VL model, wherever transformers puts them."""
    visual = model.model.visual if hasattr(model, "model") and hasattr(model.model, "visual") else model.visual
    return visual, visual.merger


def freeze_vision(model, freeze_tower: bool, freeze_merger: bool) -> None:
    visual, merger = vision_modules(model)
    if freeze_tower:
        for name, param in visual.named_parameters():
            if not name.startswith("merger."):
                param.requires_grad_(False)
    if freeze_merger:
        for param in merger.parameters():
            param.requires_grad_(False)


def count_parameters(model) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total - trainable


# ----------------------------------------------------------------------------------------------------------
# Optimizers and schedules
# ----------------------------------------------------------------------------------------------------------
# The optimizers, with their bytes of state per trainable parameter (the memory plan): fp32 m and v, or 8-bit m
# and v (block-wise scales add ~1%).
OPTIMIZER_STATE_BYTES = {"adamw": 8, "adamw8bit": 2, "paged_adamw8bit": 2, "adamw8bit_sr": 2}
OPTIMIZERS = tuple(OPTIMIZER_STATE_BYTES)
TORCHAO_HINT = "pip install -r requirements-torchao.txt"


def make_optimizer(params, name: str, lr: float, weight_decay: float = 0.0, betas=(0.9, 0.999), eps: float = 1e-8,
                   sharded: bool = False, quiet: bool = False):
    """torch AdamW, bitsandbytes AdamW8bit / PagedAdamW8bit (2 bytes of state per parameter instead of 8), or
    adamw8bit_sr: torchao's AdamW8bit with bf16 stochastic rounding, for pure bf16 weights (--precision bf16).

    Why stochastic rounding: a bf16 weight near 0.02 has a spacing of 2^-13 ~ 1.2e-4 between representable
    values, so an AdamW update of ~lr = 1e-6 rounds back to the same weight every step and training does
    nothing. torchao computes the update in fp32 and writes it back rounded up or down at random with
    probabilities that make the expected written value equal the fp32 result, so many small updates add up in
    expectation (tests/test_common.py measures it over 1,000 steps). bitsandbytes rounds to nearest.

    sharded (FSDP, fsdp.is_sharded): torch AdamW whatever `name` says, with a message (unless quiet). FSDP's
    parameters are DTensor shards; bitsandbytes 0.50's 8-bit AdamW fails at its first step on them ("got mixed
    torch.Tensor and DTensor"), and even a version that stepped would keep its quantised states as plain tensors,
    which the sharded resume state (torch.distributed.checkpoint) would save as if every rank held the same ones.
    torch AdamW's states are DTensors like the parameters: sharded, saved and restored per rank."""
    params = [p for p in params if p.requires_grad]
    if sharded and name != "adamw":
        if not quiet:
            print(f"[optimizer] --optimizer {name} does not work on FSDP's sharded parameters (DTensor); using torch "
                  "AdamW (fp32 states, 8 B/param, sharded over the processes like the weights)", flush=True)
        name = "adamw"
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=betas, eps=eps)
    if name == "adamw8bit_sr":
        try:
            from torchao.optim import AdamW8bit
        except ImportError:
            fail(f"--optimizer adamw8bit_sr needs torchao ({TORCHAO_HINT}), or use --optimizer adamw8bit with "
                 "--precision bf16_mixed (fp32 master weights).")
        if any(p.dtype != torch.bfloat16 for p in params):
            fail("--optimizer adamw8bit_sr rounds stochastically to bf16 and needs bf16 weights (--precision bf16); "
                 "with fp32 weights use adamw8bit.")
        return AdamW8bit(params, lr=lr, weight_decay=weight_decay, betas=betas, eps=eps, bf16_stochastic_round=True)
    if name in ("adamw8bit", "paged_adamw8bit"):
        try:
            import bitsandbytes as bnb
        except ImportError:
            fail(f"--optimizer {name} needs bitsandbytes (pip install bitsandbytes), or use --optimizer adamw.")
        klass = bnb.optim.AdamW8bit if name == "adamw8bit" else bnb.optim.PagedAdamW8bit
        return klass(params, lr=lr, weight_decay=weight_decay, betas=betas, eps=eps)
    fail(f"--optimizer {name} unknown; choose one of {', '.join(OPTIMIZERS)}.")


def check_optimizer(name: str, precision: str) -> None:
    """Before any model is loaded: the optimizer exists, its package is installed, and it suits the precision."""
    import importlib.util
    if name not in OPTIMIZERS:
        fail(f"--optimizer {name} unknown; choose one of {', '.join(OPTIMIZERS)}.")
    if name == "adamw8bit_sr":
        if importlib.util.find_spec("torchao") is None:
            fail(f"--optimizer adamw8bit_sr needs torchao, which is not installed: {TORCHAO_HINT} (optional, "
                 "for the pure-bf16 presets), or use --optimizer adamw8bit with --precision bf16_mixed.")
        if precision != "bf16":
            fail(f"--optimizer adamw8bit_sr is for pure bf16 weights: use it with --precision bf16 (got {precision}).")
    elif precision == "bf16":
        print(f"note: --precision bf16 with --optimizer {name}: updates smaller than bf16's spacing (lr ~1e-6) round "
              "to nothing; --optimizer adamw8bit_sr rounds stochastically (requirements-torchao.txt).", file=sys.stderr)


def warmup_cosine(optimizer, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0):
    """Linear warmup then cosine decay to min_lr_ratio * lr (the usual TRL/HF 'cosine' schedule)."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ----------------------------------------------------------------------------------------------------------
# Range checks of numeric flags: one table per stage, one message style, exit 2 before any model is loaded
# ----------------------------------------------------------------------------------------------------------
def check_ranges(args, ranges: dict[str, str]) -> None:
    """ranges: flag name -> '>= 1' | '> 0' | '[0, 1]' | '(0, 1]' ... ; None values (optional flags) pass.

    Example: check_ranges(args, {"lr": "> 0", "warmup_ratio": "[0, 1]"}) stops a run given --lr -1 with
    'error: --lr must be > 0 (got -1.0)'."""
    import experiment
    for name, spec in ranges.items():
        value = getattr(args, name)
        if value is not None and not experiment.in_range(value, spec):
            fail(f"--{name} must be {spec.replace(' ', '')} (got {value}).")


# ----------------------------------------------------------------------------------------------------------
# Data sets
# ----------------------------------------------------------------------------------------------------------
def check_jsonl(path) -> None:
    """Every non-empty line of a JSONL file is a JSON object; a broken one is named by its line number (before
    datasets' own reader fails with a parser traceback, or after hours, when training reaches that row)."""
    rows = 0
    with Path(path).open("rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                fail(f"data {path} line {number}: not UTF-8 text (byte {err.start} of the line); JSONL data is UTF-8. "
                     "Fix or remove that line.")
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                fail(f"data {path} line {number}: not valid JSON ({err.msg} at column {err.colno}). Fix or remove "
                     "that line.")
            if not isinstance(record, dict):
                fail(f"data {path} line {number}: expected a JSON object with the data set's columns.")
            rows += 1
    if not rows:
        fail(f"data {path}: no rows (an empty JSONL file); write one JSON object per line.")


def load_rows(path: str, split: str | None = None, required: tuple[str, ...] = (), verify_images: bool = False):
    """A `datasets` folder (save_to_disk; a DatasetDict needs `split`) or a JSONL file, with its columns checked
    before any model is loaded (and, with verify_images, every image decoded: see check_images)."""
    from datasets import load_dataset
    p = Path(path)
    if not p.exists():
        fail(f"data {path}: no such file or folder. Build one with `python jigsaw.py --output_dir {path}` or point "
             "--data at a save_to_disk folder or a .jsonl file.")
    if p.is_file():
        if p.suffix not in (".jsonl", ".json"):
            fail(f"data {path}: expected a .jsonl file or a save_to_disk folder.")
        if p.suffix == ".jsonl":
            check_jsonl(p)
        dataset = load_dataset("json", data_files=str(p), split="train")
    else:
        dataset = load_saved(p, split, f"data {path}")
    missing = [c for c in required if c not in dataset.column_names]
    if missing:
        fail(f"data {path}: missing column(s) {missing}; it has {dataset.column_names}. Pass the right "
             "--prompt_column/--completion_column, or rebuild the data set.")
    if verify_images:
        check_images(dataset, path)
    return dataset


def load_saved(path, split: str | None, label: str, split_hint: str = "choose one with --split"):
    """One split of a save_to_disk folder (a DatasetDict; a single Dataset folder is returned whole), opened
    alone: datasets cannot open a folder in which any split has no rows (IndexError in concat_tables), and
    the other splits are not needed. An empty split, or a folder datasets cannot read, is an error line naming
    `label`."""
    from datasets import load_from_disk
    path = Path(path)
    folder = path
    if (path / "dataset_dict.json").exists():
        try:
            splits = list(json.loads((path / "dataset_dict.json").read_text())["splits"])
        except (OSError, ValueError, KeyError, TypeError) as err:
            fail(f"{label}: dataset_dict.json cannot be read ({err.__class__.__name__}); rebuild the data set.")
        if split is None or split not in splits:
            fail(f"{label} holds splits {splits}; {split_hint}.")
        folder = path / split
    try:
        files = json.loads((folder / "state.json").read_text()).get("_data_files")
    except (OSError, ValueError, AttributeError):
        files = None
    if files == []:
        fail(f"{label}{f' split {split}' if folder != path else ''} has no rows; rebuild it (e.g. jigsaw.py with "
             "--train/--test of at least 1), or use another split.")
    try:
        return load_from_disk(str(folder))
    except Exception as err:  # noqa: BLE001 - datasets raises many types for a folder it cannot read
        fail(f"{label}: not a readable save_to_disk folder ({err.__class__.__name__}: {str(err)[:200]}). Rebuild "
             "it, or point at a save_to_disk folder or a .jsonl file.")


def check_images(dataset, path) -> None:
    """Decode every image of a data set once, when it is opened, and name the row and file of the first broken
    one: a truncated PNG found when training reaches its row crashes the run after the GPU time was spent (and
    again at the same row after a resume)."""
    from datasets import Image as ImageFeature, List
    from PIL import Image
    import io
    column = "images" if "images" in dataset.column_names else "image" if "image" in dataset.column_names else None
    if column is None:
        return
    feature = dataset.features[column]
    raw = dataset
    if isinstance(feature, List) and isinstance(feature.feature, ImageFeature):
        raw = dataset.cast_column(column, List(ImageFeature(decode=False)))
    elif isinstance(feature, ImageFeature):
        raw = dataset.cast_column(column, ImageFeature(decode=False))
    base_dir = Path(path).parent if Path(path).is_file() else Path(".")
    ids = dataset["id"] if "id" in dataset.column_names else list(range(len(dataset)))
    for index, (row_id, value) in enumerate(zip(ids, raw[column])):
        for item in (value if isinstance(value, list) else [value]):
            if item is None:
                continue
            where = item.get("path") if isinstance(item, dict) else item
            try:
                if isinstance(item, dict) and item.get("bytes") is not None:
                    image = Image.open(io.BytesIO(item["bytes"]))
                else:
                    image = Image.open(base_dir / str(where))
                image.load()
            except Exception as err:  # PIL raises many types for truncated/corrupt files
                fail(f"data {path}: the image of row {index} (id {row_id}{', file ' + str(where) if where else ''}) "
                     f"cannot be decoded ({err.__class__.__name__}: {err}). Rebuild the data set or remove that row; "
                     "nothing was trained yet.")


def read_json(path, fix: str = "", expect: type | None = dict):
    """A JSON file a stage wrote, or an error line naming it and the fix (`fix`): unreadable, not UTF-8 text,
    not JSON, or (with `expect`) not the JSON type the stage writes. Never a traceback, never a silent None."""
    path = Path(path)
    try:
        value = json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        fail(f"{path}: no such file. {fix}")
    except UnicodeDecodeError as err:
        fail(f"{path}: not UTF-8 text (byte {err.start} is 0x{err.object[err.start]:02x}), so not a JSON file a "
             f"stage wrote. {fix}")
    except json.JSONDecodeError as err:
        fail(f"{path}: not valid JSON ({err.msg} at line {err.lineno}, column {err.colno}). {fix}")
    except OSError as err:
        fail(f"{path}: cannot be read ({err.strerror or err}). {fix}")
    if expect is not None and not isinstance(value, expect):
        fail(f"{path}: holds a JSON {type(value).__name__}, not the {expect.__name__} a stage writes. {fix}")
    return value


def row_images(row: dict, base_dir: str | Path | None = None) -> list:
    """The images of a row: column `images` (list) or `image` (one), as RGB PIL images. In JSONL data an
    image may be a file path, relative to the JSONL file's folder (`base_dir`)."""
    from PIL import Image
    if "images" in row and row["images"] is not None:
        images = row["images"]
    elif "image" in row and row["image"] is not None:
        images = [row["image"]]
    else:
        images = []
    out = []
    for im in images:
        if isinstance(im, str):
            path = Path(base_dir or ".") / im
            if not path.exists():
                fail(f"image {path} (row {row.get('id', '?')}) does not exist; image paths in JSONL data are "
                     "relative to the JSONL file.")
            im = Image.open(path)
        out.append(im.convert("RGB"))
    return out


def data_indices(num_rows: int, seed: int, start: int, count: int) -> list[int]:
    """Rows at global data positions [start, start + count): epoch e = position // num_rows walks a permutation
    seeded by (seed, e). The ONE seeded data order of the training stages: a pure function of the position, so
    a resume needs only the position, and under accelerate each rank takes its own positions (rank r of a
    step that consumes B rows per rank reads [position + r*B, position + (r+1)*B))."""
    out = []
    for pos in range(start, start + count):
        epoch, offset = divmod(pos, num_rows)
        out.append(_epoch_order(num_rows, seed, epoch)[offset])
    return out


_ORDER_CACHE: dict = {}


def _epoch_order(num_rows: int, seed: int, epoch: int) -> list[int]:
    key = (num_rows, seed, epoch)
    if key not in _ORDER_CACHE:
        order = list(range(num_rows))
        random.Random(f"{seed}/epoch{epoch}").shuffle(order)
        _ORDER_CACHE.clear()  # one epoch at a time is all a run needs
        _ORDER_CACHE[key] = order
    return _ORDER_CACHE[key]


# ----------------------------------------------------------------------------------------------------------
# Statistics: one correlation for analyze.py (dynamics.json) and report.py (KL against forgetting)
# ----------------------------------------------------------------------------------------------------------
def pearson(x, y) -> float:
    """Pearson correlation of two equally long sequences in float64; NaN when it is undefined (fewer than two
    values, or one side constant)."""
    x = torch.as_tensor(x, dtype=torch.float64).flatten()
    y = torch.as_tensor(y, dtype=torch.float64).flatten()
    if x.numel() < 2:
        return float("nan")
    x, y = x - x.mean(), y - y.mean()
    denom = (x.norm() * y.norm()).item()
    return float((x @ y).item() / denom) if denom > 0 else float("nan")
