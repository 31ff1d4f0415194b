"""sft.py on the tiny model: memorisation, exact resume, 8-bit optimizer, memory plan, two processes."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import common
import runs
import sequences
import sft

ROOT = Path(__file__).resolve().parents[1]


def _weights(folder: Path) -> dict:
    return load_file(str(folder / "model.safetensors"))


def _run(toy_model_dir, data, out, *extra):
    return sft.main(["--model", str(toy_model_dir), "--data", str(data), "--output_dir", str(out),
                     "--prompt_column", "prompt_no_think", "--completion_column", "target_non_rea", *extra])


def test_memorises_a_handful_of_puzzles(toy_model_dir, tmp_path):
    import jigsaw
    data = tmp_path / "few"
    jigsaw.build_dataset(jigsaw.BuildArgs(source="procedural", grid="2x2", train=6, test=2, output_dir=str(data),
                                          image_size=56))
    # 150 steps: with the image tokens at their 3D M-RoPE positions, 100 steps memorised 5 of the 6 (measured)
    final = _run(toy_model_dir, data, tmp_path / "run", "--max_steps", "150", "--batch_size", "6", "--lr", "3e-3",
                 "--warmup_ratio", "0", "--min_lr_ratio", "1")
    model, processor = common.load_model_and_processor(str(final))
    rows = list(common.load_rows(str(data), "train"))
    out = sequences.generate(model, processor, [r["prompt_no_think"] for r in rows],
                          [common.row_images(r) for r in rows], max_new_tokens=24, do_sample=False)
    exact = sum(text.strip() == r["target_non_rea"] for text, r in zip(out["texts"], rows)) / len(rows)
    assert exact >= 0.9, list(zip(out["texts"], [r["target_non_rea"] for r in rows]))
    metrics = [json.loads(line) for line in (final.parent / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["loss"] < metrics[0]["loss"] / 5


def _keep_resume_state_at(monkeypatch, step: int, keep: Path):
    """Copy the resume state the run writes at `step` aside (the run keeps only its latest one), so a test can
    put it back as if the run had been killed right after that save. Returns the steps it saves at."""
    original = runs.save_resume_state
    saved_at = []

    def wrapped(accelerator, output_dir, at_step, extra):
        path = original(accelerator, output_dir, at_step, extra)
        saved_at.append(at_step)
        if at_step == step:
            shutil.copytree(path, keep)
        return path
    monkeypatch.setattr(runs, "save_resume_state", wrapped)
    return saved_at


def _interrupt_after(out: Path, kept_state: Path, step: int) -> None:
    """The run folder as a kill right after step `step`'s save would have left it."""
    shutil.rmtree(out / "final")
    shutil.rmtree(out / runs.RESUME_DIR)
    shutil.copytree(kept_state, out / runs.RESUME_DIR)
    for _, label, path in runs.list_checkpoints(out, include_final=False):
        if int(label.split("-")[1]) > step:
            shutil.rmtree(path)


def test_resume_reproduces_uninterrupted_run(toy_model_dir, jigsaw_data, tmp_path, monkeypatch):
    out = tmp_path / "run"
    # --save_at 2,3: extra early snapshots (model only: the resume state is still written at 5 and 10 alone)
    args = ["--max_steps", "10", "--save_steps", "5", "--save_at", "2,3", "--batch_size", "3", "--lr", "1e-3",
            "--seed", "3"]
    resume_saves = _keep_resume_state_at(monkeypatch, 5, tmp_path / "state5")
    _run(toy_model_dir, jigsaw_data, out, *args)
    straight = _weights(out / "final")
    assert resume_saves == [5, 10]
    assert [label for _, label, _ in runs.list_checkpoints(out)] == \
        ["checkpoint-2", "checkpoint-3", "checkpoint-5", "final"]  # final/ is step 10's snapshot
    assert not (out / "checkpoint-5" / "optimizer.bin").exists()  # snapshots are model-only
    _interrupt_after(out, tmp_path / "state5", 5)
    _run(toy_model_dir, jigsaw_data, out, *args, "--resume")
    resumed = _weights(out / "final")
    assert straight.keys() == resumed.keys()
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 11))  # resume truncated and re-logged steps 6..10, no duplicates


def test_resume_without_a_saved_state_logs_no_step_twice(toy_model_dir, jigsaw_data, tmp_path):
    """Killed before its first save, then --resume: it starts over, and metrics.jsonl holds each step once."""
    out = tmp_path / "run"
    args = ["--max_steps", "3", "--batch_size", "2", "--lr", "1e-3"]
    _run(toy_model_dir, jigsaw_data, out, *args)
    shutil.rmtree(out / runs.RESUME_DIR)  # as if killed after logging 3 steps but before any save
    shutil.rmtree(out / "final")
    _run(toy_model_dir, jigsaw_data, out, *args, "--resume")
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]


