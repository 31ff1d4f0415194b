"""The run folder's life cycle, the same for every stage: the output marker (no stage deletes what it did not
make), the record of what ran, model snapshots, the one resume state, the
fresh-run/resume rule, metrics, the accelerator, and the save/resume/final steps that sft.py and rft.py share.

Layout of a training run's --output_dir (sft.py and rft.py; rollout_sft.py, eval.py and analyze.py read it):
    run.json          the run's settings (the resume rule compares them), written at the start
    metrics.jsonl     one JSON object per logged step (and eval lines)
    checkpoint-N/     model-only save_pretrained snapshots every --save_steps and at each --save_at step (bf16 on
                      a GPU: 2 bytes/param), each with trainer_state.json {"step": N}: what evaluation along
                      training and analyze.py read
    resume/           the ONE resume state (accelerate state: weights, optimizer, scheduler, every process's RNG,
                      + trainer_state.json with the data position), replaced at each save: about 6 bytes/param on a GPU
    final/            save_pretrained of the last step (same dtype as the snapshots)
    .kit_stage.lock   the stage's lock, held while it runs (files.lock_output_dir); every stage's output folder has one
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
import shutil
import sys
import time
from pathlib import Path

import torch

import files
import fsdp
from common import fail

# ----------------------------------------------------------------------------------------------------------
# The output marker: no stage deletes what it did not make
# ----------------------------------------------------------------------------------------------------------
# Every folder a stage writes carries this marker (its stage name), so that a later run may replace the folder
# only when the same stage made it: no stage deletes what it did not create.
OUTPUT_MARKER = ".kit_output.json"
NOT_OUTPUTS = (OUTPUT_MARKER, files.LOCK_FILE)   # in every output folder; neither makes it "not empty"


def check_output_dir(path, stage: str, overwrite: bool = False) -> None:
    """Refuse to write into an existing, non-empty folder that this stage did not create (a run folder with
    checkpoints, someone's data), unless --overwrite; and a file or read-only folder in its place. Called
    before any model is loaded."""
    path = Path(path)
    files.check_writable(path)
    if not path.exists():
        return
    entries = [p for p in path.iterdir() if p.name not in NOT_OUTPUTS]
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
    files.write_json_atomic(Path(path) / OUTPUT_MARKER, {"stage": stage})


def save_dataset_atomic(dataset, out, stage: str, overwrite: bool = False) -> None:
    """save_to_disk into a temporary sibling folder, then swap it in: a crash never leaves half a data set, and
    an existing folder is replaced only when this stage made it (check_output_dir)."""
    out_path = Path(out)
    check_output_dir(out_path, stage, overwrite)
    tmp = out_path.with_name(out_path.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        dataset.save_to_disk(str(tmp))
        mark_output_dir(tmp, stage)
    except BaseException:  # a full disk, Ctrl-C: give the space back; `out` is as it was
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out_path.exists():
        old = out_path.with_name(out_path.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        out_path.rename(old)
        tmp.rename(out_path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out_path)


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
    from gpus import nvidia_smi
    gpus = nvidia_smi()
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
            # what the machine has, whatever torch can use: a torch build for a newer CUDA than the driver runs
            # sees no GPU (plan.py's GPU check says which build fits)
            "torch_cuda_build": torch.version.cuda,
            "nvidia_driver": gpus[0]["driver"] if gpus else None,
            "driver_cuda": gpus[0]["cuda"] if gpus else None,
            "torch_threads": torch.get_num_threads(), "git_commit": commit, "git_dirty": dirty,
            "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]) if sys.argv and sys.argv[0] else None}


def export_model(accelerator, model, processor, path, dtype: torch.dtype | None = None) -> None:
    """save_pretrained of model and processor: a folder any HF tool (and every stage here) loads by path.
    Gathers the full state dict first, so it also works under FSDP/DeepSpeed. `dtype` casts floating weights
    on the way out (bf16: 2 bytes per parameter; the fp32 master weights stay in the resume state only).
    Written to a temp folder and renamed, so a crash never leaves half a model behind."""
    path = Path(path)
    state_dict = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        for key in getattr(unwrapped, "all_tied_weights_keys", None) or {}:
            state_dict.pop(key, None)   # a tied copy (lm_head of 3B): FSDP's full state dict lists it as a tensor of its own
        if dtype is not None:
            state_dict = {k: (v.to(dtype) if torch.is_floating_point(v) else v) for k, v in state_dict.items()}
        tmp = path.with_name(f".{path.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            unwrapped.save_pretrained(str(tmp), state_dict=state_dict, safe_serialization=True)
            if dtype is not None:  # config.json must say what the files hold (save_pretrained writes the live dtype)
                name = str(dtype).replace("torch.", "")
                config = json.loads((tmp / "config.json").read_text())
                for section in [config] + [v for v in config.values() if isinstance(v, dict) and "dtype" in v]:
                    section["dtype"] = name
                files.write_json_atomic(tmp / "config.json", config)
            processor.save_pretrained(str(tmp))
        except BaseException:  # a full disk: give the half-written copy's space back; `path` is as it was
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        shutil.rmtree(path, ignore_errors=True)
        tmp.rename(path)
    accelerator.wait_for_everyone()


RUN_FILE, RESUME_DIR = "run.json", "resume"
TRAINING_OUTPUTS = (RUN_FILE, "metrics.jsonl", RESUME_DIR, "final", "completions.jsonl", "tracking", OUTPUT_MARKER)
TRAINING_OUTPUT_GLOBS = ("checkpoint-*", "completions.rank*.jsonl", ".*.tmp", ".*.old")


def snapshot_dtype(precision: str) -> torch.dtype:
    """Model-only snapshots: bf16 for GPU precisions (inference needs nothing more), fp32 for fp32 runs."""
    return torch.float32 if precision == "fp32" else torch.bfloat16


def parse_save_at(text: str, flag: str = "--save_at") -> list[int]:
    """'5,10,20' -> [5, 10, 20]: extra snapshot steps (the early points of an accuracy/forgetting curve,
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
        files.write_json_atomic(path / "trainer_state.json", {"step": step})
    accelerator.wait_for_everyone()
    return path


def save_resume_state(accelerator, output_dir, step: int, extra: dict) -> Path:
    """Model, optimizer, scheduler and every RNG state (accelerator.save_state, safetensors) plus
    trainer_state.json (step, data position, ...) in output_dir/resume, replacing the previous one. Written to
    a temp folder first; the old state is only removed once the new one is complete, so a crash at any moment
    leaves one complete state (resume_state() finds it)."""
    output_dir = Path(output_dir)
    final, tmp, old = output_dir / RESUME_DIR, output_dir / f".{RESUME_DIR}.tmp", output_dir / f".{RESUME_DIR}.old"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(tmp), safe_serialization=True)
        if accelerator.is_main_process:
            files.write_json_atomic(tmp / "trainer_state.json", {"step": step, **extra, "rng_fingerprint": rng_fingerprint(),
                                                           "environment": environment()})
    except BaseException:  # a full disk: the previous state was not touched; give the half-written one's space back
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if accelerator.is_main_process:
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


def rng_fingerprint() -> str:
    """A short hash of this process's Python and torch RNG states: what the sampler and the data draws depend on."""
    digest = hashlib.sha256(repr(random.getstate()).encode())
    digest.update(torch.get_rng_state().numpy().tobytes())
    return digest.hexdigest()[:16]


def load_resume_state(accelerator, path) -> dict:
    """accelerator.load_state (weights, optimizer, scheduler and every process's RNG), then the trainer state.
    accelerate only logs "Could not load random states" when it fails to restore them; a resume that samples
    from another RNG state is not the same run, so the main process compares the restored state with the
    fingerprint recorded at save time and stops on a difference."""
    accelerator.load_state(str(path))
    state = json.loads((Path(path) / "trainer_state.json").read_text())
    recorded = state.get("rng_fingerprint")
    if accelerator.is_main_process and recorded is not None and recorded != rng_fingerprint():
        fail(f"resume state {path}: accelerate did not restore the random number generators (their fingerprint "
             f"differs from the one saved); resuming would not continue the same run. Check that the accelerate "
             f"version matches the one that saved it ({state.get('environment', {}).get('packages', {})}).")
    return state


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


# ----------------------------------------------------------------------------------------------------------
# The save / resume / final steps of a training loop (sft.py and rft.py)
# ----------------------------------------------------------------------------------------------------------
def start_or_resume(accelerator, resume_from, output_dir, resume_asked: bool, tag: str) -> dict:
    """The trainer state a training loop continues from: the resume state's (step, data position, ...) after
    accelerate restored the weights, optimizer, scheduler and RNGs, or step 0 of a fresh run."""
    if resume_from is not None:
        state = load_resume_state(accelerator, resume_from)
        accelerator.print(f"[{tag}] resumed from {resume_from} at step {state['step']} (data position "
                          f"{state.get('data_position')})")
        return state
    if resume_asked:
        accelerator.print(f"[{tag}] --resume: no resume state in {output_dir}; starting from step 0")
    return {"step": 0, "data_position": 0}


def continue_run(accelerator, resume_from, output_dir, max_steps: int, save_steps: int, save_at: list[int],
                 tag: str) -> bool:
    """Before any model loads, a resume state's step against --max_steps: past it stops (a run cannot go back),
    at it with final/ written is a finished run (True: nothing to do). A run continued past the --max_steps it
    finished at (run_all.sh's pilot, then rft) left that step's weights in final/, which one uninterrupted run
    would have saved as checkpoint-{step}/ (snapshot_due): they are copied there, so the run has the same
    snapshots. final/ holds exactly those weights only when its trainer_state.json says it was written then."""
    if resume_from is None:
        return False
    output_dir = Path(output_dir)
    step = json.loads((Path(resume_from) / "trainer_state.json").read_text())["step"]
    if step > max_steps:
        fail(f"--resume: {output_dir} is at step {step}, past --max_steps {max_steps}; a run cannot go back. Give "
             "--max_steps >= its step, or start a new --output_dir.")
    final, target = output_dir / "final", output_dir / f"checkpoint-{step}"
    if step == max_steps and (final / "config.json").exists():
        accelerator.print(f"[{tag}] {output_dir} already finished --max_steps {max_steps}: nothing to do")
        return True
    state = final / "trainer_state.json"
    if (accelerator.is_main_process and snapshot_due(step, max_steps, save_steps, save_at)[0]
            and not target.exists() and state.exists() and json.loads(state.read_text()).get("step") == step):
        tmp = output_dir / f".checkpoint-{step}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(final, tmp)
        files.write_json_atomic(tmp / "trainer_state.json", {"step": step})
        tmp.rename(target)
    return False


def save_checkpoint(accelerator, model, processor, output_dir, step: int, dtype: torch.dtype,
                    trainer_state: dict | None, snapshot: bool = True, keep_snapshots: int = 0) -> None:
    """After optimizer step `step`: the model-only snapshot checkpoint-{step}/ (when `snapshot`), the one resume
    state with `trainer_state` (when given), then only the newest `keep_snapshots` snapshots kept (0: all)."""
    with files.write_guard(output_dir, f"step {step}'s checkpoint into {output_dir}", lambda: kept_note(output_dir)):
        if snapshot:
            save_snapshot(accelerator, model, processor, output_dir, step, dtype)
        if trainer_state is not None:
            save_resume_state(accelerator, output_dir, step, trainer_state)
    if accelerator.is_main_process and keep_snapshots:
        for _, _, old in list_checkpoints(output_dir, include_final=False)[:-keep_snapshots]:
            shutil.rmtree(old, ignore_errors=True)


def finish_run(accelerator, model, processor, output_dir, step: int, dtype: torch.dtype, trainer_state: dict,
               final_state: dict) -> Path:
    """The end of a training run: the last step's resume state (a rerun with --resume finds the run finished),
    final/ (save_pretrained in the snapshots' dtype; it is the last step's snapshot, so no checkpoint-N/ copy of
    it) with `final_state` in its trainer_state.json, and the trackers closed."""
    final = Path(output_dir) / "final"
    with files.write_guard(output_dir, f"the last step's resume state and {final}", lambda: kept_note(output_dir)):
        save_resume_state(accelerator, output_dir, step, trainer_state)
        export_model(accelerator, model, processor, final, dtype)
        if accelerator.is_main_process:
            files.write_json_atomic(final / "trainer_state.json", {"step": step, **final_state})
    if accelerator.num_processes > 1:
        accelerator.end_training()
    else:  # the trackers only: a process group in a one-process run is a vLLM engine's (vllm_engine.py), which
        for tracker in accelerator.trackers:   # would fail to shut down at exit if accelerate destroyed it here
            tracker.finish()
    return final


def kept_note(output_dir) -> str:
    """What a failed save left of a training run: its last complete resume state (each save writes a new one
    beside the old and swaps them only when it is complete) and the snapshots written before."""
    state = resume_state(output_dir)
    snapshots = ", ".join(label for _, label, _ in list_checkpoints(output_dir)) or "none"
    if state is None:
        return (f"No resume state of this run was complete yet (snapshots kept: {snapshots}); free space and "
                "rerun the same command, which starts from step 0.")
    try:
        step = json.loads((state / "trainer_state.json").read_text())["step"]
    except (OSError, ValueError, KeyError):
        step = "?"
    return (f"The previous complete resume state, {state} (step {step}), is intact, and so are the snapshots "
            f"written before ({snapshots}); the half-written copy was removed. Free space on that disk, then rerun "
            f"the same command with --resume: it continues from step {step}.")


# ----------------------------------------------------------------------------------------------------------
# What --data and --model point to: the resume rule compares these, not how the paths are spelt
# ----------------------------------------------------------------------------------------------------------
MODEL_SAMPLE_BLOCKS, MODEL_SAMPLE_BYTES = 16, 1 << 16


def data_fingerprint(path) -> str | None:
    """sha256 (16 hex digits) of a data set's content: a .jsonl/.json file's bytes, or the Arrow files that a
    save_to_disk folder's state.json lists, split by split (not its random `_fingerprint`, nor the cache-*.arrow
    files that reading leaves beside them). Reads the data once (check_images decodes it all anyway); None
    when there is nothing at the path. The images a JSONL row names by path are not part of it."""
    path = Path(path)
    if not path.exists():
        return None
    digest = hashlib.sha256()

    def add_file(file: Path) -> None:
        digest.update(f"{file.name}:{file.stat().st_size}\n".encode())
        with file.open("rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                digest.update(block)
    if path.is_file():
        add_file(path)
        return digest.hexdigest()[:16]
    splits = [path]
    if (path / "dataset_dict.json").exists():
        try:
            splits = [path / name for name in json.loads((path / "dataset_dict.json").read_text())["splits"]]
        except (OSError, ValueError, KeyError, TypeError):
            pass
    for folder in splits:
        digest.update(f"split {folder.name}\n".encode())
        try:
            state = json.loads((folder / "state.json").read_text())
            files = [folder / item["filename"] for item in state["_data_files"]]
        except (OSError, ValueError, KeyError, TypeError):  # not a save_to_disk folder: every file but caches
            files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("cache-")
                           and p.name not in NOT_OUTPUTS)
        for file in files:
            if file.is_file():
                add_file(file)
    return digest.hexdigest()[:16]


def model_fingerprint(name_or_path) -> str:
    """What a model folder holds, cheaply (a 7.5 GB model is not read): its config.json (without the
    transformers version that saved it), and each *.safetensors file's name, size and 16 blocks of 64 KiB
    spread over it (another training of the same architecture differs in all of them). A hub id: the id."""
    folder = Path(name_or_path).expanduser()
    if not folder.is_dir():
        return f"hub:{name_or_path}"
    digest = hashlib.sha256()
    try:
        config = json.loads((folder / "config.json").read_text())
        config.pop("transformers_version", None)
        config.pop("_name_or_path", None)
        digest.update(json.dumps(config, sort_keys=True).encode())
    except (OSError, ValueError, AttributeError):
        digest.update(b"no config")
    for file in sorted(folder.glob("*.safetensors")):
        size = file.stat().st_size
        digest.update(f"{file.name}:{size}\n".encode())
        with file.open("rb") as f:
            for k in range(MODEL_SAMPLE_BLOCKS):
                f.seek(k * max(0, size - MODEL_SAMPLE_BYTES) // (MODEL_SAMPLE_BLOCKS - 1))
                digest.update(f.read(MODEL_SAMPLE_BYTES))
    return digest.hexdigest()[:16]


FINGERPRINTS = {"data": data_fingerprint, "model": model_fingerprint}   # setting -> what its path holds


def claim_output_dir(output_dir, stage: str, overwrite: bool, main_process: bool | None = None,
                     create: bool = False) -> None:
    """Before anything else of a training stage: the folder can be written (not a file, not read-only), is not
    someone else's (check_output_dir, unless it holds this stage's run.json), and no other process writes it
    (files.lock_output_dir, main process only). sft.py and rft.py call it first thing, so a second writer on an
    existing folder stops before its data is read (a folder that does not exist yet is made and locked by
    prepare_run, create=True: nothing is written before the data passed its checks)."""
    output_dir = Path(output_dir)
    files.check_writable(output_dir)
    if output_dir.exists() and not (output_dir / RUN_FILE).exists():
        check_output_dir(output_dir, stage, overwrite)  # a folder someone else made: refused without --overwrite
    if files.is_main_process() if main_process is None else main_process:
        files.lock_output_dir(output_dir, stage, create=create)


def prepare_run(accelerator, output_dir, stage: str, settings: dict, resume: bool, overwrite: bool,
                operational: tuple[str, ...] = ()) -> Path | None:
    """The one fresh-run / resume rule of every training stage; returns the resume state to load, or None.

    - The folder is claimed first (claim_output_dir: writable, not someone else's, locked by this process).
    - Fresh run (no --resume) into a folder that already holds a run of this stage: stop, unless --overwrite,
      which removes only what this stage writes (TRAINING_OUTPUTS and checkpoint-N/). A folder this kit did
      not make is refused (check_output_dir).
    - --resume: the recorded run.json settings must equal these, except the `operational` ones (logging,
      saving and evaluation cadence), which do not change the trajectory; a difference stops and names them.
      Paths are compared by what they hold (FINGERPRINTS of --data and --model, recorded in run.json): a
      rebuilt --data is refused even under the same name, and a run folder moved elsewhere (or data reached by
      another spelling) resumes. --output_dir is the folder being resumed, wherever it now lies.
    - In every case metrics.jsonl keeps only the steps up to the resumed one (0 for a fresh start), so a run
      killed before its first checkpoint and resumed never logs a step twice (-1: nothing kept).
    """
    output_dir = Path(output_dir)
    claim_output_dir(output_dir, stage, overwrite, accelerator.is_main_process, create=True)
    run_file = output_dir / RUN_FILE
    ignored = set(operational) | {"resume", "overwrite", "output_dir"}
    fingerprints = {key: function(settings[key]) for key, function in FINGERPRINTS.items() if key in settings}
    state = None
    if output_dir.exists() and any(p.name not in NOT_OUTPUTS for p in output_dir.iterdir()):
        if resume and run_file.exists():
            try:
                record = json.loads(run_file.read_text())
                recorded = record.get("settings", {})
            except (ValueError, AttributeError):  # not UTF-8, not JSON, not an object
                fail(f"--resume: {run_file} cannot be read (not the JSON object sft.py/rft.py write); the run's "
                     "settings are unknown, so it cannot be resumed safely. Start a new --output_dir, or "
                     "--overwrite it without --resume.")
            for key, now in fingerprints.items():
                before = (record.get("fingerprints") or {}).get(key)
                if before is None:
                    continue  # a run.json from before fingerprints: the spelling is compared below
                if before != now:
                    fail(f"--resume: --{key} {settings[key]} does not hold what {output_dir} was trained on "
                         f"(recorded --{key} {recorded.get(key)!r}, content fingerprint {before}; now {now}): it "
                         f"was rebuilt or replaced since. Resuming would mix two runs in one. Point --{key} at what "
                         "the run was trained on, or start a new --output_dir (or --overwrite it without --resume).")
                ignored.add(key)  # same content: a moved folder or another spelling of the same path
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
        with files.write_guard(output_dir, f"the run's records into {output_dir}",
                         "Nothing was trained yet; the files already there keep their previous versions."):
            output_dir.mkdir(parents=True, exist_ok=True)
            step = json.loads((state / "trainer_state.json").read_text())["step"] if state is not None else -1
            truncate_metrics(output_dir / "metrics.jsonl", step)
            if not (resume and run_file.exists()):
                files.write_json_atomic(run_file, {"stage": stage, "settings": settings, "fingerprints": fingerprints,
                                             "environment": environment()})
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
        with files.write_guard(self.path.parent, f"{self.path}",
                         lambda: f"{self.path.name} keeps the lines written before. " + kept_note(self.path.parent)):
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
    accelerator = Accelerator(mixed_precision=mixed_precision, cpu=not torch.cuda.is_available(), log_with=log_with,
                              project_dir=str(Path(output_dir) / "tracking") if log_with else None, **kwargs)
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        fsdp.enable_on_cpu(accelerator, mixed_precision)
    return accelerator


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
    files.write_text_atomic(path, "".join(line + "\n" for line in kept))


