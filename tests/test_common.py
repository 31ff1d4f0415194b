"""Tests of the shared helpers (common.py) on the tiny offline Qwen2.5-VL (tests/conftest.py's toy_model_dir).

    python -m pytest -q tests/test_common.py
What is checked: the loss mask covers exactly the completion tokens; every row of a batch sees its own image
(per-row log-probs equal the row run alone); log-softmax/mean helpers against hand values; greedy generation
is deterministic, batch-size independent and agrees with a teacher-forced forward; --help comes from field
docstrings; both optimizers step; checkpoints round-trip and survive a crash; atomic JSON and metrics logs.
"""
import copy
import dataclasses
import json
import shutil
import math

import pytest
import torch
from PIL import Image

import common
import files
import jigsaw
import runs
import sequences
from conftest import perturbed_copy


# ----------------------------------------------------------------------------------------------------------
# Fixtures
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def toy(toy_model_dir):
    """(model, processor) of the tiny random model, fp32, eval mode (dropout is 0 anyway)."""
    torch.manual_seed(0)
    model, processor = common.load_model_and_processor(str(toy_model_dir), dtype="float32")
    model.eval()
    return model, processor


@pytest.fixture(scope="module")
def varied_model(toy):
    """The tiny model with its language weights perturbed (conftest.perturbed_copy)."""
    return perturbed_copy(toy[0])


def image_a():
    return jigsaw.procedural_image(1, 56)                        # 56x56 -> 4x4 patches -> 4 image tokens


def image_b():
    return jigsaw.procedural_image(2, 112).resize((112, 84))     # 112x84 -> 8x6 patches -> 12 image tokens


PROMPTS = ["What color is the shape?", "Is there a red circle in the image? Please answer yes or no."]
COMPLETIONS = ["<think>The shape is red.</think>\n<answer>red</answer>", "no"]


# ----------------------------------------------------------------------------------------------------------
# build_batch: layout and loss mask
# ----------------------------------------------------------------------------------------------------------
def test_completion_mask_covers_exactly_the_completion(toy):
    _, processor = toy
    tokenizer = processor.tokenizer
    batch = sequences.build_batch(processor, PROMPTS, [[image_a()], [image_b()]], completions=COMPLETIONS)
    prompt_length = batch["prompt_length"]
    input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
    completion_mask = batch["completion_mask"]
    assert input_ids.shape[1] == prompt_length + completion_mask.shape[1]
    # the mask over the whole sequence: zeros over the prompt block, completion_mask after it
    loss_mask = torch.cat([torch.zeros_like(input_ids[:, :prompt_length]), completion_mask], dim=1)
    pad_id = tokenizer.pad_token_id
    for row, (prompt, completion) in enumerate(zip(PROMPTS, COMPLETIONS)):
        masked = input_ids[row][loss_mask[row].bool()]
        assert tokenizer.decode(masked, skip_special_tokens=False) == completion + "<|im_end|>"
        assert masked[-1].item() == tokenizer.eos_token_id
        # the prompt block of this row is exactly the row's own prompt encoding, left-padded
        alone = sequences.build_batch(processor, [prompt], [[[image_a()], [image_b()]][row]])
        own = alone["input_ids"][0]
        assert torch.equal(input_ids[row, prompt_length - len(own):prompt_length], own)
        assert (input_ids[row, :prompt_length - len(own)] == pad_id).all()
        assert attention_mask[row, :prompt_length - len(own)].sum() == 0
        # no prompt token is ever masked in; the image tokens are all in the prompt block
        assert loss_mask[row, :prompt_length].sum() == 0
        image_token = tokenizer.convert_tokens_to_ids("<|image_pad|>")
        assert (input_ids[row][loss_mask[row].bool()] != image_token).all()
    # padding (left of prompts, right of completions) is never in the loss and never attended
    assert (loss_mask[attention_mask == 0] == 0).all()
    assert (input_ids[:, prompt_length:][completion_mask == 0] == pad_id).all()
    assert torch.equal(attention_mask[:, prompt_length:], completion_mask)
    # the two completions have different lengths, so the second row really is right-padded
    lengths = completion_mask.sum(1).tolist()
    assert lengths[0] > lengths[1] == len(tokenizer("no<|im_end|>", add_special_tokens=False)["input_ids"])

    # completion ids given directly (rollouts) give the same batch as the text
    by_ids = sequences.build_batch(processor, PROMPTS, [[image_a()], [image_b()]],
                                completion_ids=[ids[:n].tolist() for ids, n in zip(batch["completion_ids"], lengths)])
    for key in ("input_ids", "attention_mask", "completion_mask", "pixel_values", "image_grid_thw"):
        assert torch.equal(by_ids[key], batch[key]), key
    # max_completion_tokens cuts completions (and their mask) to that length
    short = sequences.build_batch(processor, PROMPTS, [[image_a()], [image_b()]], completions=COMPLETIONS,
                               max_completion_tokens=3)
    assert short["completion_mask"].sum(1).tolist() == [3, min(3, lengths[1])]