def test_a_used_folder_needs_resume_or_overwrite(toy_model_dir, jigsaw_data, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["--max_steps", "2", "--batch_size", "2", "--lr", "1e-3"]
    _run(toy_model_dir, jigsaw_data, out, *args)
    metrics = (out / "metrics.jsonl").read_text()
    with pytest.raises(SystemExit) as err:  # a fresh run into the same folder: refused, nothing deleted
        _run(toy_model_dir, jigsaw_data, out, *args)
    assert err.value.code == 2 and "--resume" in capsys.readouterr().err
    assert (out / "metrics.jsonl").read_text() == metrics and (out / "final" / "config.json").exists()
    with pytest.raises(SystemExit):  # --resume with a setting that changes the trajectory: refused, named
        _run(toy_model_dir, jigsaw_data, out, "--max_steps", "2", "--batch_size", "2", "--lr", "2e-3", "--resume")
    assert "--lr 0.001 -> 0.002" in capsys.readouterr().err
    _run(toy_model_dir, jigsaw_data, out, *args, "--logging_steps", "2", "--resume")  # operational: accepted
    _run(toy_model_dir, jigsaw_data, out, *args, "--overwrite")  # the user means it
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(SystemExit):  # a folder the kit did not make
        _run(toy_model_dir, jigsaw_data, foreign, *args)
    assert "was not made by this kit" in capsys.readouterr().err and (foreign / "notes.txt").exists()


def test_a_corrupt_image_is_found_before_training(toy_model_dir, tmp_path, capsys):
    import io
    from PIL import Image
    images = tmp_path / "data"
    images.mkdir()
    good = io.BytesIO()
    Image.new("RGB", (56, 56), (200, 10, 10)).save(good, format="PNG")
    (images / "good.png").write_bytes(good.getvalue())
    (images / "bad.png").write_bytes(good.getvalue()[:60])  # a truncated PNG
    rows = [{"id": "a", "images": ["good.png"], "prompt": "colour?", "completion": "red"},
            {"id": "b", "images": ["bad.png"], "prompt": "colour?", "completion": "red"}]
    data = images / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(SystemExit) as err:
        sft.main(["--model", str(toy_model_dir), "--data", str(data), "--output_dir", str(tmp_path / "run"),
                  "--max_steps", "1"])
    message = capsys.readouterr().err
    assert err.value.code == 2 and "row 1 (id b, file bad.png)" in message, message
    assert not (tmp_path / "run").exists()  # failed before anything was written
    data.write_text(json.dumps(rows[0]) + "\n{not json\n")
    with pytest.raises(SystemExit):
        sft.main(["--model", str(toy_model_dir), "--data", str(data), "--output_dir", str(tmp_path / "run")])
    assert "line 2: not valid JSON" in capsys.readouterr().err


def test_adamw8bit_runs_and_changes_weights(toy_model_dir, jigsaw_data, tmp_path):
    final = _run(toy_model_dir, jigsaw_data, tmp_path / "run", "--max_steps", "2", "--batch_size", "2",
                 "--optimizer", "adamw8bit", "--lr", "1e-3")
    before, after = _weights(toy_model_dir), _weights(final)
    changed = [n for n in after if not torch.equal(before[n], after[n])]
    assert changed, "8-bit AdamW step left every weight unchanged"


def test_freeze_vision_tower_keeps_it_fixed(toy_model_dir, jigsaw_data, tmp_path):
    final = _run(toy_model_dir, jigsaw_data, tmp_path / "run", "--max_steps", "2", "--batch_size", "2",
                 "--lr", "1e-2", "--freeze_vision_tower")
    before, after = _weights(toy_model_dir), _weights(final)
    tower = [n for n in after if "visual." in n and "merger." not in n]
    assert tower and all(torch.equal(before[n], after[n]) for n in tower)
    assert any(not torch.equal(before[n], after[n]) for n in after if "merger." in n)


def test_dry_run_3b_parameter_count(capsys):
    plan = sft.main(["--model", "Qwen/Qwen2.5-VL-3B-Instruct", "--dry_run", "--optimizer", "adamw8bit"])
    published = 3.75e9  # the model card's "3.75B params"
    assert abs(plan["parameters_total"] - published) / published < 0.01
    printed = capsys.readouterr().out
    assert "parameters:" in printed and "optimizer_states" in printed and "fits on" in printed


def test_bad_input_fails_clearly(toy_model_dir, jigsaw_data, tmp_path, capsys):
    with pytest.raises(SystemExit):
        sft.main(["--model", str(toy_model_dir), "--data", str(jigsaw_data), "--completion_column", "nope",
                  "--output_dir", str(tmp_path / "x")])
    assert "missing column(s) ['nope']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        sft.main(["--model", str(tmp_path / "no_model"), "--data", str(jigsaw_data), "--prompt_column",
                  "prompt_no_think", "--completion_column", "target_non_rea", "--output_dir", str(tmp_path / "x")])
    assert "no such folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        sft.main(["--model", str(toy_model_dir), "--data", str(tmp_path / "missing"), "--output_dir",
                  str(tmp_path / "x")])
    assert "no such file or folder" in capsys.readouterr().err


