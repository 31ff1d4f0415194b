"""What must be identical across stages: arguments, model loading, batching, log-probs, generation,
optimizers, checkpoints, logging and the memory plan.

Every stage script (sft.py, rft.py, rollout_sft.py, eval.py, analyze.py) shows its own algorithm top to bottom;
only the pieces whose drift between stages would silently break the experiment live here (two copies of a
log-prob function that disagree would make the KL, the influence scores and the rollout log-probs
incomparable). The jigsaw task itself is in jigsaw.py.

Batch layout used everywhere (the layout of `generate`'s output, and TRL's):
    [pad pad P P P P | C C C <|im_end|> pad]
     prompt, left-padded | completion, right-padded
so all completions start at the same column and `logits_to_keep = completion_length + 1` covers them.
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
import re
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

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
    """AutoModelForImageTextToText by hub id or local path; safetensors only, no remote code."""
    from transformers import AutoModelForImageTextToText
    kwargs = {"dtype": DTYPES[dtype], "use_safetensors": True}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    model = AutoModelForImageTextToText.from_pretrained(name_or_path, **kwargs)
    if device:
        model.to(device)
    return model


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
# Chat messages and batches
# ----------------------------------------------------------------------------------------------------------
def make_messages(prompt: str, num_images: int) -> list[dict]:
    """One user turn: the images first, then the text (how Qwen2.5-VL's model cards show it)."""
    return [{"role": "user", "content": [{"type": "image"} for _ in range(num_images)]
             + [{"type": "text", "text": prompt}]}]


def prompt_texts(processor, prompts: list[str], images: list[list]) -> list[str]:
    return [processor.apply_chat_template(make_messages(p, len(im)), tokenize=False, add_generation_prompt=True)
            for p, im in zip(prompts, images)]


def build_batch(processor, prompts: list[str], images: list[list], completions: list[str] | None = None,
                max_completion_tokens: int | None = None, completion_ids: list[list[int]] | None = None) -> dict:
    """Tokenize rows of (prompt, images[, completion]) into one padded batch.

    Prompts go through the processor (which expands each <|image_pad|> to the image's token count) and are
    left-padded; completions are tokenized separately (as generate would have produced them, ending in
    <|im_end|>) and right-padded (append_completions). `pixel_values` holds each row's images in row order,
    concatenated along dim 0 (rows per image = image_grid_thw.prod(-1)); `completion_mask` is 1 exactly on
    completion tokens. Completion ids may be given directly (rollouts) instead of text.
    """
    tokenizer = processor.tokenizer
    flat_images = [im for row in images for im in row]
    texts = prompt_texts(processor, prompts, images)
    encoded = processor(text=texts, images=flat_images or None, padding=True, padding_side="left",
                        return_tensors="pt")
    batch = {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"],
             "images_per_row": torch.tensor([len(row) for row in images], dtype=torch.long)}
    # mm_token_type_ids (1 on image tokens) is what makes transformers 5.x compute Qwen2.5-VL's 3D M-RoPE
    # positions; without it the model silently falls back to 1D text positions for the image tokens too.
    for key in ("pixel_values", "image_grid_thw", "mm_token_type_ids"):
        if key in encoded:
            batch[key] = encoded[key]
    batch["prompt_length"] = encoded["input_ids"].shape[1]
    if completions is None and completion_ids is None:
        return batch
    if completion_ids is None:
        eos = tokenizer.convert_ids_to_tokens(tokenizer.eos_token_id) if tokenizer.eos_token is None \
            else tokenizer.eos_token
        completion_ids = [tokenizer(c + eos, add_special_tokens=False)["input_ids"] for c in completions]
    if max_completion_tokens is not None:
        completion_ids = [ids[:max_completion_tokens] for ids in completion_ids]
    return append_completions(batch, completion_ids, tokenizer.pad_token_id)


def append_completions(prompt_batch: dict, completion_ids: list[list[int]], pad_id: int) -> dict:
    """A copy of an encoded prompt batch with one completion per row appended, right-padded with pad_id."""
    length = max(1, max(len(ids) for ids in completion_ids))
    comp = torch.full((len(completion_ids), length), pad_id, dtype=torch.long)
    comp_mask = torch.zeros((len(completion_ids), length), dtype=torch.long)
    for i, ids in enumerate(completion_ids):
        comp[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        comp_mask[i, :len(ids)] = 1
    batch = dict(prompt_batch)
    batch["input_ids"] = torch.cat([batch["input_ids"], comp], dim=1)
    batch["attention_mask"] = torch.cat([batch["attention_mask"], comp_mask], dim=1)
    if "mm_token_type_ids" in batch:  # completion tokens are text (type 0)
        batch["mm_token_type_ids"] = torch.cat([batch["mm_token_type_ids"], torch.zeros_like(comp)], dim=1)
    batch["completion_ids"] = comp
    batch["completion_mask"] = comp_mask
    return batch


def select_rows(prompt_batch: dict, rows: list[int]) -> dict:
    """Rows of an encoded prompt batch (any order, repeats allowed) with each row's own block of pixel rows,
    without running the processor again. Left-padding columns that none of the chosen rows needs are dropped,
    so the result is the batch build_batch would have made from those rows alone."""
    index = torch.tensor(rows, dtype=torch.long)
    mask = prompt_batch["attention_mask"][index]
    first = int(mask.any(0).nonzero()[0]) if mask.any() else 0
    out = {"images_per_row": prompt_batch["images_per_row"][index]}
    for key in ("input_ids", "attention_mask", "mm_token_type_ids"):
        if key in prompt_batch:
            out[key] = prompt_batch[key][index, first:]
    out["prompt_length"] = out["input_ids"].shape[1]
    if "pixel_values" in prompt_batch:
        # image i of the batch owns pixel rows [start_i, start_i + prod(grid_i)); row r owns its images' blocks
        grid = prompt_batch["image_grid_thw"]
        pixel_start = torch.cumsum(grid.prod(-1), 0) - grid.prod(-1)
        image_start = torch.cumsum(prompt_batch["images_per_row"], 0) - prompt_batch["images_per_row"]
        images = [int(image_start[r]) + j for r in rows for j in range(int(prompt_batch["images_per_row"][r]))]
        out["image_grid_thw"] = grid[images]
        out["pixel_values"] = torch.cat([prompt_batch["pixel_values"][int(pixel_start[i]):
                                                                      int(pixel_start[i] + grid[i].prod())]
                                         for i in images])
    return out


def to_device(batch: dict, device) -> dict:
    return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}


def model_inputs(batch: dict) -> dict:
    """The keys the model's forward takes. image_grid_thw always goes with the pixels (stale rope_deltas trap), and
    mm_token_type_ids too: in transformers 5.x the 3D M-RoPE positions of the image tokens are computed only when
    it is passed, otherwise every token silently gets a 1D text position (what the real model never saw)."""
    keys = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids")
    return {k: batch[k] for k in keys if k in batch}


# ----------------------------------------------------------------------------------------------------------
# Log-probs of completion tokens
# ----------------------------------------------------------------------------------------------------------
def selective_log_softmax(logits: torch.Tensor, index: torch.Tensor, chunk_rows: int = 4) -> torch.Tensor:
    """log_softmax(logits)[..., index] computed a few rows at a time, in fp32: the [B, T, V] log-softmax of
    a 152k vocabulary would otherwise double the largest tensor of the step."""
    out = []
    for logits_chunk, index_chunk in zip(logits.split(chunk_rows), index.split(chunk_rows)):
        logits_chunk = logits_chunk.float()
        picked = torch.gather(logits_chunk, -1, index_chunk.unsqueeze(-1)).squeeze(-1)
        out.append(picked - torch.logsumexp(logits_chunk, dim=-1))
    return torch.cat(out)


def completion_logits(model, batch: dict, temperature: float = 1.0) -> torch.Tensor:
    """Logits that predict each completion token, [B, Tc, V]; only Tc+1 positions go through lm_head."""
    length = batch["completion_ids"].shape[1]
    # A fresh forward with image_grid_thw: rope_deltas cached by generate() may belong to another batch.
    model_kwargs = model_inputs(batch)
    if hasattr(model, "model") and hasattr(model.model, "rope_deltas"):
        model.model.rope_deltas = None
    logits = model(**model_kwargs, logits_to_keep=length + 1, use_cache=False).logits[:, :-1]
    return logits / temperature if temperature != 1.0 else logits


def completion_logprobs(model, batch: dict, temperature: float = 1.0, chunk_rows: int = 4) -> torch.Tensor:
    """Per-token log pi(c_t | prompt, c_<t) of the completion tokens, [B, Tc] (zeros are padding: use
    batch['completion_mask'])."""
    logits = completion_logits(model, batch, temperature)
    return selective_log_softmax(logits, batch["completion_ids"], chunk_rows) * batch["completion_mask"]


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    mask = mask.to(values.dtype)
    if dim is None:
        return (values * mask).sum() / mask.sum().clamp(min=1)
    return (values * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def sft_loss(model, batch: dict) -> tuple[torch.Tensor, int]:
    """Cross-entropy on completion tokens only, averaged over the batch's completion tokens."""
    logprobs = completion_logprobs(model, batch)
    mask = batch["completion_mask"]
    return -(logprobs * mask).sum() / mask.sum().clamp(min=1), int(mask.sum())


@torch.no_grad()
def sequence_logprobs(model, processor, prompts: list[str], images: list[list], completions: list[str],
                      batch_size: int) -> list[tuple[float, int]]:
    """(sum log pi(completion | prompt), completion token count) per row, completions tokenized as SFT will
    tokenize them (build_batch: text + <|im_end|>, which is scored too, as SFT trains on it). The ONE
    sequence-scoring function: rollout_sft.py's per-row log-probs and analyze.py's perplexity of each source.

    The decoded text is scored, not the sampled token ids: what SFT trains on is the text, so the rollout
    log-probs and the perplexity table measure the same thing. (A model that samples a non-canonical BPE
    split gets its re-tokenized text scored; rare for a trained model, common for a random one.)"""
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(prompts), batch_size):
        batch = build_batch(processor, prompts[start:start + batch_size], images[start:start + batch_size],
                                   completions=completions[start:start + batch_size])
        batch = to_device(batch, device)
        logprobs = completion_logprobs(model, batch)
        mask = batch["completion_mask"]
        for row_logprobs, row_mask in zip(logprobs, mask):
            out.append((float((row_logprobs * row_mask).sum()), int(row_mask.sum())))
    return out



def token_weighted_nll(logprob_sums: list[float], token_counts: list[int]) -> tuple[float, float]:
    """(mean NLL per token, perplexity) over all completion tokens of a set of rows.

    Token-weighted, not a mean of per-row means: two rows of 2 and 6 tokens with log-prob sums -2 and -18
    give mean NLL (2 + 18) / 8 = 2.5 and perplexity exp(2.5) = 12.18.
    """
    tokens = sum(token_counts)
    if tokens == 0:
        raise ValueError("no completion tokens to score")
    mean_nll = -sum(logprob_sums) / tokens
    return mean_nll, math.exp(mean_nll)



# ----------------------------------------------------------------------------------------------------------
# Generation
# ----------------------------------------------------------------------------------------------------------
@torch.no_grad()
def generate(model, processor, prompts: list[str], images: list[list], max_new_tokens: int,
             temperature: float = 1.0, top_p: float = 1.0, do_sample: bool = True, num_samples: int = 1) -> dict:
    """Batched sampling (or greedy decoding) of `num_samples` completions per prompt, left-padded prompts.

    Returns the encoded prompt batch ("batch", one row per prompt), completion ids (a list per completion,
    ending at and including <|im_end|> when it was produced, the num_samples completions of prompt i at
    i*num_samples ..), the decoded texts, whether each hit the length limit, and "logprobs": the log-prob of
    each completion token under the distribution it was drawn from (greedy: log-softmax of the logits).

    Our own decode loop, not model.generate: each prompt (and its images, through the vision tower) is
    prefilled ONCE and its KV cache copied num_samples times, where generate would prefill every copy of a
    GRPO group; and the loop only asks the GPU whether all rows are done every `check_every` tokens instead
    of after each one, so the host can queue the next forward while the GPU runs this one. Sampling is
    plain multinomial sampling from softmax(logits / temperature), optionally nucleus-truncated (top_p).
    Tests check it against a teacher-forced forward and against model.generate's greedy output.
    """
    batch = build_batch(processor, prompts, images)
    tokenizer = processor.tokenizer
    device = next(model.parameters()).device
    inputs = to_device(model_inputs(batch), device)
    # Never let the model emit <|image_pad|>, <|video_pad|> or <|vision_start|> (TRL suppresses the image token
    # too): a sampled image token makes any later forward fail with "Image features and image tokens do not
    # match". A random toy model samples them; for a trained one the renormalisation is a log(1 - p) ~ 0 change.
    suppress = [getattr(model.config, k, None) for k in ("image_token_id", "video_token_id", "vision_start_token_id")]
    suppress = torch.tensor([i for i in suppress if i is not None], dtype=torch.long, device=device)
    was_training = model.training
    model.eval()
    try:
        tokens, logprobs = decode(model, inputs, max_new_tokens, tokenizer.eos_token_id, suppress, temperature,
                                  top_p, do_sample, num_samples)
    finally:
        model.train(was_training)
    completion_ids, truncated, sampler_logprobs = [], [], []
    for ids, lps in zip(tokens.tolist(), logprobs.tolist()):
        if tokenizer.eos_token_id in ids:
            ids = ids[:ids.index(tokenizer.eos_token_id) + 1]
            truncated.append(False)
        else:
            truncated.append(True)
        completion_ids.append(ids)
        sampler_logprobs.append(lps[:len(ids)])
    texts = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
    return {"batch": batch, "completion_ids": completion_ids, "texts": texts, "truncated": truncated,
            "logprobs": sampler_logprobs}


def _cache_keyword(model) -> str:
    """transformers renamed the forward's `past_key_values` to `cache` (5.2x); take whichever it has."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _next_positions(model, inputs: dict) -> torch.Tensor:
    """Right after a prefill forward on `inputs`: the position of the first token after each prompt."""
    rows, prompt_length = inputs["input_ids"].shape
    if "image_grid_thw" in inputs and getattr(model.model, "rope_deltas", None) is not None:
        deltas = model.model.rope_deltas.view(rows).to(inputs["attention_mask"].device)
        return inputs["attention_mask"].sum(1) + deltas
    return torch.full((rows,), prompt_length, dtype=torch.long, device=inputs["input_ids"].device)


@torch.no_grad()
def shared_prefix_logprobs(model, prefix: dict, index: torch.Tensor, completion_ids: torch.Tensor,
                           completion_mask: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """completion_logprobs of the sequences (prompt index[i] of `prefix`, completion i), without gradient,
    running each distinct prompt (and its images) through the model once: its KV cache is copied to every
    completion that follows it, then the completions go through in one forward. For the reference and old
    log-probs of GRPO, whose G completions share a prompt. (No gradient: transformers' gradient checkpointing
    cannot take a cache, so the policy's own forward with gradient stays a plain full-sequence forward.)"""
    keyword = _cache_keyword(model)
    inputs = model_inputs(prefix)
    out = model(**inputs, use_cache=True, logits_to_keep=1)
    cache, start = getattr(out, keyword), _next_positions(model, inputs)[index]
    cache.batch_select_indices(index)
    mask = torch.cat([inputs["attention_mask"][index], completion_mask], dim=1)
    steps = torch.arange(completion_ids.shape[1], device=start.device)
    position = (start.unsqueeze(1) + steps).unsqueeze(0).expand(3, -1, -1)
    logits = model(input_ids=completion_ids, attention_mask=mask, position_ids=position, use_cache=True,
                   **{keyword: cache}).logits
    logits = torch.cat([out.logits[index, -1:], logits[:, :-1]], dim=1) / temperature
    return selective_log_softmax(logits, completion_ids) * completion_mask


def decode(model, inputs: dict, max_new_tokens: int, eos_id: int, suppress: torch.Tensor, temperature: float,
           top_p: float, do_sample: bool, num_samples: int = 1, check_every: int = 8) -> tuple:
    """The decode loop of generate: token ids [rows * num_samples, T <= max_new_tokens] (eos_id after the end)
    and the sampler's log-prob of each token, same shape.

    Positions: the prefill forward computes the prompt's 3D M-RoPE positions itself (mm_token_type_ids) and
    leaves rope_deltas = (largest position + 1) - (unpadded prompt length) per row on the model; the t-th new
    token then sits at position (unpadded prompt length + t) + rope_delta on all three axes, exactly where a
    teacher-forced forward over prompt + completion puts it. Text-only prompts get the model's 1D fallback:
    position = column of the padded sequence.
    """
    keyword = _cache_keyword(model)
    out = model(**inputs, use_cache=True, logits_to_keep=1)
    cache, start = getattr(out, keyword), _next_positions(model, inputs)
    logits, mask = out.logits[:, -1], inputs["attention_mask"]
    if num_samples > 1:  # the G samples of a prompt share its prefill: copy its cache, logits, mask, positions
        cache.batch_repeat_interleave(num_samples)
        logits, mask, start = (t.repeat_interleave(num_samples, dim=0) for t in (logits, mask, start))
    finished = torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device)
    tokens, logprobs = [], []
    for step in range(max_new_tokens):
        logits = logits.float()
        logits[:, suppress] = float("-inf")
        if do_sample:
            probs = torch.softmax(logits / temperature, dim=-1)
            if top_p < 1.0:  # nucleus: keep the smallest set of top tokens whose mass reaches top_p
                sorted_probs, order = probs.sort(dim=-1, descending=True)
                drop = sorted_probs.cumsum(-1) - sorted_probs >= top_p
                probs = probs.scatter(-1, order, sorted_probs.masked_fill(drop, 0.0))
            token = torch.multinomial(probs, 1).squeeze(1)
            logprobs.append(torch.log(probs.gather(1, token.unsqueeze(1)).squeeze(1) / probs.sum(-1)))
        else:
            token = logits.argmax(dim=-1)
            logprobs.append(torch.log_softmax(logits, dim=-1).gather(1, token.unsqueeze(1)).squeeze(1))
        token = token.masked_fill(finished, eos_id)   # a finished row keeps emitting eos (trimmed by the caller)
        tokens.append(token)
        finished |= token == eos_id
        if step == max_new_tokens - 1 or (step % check_every == check_every - 1 and bool(finished.all())):
            break
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        position = (start + step).view(1, -1, 1).expand(3, -1, 1)
        out = model(input_ids=token.unsqueeze(1), attention_mask=mask, position_ids=position, use_cache=True,
                    **{keyword: cache})
        cache, logits = getattr(out, keyword), out.logits[:, -1]
    return torch.stack(tokens, dim=1), torch.stack(logprobs, dim=1)


# ----------------------------------------------------------------------------------------------------------
# Optimizers and schedules
# ----------------------------------------------------------------------------------------------------------
OPTIMIZERS = ("adamw", "adamw8bit", "paged_adamw8bit")


def make_optimizer(params, name: str, lr: float, weight_decay: float = 0.0, betas=(0.9, 0.999), eps: float = 1e-8):
    """torch AdamW, or bitsandbytes AdamW8bit / PagedAdamW8bit (2 bytes of state per parameter instead of 8)."""
    params = [p for p in params if p.requires_grad]
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=betas, eps=eps)
    if name in ("adamw8bit", "paged_adamw8bit"):
        try:
            import bitsandbytes as bnb
        except ImportError:
            fail(f"--optimizer {name} needs bitsandbytes (pip install bitsandbytes), or use --optimizer adamw.")
        klass = bnb.optim.AdamW8bit if name == "adamw8bit" else bnb.optim.PagedAdamW8bit
        return klass(params, lr=lr, weight_decay=weight_decay, betas=betas, eps=eps)
    fail(f"--optimizer {name} unknown; choose one of {', '.join(OPTIMIZERS)}.")