def test_sft_loss_is_mean_over_completion_tokens(toy):
    model, processor = toy
    batch = sequences.build_batch(processor, PROMPTS, [[image_a()], [image_b()]], completions=COMPLETIONS)
    with torch.no_grad():
        loss, count = sequences.sft_loss(model, batch)
        logprobs = sequences.completion_logprobs(model, batch)
    mask = batch["completion_mask"]
    assert count == int(mask.sum())
    assert loss.item() == pytest.approx(-(logprobs[mask.bool()]).mean().item(), rel=1e-6)
    assert (logprobs[mask == 0] == 0).all()
    # a random model over an ~800-token vocabulary: loss near log(V)
    assert abs(loss.item() - math.log(len(processor.tokenizer))) < 2.0


# ----------------------------------------------------------------------------------------------------------
# Each row of a batch gets its own image
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pair", ["different_sizes", "same_size"])
def test_each_row_gets_its_own_image(toy, pair):
    """Per-row completion log-probs of a batch equal those of the row run alone (left padding, mixed image
    sizes, pixel_values concatenated in row order); swapping the images changes them, so a batch that paired
    the wrong image with a row would fail here."""
    model, processor = toy
    first = image_a()
    second = image_b() if pair == "different_sizes" else jigsaw.procedural_image(3, 56)
    images = [[first], [second]]
    with torch.no_grad():
        batch = sequences.build_batch(processor, PROMPTS, images, completions=COMPLETIONS)
        together = sequences.completion_logprobs(model, batch)
        swapped_batch = sequences.build_batch(processor, PROMPTS, images[::-1], completions=COMPLETIONS)
        swapped = sequences.completion_logprobs(model, swapped_batch)
        for row in range(2):
            alone_batch = sequences.build_batch(processor, PROMPTS[row:row + 1], images[row:row + 1],
                                             completions=COMPLETIONS[row:row + 1])
            alone = sequences.completion_logprobs(model, alone_batch)[0]
            length = alone.shape[0]
            torch.testing.assert_close(together[row, :length], alone, atol=1e-5, rtol=0)
            assert (together[row, length:] == 0).all()
            # the swap moves a different image into this row: its log-probs must move well beyond 1e-5
            assert (swapped[row, :length] - alone).abs().max() > 1e-3
    if pair == "different_sizes":
        assert batch["image_grid_thw"].tolist() == [[1, 4, 4], [1, 6, 8]]
        assert batch["pixel_values"].shape[0] == 16 + 48