def test_two_processes_equal_one_process_with_double_batch(toy_model_dir, jigsaw_data, tmp_path):
    """Two processes under accelerate launch: gradients are all-reduced, so 2 x batch 2 equals 1 x batch 4.
    (`accelerate launch --cpu` always starts one process, MPI aside; `--multi_gpu` starts torchrun workers,
    which on a machine without CUDA run on the CPU with the gloo backend.)"""
    common_args = ["--model", str(toy_model_dir), "--data", str(jigsaw_data), "--prompt_column", "prompt_no_think",
                   "--completion_column", "target_non_rea", "--max_steps", "4", "--lr", "1e-3", "--warmup_ratio", "0.25"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launched = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", str(ROOT / "sft.py"), *common_args,
         "--batch_size", "2", "--output_dir", str(tmp_path / "two")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert launched.returncode == 0, launched.stderr[-3000:]
    assert "2 process(es)" in launched.stdout + launched.stderr
    sft.main([*common_args, "--batch_size", "4", "--output_dir", str(tmp_path / "one")])
    # Step 1 sees the same weights and rows in both runs: the logged loss (all-reduced token sum / all tokens)
    # and the gradient norm (taken after the all-reduce) must match. Unsynchronised or wrongly normalised
    # gradients would show here. Later steps drift apart at float-noise level: Adam divides each update by
    # sqrt(v), so reduction-order noise in near-zero gradients becomes lr-sized steps.
    first = {run: json.loads((tmp_path / run / "metrics.jsonl").read_text().splitlines()[0]) for run in ("one", "two")}
    for key in ("loss", "grad_norm", "tokens"):
        assert first["two"][key] == pytest.approx(first["one"][key], rel=1e-5), key
    # The schedule counts optimizer steps, not steps x processes (accelerate's default would step it twice)
    lrs = {run: [json.loads(line)["lr"] for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
           for run in ("one", "two")}
    assert len(lrs["two"]) == 4 and lrs["two"] == pytest.approx(lrs["one"]) and lrs["two"][-2] > 0, lrs
    two, before = _weights(tmp_path / "two" / "final"), _weights(toy_model_dir)
    assert any(not torch.equal(two[n], before[n]) for n in two)


def test_report_to_tensorboard_logs_the_scalars(toy_model_dir, jigsaw_data, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out = tmp_path / "run"
    _run(toy_model_dir, jigsaw_data, out, "--max_steps", "3", "--batch_size", "2", "--lr", "1e-3",
         "--report_to", "tensorboard")
    events = list((out / "tracking").rglob("events.out.tfevents.*"))
    assert events, list(out.rglob("*"))
    accumulator = EventAccumulator(str(events[0].parent))
    accumulator.Reload()
    losses = [e.value for e in accumulator.Scalars("loss")]
    logged = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert losses == pytest.approx(logged, rel=1e-6)  # the same numbers as metrics.jsonl, which stays the record


def test_sort_by_length_keeps_the_step_and_cuts_the_padding(toy_model_dir, prior_data, tmp_path, monkeypatch):
    """--sort_by_length regroups a step's rows into micro-batches of similar length: the step's loss and gradient
    norm equal one unsorted batch of the same rows, and the padded token slots it computes are fewer (the toy
    prior rows mix ~30- and ~120-token targets)."""
    slots = {}
    real_build = sequences.build_batch

    def counting_build(*a, **k):
        batch = real_build(*a, **k)
        slots[current] = slots.get(current, 0) + batch["input_ids"].numel()
        return batch

    monkeypatch.setattr(sequences, "build_batch", counting_build)
    args = ["--model", str(toy_model_dir), "--data", str(prior_data), "--split", "train", "--prompt_column", "prompt",
            "--completion_column", "completion", "--max_steps", "2", "--lr", "1e-3"]
    variants = {"whole": ["--batch_size", "8"], "unsorted": ["--batch_size", "2", "--grad_accum", "4"],
                "sorted": ["--batch_size", "2", "--grad_accum", "4", "--sort_by_length"]}
    for current, extra in variants.items():
        sft.main([*args, *extra, "--output_dir", str(tmp_path / current)])
    first = {run: json.loads((tmp_path / run / "metrics.jsonl").read_text().splitlines()[0]) for run in variants}
    for run in ("unsorted", "sorted"):
        for key in ("loss", "grad_norm", "tokens"):
            assert first[run][key] == pytest.approx(first["whole"][key], rel=1e-5), (run, key)
    assert slots["sorted"] < 0.9 * slots["unsorted"], slots