def warmup_cosine(optimizer, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0):
    """Linear warmup then cosine decay to min_lr_ratio * lr (the usual TRL/HF 'cosine' schedule)."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ----------------------------------------------------------------------------------------------------------
# Checkpoints, logging, atomic files
# ----------------------------------------------------------------------------------------------------------
def write_text_atomic(path, text: str) -> None:
    """Write to a temp file next to `path`, then rename: a crash never leaves half a file behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json_atomic(path, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, default=str))


# Every folder a stage writes carries this marker (its stage name), so that a later run may replace the folder
# only when the same stage made it: no stage deletes what it did not create.
OUTPUT_MARKER = ".kit_output.json"


def check_output_dir(path, stage: str, overwrite: bool = False) -> None:
    """Refuse to write into an existing, non-empty folder that this stage did not create (a run folder with
    checkpoints, someone's data), unless --overwrite. Called before any model is loaded."""
    path = Path(path)
    if not path.exists():
        return
    if not path.is_dir():
        fail(f"--output_dir {path} is a file, not a folder; choose another --output_dir.")
    entries = [p for p in path.iterdir() if p.name != OUTPUT_MARKER]
    if not entries or overwrite:
        return
    marker = path / OUTPUT_MARKER
    owner = None
    if marker.exists():
        try:
            owner = json.loads(marker.read_text()).get("stage")
        except (OSError, json.JSONDecodeError):
            owner = None
    if owner != stage:
        made_by = f"was made by {owner}" if owner else "was not made by this kit"
        fail(f"--output_dir {path} already exists and {made_by} ({len(entries)} entries, e.g. "
             f"{sorted(e.name for e in entries)[:3]}); {stage} would replace it. Choose another --output_dir, or "
             "pass --overwrite if you mean it.")


