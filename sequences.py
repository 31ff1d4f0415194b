"""Sequences: how a (prompt, images, completion) row becomes a batch, its per-token log-probs, and the decode
loop that samples completions. One copy for every stage: two log-prob functions that disagreed would make the
KL, the influence scores and the rollout log-probs incomparable.

Batch layout used everywhere (the layout of `generate`'s output, and TRL's):
    [pad pad P P P P | C C C <|im_end|> pad]
     prompt, left-padded | completion, right-padded
so all completions start at the same column and `logits_to_keep = completion_length + 1` covers them.
"""
from __future__ import annotations

import inspect
import math

import torch

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


def select_prompt_rows(prompt_batch: dict, rows: list[int]) -> dict:
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
    # Several processes (accelerate launch): under FSDP every forward gathers parameters from all ranks, so a rank
    # whose rows are done must keep stepping until every rank's are, or the others wait for it forever. All ranks
    # decode up to the largest cap asked for and leave together; a rank keeps only its own cap's tokens. One process
    # (nothing initialised): the loop below is exactly the single-process loop, not one operation more.
    own_cap, synced = max_new_tokens, _several_processes()
    if synced:
        max_new_tokens = int(_all_reduce(torch.tensor(max_new_tokens, device=logits.device), "max"))
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
        if synced and step == own_cap - 1:
            finished[:] = True   # this rank's cap: it only keeps stepping for the others (columns cut below)
        if step == max_new_tokens - 1 or (step % check_every == check_every - 1 and _all_done(finished, synced)):
            break
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        position = (start + step).view(1, -1, 1).expand(3, -1, 1)
        out = model(input_ids=token.unsqueeze(1), attention_mask=mask, position_ids=position, use_cache=True,
                    **{keyword: cache})
        cache, logits = getattr(out, keyword), out.logits[:, -1]
    return torch.stack(tokens[:own_cap], dim=1), torch.stack(logprobs[:own_cap], dim=1)


def _several_processes() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized() \
        and torch.distributed.get_world_size() > 1


def _all_reduce(value: torch.Tensor, op: str) -> torch.Tensor:
    reduce_op = {"max": torch.distributed.ReduceOp.MAX, "sum": torch.distributed.ReduceOp.SUM}[op]
    torch.distributed.all_reduce(value, op=reduce_op)
    return value


def _all_done(finished: torch.Tensor, synced: bool) -> bool:
    """Whether the decode loop may stop: this rank's rows all finished, and with several processes every rank's
    (one all-reduce of an int per check)."""
    if not synced:
        return bool(finished.all())
    return int(_all_reduce((~finished).any().to(torch.int32), "sum")) == 0
