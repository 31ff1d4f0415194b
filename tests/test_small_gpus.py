"""Every GPU a user may have: the memory plan of each preset against the card found (plan.py gpu, before anything
loads), the torch build that matches the driver when torch sees no GPU, the 40 GB preset's optimizer (bf16
stochastic rounding: lr 1e-6 updates survive), weights streamed to the device, and the environment record."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import common
import gpus
import memory
import plan

ROOT = Path(__file__).resolve().parents[1]


def run_all(args=(), timeout=120, **env):
    full = {**os.environ, "PY": sys.executable, **{k: str(v) for k, v in env.items()}}
    return subprocess.run(["bash", "run_all.sh", *args], cwd=ROOT, env=full, capture_output=True, text=True,
                          timeout=timeout)


def fake_nvidia_smi(folder: Path, name="NVIDIA A100-SXM4-40GB", mib=40960, driver="535.104.05", cuda="12.2",
                    cc="8.0") -> str:
    """A PATH whose nvidia-smi lists one GPU (query mode) and prints the usual header (plain mode)."""
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / "nvidia-smi"
    script.write_text(f"""#!/bin/bash
if [[ "$*" == *--query-gpu* ]]; then echo "{name}, {mib}, {driver}, {cc}"; exit 0; fi
echo "+-----------------------------------------------------------------------------------------+"
echo "| NVIDIA-SMI {driver}             Driver Version: {driver}     CUDA Version: {cuda}     |"
""")
    script.chmod(0o755)
    return f"{folder}{os.pathsep}{os.environ['PATH']}"


# ----------------------------------------------------------------------------------------------------------
# The GPU the user has is the GPU used
# ----------------------------------------------------------------------------------------------------------
def test_nvidia_smi_lists_a_gpu_torch_cannot_see_and_run_all_stops(tmp_path):
    """The CPU torch of this machine plays a CUDA 13 build on a driver that runs CUDA 12.2 at most."""
    path = fake_nvidia_smi(tmp_path / "bin")
    run = tmp_path / "run"
    for preset in ({"PRESET": "smoke"}, {}):   # an explicit preset, and the default choice (which would be toy)
        result = run_all(PATH=path, RUN=run, **preset)
        assert result.returncode == 2, result.stdout + result.stderr
        message = result.stderr
        assert "error: nvidia-smi lists NVIDIA A100-SXM4-40GB" in message and "driver 535.104.05" in message
        assert "torch" in message and "sees no GPU" in message
        # CUDA 12.2 at most: the newest torch build it runs is cu121; never the constraints file's CUDA 13 build
        assert "--index-url https://download.pytorch.org/whl/cu121" in message
        assert "-c constraints.txt" in message and "CUDA 13" in message
        assert not run.exists(), "nothing may run before the GPU check"
    override = run_all(["--list"], PATH=path, PRESET="smoke", RUN=run)
    assert override.returncode == 0 and "warning: nvidia-smi lists" in override.stderr


def test_the_environment_record_holds_the_driver_and_cuda_versions(tmp_path, monkeypatch):
    import runs
    monkeypatch.setenv("PATH", fake_nvidia_smi(tmp_path / "bin", driver="550.54.15", cuda="12.4"))
    env = runs.environment()
    assert env["nvidia_driver"] == "550.54.15" and env["driver_cuda"] == "12.4"
    assert env["torch_cuda_build"] == torch.version.cuda
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert runs.environment()["nvidia_driver"] is None   # no nvidia-smi: recorded as absent, no error


def test_load_model_streams_weights_to_the_device(toy_model_dir, monkeypatch):
    """With a device, from_pretrained gets device_map={'': device} (safetensors go straight to it, no full copy
    in host RAM first) and nothing moves the model afterwards; the tiny model loads that way for real."""
    from transformers import AutoModelForImageTextToText
    model = common.load_model(str(toy_model_dir), "float32", device="cpu")
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    seen = {}
    moved = []

    class Loaded(torch.nn.Module):
        def to(self, *args, **kwargs):
            moved.append(args)
            return self

    def fake_from_pretrained(name, **kwargs):
        seen.update(kwargs)
        return Loaded()
    monkeypatch.setattr(AutoModelForImageTextToText, "from_pretrained", fake_from_pretrained)
    common.load_model("some/model", "bfloat16", device="cuda:1")
    assert seen["device_map"] == {"": "cuda:1"} and seen["dtype"] == torch.bfloat16 and not moved
    seen.clear()
    common.load_model("some/model", "float32")
    assert "device_map" not in seen


@pytest.mark.parametrize("script", ["sft", "rft", "base_check"])
def test_training_and_check_stages_load_onto_their_device(script, jigsaw_data, toy_model_dir, tmp_path, monkeypatch):
    """sft.py, rft.py and base_check.py hand the accelerator's device to the loader (before: a CPU load, then
    accelerate moved it, after the whole fp32 model had sat in host RAM)."""
    import importlib
    module = importlib.import_module(script)
    calls = []

    class Loaded(Exception):
        pass

    def spy(*args, **kwargs):
        calls.append((args, kwargs))
        raise Loaded
    monkeypatch.setattr(common, "load_model_and_processor", spy)
    argv = ["--model", str(toy_model_dir), "--data", str(jigsaw_data), "--output_dir", str(tmp_path / "out")]
    if script == "sft":
        argv += ["--prompt_column", "prompt", "--completion_column", "target_non_rea", "--max_steps", "1"]
    if script == "rft":
        argv += ["--max_steps", "1", "--optimizer", "adamw"]
    with pytest.raises(Loaded):
        module.main(argv)
    args, kwargs = calls[0]
    device = kwargs.get("device", args[5] if len(args) > 5 else None)
    assert device == "cpu", calls


# ----------------------------------------------------------------------------------------------------------
# The memory plan knows every card, and run_all.sh refuses a preset that does not fit before anything loads
# ----------------------------------------------------------------------------------------------------------
def test_fits_on_lines_name_every_card_class(capsys):
    tiny = memory.memory_plan_of_counts(10 ** 9, 0, "adamw8bit", "bf16")   # 6 GB: fits every class
    memory.print_memory_plan(tiny, "plan")
    printed = capsys.readouterr().out
    for size in ("16 GB", "24 GB", "40 GB", "48 GB", "80 GB", "96 GB", "141 GB"):
        assert re.search(rf"fits on {size} \(.*\) with .*: yes", printed), size
    large = memory.memory_plan_of_counts(20 * 10 ** 9, 0, "adamw", "fp32")
    memory.print_memory_plan(large, "plan")
    assert printed.count(": yes") == 7 and capsys.readouterr().out.count(": no") == 7


def needs(preset: str) -> float:
    """GiB the preset's plan needs with headroom (plan.py's figure, which run_all.sh's messages must name)."""
    return gpus.needed_gib(gpus.memory_peaks(plan.preset_settings(preset)))[0]