# ----------------------------------------------------------------------------------------------------------
# Small pure functions, by hand
# ----------------------------------------------------------------------------------------------------------
def test_selective_log_softmax_matches_log_softmax_gather():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 7, 11, generator=generator) * 4
    index = torch.randint(0, 11, (5, 7), generator=generator)
    expected = torch.log_softmax(logits, dim=-1).gather(-1, index.unsqueeze(-1)).squeeze(-1)
    for chunk_rows in (1, 2, 4, 8):
        torch.testing.assert_close(sequences.selective_log_softmax(logits, index, chunk_rows), expected)
    # bf16 logits are read in fp32 (the result is fp32 and exact for the bf16 values)
    low = logits.bfloat16()
    out = sequences.selective_log_softmax(low, index)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.log_softmax(low.float(), -1).gather(-1, index.unsqueeze(-1)).squeeze(-1))
    # by hand: logits (0, log 3) -> probabilities 1/4, 3/4
    two = torch.tensor([[[0.0, math.log(3.0)]]])
    assert sequences.selective_log_softmax(two, torch.tensor([[0]])).item() == pytest.approx(math.log(0.25))
    assert sequences.selective_log_softmax(two, torch.tensor([[1]])).item() == pytest.approx(math.log(0.75))


def test_warmup_cosine_by_hand():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = common.warmup_cosine(optimizer, warmup_steps=2, total_steps=6, min_lr_ratio=0.1)
    seen = []
    for _ in range(8):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    cosine = [0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(5)]
    assert seen == pytest.approx([0.5, 1.0] + cosine + [0.1])


def test_image_tokens_get_3d_mrope_positions(varied_model, toy):
    """Every forward built by build_batch/model_inputs gives the image tokens Qwen2.5-VL's 3D positions, the
    ones the real model was trained with. Expected positions written out by hand for one 112x84 image (3x4
    merged tokens after s text tokens): text 0..s-1 on all three axes; image token (r, c) at (s, s + r, s + c);
    the text after it resumes at s + max(3, 4) = s + 4. (transformers 5.x only computes these when
    mm_token_type_ids is passed; without it every token silently got a 1D position.)"""
    model, processor = varied_model, toy[1]
    batch = sequences.build_batch(processor, PROMPTS[:1], [[image_b()]], completions=COMPLETIONS[:1])
    assert batch["mm_token_type_ids"].shape == batch["input_ids"].shape
    image_at = (batch["input_ids"][0] == model.config.image_token_id).nonzero().flatten().tolist()
    assert len(image_at) == 12 and batch["mm_token_type_ids"][0].tolist() == [
        int(i in image_at) for i in range(batch["input_ids"].shape[1])]
    s, length = image_at[0], batch["input_ids"].shape[1]
    expected = []
    for i in range(length):
        if i < s:
            expected.append((i, i, i))
        elif i < s + 12:
            r, c = divmod(i - s, 4)
            expected.append((s, s + r, s + c))
        else:
            expected.append((s + 4 + i - s - 12,) * 3)
    position_ids = torch.tensor(expected).T.unsqueeze(1)                       # [3, batch 1, length]
    inputs = sequences.model_inputs(batch)
    with torch.no_grad():
        ours = model(**inputs).logits
        by_hand = model(**{k: v for k, v in inputs.items() if k != "mm_token_type_ids"},
                        position_ids=position_ids).logits
        flat = model(**{k: v for k, v in inputs.items() if k != "mm_token_type_ids"}).logits
    assert torch.allclose(ours, by_hand, atol=1e-5)
    assert not torch.allclose(ours, flat, atol=1e-3)  # the check has teeth: 1D positions change the logits