def mark_output_dir(path, stage: str) -> None:
    write_json_atomic(Path(path) / OUTPUT_MARKER, {"stage": stage})


def save_dataset_atomic(dataset, out, stage: str, overwrite: bool = False) -> None:
    """save_to_disk into a temporary sibling folder, then swap it in: a crash never leaves half a data set, and
    an existing folder is replaced only when this stage made it (check_output_dir)."""
    import shutil
    out_path = Path(out)
    check_output_dir(out_path, stage, overwrite)
    tmp = out_path.with_name(out_path.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    dataset.save_to_disk(str(tmp))
    mark_output_dir(tmp, stage)
    if out_path.exists():
        old = out_path.with_name(out_path.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        out_path.rename(old)
        tmp.rename(out_path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out_path)


def read_shard(path) -> dict[str, dict]:
    """Records by id of an append-only JSONL shard (the resume state of rollout_sft.py's sampling and of the
    teacher). A torn or unreadable line (a crash during a write) is dropped and the file rewritten without it,
    so the next append starts on a clean line; those records are made again."""
    path = Path(path)
    if not path.exists():
        return {}
    records, good_lines, bad = {}, [], 0
    for line in path.read_text().splitlines(keepends=True):
        try:
            if not line.endswith("\n"):
                raise ValueError("torn line")
            record = json.loads(line)
            records[str(record["id"])] = record
            good_lines.append(line)
        except (ValueError, KeyError, TypeError):
            bad += 1
    if bad:
        print(f"[shard] {path}: dropped {bad} unreadable line(s) (a write cut short); those are made again", flush=True)
        write_text_atomic(path, "".join(good_lines))
    return records


def append_shard(path, records: list[dict]) -> None:
    """One write, flushed and fsynced: once this returns the records survive a crash."""
    with Path(path).open("a") as f:
        f.write("".join(json.dumps(r) + "\n" for r in records))
        f.flush()
        os.fsync(f.fileno())


# ----------------------------------------------------------------------------------------------------------
# Range checks of numeric flags: one table per stage, one message style, exit 2 before any model is loaded
# ----------------------------------------------------------------------------------------------------------
_RANGE_RE = re.compile(r"^(>=|>|<=|<)\s*(-?[0-9.e+-]+)$|^([\[(])\s*(-?[0-9.e+-]+)\s*,\s*(-?[0-9.e+-]+)\s*([\])])$")


def check_ranges(args, ranges: dict[str, str]) -> None:
    """ranges: flag name -> '>= 1' | '> 0' | '[0, 1]' | '(0, 1]' ... ; None values (optional flags) pass.

    Example: check_ranges(args, {"lr": "> 0", "warmup_ratio": "[0, 1]"}) stops a run given --lr -1 with
    'error: --lr must be > 0 (got -1.0)'."""
    for name, spec in ranges.items():
        value = getattr(args, name)
        if value is None:
            continue
        match = _RANGE_RE.match(spec.strip())
        if not match:
            raise ValueError(f"bad range spec {spec!r} for {name}")
        if match.group(1):
            op, bound = match.group(1), float(match.group(2))
            ok = {">=": value >= bound, ">": value > bound, "<=": value <= bound, "<": value < bound}[op]
        else:
            low, high = float(match.group(4)), float(match.group(5))
            ok = (value >= low if match.group(3) == "[" else value > low) and \
                 (value <= high if match.group(6) == "]" else value < high)
        if not ok or (isinstance(value, float) and math.isnan(value)):
            fail(f"--{name} must be {spec.replace(' ', '')} (got {value}).")


# ----------------------------------------------------------------------------------------------------------
# What ran: recorded in every results file, metrics header, checkpoint state and the report
# ----------------------------------------------------------------------------------------------------------
def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux; platform.processor() is empty there), else the machine type."""
    import platform
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and ":" in line:
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> dict:
    """Package versions, device, CUDA/cuDNN, threads, the kit's git commit (+ dirty flag) and the command line.
    No environment variables are recorded (they may hold secrets such as API keys)."""
    import importlib.metadata as metadata
    import platform
    import subprocess
    versions = {}
    for package in ("torch", "transformers", "accelerate", "datasets", "bitsandbytes", "pillow", "tokenizers"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    cuda = torch.cuda.is_available()
    root = Path(__file__).resolve().parent
    commit, dirty = None, None
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                capture_output=True, text=True, timeout=10)
        dirty = bool(status.stdout.strip()) if status.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        pass
    return {"python": platform.python_version(), "packages": versions,
            "device": torch.cuda.get_device_name(0) if cuda else f"cpu ({cpu_model()})",
            # the kernels torch picked (AVX2, AVX512, ...): another CPU sums floats in another order, and a
            # toy model trained for hundreds of steps on it ends somewhere else (README, the toy run)
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "cuda": torch.version.cuda if cuda else None,
            "cudnn": torch.backends.cudnn.version() if cuda else None,
            "torch_threads": torch.get_num_threads(), "git_commit": commit, "git_dirty": dirty,
            "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]) if sys.argv and sys.argv[0] else None}


def export_model(accelerator, model, processor, path, dtype: torch.dtype | None = None) -> None:
    """save_pretrained of model and processor: a folder any HF tool (and every stage here) loads by path.
    Gathers the full state dict first, so it also works under FSDP/DeepSpeed. `dtype` casts floating weights
    on the way out (bf16: 2 bytes per parameter; the fp32 master weights stay in the resume state only).
    Written to a temp folder and renamed, so a crash never leaves half a model behind."""
    import shutil
    path = Path(path)
    state_dict = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        if dtype is not None:
            state_dict = {k: (v.to(dtype) if torch.is_floating_point(v) else v) for k, v in state_dict.items()}
        tmp = path.with_name(f".{path.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        accelerator.unwrap_model(model).save_pretrained(str(tmp), state_dict=state_dict, safe_serialization=True)
        if dtype is not None:  # config.json must say what the files hold (save_pretrained writes the live dtype)
            name = str(dtype).replace("torch.", "")
            config = json.loads((tmp / "config.json").read_text())
            for section in [config] + [v for v in config.values() if isinstance(v, dict) and "dtype" in v]:
                section["dtype"] = name
            write_json_atomic(tmp / "config.json", config)
        processor.save_pretrained(str(tmp))
        shutil.rmtree(path, ignore_errors=True)
        tmp.rename(path)
    accelerator.wait_for_everyone()


# Layout of a training run's --output_dir (sft.py and rft.py; rollout_sft.py, eval and analyze.py read it):
#   run.json          the run's settings (the resume rule compares them), written at the start
#   metrics.jsonl     one JSON object per logged step (and eval lines)
#   checkpoint-N/     model-only save_pretrained snapshots every --save_steps and at each --save_at step (bf16 on a
#                     GPU: 2 bytes/param),
#                     each with trainer_state.json {"step": N}: what evaluation along training and analyze.py read
#   resume/           the ONE resume state (accelerate state: weights, optimizer, scheduler, RNG + trainer_state.json
#                     with the data position), replaced at each save: about 6 bytes/param on a GPU
#   final/            save_pretrained of the last step (same dtype as the snapshots)
RUN_FILE, RESUME_DIR = "run.json", "resume"
TRAINING_OUTPUTS = (RUN_FILE, "metrics.jsonl", RESUME_DIR, "final", "completions.jsonl", "tracking", OUTPUT_MARKER)
TRAINING_OUTPUT_GLOBS = ("checkpoint-*", "completions.rank*.jsonl", ".*.tmp", ".*.old")


def snapshot_dtype(precision: str) -> torch.dtype:
    """Model-only snapshots: bf16 for GPU precisions (inference needs nothing more), fp32 for fp32 runs."""
    return torch.float32 if precision == "fp32" else torch.bfloat16


def parse_save_at(text: str, flag: str = "--save_at") -> list[int]:
    """'5,10,20' -> [5, 10, 20]: extra snapshot steps (issue 13: the early points of an accuracy/forgetting curve,
    where SFT already climbs from the base's level to its plateau). Empty text: none."""
    steps = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        if not part.isdigit() or int(part) < 1:
            fail(f"{flag} must be a comma-separated list of positive step numbers (e.g. 5,10,20), got {text!r}.")
        steps.append(int(part))
    return sorted(set(steps))


def snapshot_due(step: int, max_steps: int, save_steps: int, save_at: list[int]) -> tuple[bool, bool]:
    """(snapshot, resume state) due after optimizer step `step`: every save_steps both (checkpoint-N/ + the
    resume state), at a save_at step a snapshot only (a resume state per early point would cost its optimizer
    bytes each time). Never at max_steps: final/ is that step's snapshot."""
    if step >= max_steps:
        return False, False
    periodic = bool(save_steps) and step % save_steps == 0
    return periodic or step in save_at, periodic


def save_snapshot(accelerator, model, processor, output_dir, step: int, dtype: torch.dtype) -> Path:
    """output_dir/checkpoint-{step}: model + processor only (no optimizer), for evaluation and analysis."""
    path = Path(output_dir) / f"checkpoint-{step}"
    export_model(accelerator, model, processor, path, dtype)
    if accelerator.is_main_process:
        write_json_atomic(path / "trainer_state.json", {"step": step})
    accelerator.wait_for_everyone()
    return path


def save_resume_state(accelerator, output_dir, step: int, extra: dict) -> Path:
    """Model, optimizer, scheduler and every RNG state (accelerator.save_state, safetensors) plus
    trainer_state.json (step, data position, ...) in output_dir/resume, replacing the previous one. Written to
    a temp folder first; the old state is only removed once the new one is complete, so a crash at any moment
    leaves one complete state (resume_state() finds it)."""
    import shutil
    output_dir = Path(output_dir)
    final, tmp, old = output_dir / RESUME_DIR, output_dir / f".{RESUME_DIR}.tmp", output_dir / f".{RESUME_DIR}.old"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    if accelerator.is_main_process:
        write_json_atomic(tmp / "trainer_state.json", {"step": step, **extra, "environment": environment()})
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def resume_state(output_dir) -> Path | None:
    """The complete resume state of a run, or None (a crash between the two renames leaves it in .resume.old)."""
    for name in (RESUME_DIR, f".{RESUME_DIR}.old"):
        path = Path(output_dir) / name
        if (path / "trainer_state.json").exists():
            return path
    return None


def load_resume_state(accelerator, path) -> dict:
    accelerator.load_state(str(path))
    return json.loads((Path(path) / "trainer_state.json").read_text())


def list_checkpoints(run_dir, include_final: bool = True) -> list[tuple[int, str, Path]]:
    """[(step, label, folder)] of a training run's model snapshots (checkpoint-N/) and final/, by step: the one
    place that knows the layout (eval along training, analyze.py, rollout_sft.py and report.py use it)."""
    root = Path(run_dir)
    found = []
    for path in root.glob("checkpoint-*"):
        match = re.fullmatch(r"checkpoint-(\d+)", path.name)
        if match and (path / "config.json").exists():
            found.append((int(match.group(1)), path.name, path))
    final = root / "final"
    if include_final and (final / "config.json").exists():
        state = final / "trainer_state.json"
        step = json.loads(state.read_text()).get("step") if state.exists() else None
        found.append((int(step) if step is not None else max((s for s, _, _ in found), default=0), "final", final))
    return sorted(found, key=lambda item: (item[0], item[1] == "final"))


def prepare_run(accelerator, output_dir, stage: str, settings: dict, resume: bool, overwrite: bool,
                operational: tuple[str, ...] = ()) -> Path | None:
    """The one fresh-run / resume rule of every training stage; returns the resume state to load, or None.

    - Fresh run (no --resume) into a folder that already holds a run of this stage: stop, unless --overwrite,
      which removes only what this stage writes (TRAINING_OUTPUTS and checkpoint-N/). A folder this kit did
      not make is refused (check_output_dir).
    - --resume: the recorded run.json settings must equal these, except the `operational` ones (logging,
      saving and evaluation cadence), which do not change the trajectory; a difference stops and names them.
    - In every case metrics.jsonl keeps only the steps up to the resumed one (0 for a fresh start), so a run
      killed before its first checkpoint and resumed never logs a step twice (-1: nothing kept).
    """
    import shutil
    output_dir = Path(output_dir)
    run_file = output_dir / RUN_FILE
    ignored = set(operational) | {"resume", "overwrite"}
    state = None
    if output_dir.exists() and any(output_dir.iterdir()):
        if not run_file.exists():
            check_output_dir(output_dir, stage, overwrite)  # a folder someone else made: refused without --overwrite
        if resume and run_file.exists():
            recorded = json.loads(run_file.read_text()).get("settings", {})
            changed = [f"--{k} {recorded.get(k)!r} -> {settings.get(k)!r}" for k in sorted(set(recorded) | set(settings))
                       if k not in ignored and recorded.get(k) != settings.get(k)]
            if changed:
                fail(f"--resume: {output_dir} was trained with other settings ({'; '.join(changed)}). Resuming would "
                     "mix two runs in one. Rerun with the recorded settings, or start a new --output_dir (or "
                     "--overwrite it without --resume).")
            state = resume_state(output_dir)
        elif not resume and run_file.exists():
            if not overwrite:
                fail(f"--output_dir {output_dir} already holds a {stage} run (its {RUN_FILE}); pass --resume to "
                     "continue it, --overwrite to start it again (removes that run's checkpoints and metrics), or "
                     "choose a new --output_dir.")
        if not resume and overwrite and accelerator.is_main_process:
            for name in TRAINING_OUTPUTS:
                target = output_dir / name
                shutil.rmtree(target, ignore_errors=True) if target.is_dir() else target.unlink(missing_ok=True)
            for target in [t for pattern in TRAINING_OUTPUT_GLOBS for t in output_dir.glob(pattern)]:
                shutil.rmtree(target, ignore_errors=True) if target.is_dir() else target.unlink(missing_ok=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        step = json.loads((state / "trainer_state.json").read_text())["step"] if state is not None else -1
        truncate_metrics(output_dir / "metrics.jsonl", step)
        if not (resume and run_file.exists()):
            write_json_atomic(run_file, {"stage": stage, "settings": settings, "environment": environment()})
        mark_output_dir(output_dir, stage)
    accelerator.wait_for_everyone()
    return state


class MetricsLogger:
    """Appends one JSON object per line to metrics.jsonl (durable, greppable, plotted by the report), and
    mirrors every record to the experiment trackers accelerate was set up with (--report_to), if any."""

    def __init__(self, path, enabled: bool = True, accelerator=None):
        self.path = Path(path)
        self.enabled = enabled
        self.accelerator = accelerator
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def log(self, record: dict) -> None:
        if self.accelerator is not None and getattr(self.accelerator, "trackers", None):
            scalars = {k: v for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                       and k != "step" and v is not None and math.isfinite(v)}
            self.accelerator.log(scalars, step=record.get("step"))
        if not self.enabled:
            return
        record = {"time": round(time.time(), 3), **record}
        with self.path.open("a") as f:
            f.write(json.dumps(record, default=float) + "\n")


REPORT_TO = ("none", "tensorboard", "wandb")


def make_accelerator(mixed_precision: str, report_to: str, output_dir, **kwargs):
    """accelerate.Accelerator on the GPU if there is one, with --report_to trackers (HF Trainer's flag): off by
    default, and nothing of tensorboard/wandb is imported unless asked for."""
    from accelerate import Accelerator
    if report_to not in REPORT_TO:
        fail(f"--report_to {report_to}: choose one of {', '.join(REPORT_TO)}.")
    log_with = None if report_to == "none" else report_to
    if log_with == "tensorboard":
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            try:
                import tensorboardX  # noqa: F401
            except ImportError:
                fail("--report_to tensorboard needs tensorboard (pip install tensorboard), or use --report_to none.")
    if log_with == "wandb":
        try:
            import wandb  # noqa: F401
        except ImportError:
            fail("--report_to wandb needs wandb (pip install wandb; it reads WANDB_API_KEY from the environment), "
                 "or use --report_to none.")
    # step_scheduler_with_optimizer=False: our schedules count optimizer steps (warmup_cosine over --max_steps),
    # and every loop calls scheduler.step() once per optimizer step. accelerate's default steps a prepared
    # scheduler num_processes times per call, so under `accelerate launch --num_processes 2` the lr reached 0
    # half-way through (measured: a 40-step sft.py run at lr 0.0 from step 20 on).
    kwargs.setdefault("step_scheduler_with_optimizer", False)
    return Accelerator(mixed_precision=mixed_precision, cpu=not torch.cuda.is_available(), log_with=log_with,
                       project_dir=str(Path(output_dir) / "tracking") if log_with else None, **kwargs)


def truncate_metrics(path, after_step: int) -> None:
    """Keep only lines logged at steps <= after_step (later ones are logged again after a resume); -1 keeps
    nothing (a run that starts over, including its step-0 evaluation)."""
    path = Path(path)
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a run killed mid-write leaves a partial last line
            continue
        if record.get("step", 0) <= after_step:
            kept.append(line)
    write_text_atomic(path, "".join(line + "\n" for line in kept))


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
# Data sets
# ----------------------------------------------------------------------------------------------------------
def check_jsonl(path) -> None:
    """Every non-empty line of a JSONL file is a JSON object; a broken one is named by its line number (before
    datasets' own reader fails with a parser traceback, or after hours, when training reaches that row)."""
    with Path(path).open() as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                fail(f"data {path} line {number}: not valid JSON ({err.msg} at column {err.colno}). Fix or remove "
                     "that line.")
            if not isinstance(record, dict):
                fail(f"data {path} line {number}: expected a JSON object with the data set's columns.")


def load_rows(path: str, split: str | None = None, required: tuple[str, ...] = (), verify_images: bool = False):
    """A `datasets` folder (save_to_disk; a DatasetDict needs `split`) or a JSONL file, with its columns checked
    before any model is loaded (and, with verify_images, every image decoded: see check_images)."""
    from datasets import DatasetDict, load_dataset, load_from_disk
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
        dataset = load_from_disk(str(p))
        if isinstance(dataset, DatasetDict):
            if split is None or split not in dataset:
                fail(f"data {path} holds splits {list(dataset)}; choose one with --split.")
            dataset = dataset[split]
    missing = [c for c in required if c not in dataset.column_names]
    if missing:
        fail(f"data {path}: missing column(s) {missing}; it has {dataset.column_names}. Pass the right "
             "--prompt_column/--completion_column, or rebuild the data set.")
    if verify_images:
        check_images(dataset, path)
    return dataset


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


# ----------------------------------------------------------------------------------------------------------
# Memory plan (--dry_run)
# ----------------------------------------------------------------------------------------------------------
CONFIGS_DIR = Path(__file__).resolve().parent / "configs"
REAL_CONFIGS = {"Qwen/Qwen2.5-VL-3B-Instruct": CONFIGS_DIR / "qwen2_5_vl_3b_instruct.json",
                "Qwen/Qwen2.5-VL-7B-Instruct": CONFIGS_DIR / "qwen2_5_vl_7b_instruct.json"}


def meta_model(name_or_path: str):
    """The architecture on the meta device (no memory, no download): shipped configs for the real models,
    else the config.json of a local folder."""
    from transformers import AutoConfig, AutoModelForImageTextToText
    if name_or_path in REAL_CONFIGS:
        config = AutoConfig.from_pretrained(str(REAL_CONFIGS[name_or_path]))
    elif Path(name_or_path).is_dir():
        config = AutoConfig.from_pretrained(name_or_path)
    elif Path(name_or_path).suffix == ".json":
        config = AutoConfig.from_pretrained(name_or_path)
    else:
        fail(f"--dry_run knows {list(REAL_CONFIGS)} and local folders; {name_or_path} is neither.")
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    return model


GiB = 1024 ** 3


def activation_plan(config, micro_batch: int, seq_len: int, completion_len: int, gradient_checkpointing: bool,
                    generation_sequences: int = 0) -> dict:
    """Rough peak activation bytes of one training step (and of generation), bf16 (2 bytes per value); the ONE
    formula of every --dry_run (sft.py and rft.py), for planning only: the exact figure depends on kernels.

    training, per micro-batch of b sequences of s = prompt + completion tokens (image tokens included):
      layer inputs kept (checkpointing):  L * b * s * h * 2
      full activations of a layer:        34 * b * s * h  (Korthikanti et al. 2022, flash/SDPA attention: no s^2
                                          term); one layer at a time with checkpointing, all L without
      completion logits:                  b * Tc * V * 4 + min(b, 4) * Tc * V * 8  (bf16 logits and their grad,
                                          fp32 chunks of selective_log_softmax)
    generation (GRPO rollouts), all sequences at once:
      KV cache:                           n * s * L * 2 (k, v) * kv_heads * head_dim * 2
    The two phases do not overlap (the KV cache is freed before training), so the peak is the larger.
    """
    text = getattr(config, "text_config", config)
    layers, hidden, vocab = text.num_hidden_layers, text.hidden_size, text.vocab_size
    heads, kv_heads = text.num_attention_heads, text.num_key_value_heads
    head_dim = getattr(text, "head_dim", None) or hidden // heads
    b, tc = micro_batch, completion_len
    kept = layers * b * seq_len * hidden * 2 if gradient_checkpointing else 0
    full = 34 * b * seq_len * hidden * (1 if gradient_checkpointing else layers)
    logits = b * tc * vocab * 4 + min(b, 4) * tc * vocab * 8
    kv_cache = generation_sequences * seq_len * layers * 2 * kv_heads * head_dim * 2
    training = kept + full + logits
    return {"training": int(training), "generation": int(kv_cache), "peak": int(max(training, kv_cache))}


def memory_plan(model, optimizer: str, precision: str, reference_model: bool = False,
                activations_bytes: int = 0, reference_bytes: int = 2) -> dict:
    """Bytes of weights, gradients, optimizer states and master copy for the chosen options.

    precision bf16_mixed or fp32: fp32 weights (4 B) and grads (4 B); bf16: pure bf16 weights and grads (2 B).
    AdamW states 8 B/param (fp32 m, v), 8-bit AdamW 2 B/param. The reference model (GRPO's KL) is a frozen
    copy of `reference_bytes` per parameter. A lower bound: measured peaks on an H100 were up to 1.45x the
    plan (README, bench/bench_real_arch.py), from autocast weight copies, logits and allocator slack.
    """
    trainable, frozen = count_parameters(model)
    total = trainable + frozen
    weight_bytes = 2 if precision == "bf16" else 4
    plan = {
        "parameters_total": total, "parameters_trainable": trainable, "parameters_frozen": frozen,
        "weights": total * weight_bytes,
        "gradients": trainable * weight_bytes,
        "optimizer_states": trainable * (8 if optimizer == "adamw" else 2),
        "reference_model": total * reference_bytes if reference_model else 0,
        "activations_estimate": activations_bytes,
    }
    plan["total"] = sum(v for k, v in plan.items() if not k.startswith("parameters"))
    return plan


def print_memory_plan(plan: dict, title: str) -> None:
    print(f"\n{title}")
    print(f"  parameters: {plan['parameters_total']:,} total, {plan['parameters_trainable']:,} trainable, "
          f"{plan['parameters_frozen']:,} frozen")
    for key in ("weights", "gradients", "optimizer_states", "reference_model", "activations_estimate", "total"):
        print(f"  {key:<22} {plan[key] / GiB:8.2f} GiB")
    for gpu, size in (("24 GB (RTX 4090/A10)", 24), ("40 GB (A100-40G)", 40), ("80 GB (A100/H100-80G)", 80)):
        # Measured peaks reached 1.45x the plan (GRPO, 3B, H100): keep that much headroom.
        fits = plan["total"] * 1.45 / GiB <= size
        print(f"  fits on {gpu} (with 1.45x headroom): {'yes' if fits else 'no'}")