@pytest.mark.parametrize("gib, advice", [
    (24, "No preset of the 3B/7B experiment fits 24.0 GiB"),
    (40, "PRESET=3b_40gb bash run_all.sh"),
    (80, None)])
def test_a_faked_card_gets_the_right_preset_advice_before_anything_loads(tmp_path, gib, advice):
    run = tmp_path / "run"
    log = tmp_path / "calls"
    fake = tmp_path / "py"   # stage scripts would only log: none may be reached when the plan does not fit
    fake.write_text(f'#!/bin/bash\ncase "$1" in\n  plan.py|mirror.py|experiment.py|-c) exec {sys.executable} "$@" ;;\n'
                    f'  *) echo "$@" >> {log}; exit 0 ;;\nesac\n')
    fake.chmod(0o755)
    args = ["--list"] if advice is None else []
    result = run_all(args, PRESET="3b", RUN=run, PY=fake, GPU_MEMORY_GB=gib)
    need = needs("3b")   # between the 40 GB and the 80 GB card
    assert 40 < need < 80
    assert f"{float(gib):.1f} GiB here" in result.stdout and f"{need:.1f} GiB needed (rft)" in result.stdout
    if advice is None:
        assert result.returncode == 0 and "error" not in result.stderr and "warning" not in result.stderr
    else:
        assert result.returncode == 2, result.stdout + result.stderr
        assert f"error: preset 3b needs {need:.1f} GiB" in result.stderr and advice in result.stderr
        if gib == 24:
            assert "PRESET=toy" in result.stderr and f"3b_40gb, needs {needs('3b_40gb'):.1f} GiB" in result.stderr
        assert not log.exists() and not run.exists()


def test_the_default_preset_follows_the_card(tmp_path, monkeypatch):
    failing = tmp_path / "bin" / "nvidia-smi"   # an nvidia-smi that finds no GPU, whatever the machine has
    failing.parent.mkdir()
    failing.write_text("#!/bin/bash\necho 'NVIDIA-SMI has failed' >&2\nexit 9\n")
    failing.chmod(0o755)
    path = f"{failing.parent}{os.pathsep}{os.environ['PATH']}"
    monkeypatch.setenv("PATH", path)
    monkeypatch.setattr(gpus, "_torch_cuda", lambda: False)   # what torch says on a machine without a GPU

    def choose(**env):
        return gpus.choose_preset({**os.environ, **env})
    assert choose()[0] == "toy"
    assert choose(GPU_MEMORY_GB="80", GPU_NAME="NVIDIA H100 80GB HBM3")[0] == "3b"
    assert choose(GPU_MEMORY_GB="40", GPU_NAME="NVIDIA A100-SXM4-40GB")[0] == "3b_40gb"
    name, why = choose(GPU_MEMORY_GB="22.5", GPU_NAME="NVIDIA L4")
    assert name == "toy" and f"3b_40gb needs {needs('3b_40gb'):.1f} GiB" in why
    name, why = choose(GPU_MEMORY_GB="15", GPU_NAME="Tesla T4")
    assert name == "toy" and "no bf16 tensor cores" in why and "overflow" in why
    listed = run_all(["--list"], GPU_MEMORY_GB=40, GPU_NAME="NVIDIA A100-SXM4-40GB", RUN=tmp_path / "run", PATH=path)
    assert listed.returncode == 0 and "[run_all] preset 3b_40gb" in listed.stdout, listed.stdout + listed.stderr