# ----------------------------------------------------------------------------------------------------------
# Generation
# ----------------------------------------------------------------------------------------------------------
def test_greedy_generate_deterministic_and_batch_independent(varied_model, toy):
    """Greedy decoding of a row alone equals the same row inside a batch of 3 with different prompt
    lengths (so different left padding) and image sizes; repeated calls agree; and each generated token is
    the argmax of a fresh teacher-forced forward (generate's cached rope_deltas do not leak)."""
    model, processor = varied_model, toy[1]
    prompts = ["What color is the shape?", "x",
               "A much longer prompt: is there a red circle and a blue square anywhere in this image?"]
    images = [[image_a()], [image_b()], [jigsaw.procedural_image(4, 56)]]
    batched = sequences.generate(model, processor, prompts, images, max_new_tokens=10, do_sample=False)
    again = sequences.generate(model, processor, prompts, images, max_new_tokens=10, do_sample=False)
    assert batched["completion_ids"] == again["completion_ids"]
    for row in range(3):
        alone = sequences.generate(model, processor, prompts[row:row + 1], images[row:row + 1], max_new_tokens=10,
                                do_sample=False)
        assert alone["completion_ids"][0] == batched["completion_ids"][row], f"row {row} depends on the batch"
    ids = batched["completion_ids"]
    # the comparison above is not trivial: rows differ and contain several distinct tokens
    assert len({tuple(x) for x in ids}) == 3 and all(len(set(x)) > 2 for x in ids)
    tokenizer = processor.tokenizer
    for row in range(3):
        assert batched["truncated"][row] == (tokenizer.eos_token_id not in ids[row])
        assert batched["texts"][row] == tokenizer.decode(ids[row], skip_special_tokens=True)
    with torch.no_grad():
        batch = sequences.build_batch(processor, prompts, images, completion_ids=ids)
        logits = sequences.completion_logits(model, batch)
    mask = batch["completion_mask"].bool()
    # generate never emits the vision tokens (sequences.generate suppresses them), so neither may the argmax.
    suppressed = [model.config.image_token_id, model.config.video_token_id, model.config.vision_start_token_id]
    logits[..., suppressed] = float("-inf")
    assert torch.equal(logits.argmax(-1)[mask], batch["completion_ids"][mask])


def test_shared_prefix_logprobs_equal_full_forward(varied_model, toy):
    """Log-probs from one pass per distinct prompt (its cache copied to each completion) equal a full forward
    of every (prompt, completion) sequence: two prompts with different image sizes (so left padding), rows
    in a shuffled order with repeats, completions of different lengths; select_prompt_rows gives the same batch as
    encoding those rows anew."""
    model, processor = varied_model, toy[1]
    prompts, images = PROMPTS, [[image_a()], [image_b()]]
    prompt_batch = sequences.build_batch(processor, prompts, images)
    rows = [1, 0, 1, 1, 0]
    completions = [processor.tokenizer(text, add_special_tokens=False)["input_ids"]
                   for text in ("red", "a blue square", "no", "3 1 4 2", "<answer>yes</answer>")]
    assert len({len(ids) for ids in completions}) > 2
    full = sequences.build_batch(processor, [prompts[r] for r in rows], [images[r] for r in rows],
                              completion_ids=completions)
    selected = sequences.append_completions(sequences.select_prompt_rows(prompt_batch, rows), completions,
                                         processor.tokenizer.pad_token_id)
    for key in ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw"):
        assert torch.equal(full[key], selected[key]), key
    with torch.no_grad():
        expected = sequences.completion_logprobs(model, full, temperature=0.7)
    shared = sequences.shared_prefix_logprobs(model, prompt_batch, torch.tensor(rows), full["completion_ids"],
                                           full["completion_mask"], temperature=0.7)
    mask = full["completion_mask"].bool()
    assert (expected[mask] < 0).all()
    assert torch.allclose(shared, expected, atol=1e-5), (shared - expected).abs().max()


# ----------------------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class DemoArgs:
    learning_rate: float = 1e-5
    """peak learning rate of the demo stage (SFT default of the paper's notes)"""
    model: str = "Qwen/Qwen2.5-VL-3B-Instruct"
    """hub id or local folder, kept at 100% of its name"""
    use_kl: bool = True
    """add the KL penalty to the reference model"""
    save_steps: int = 50
    """save a checkpoint every this many optimizer steps"""


