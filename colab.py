r"""What colab.ipynb does, in small functions a test can run: install without replacing Colab's torch, say
which GPU this is and what runs on it, cut the run into session-sized pieces, run one piece with run_all.sh,
copy the small durable outputs to Google Drive after every stage, and show the report inline.

Colab in numbers (the notebook's reasons): a T4 (15 GB, no bf16), L4 (24 GB), A100 (40 GB, sometimes 80), H100
(80 GB) or G4 (RTX PRO 6000, 96 GB); a session lasts hours, not days; the VM's local disk is wiped when it is
recycled; a standard VM has ~12.7 GB of host RAM. So the run folder and HF_HOME live on the fast local disk, and
what must outlive the VM goes to Drive: the small outputs always (settings, logs, metrics, shards, results, the
report: megabytes), the models and resume states only when asked (KEEP_MODELS_ON_DRIVE: the plan's disk, about
160 GB for the 3B presets, more than a free Drive's 15 GB).

    python colab.py plan --preset auto                       # the GPU, the preset for it, the pieces
    python colab.py sync --run runs/smoke --drive /tmp/drive # what the notebook copies after every stage
"""
from __future__ import annotations

import argparse
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
# Small durable outputs: what the stages write besides models and data sets, by file suffix (settings, logs,
# metrics, completions, rollout/teacher shards, results, the report and its figures, the analysis tables).
SMALL_SUFFIXES = (".json", ".jsonl", ".log", ".md", ".png", ".seconds", ".txt", ".csv")
SMALL_MAX_BYTES = 50e6   # a file larger than this is not "small" (an eval results.json is ~1 MB at --limit 500)
NEVER_SYNCED = (".lock", ".lock.pid")


def in_colab() -> bool:
    return "google.colab" in sys.modules or os.environ.get("COLAB_RELEASE_TAG") is not None


# ----------------------------------------------------------------------------------------------------------
# Install: the kit's requirements without touching the torch that Colab matched to its CUDA driver
# ----------------------------------------------------------------------------------------------------------
KEEP_INSTALLED = ("torch", "torchvision")


def install_files(folder: Path, extra: tuple[str, ...] = ()) -> tuple[Path, Path]:
    """(requirements, constraints) for `pip install -r R -c C`: requirements.txt (+ extra files) without the
    torch/torchvision lines, and a constraint pinning the installed torch and torchvision, so that no other
    package can pull in another build (requirements.txt's constraints.txt would install CUDA 13 wheels)."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for name in ("requirements.txt",) + extra:
        for line in (ROOT / name).read_text().splitlines():
            package = re.split(r"[<>=!~\[ ;#]", line.strip(), maxsplit=1)[0].lower()
            if package and package not in KEEP_INSTALLED and not line.strip().startswith("-"):
                lines.append(line)
    pins = []
    for package in KEEP_INSTALLED:
        try:
            pins.append(f"{package}=={importlib.metadata.version(package)}")
        except importlib.metadata.PackageNotFoundError:
            pass
    requirements, constraints = folder / "requirements-colab.txt", folder / "constraints-colab.txt"
    requirements.write_text("\n".join(lines) + "\n")
    constraints.write_text("\n".join(pins) + "\n")
    return requirements, constraints


def install(torchao: bool, folder: Path = Path("/tmp/kit-install")) -> int:
    extra = ("requirements-torchao.txt",) if torchao else ()
    requirements, constraints = install_files(folder, extra)
    print(f"[colab] keeping the installed {', '.join(constraints.read_text().split())}")
    return subprocess.call([sys.executable, "-m", "pip", "install", "-q", "-r", str(requirements), "-c",
                            str(constraints)])


# ----------------------------------------------------------------------------------------------------------
# The GPU, the preset for it, and the pieces of the plan
# ----------------------------------------------------------------------------------------------------------
def gpu_line() -> str:
    """Name, memory, driver of the GPU (nvidia-smi, else torch), or that this is a CPU runtime."""
    import torch
    from gpus import nvidia_smi
    listed = nvidia_smi()
    if listed:
        g = listed[0]
        seen = "torch sees it" if torch.cuda.is_available() else "torch does NOT see it"
        return (f"GPU: {g['name']}, {g['memory_mib'] / 1024:.1f} GiB, driver {g['driver']} (CUDA {g['cuda'] or '?'} "
                f"at most), compute capability {g['compute_capability'] or '?'}; torch {torch.__version__} "
                f"(CUDA {torch.version.cuda}): {seen}")
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return f"GPU: {props.name}, {props.total_memory / 1024 ** 3:.1f} GiB (torch {torch.__version__})"
    return f"no GPU: a CPU runtime ({os.cpu_count()} cores); torch {torch.__version__}"


def choose_preset(preset: str, env: dict) -> tuple[str, str]:
    """(preset, why): 'auto' asks run_all.sh's own choice (plan.py gpu --choose: 3b where it fits, 3b_40gb on
    40 GB, toy on a CPU, a T4 or an L4)."""
    if preset != "auto":
        return preset, f"preset {preset} (chosen in the notebook)"
    out = subprocess.run([sys.executable, "plan.py", "gpu", "--choose"], cwd=ROOT, env=env, capture_output=True,
                         text=True)
    if out.returncode != 0:
        raise SystemExit(out.stderr.strip())
    return out.stdout.strip(), out.stderr.strip().removeprefix("[run_all] ")


def preset_overrides(env: dict) -> dict:
    """The preset and run variables set in `env` (they win over the preset file, as in run_all.sh)."""
    import experiment
    known = set(experiment.PRESET_VARIABLES) | set(experiment.RUN_VARIABLES)
    return {k: v for k, v in env.items() if k in known and k != "PRESET"}


def check_gpu(preset: str, env: dict) -> int:
    """run_all.sh's GPU check for `preset` (plan.py gpu): 0, or 2 after printing why and which preset fits."""
    import gpus
    import plan
    return gpus.gpu_check(plan.preset_settings(preset, preset_overrides(env)), preset, env)