def test_a_t4_is_told_what_works_and_why_training_does_not(tmp_path):
    result = run_all(PRESET="3b", GPU_MEMORY_GB=15, GPU_NAME="Tesla T4", RUN=tmp_path / "run")
    assert result.returncode == 2
    assert "no bf16 tensor cores" in result.stderr and "Qwen2-family models overflow" in result.stderr
    assert "PRESET=toy" in result.stderr and "evaluating a 3B model" in result.stderr
    ok = run_all(["--list"], PRESET="toy", GPU_MEMORY_GB=15, GPU_NAME="Tesla T4", RUN=tmp_path / "run")
    assert ok.returncode == 0 and "warning" not in ok.stderr   # the toy runs in fp32


def test_the_40gb_preset_fits_40_not_24_and_departs_only_where_its_plan_needs(tmp_path):
    settings = plan.preset_settings("3b_40gb")
    three = plan.preset_settings("3b")
    need, _ = gpus.needed_gib(gpus.memory_peaks(settings))
    assert 24 < need <= 40 and gpus.needed_gib(gpus.memory_peaks(three))[0] > 40
    changed = {k for k in settings if settings[k] != three.get(k)} - {"PRESET"}
    assert changed == {"PRECISION", "OPTIMIZER", "BETA", "RFT_SAVE_STEPS"}, changed
    # with the reference model (BETA as in 3b) it would not fit: the one departure the plan needs beyond bf16
    assert gpus.needed_gib(gpus.memory_peaks({**settings, "BETA": "0.04"}))[0] > 40
    listed = run_all(["--list"], PRESET="3b_40gb", RUN=tmp_path / "run")   # plan.py check passes its variables
    assert listed.returncode == 0, listed.stderr


def test_the_plan_is_the_dry_run_formula(tmp_path):
    """memory_peaks' SFT phase equals sft.py --dry_run for the same shapes (one formula, not two)."""
    import sft
    assert gpus.SFT_MAX_COMPLETION_LENGTH == sft.Args.max_completion_length
    settings = {**plan.preset_settings("3b_40gb")}
    prompt = plan.prompt_tokens(settings)
    dry = sft.main(["--model", "Qwen/Qwen2.5-VL-3B-Instruct", "--data", "unused", "--output_dir", str(tmp_path),
                    "--dry_run", "--precision", "bf16", "--optimizer", "adamw8bit_sr", "--batch_size", "4",
                    "--gradient_checkpointing", "--plan_prompt_length", str(prompt)])
    assert gpus.memory_peaks(settings)["sft"]["total"] == dry["total"]


def test_cards_table_gives_every_preset_against_every_colab_gpu():
    table = gpus.cards_table(["3b", "3b_40gb", "7b", "toy"])
    rows = {line.split("|")[1].strip(): line for line in table.splitlines()[2:]}
    assert set(rows) == {"3b", "3b_40gb", "7b"}   # CPU presets have no GPU row
    cells = lambda name: [c.strip() for c in rows[name].split("|")[4:-1]]  # noqa: E731
    t4, l4, a100_40, a100_80, h100, g4, h200 = cells("3b")
    assert t4 == "no (no bf16)" and l4 == "no (memory)" and a100_40 == "no (memory)" and h100.startswith("yes")
    assert cells("3b_40gb")[2].startswith("yes") and cells("3b_40gb")[1] == "no (memory)"
    assert cells("7b")[-1].startswith("yes") and cells("7b")[4] == "no (memory)"


# ----------------------------------------------------------------------------------------------------------
# bf16 weights with stochastic rounding (torchao, requirements-torchao.txt)
# ----------------------------------------------------------------------------------------------------------
def _adamw_displacement(weights, grad, optimizer_factory, steps):
    param = torch.nn.Parameter(weights.clone())
    optimizer = optimizer_factory([param])
    for _ in range(steps):
        param.grad = grad.to(param.dtype)
        optimizer.step()
    return param.detach().float() - weights.float()