def test_parse_args_help_shows_field_docstrings(capsys):
    with pytest.raises(SystemExit) as exit_info:
        common.parse_args(DemoArgs, "Demo stage.\n    python demo.py --learning_rate 1e-6", ["--help"])
    assert exit_info.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines; compare word sequences
    for doc in ("peak learning rate of the demo stage (SFT default of the paper's notes)",
                "hub id or local folder, kept at 100% of its name",  # '%' survives argparse's formatting
                "add the KL penalty to the reference model",
                "save a checkpoint every this many optimizer steps"):
        assert doc in out
    assert "python demo.py --learning_rate 1e-6" in out
    assert "(default: 1e-05)" in out and "(default: True)" in out


def test_parse_args_types_and_defaults():
    assert common.parse_args(DemoArgs, None, []) == DemoArgs()
    args = common.parse_args(DemoArgs, None, ["--learning_rate", "2e-6", "--save_steps", "7", "--model", "runs/x"])
    assert args == DemoArgs(learning_rate=2e-6, model="runs/x", use_kl=True, save_steps=7)
    assert isinstance(args.learning_rate, float) and isinstance(args.save_steps, int)
    assert common.parse_args(DemoArgs, None, ["--use_kl"]).use_kl is True
    assert common.parse_args(DemoArgs, None, ["--no-use_kl"]).use_kl is False  # argparse's usual spelling
    with pytest.raises(SystemExit):
        common.parse_args(DemoArgs, None, ["--save_steps", "ten"])
    with pytest.raises(SystemExit):
        common.parse_args(DemoArgs, None, ["--unknown_option", "1"])


def test_parse_args_no_underscore_flag_as_documented():
    """`--no_flag` is the documented spelling (analyze.py's docstring uses --no_first_order); it was rejected
    while parse_args used argparse.BooleanOptionalAction, which only makes `--no-flag`."""
    assert common.parse_args(DemoArgs, None, ["--no_use_kl"]).use_kl is False
    assert common.parse_args(DemoArgs, None, ["--no_use_kl", "--use_kl"]).use_kl is True  # last one wins


# ----------------------------------------------------------------------------------------------------------
# Optimizers
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["adamw", "adamw8bit"])
def test_make_optimizer_steps(name):
    torch.manual_seed(0)
    # 128x64 = 8192 weights: above bitsandbytes' 4096-element threshold, so the 8-bit state is really used
    model = torch.nn.Sequential(torch.nn.Linear(128, 64), torch.nn.Tanh(), torch.nn.Linear(64, 4))
    frozen = model[2].bias
    frozen.requires_grad_(False)
    optimizer = common.make_optimizer(model.parameters(), name, lr=1e-2, weight_decay=0.01)
    assert all(p is not frozen for group in optimizer.param_groups for p in group["params"])
    before = [p.detach().clone() for p in model.parameters()]
    loss = model(torch.randn(8, 128)).pow(2).mean()
    loss.backward()
    optimizer.step()
    for (name_p, param), old in zip(model.named_parameters(), before):
        if param is frozen:
            assert torch.equal(param, old)
        else:
            assert not torch.equal(param, old), f"{name_p} did not change"
            # Adam's first step moves each weight by about lr (sign of the gradient)
            assert (param - old).abs().max() < 0.05
    if name == "adamw8bit":
        assert optimizer.state[model[0].weight]["state1"].dtype == torch.uint8


def test_make_optimizer_unknown_name():
    with pytest.raises(SystemExit):
        common.make_optimizer([torch.nn.Parameter(torch.zeros(2))], "sgd", lr=0.1)


# ----------------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------------
@pytest.fixture
def accelerator():
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    acc = Accelerator(cpu=True)
    yield acc
    AcceleratorState._reset_state(reset_partial_state=True)  # leave no global state to other tests