def stage_hours(preset: str, env: dict) -> tuple[dict, str]:
    """({stage: estimated hours on this machine}, what the estimate rests on): the plan's GPU-hours times the
    card's time factor (gpus.COLAB_GPUS), or the CPU minutes of a CPU preset."""
    import gpus
    import plan
    settings = plan.preset_settings(preset, preset_overrides(env))
    rows = plan.plan(settings, list(plan.experiment_stages()))["rows"]
    hours = {stage: row["seconds"] / 3600 for stage, row in rows.items()}
    if settings.get("PLAN_DEVICE") != "gpu":
        return hours, "CPU minutes of the README's toy run (plan.py)"
    gpu = gpus.find_gpu(env)["gpu"]
    card = gpus.card_of(gpu["name"], gpu["gib"]) if gpu else None
    if card and card[3]:
        return {s: h * card[3] for s, h in hours.items()}, f"the plan's H100 hours x {card[3]} for {card[0]} " \
            "(gpus.COLAB_GPUS: an estimate from public specifications)"
    return hours, "the plan's H100 hours (this GPU has no time factor in gpus.COLAB_GPUS)"


def pieces(hours: dict, session_hours: float) -> list[list[str]]:
    """Consecutive stages grouped so that each group fits one session; a stage longer than a session is a piece
    of its own (a training stage resumes from its last resume state in the next session; eval and sources
    keep what they finished, per sample)."""
    out, current, used = [], [], 0.0
    for stage, h in hours.items():
        if current and used + h > session_hours:
            out.append(current)
            current, used = [], 0.0
        current.append(stage)
        used += h
    return out + ([current] if current else [])


def done_stages(run: Path) -> set[str]:
    return {p.name for p in (run / ".done").glob("*") if p.suffix == ""} if (run / ".done").is_dir() else set()


# ----------------------------------------------------------------------------------------------------------
# Drive: the small durable outputs after every stage (everything with KEEP_MODELS_ON_DRIVE)
# ----------------------------------------------------------------------------------------------------------
def _model_folder(folder: Path) -> bool:
    """A save_pretrained folder, a resume state or one being written: what the small sync leaves on the local
    disk (their config and tokenizer files are megabytes per checkpoint and useless without the weights)."""
    return folder.name == "resume" or (folder.name.startswith(".") and folder.name.endswith(".tmp")) or \
        any(folder.glob("*.safetensors"))


def files_to_sync(run: Path, models: bool) -> list[Path]:
    chosen = []
    for folder, subfolders, files in os.walk(run):
        folder = Path(folder)
        if not models and folder != run and _model_folder(folder):
            subfolders[:] = []
            continue
        for name in files:
            path = folder / name
            if name in NEVER_SYNCED or path.is_symlink():
                continue
            small = (path.suffix in SMALL_SUFFIXES or folder.name == ".done") and path.stat().st_size <= SMALL_MAX_BYTES
            if models or small:
                chosen.append(path)
    return chosen


def sync(run: Path, drive: Path, models: bool = False) -> int:
    """Copy what changed (size or modification time) from the run folder to the Drive folder, each file written
    to a temporary name and renamed, so a sync cut short leaves whole files. Nothing on Drive is deleted.
    Returns the number of files copied."""
    copied = 0
    for path in files_to_sync(run, models):
        target = drive / path.relative_to(run)
        stat = path.stat()
        if target.exists() and target.stat().st_size == stat.st_size and int(target.stat().st_mtime) == int(stat.st_mtime):
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.sync")
        shutil.copy2(path, tmp)
        os.replace(tmp, target)
        copied += 1
    return copied