def test_stochastic_rounding_keeps_lr_1e6_updates_that_plain_bf16_loses():
    """1,000 AdamW steps at lr 1e-6 on bf16 weights in [0.5, 1) (spacing 2^-8 = 3.9e-3, so one update is 1/3900
    of it). With a constant gradient each step moves a weight by lr against its sign: the fp32 reference moves
    1e-3 in total. Plain bf16 (torch AdamW, and bitsandbytes' 8-bit AdamW, which rounds to nearest) moves no
    weight at all; torchao's AdamW8bit with bf16 stochastic rounding moves them by the reference's amount in
    expectation: the mean over 16,384 weights is within 5% of it (its standard error is ~1.5%: each weight ends
    on a bf16 value, ~2e-3 from its expectation)."""
    from torchao.optim import AdamW8bit  # noqa: F401 (fails here, clearly, when torchao is missing)
    import bitsandbytes as bnb
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        generator = torch.Generator().manual_seed(0)
        n, steps, lr = 16384, 1000, 1e-6
        weights = (0.5 + 0.5 * torch.rand(n, generator=generator)).to(torch.bfloat16)
        grad = (0.1 + 0.9 * torch.rand(n, generator=generator)) * torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0)
        against = -torch.sign(grad)
        reference = _adamw_displacement(weights.float(), grad, lambda p: torch.optim.AdamW(p, lr=lr, weight_decay=0.0), steps)
        plain = _adamw_displacement(weights, grad, lambda p: torch.optim.AdamW(p, lr=lr, weight_decay=0.0), steps)
        nearest = _adamw_displacement(weights, grad, lambda p: bnb.optim.AdamW8bit(p, lr=lr, weight_decay=0.0), steps)
        torch.manual_seed(0)
        rounded = _adamw_displacement(weights, grad, lambda p: common.make_optimizer(p, "adamw8bit_sr", lr), steps)
    finally:
        torch.set_num_threads(previous)
    expected = float((reference * against).mean())
    assert abs(expected - steps * lr) < 0.05 * steps * lr      # fp32 itself: 1e-3, up to its own rounding
    assert torch.count_nonzero(plain) == 0 and torch.count_nonzero(nearest) == 0
    moved = float((rounded * against).mean())
    assert abs(moved - expected) < 0.05 * expected, (moved, expected)
    assert 0.1 < float((rounded != 0).float().mean()) < 0.5   # single weights moved by whole bf16 steps, some not


def test_the_stochastic_rounding_optimizer_resumes_exactly(tmp_path):
    """Its state (8-bit tensors of torchao's own class) survives torch.save / torch.load(weights_only=True), as
    accelerate's resume state stores it; with the RNG restored, the continuation equals the uninterrupted run."""
    def run(split_at=None):
        torch.manual_seed(1)
        param = torch.nn.Parameter(torch.rand(4096, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16))
        optimizer = common.make_optimizer([param], "adamw8bit_sr", 1e-4)
        for step in range(6):
            if step == split_at:
                path = tmp_path / "state.pt"
                torch.save({"optimizer": optimizer.state_dict(), "param": param.detach().clone(),
                            "rng": torch.get_rng_state()}, path)
                saved = torch.load(path, weights_only=True)
                param = torch.nn.Parameter(saved["param"])
                optimizer = common.make_optimizer([param], "adamw8bit_sr", 1e-4)
                optimizer.load_state_dict(saved["optimizer"])
                torch.set_rng_state(saved["rng"])
            param.grad = torch.sin(torch.arange(4096.0) * (step + 1)).to(torch.bfloat16)
            optimizer.step()
        return param.detach()
    assert torch.equal(run(), run(split_at=3))


def test_the_optimizer_is_checked_before_anything_loads(monkeypatch, capsys):
    with pytest.raises(SystemExit):
        common.check_optimizer("adamw8bit_sr", "bf16_mixed")
    assert "--precision bf16" in capsys.readouterr().err
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torchao" else real(name, *a))
    with pytest.raises(SystemExit):
        common.check_optimizer("adamw8bit_sr", "bf16")
    assert "error: --optimizer adamw8bit_sr needs torchao" in capsys.readouterr().err
    assert "requirements-torchao.txt" in (ROOT / "requirements-dev.txt").read_text()
    common.check_optimizer("adamw8bit", "bf16")
    assert "round to nothing" in capsys.readouterr().err   # pure bf16 without stochastic rounding: said


def test_the_report_says_a_preset_that_departs_is_compared_within_itself():
    import report
    note = report.within_preset_note({"PRECISION": "bf16", "OPTIMIZER": "adamw8bit_sr", "BETA": "0"}, "3b_40gb")
    assert "Compare within this preset only" in note[0] and "BETA=0" in note[0] and "adamw8bit_sr" in note[0]
    assert report.within_preset_note({"PRECISION": "bf16_mixed", "BETA": "0.04"}, "3b") == []