def test_checkpoint_round_trip_and_crash(toy, accelerator, tmp_path):
    base_model, processor = toy
    torch.manual_seed(0)
    model = copy.deepcopy(base_model)
    model.train()
    optimizer = common.make_optimizer(model.parameters(), "adamw", lr=1e-3)
    schedule = common.warmup_cosine(optimizer, warmup_steps=2, total_steps=10)
    model, optimizer, schedule = accelerator.prepare(model, optimizer, schedule)
    batch = sequences.build_batch(processor, PROMPTS, [[image_a()], [image_b()]], completions=COMPLETIONS)

    def train_step():
        loss, _ = sequences.sft_loss(model, batch)
        accelerator.backward(loss)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()

    def weights():
        return {k: v.detach().clone() for k, v in accelerator.unwrap_model(model).state_dict().items()}

    train_step()
    train_step()
    out = tmp_path / "run"
    assert runs.resume_state(out) is None
    snapshot = runs.save_snapshot(accelerator, model, processor, out, 2, torch.float32)
    state_dir = runs.save_resume_state(accelerator, out, 2, {"data_position": 7, "best": 0.5})
    assert snapshot == out / "checkpoint-2" and state_dir == out / "resume" and runs.resume_state(out) == state_dir
    saved_weights = weights()
    saved_moments = {k: v["exp_avg"].clone() for k, v in optimizer.state_dict()["state"].items()}
    saved_lr = optimizer.param_groups[0]["lr"]
    train_step()
    after_step_3 = weights()
    assert any(not torch.equal(after_step_3[k], saved_weights[k]) for k in saved_weights)

    torch.rand(3)  # the RNG moves on after the save, as a run's sampler does
    state = runs.load_resume_state(accelerator, runs.resume_state(out))
    assert {k: v for k, v in state.items() if k not in ("environment", "rng_fingerprint")} == \
        {"step": 2, "data_position": 7, "best": 0.5}
    assert state["rng_fingerprint"] == runs.rng_fingerprint()  # accelerate restored the RNG of the save
    assert state["environment"]["packages"]["torch"]  # what ran is recorded with the state
    restored = weights()
    for key in saved_weights:
        assert torch.equal(restored[key], saved_weights[key]), key
    for key, moment in optimizer.state_dict()["state"].items():
        assert torch.equal(moment["exp_avg"], saved_moments[key])
    assert optimizer.param_groups[0]["lr"] == saved_lr
    # resuming reproduces the same step 3 as the uninterrupted run
    train_step()
    for key, value in weights().items():
        torch.testing.assert_close(value, after_step_3[key], rtol=0, atol=1e-7)

    # the snapshot is a model-only save_pretrained folder holding the step-2 weights
    exported = common.load_model(str(snapshot))
    for key, value in exported.state_dict().items():
        assert torch.equal(value, saved_weights[key]), key
    assert (snapshot / "tokenizer_config.json").exists() or (snapshot / "tokenizer.json").exists()
    assert not any(snapshot.glob("optimizer*")) and not any(snapshot.glob("random_states*"))
    bf16 = runs.save_snapshot(accelerator, model, processor, out, 3, torch.bfloat16)
    from safetensors.torch import load_file
    stored = load_file(str(bf16 / "model.safetensors"))
    assert {v.dtype for v in stored.values()} == {torch.bfloat16}  # 2 bytes per parameter on disk
    assert json.loads((bf16 / "config.json").read_text())["dtype"] == "bfloat16"
    assert [(s, label) for s, label, _ in runs.list_checkpoints(out)] == [(2, "checkpoint-2"), (3, "checkpoint-3")]

    # a resume state whose RNG record accelerate cannot restore is refused: it would not continue the same run
    no_rng = tmp_path / "no_rng"
    shutil.copytree(state_dir, no_rng)
    for rng_file in no_rng.glob("random_states_*.pkl"):
        rng_file.unlink()
    torch.rand(3)
    with pytest.raises(SystemExit) as stop:
        runs.load_resume_state(accelerator, no_rng)
    assert stop.value.code == 2

    # crash while saving step 4: a half-written temp state is left behind; the step-2 state is still the one
    crashed = out / ".resume.tmp"
    crashed.mkdir()
    (crashed / "model.safetensors").write_bytes(b"\x00" * 10)
    assert runs.resume_state(out) == state_dir
    # crash between the two renames: only .resume.old is complete, and it is found
    (out / "resume").rename(out / ".resume.old")
    assert runs.resume_state(out) == out / ".resume.old"
    assert runs.load_resume_state(accelerator, runs.resume_state(out))["step"] == 2
    # the next save replaces the debris
    runs.save_resume_state(accelerator, out, 4, {"data_position": 9})
    assert runs.resume_state(out) == out / "resume" and not crashed.exists() and not (out / ".resume.old").exists()
    assert json.loads((out / "resume" / "trainer_state.json").read_text())["step"] == 4