def restore(drive: Path, run: Path) -> int:
    """After the VM was recycled: bring a whole run back from Drive (KEEP_MODELS_ON_DRIVE only: with the small
    outputs alone, a finished stage's models are gone and the stage must run again)."""
    if not (drive / ".done").is_dir() or done_stages(run):
        return 0
    return sync(drive, run, models=True)


# ----------------------------------------------------------------------------------------------------------
# One piece: run_all.sh up to the piece's last stage, a Drive sync after every stage it finishes
# ----------------------------------------------------------------------------------------------------------
def run_piece(stages: list[str], run: Path, drive: Path | None, env: dict, models: bool = False) -> int:
    """`bash run_all.sh --until LAST` (finished stages are skipped, an interrupted one resumes), its output
    streamed; each '[run_all] STAGE: done' line triggers a sync to Drive, and one more follows the end."""
    command = ["bash", "run_all.sh", "--until", stages[-1]]
    print("[colab] " + " ".join(command), flush=True)
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, bufsize=1)
    for line in process.stdout:
        print(line, end="", flush=True)
        if drive is not None and re.match(r"\[run_all\] \w+: done in ", line):
            print(f"[colab] synced {sync(run, drive, models)} files to {drive}", flush=True)
    rc = process.wait()
    if drive is not None and run.is_dir():
        print(f"[colab] synced {sync(run, drive, models)} files to {drive}", flush=True)
    return rc


def next_steps(all_pieces: list[list[str]], run: Path, models: bool) -> str:
    """What to do next: the next piece, or that the run is finished; and how to continue after a disconnect."""
    done = done_stages(run)
    left = [p for p in all_pieces if not set(p) <= done]
    if not left:
        return f"All stages are done: {run / 'report.md'} (shown below)."
    where = ("Drive holds the whole run (KEEP_MODELS_ON_DRIVE): after a disconnect or a new VM, run all cells "
             "again; the restore cell copies the run back and run_all.sh skips the finished stages and resumes "
             "the interrupted one from its last resume state." if models else
             "Drive holds the small outputs only: if the VM is still the same (a browser disconnect), run the "
             "'next piece' cell again and run_all.sh resumes; if the VM was recycled, the models are gone and "
             "the stages run again (set KEEP_MODELS_ON_DRIVE = True with enough Drive space to continue instead).")
    return f"Next piece: {' '.join(left[0])} ({len(left)} piece(s) left): run the 'next piece' cell again. " + where


# ----------------------------------------------------------------------------------------------------------
# The report, inline
# ----------------------------------------------------------------------------------------------------------
def report_parts(report: Path) -> list[tuple[str, str]]:
    """report.md as [("markdown", text) | ("image", path)]: notebooks do not show a local image linked from
    Markdown, so each figure is displayed as an image of its own."""
    text = report.read_text()
    parts, last = [], 0
    for match in re.finditer(r"!\[[^\]]*\]\(([^)]+)\)", text):
        parts.append(("markdown", text[last:match.start()]))
        parts.append(("image", str((report.parent / match.group(1)).resolve())))
        last = match.end()
    parts.append(("markdown", text[last:]))
    return [(kind, value) for kind, value in parts if value.strip()]


def show_report(report: Path) -> None:
    from IPython.display import Image, Markdown, display
    for kind, value in report_parts(report):
        display(Markdown(value) if kind == "markdown" else Image(filename=value))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    show = commands.add_parser("plan", help="the GPU, the preset for it and the session-sized pieces")
    show.add_argument("--preset", default="auto")
    show.add_argument("--session_hours", type=float, default=6.0)
    copy = commands.add_parser("sync", help="copy a run's small durable outputs (or everything) to a folder")
    copy.add_argument("--run", required=True)
    copy.add_argument("--drive", required=True)
    copy.add_argument("--models", action="store_true", help="also models, resume states and data sets")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    if args.command == "sync":
        print(f"{sync(Path(args.run), Path(args.drive), args.models)} files copied")
        return 0
    print(gpu_line())
    preset, why = choose_preset(args.preset, dict(os.environ))
    print(why)
    hours, basis = stage_hours(preset, dict(os.environ))
    for k, piece in enumerate(pieces(hours, args.session_hours), 1):
        print(f"piece {k}: {' '.join(piece)} (~{sum(hours[s] for s in piece):.1f} h)")
    print(f"(hours: {basis})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