# ----------------------------------------------------------------------------------------------------------
# Atomic JSON, metrics
# ----------------------------------------------------------------------------------------------------------
def test_write_json_atomic(tmp_path):
    target = tmp_path / "deep" / "er" / "results.json"
    files.write_json_atomic(target, {"accuracy": 0.5, "path": tmp_path})
    files.write_json_atomic(target, {"accuracy": 0.75, "rows": [1, 2]})
    assert json.loads(target.read_text()) == {"accuracy": 0.75, "rows": [1, 2]}
    assert [p.name for p in target.parent.iterdir()] == ["results.json"]


def test_atomic_path_leaves_the_old_file_when_the_writer_fails(tmp_path):
    target = tmp_path / "figure.png"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with files.atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("the writer failed")
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["figure.png"]
    with files.atomic_path(target) as tmp:
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new" and [p.name for p in tmp_path.iterdir()] == ["figure.png"]


def test_metrics_logger_and_truncate(tmp_path):
    path = tmp_path / "logs" / "metrics.jsonl"
    logger = runs.MetricsLogger(path)
    logger.log({"event": "start"})  # no step: counts as step 0
    for step in range(1, 6):
        logger.log({"step": step, "loss": torch.tensor(1.0 / step).item(), "lr": torch.tensor(0.5)})
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(records) == 6 and all("time" in r for r in records)
    assert [r.get("step") for r in records] == [None, 1, 2, 3, 4, 5]
    assert records[2]["loss"] == pytest.approx(0.5) and records[2]["lr"] == pytest.approx(0.5)
    runs.truncate_metrics(path, after_step=3)
    kept = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r.get("step") for r in kept] == [None, 1, 2, 3]
    assert sorted(p.name for p in path.parent.iterdir()) == ["metrics.jsonl"]
    runs.MetricsLogger(path).log({"step": 4, "loss": 0.1})  # resumed run appends after the kept lines
    assert [json.loads(line).get("step") for line in path.read_text().splitlines()] == [None, 1, 2, 3, 4]
    runs.truncate_metrics(tmp_path / "missing.jsonl", 3)  # nothing to truncate: no error, no file
    assert not (tmp_path / "missing.jsonl").exists()
    disabled = runs.MetricsLogger(tmp_path / "off" / "metrics.jsonl", enabled=False)
    disabled.log({"step": 1})
    assert not (tmp_path / "off").exists()


def test_truncate_metrics_survives_a_partial_last_line(tmp_path):
    """A run killed while appending to metrics.jsonl leaves a torn last line; resuming must not crash on it."""
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    runs.truncate_metrics(path, after_step=2)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2]


def test_load_rows_checks_split_and_columns(jigsaw_data, tmp_path):
    rows = common.load_rows(str(jigsaw_data), "test", required=("prompt", "answer", "images"))
    assert len(rows) == 8
    assert len(common.row_images(rows[0])) == 1 and isinstance(common.row_images(rows[0])[0], Image.Image)
    with pytest.raises(SystemExit):
        common.load_rows(str(jigsaw_data), None)
    with pytest.raises(SystemExit):
        common.load_rows(str(jigsaw_data), "train", required=("completion",))
    with pytest.raises(SystemExit):
        common.load_rows(str(tmp_path / "nothing_here"), "train")
