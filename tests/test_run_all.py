"""run_all.sh: the smoke preset end to end (a few steps of every stage, tiny model, offline), its plan against
what it wrote, and the stage machinery (process groups, lock, settings per stage, presets)."""
import glob
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from test_docs import documented_paths

ROOT = Path(__file__).resolve().parents[1]
METHODS = ["base", "sft_non_rea", "rft", "sft_rea_external", "sft_rea_grpo_rollout", "sft_rea_self_generated"]
PYTHON = sys.executable


def run_all(args=(), timeout=120, **env):
    full = {**os.environ, "PY": PYTHON, **{k: str(v) for k, v in env.items()}}
    return subprocess.run(["bash", "run_all.sh", *args], cwd=ROOT, env=full, capture_output=True, text=True,
                          timeout=timeout)


def fake_python(tmp_path, body: str) -> Path:
    """A PY that runs the machinery's own helpers (plan.py, mirror.py, python -c) with the real interpreter and
    answers the stage scripts with `body` (a bash case arm list on $1)."""
    fake = tmp_path / "py"
    fake.write_text(f'#!/bin/bash\ncase "$1" in\n  plan.py|mirror.py|experiment.py|-c) exec {PYTHON} "$@" ;;\n{body}\nesac\n')
    fake.chmod(0o755)
    return fake


def du_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def test_smoke_preset_writes_full_report(smoke_run):
    run, _ = smoke_run
    report = (run / "report.md").read_text()
    for method in METHODS:
        assert re.search(rf"^\|\s*{method}\s*\|", report, re.M), f"row {method} missing from report.md"
    for image in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report):
        assert (run / image).exists(), f"figure {image} linked from report.md does not exist"
    assert len(re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)) >= 3
    # the toy world's think check ran on the base and on the thinking-format arms, and the report shows it
    assert all((run / "eval" / m / "think_check.json").exists() for m in ("base", "rft", "sft_rea_external"))
    assert "What the think text says about the pieces" in report and re.search(r"^\| base \| [\d.-]+ \|", report, re.M)
    # Rerun: every stage is skipped, nothing recomputed.
    again = run_all(timeout=300, PRESET="smoke", RUN=run)
    assert again.returncode == 0, again.stdout + again.stderr
    assert len(re.findall(r"^\[run_all\] \w+: done, skipped", again.stdout, re.M)) == 11, again.stdout


def test_settings_recorded_per_stage(smoke_run):
    run, _ = smoke_run
    for stage in ("base", "data", "sft_non_rea", "rft", "sources", "sft_sources", "eval", "report"):
        record = json.loads((run / "settings" / f"{stage}.json").read_text())
        assert record["stage"] == stage and record["preset"] == "smoke" and record["seconds"] >= 0
        assert record["settings"]["PRESET"] == "smoke"
    assert json.loads((run / "settings" / "rft.json").read_text())["settings"]["RFT_STEPS"] == "4"
    assert json.loads((run / "settings" / "sft_non_rea.json").read_text())["settings"]["SFT_STEPS"] == "2"
    assert "RFT_STEPS" not in json.loads((run / "settings" / "sft_non_rea.json").read_text())["settings"]


def _is_toy_run_path(path: str) -> bool:
    return path == "runs/toy" or path.startswith("runs/toy/")


def toy_path_in(run: Path, path: str) -> list[Path]:
    """What a documented runs/toy/... path names in a run folder of the toy world: checkpoint-N (or a step, e.g.
    checkpoint-10) matches any checkpoint-* of that run, since the smoke preset saves other steps; a <name>-style
    placeholder (also inside a name: sft_rea_<name>) matches any entry."""
    parts = path.rstrip("/").split("/")[2:]
    pattern = "/".join("checkpoint-*" if re.fullmatch(r"checkpoint-(\d+|N)", part) else
                       re.sub(r"<[^>]+>", "*", glob.escape(part)) for part in parts)
    return list(run.glob(pattern)) if pattern else [run]


def test_toy_paths_in_the_docs_are_what_the_toy_preset_makes(smoke_run):
    """Every runs/toy/... path that a script's docstring or the README names exists in the smoke run (the toy
    preset's stages with fewer steps; its folder stands for runs/toy/): a reader who ran `bash run_all.sh` can
    paste the documented commands."""
    run, _ = smoke_run
    paths = sorted({(where, path) for where, path in documented_paths() if _is_toy_run_path(path)})
    assert len(paths) >= 20, paths   # the collection itself works
    missing = [f"{where}: {path}" for where, path in paths if not toy_path_in(run, path)]
    assert not missing, "documented toy paths that the toy preset does not make:\n" + "\n".join(missing)


def test_the_docs_spell_toy_folders_only_under_runs_toy():
    """A toy example's folder is runs/toy/... (the toy preset's run folder), never a spelling of its own such as
    data/jigsaw_toy, runs/rft_toy or runs/sft_toy. Files of the kit (presets/toy.env, docs/toy/) are no examples."""
    wrong = sorted({f"{where}: {path}" for where, path in documented_paths()
                    if re.search(r"(^|[/_.-])toy($|[/_.-])", path) and not _is_toy_run_path(path)
                    and not (ROOT / path).exists()})
    assert not wrong, "toy folders spelt outside runs/toy/:\n" + "\n".join(wrong)


def test_disk_plan_matches_what_the_smoke_run_wrote(smoke_run):
    """The plan's disk column (plan.py, from the preset's numbers) against `du` of the run folder, within 20%.
    Written for the checkpoint layout of the lead's change (model-only checkpoint-N/, one resume/, final/); with
    the older layout (accelerate state + a model copy in every checkpoint) the run writes more than planned."""
    run, _ = smoke_run
    settings = json.loads((run / "settings.json").read_text())
    sys.path.insert(0, str(ROOT))
    import plan
    result = plan.plan({**settings, "MODEL": str(run / "base" / "final")}, list(plan.TOY_SECONDS))
    planned = sum(r["disk"] for r in result["rows"].values())
    written = du_bytes(run)
    assert abs(planned - written) <= 0.2 * written, f"planned {planned / 1e6:.1f} MB, written {written / 1e6:.1f} MB: " \
        + ", ".join(f"{k} {v['disk'] / 1e6:.1f}" for k, v in result["rows"].items())


def test_env_overrides_win_over_presets_and_the_plan_uses_them():
    """smoke.env uses `:=` like every preset: an environment value wins (its plain assignments used to win)."""
    result = run_all(["--list"], PRESET="smoke", SFT_STEPS=7, TOY_SIZE="small", RUN="/tmp/unused_" + uuid.uuid4().hex)
    assert result.returncode == 0, result.stderr
    assert "7 steps x batch 4" in result.stdout, result.stdout
    assert "toy.MODEL_SIZES['small']" in result.stdout


def test_every_preset_value_is_set_once_and_overridable():
    for path in sorted((ROOT / "presets").glob("*.env")):
        seen = []
        for line in path.read_text().splitlines():
            code = line.split("#", 1)[0].strip()
            if not code or code.startswith(". presets/") or code.startswith("export HF_"):
                continue
            for statement in filter(None, (s.strip() for s in code.split(";"))):
                match = re.fullmatch(r':\s+"\$\{([A-Z_0-9]+):=(?:[^}$]|\$\{[^}]*\})*\}"', statement)
                assert match, f"{path.name}: '{statement}' is not of the form : \"${{VAR:=value}}\""
                seen.append(match.group(1))
        duplicates = {v for v in seen if seen.count(v) > 1}
        assert not duplicates, f"{path.name} sets {duplicates} more than once"
    assert "MAX_NEW_TOKENS" not in (ROOT / "run_all.sh").read_text().replace("--max_new_tokens", "")


def _total(stdout: str) -> tuple[float, float]:
    line = next(line for line in stdout.splitlines() if line.strip().startswith("total"))
    match = re.search(r"\(to run\)\s+([\d.]+)\s+([\d.]+) (GB|TB)\s+\+ up to ([\d.]+) GB", line)
    disk = float(match.group(2)) * (1000 if match.group(3) == "TB" else 1) + float(match.group(4))
    return float(match.group(1)), disk


def test_3b_plan_fits_one_gpu_day_and_300_gb():
    """The 3b preset: a pilot, then RFT on 8x the first version's 2,000 prompts, within 24 GPU-hours by its plan,
    which says which constants are measured and which (the vLLM rollouts) estimated; with transformers rollouts
    the same run is planned too, and longer."""
    result = run_all(["--list"], PRESET="3b", RUN="/tmp/unused_" + uuid.uuid4().hex)
    assert result.returncode == 0, result.stderr
    hours, disk = _total(result.stdout)
    assert 0 < hours <= 24 and 0 < disk <= 300, result.stdout
    for stage in ("data", "eval_base", "pilot", "sft_non_rea", "rft", "sources", "sft_sources", "eval", "analyze"):
        assert re.search(rf"^\s+{stage}\s+to run\s+[\d.]+\s+[\d.]+ [MG]B", result.stdout, re.M), stage
    prompts = int(re.search(r"= ([\d,]+) prompts", result.stdout).group(1).replace(",", ""))
    assert prompts >= 8 * 2000 and "vllm rollouts (est.)" in result.stdout and "then the gate" in result.stdout
    assert re.search(r"constants: measured on one H100 .* estimated: .*vLLM rollouts", result.stdout)
    hf = run_all(["--list"], PRESET="3b", ROLLOUT_BACKEND="hf", RUN="/tmp/unused_" + uuid.uuid4().hex)
    assert hf.returncode == 0 and "(est.)" not in hf.stdout and _total(hf.stdout)[0] > hours, hf.stdout
    two = run_all(["--list"], PRESET="3b_2x2", RUN="/tmp/unused_" + uuid.uuid4().hex)
    assert two.returncode == 0 and 0 < _total(two.stdout)[0] <= 24, two.stdout
    seven = run_all(["--list"], PRESET="7b", RUN="/tmp/unused_" + uuid.uuid4().hex)
    assert seven.returncode == 0 and _total(seven.stdout)[0] > hours, seven.stdout


def fake_pilot_python(tmp_path, accuracies):
    """A PY whose rft.py writes the metrics.jsonl of a pilot (greedy accuracy `accuracies` at steps 0, 12, 24, ...)
    and records every other stage command; the machinery's helpers (plan.py, pilot.py, ...) run for real."""
    calls, rft = tmp_path / "calls", tmp_path / "fake_rft.py"
    rft.write_text(
        "import json, sys, pathlib\n"
        "a = sys.argv[1:]; out = pathlib.Path(a[a.index('--output_dir') + 1]); steps = int(a[a.index('--max_steps') + 1])\n"
        "out.mkdir(parents=True, exist_ok=True); path = out / 'metrics.jsonl'\n"
        "if path.exists(): sys.exit(0)\n"
        f"acc = {list(accuracies)}\n"
        "lines = [{'step': 0, 'eval_accuracy': acc[0], 'eval_size': 200}]\n"
        "for s in range(1, steps + 1):\n"
        "    lines.append({'step': s, 'reward': 1.0, 'accuracy': 0.01, 'time_generation': 10.0, 'time_training': 40.0,\n"
        "                  'completion_length': 300.0, 'truncated_share': 0.0})\n"
        "    if s % 12 == 0: lines.append({'step': s, 'eval_accuracy': acc[s // 12], 'eval_size': 200, 'time_eval': 300.0})\n"
        "path.write_text(''.join(json.dumps(l) + '\\n' for l in lines))\n")
    fake = tmp_path / "py"
    fake.write_text(f'#!/bin/bash\necho "$@" >> {calls}\ncase "$1" in\n'
                    f'  plan.py|mirror.py|experiment.py|pilot.py|-c) exec {PYTHON} "$@" ;;\n'
                    f'  rft.py) shift; exec {PYTHON} {rft} "$@" ;;\n  *) exit 0 ;;\nesac\n')
    fake.chmod(0o755)
    return fake, calls


def test_a_pilot_that_does_not_reach_its_minimum_stops_the_run_before_sft(tmp_path):
    """The 3b preset's pilot (48 steps, evaluated every 12) climbs from 1.0% to 1.5%: its line reaches ~7% by step
    500, short of the base + 10 points. The run stops before SFT and the sources, showing the measured seconds,
    the trend, the recomputed plan and what would help; IGNORE_PILOT=1 goes on, and RFT continues the pilot's run."""
    fake, calls = fake_pilot_python(tmp_path, [0.010, 0.010, 0.010, 0.015, 0.015])
    run = tmp_path / "run"
    stopped = run_all(PRESET="3b", RUN=run, PY=fake, IGNORE_DISK_PLAN=1)
    assert stopped.returncode != 0 and "pilot FAILED" in stopped.stderr, stopped.stdout + stopped.stderr
    for text in ("RFT does not learn enough in this budget", "update                       40.0 s (plan:",
                 "1.0, 12: 1.0, 24: 1.0, 36: 1.5, 48: 1.5", "+1.25 points per 100 steps", "projected at RFT_STEPS=500",
                 "short of 11.0%", "RFT_STEPS=808", "GRID=2x2", "IGNORE_PILOT=1", "recomputed with the measured"):
        assert text in stopped.stderr, (text, stopped.stderr)
    assert not any(line.startswith(("sft.py", "rollout_sft.py")) for line in calls.read_text().splitlines())
    assert json.loads((run / "pilot" / "pilot.json").read_text())["passed"] is False
    going_on = run_all(PRESET="3b", RUN=run, PY=fake, IGNORE_DISK_PLAN=1, IGNORE_PILOT=1)
    assert going_on.returncode == 0, going_on.stdout + going_on.stderr
    assert "going on because IGNORE_PILOT=1" in going_on.stdout
    lines = calls.read_text().splitlines()
    rft_calls = [line for line in lines if line.startswith("rft.py")]
    assert re.search(r"--max_steps 48 .*--eval_steps 12 ", rft_calls[0]), rft_calls
    assert re.search(r"--max_steps 500 .*--eval_steps 250 ", rft_calls[-1]), rft_calls
    assert all("--resume" in line for line in rft_calls) and any(line.startswith("sft.py") for line in lines)


def test_a_plan_that_does_not_fit_stops_before_any_stage(tmp_path):
    log = tmp_path / "calls"
    fake = fake_python(tmp_path, f'  *) echo "$@" >> {log}; exit 0 ;;')
    run = tmp_path / "run"
    # The toy preset: the stages before sft_non_rea need ~60 MB, so sft_non_rea is the stage named on any machine
    # (with 3b the data and the pilot plan 31 GB, and a CI disk with less than that free names the pilot).
    huge = dict(SFT_STEPS=1_000_000, SAVE_STEPS=1)   # 1e6 checkpoints of 4.7 MB: 4.7 TB
    result = run_all(PRESET="toy", RUN=run, PY=fake, **huge)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "not enough disk" in result.stderr and "stage sft_non_rea" in result.stderr and "SAVE_STEPS" in result.stderr
    assert "short by" in result.stderr and "IGNORE_DISK_PLAN=1" in result.stderr
    assert not log.exists() and not (run / "logs" / "base.log").exists()
    forced = run_all(["--only", "data"], PRESET="toy", RUN=run, PY=fake, IGNORE_DISK_PLAN=1, **huge)
    assert forced.returncode == 0 and "jigsaw.py" in log.read_text(), forced.stdout + forced.stderr


def test_a_failed_command_fails_its_stage(tmp_path):
    """A command failing in the middle of a stage stops it (bash ignores set -e inside `if !` / `||` contexts,
    where a stage would have run on and been marked done)."""
    fake = fake_python(tmp_path, "  toy.py) exit 3 ;;\n  *) exit 0 ;;")  # later commands "succeed"
    run = tmp_path / "run"
    result = run_all(["--only", "base"], PRESET="smoke", RUN=run, PY=fake)
    assert result.returncode != 0 and "base FAILED" in result.stderr, result.stdout + result.stderr
    assert not (run / ".done" / "base").exists()


def _processes_with(marker: str) -> list[str]:
    """'PID command line' of every live process whose command line holds `marker` (read from /proc)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if proc.name.isdigit() and marker in cmdline and state != "Z":
            found.append(f"{proc.name} {cmdline}")
    return found


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_killing_run_all_stops_the_stage_and_a_second_run_is_refused(tmp_path, sig):
    marker = "stage-marker-" + uuid.uuid4().hex
    sleeper = f'{PYTHON} -c "import time; time.sleep(120)" {marker}'
    # The stage starts a child in the background and one in the foreground: both must die with run_all.sh.
    fake = fake_python(tmp_path, f"  toy.py) {sleeper} & {sleeper}; exit 0 ;;\n  *) exit 0 ;;")
    run = tmp_path / "run"
    env = {**os.environ, "PY": str(fake), "PRESET": "smoke", "RUN": str(run)}
    proc = subprocess.Popen(["bash", "run_all.sh", "--only", "base"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while len(_processes_with(marker)) < 2 and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
        assert len(_processes_with(marker)) == 2, f"the stage did not start: {proc.poll()} {(run / 'logs').exists()}"
        second = run_all(["--only", "base"], PRESET="smoke", RUN=run, PY=fake)
        assert second.returncode == 2 and str(run / ".lock") in second.stderr and str(proc.pid) in second.stderr, \
            second.stderr
        proc.send_signal(sig)
        proc.wait(timeout=30)
        deadline = time.time() + 10
        while _processes_with(marker) and time.time() < deadline:
            time.sleep(0.2)
        assert _processes_with(marker) == [], "a stage process outlived run_all.sh"
        assert proc.returncode != 0 and not (run / ".done" / "base").exists()
        # the lock went with the last process of the run: a new run takes it
        assert run_all(["--only", "data"], PRESET="smoke", RUN=run, PY=fake).returncode == 0
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
        for line in _processes_with(marker):
            os.kill(int(line.split()[0]), signal.SIGKILL)


def test_a_later_invocation_does_not_rewrite_a_skipped_stage_s_settings(tmp_path):
    fake = fake_python(tmp_path, "  *) exit 0 ;;")
    run = tmp_path / "run"
    first = run_all(PRESET="smoke", RUN=run, PY=fake)
    assert first.returncode == 0, first.stdout + first.stderr
    again = run_all(PRESET="smoke", RUN=run, PY=fake, SFT_STEPS=7)
    assert again.returncode == 0 and len(re.findall(r"^\[run_all\] \w+: done, skipped", again.stdout, re.M)) == 11
    steps = lambda stage: json.loads((run / "settings" / f"{stage}.json").read_text())["settings"]["SFT_STEPS"]  # noqa
    assert steps("sft_non_rea") == "2" and steps("sft_sources") == "2"
    only = run_all(["--only", "sft_sources"], PRESET="smoke", RUN=run, PY=fake, SFT_STEPS=7)
    assert only.returncode == 0, only.stderr
    assert steps("sft_non_rea") == "2" and steps("sft_sources") == "7"
    merged = json.loads((run / "settings.json").read_text())
    assert merged["SFT_STEPS"] == "2 (sft_non_rea) / 7 (sft_sources)" and merged["RFT_STEPS"] == "4"


def test_download_and_mirror_flags_reach_mirror_py(tmp_path):
    log = tmp_path / "calls"
    fake = tmp_path / "py"
    fake.write_text(f'#!/bin/bash\ncase "$1" in\n  mirror.py) echo "$@" >> {log}; exit 0 ;;\n'
                    f'  *) exec {PYTHON} "$@" ;;\nesac\n')
    fake.chmod(0o755)
    mirror_dir = tmp_path / "mirror"
    result = run_all(["--download"], PRESET="3b", PY=fake, BENCH_DIR=mirror_dir, RUN=tmp_path / "run")
    assert result.returncode == 0, result.stderr
    assert log.read_text().split() == ["mirror.py", "--download", str(mirror_dir), "--model", "Qwen/Qwen2.5-VL-3B-Instruct",
                                       "--benchmarks", "refcoco,docvqa,mme,mmstar,pope,mmmu", "--source",
                                       "detection-datasets/coco", "--coco_images", "4500", "--preset", "3b"]
    assert not (tmp_path / "run").exists()
    nowhere = run_all(["--download"], PRESET="3b", PY=fake, BENCH_DIR="")
    assert nowhere.returncode == 2 and "BENCH_DIR" in nowhere.stderr
    # A run against a folder that is not a mirror stops before any stage, naming the fetch command.
    empty = run_all(PRESET="3b", BENCH_DIR=tmp_path / "empty", RUN=tmp_path / "run2")
    assert empty.returncode == 2 and "not a mirror" in empty.stderr and "--download" in empty.stderr, empty.stderr
    assert not (tmp_path / "run2" / "logs").exists()


def test_seeds_repeat_the_training_stages_in_their_own_folders(tmp_path):
    """SEEDS=2: after the run, seed 1 repeats sft_non_rea, rft, sources, sft_sources and eval in RUN/seed1 with
    --seed 1 (sharing the base model and the data of RUN), then the report is written again."""
    calls = tmp_path / "calls.txt"
    fake = tmp_path / "py"
    # every stage command "succeeds" and is recorded; run_all.sh's own helpers run for real
    fake.write_text(f'#!/bin/bash\ncase "$1" in\n  plan.py|experiment.py) exec {PYTHON} "$@" ;;\nesac\n'
                    f'echo "$@" >> {calls}\nexit 0\n')
    fake.chmod(0o755)
    run = tmp_path / "run"
    env = {**os.environ, "PRESET": "smoke", "RUN": str(run), "PY": str(fake), "SEEDS": "2", "IGNORE_DISK_PLAN": "1"}
    result = subprocess.run(["bash", "run_all.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
                            stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    lines = calls.read_text().splitlines()
    seed1 = [line for line in lines if str(run / "seed1") in line]
    assert any(line.startswith("rft.py") and "--seed 1" in line for line in seed1)
    assert any(line.startswith("sft.py") and "--seed 1" in line and "sft_non_rea" in line for line in seed1)
    assert any(line.startswith("rollout_sft.py") and "--seed 1" in line for line in seed1)
    assert not any(line.startswith(("toy.py", "jigsaw.py", "analyze.py")) for line in seed1)  # shared, not redone
    assert any(line.startswith("sft.py") and f"--data {run}/data/jigsaw" in line and "seed1" in line for line in seed1)
    assert [line for line in lines if line.startswith("report.py")][-1].startswith(f"report.py --run_dir {run} ")


def test_jobs_run_side_by_side_with_a_share_of_the_threads(tmp_path):
    """JOBS=2: the three SFT runs of sft_sources run at most two at a time, each with CPU_THREADS / JOBS threads,
    each logging to its own file."""
    times = tmp_path / "times"
    fake = fake_python(tmp_path, f'  sft.py) echo "start $(date +%s.%N) $OMP_NUM_THREADS" >> {times}; sleep 1; '
                                 f'echo "end $(date +%s.%N)" >> {times}; echo trained ;;\n  *) exit 0 ;;')
    run = tmp_path / "run"
    result = run_all(["--only", "sft_sources"], PRESET="smoke", RUN=run, PY=fake, JOBS=2, CPU_THREADS=4)
    assert result.returncode == 0, result.stdout + result.stderr
    events = sorted((float(line.split()[1]), line.split()[0]) for line in times.read_text().splitlines())
    running = peak = 0
    for _, kind in events:
        running += 1 if kind == "start" else -1
        peak = max(peak, running)
    assert peak == 2, events
    assert [line.split()[2] for line in times.read_text().splitlines() if line.startswith("start")] == ["2"] * 3
    for s in ("rea_external", "rea_grpo_rollout", "rea_self_generated"):
        assert "trained" in (run / "logs" / f"sft_sources.sft_{s}.log").read_text()
    assert (run / ".done" / "sft_sources").exists()


def test_a_failed_job_fails_its_stage_and_shows_its_log(tmp_path):
    fake = fake_python(tmp_path, '  sft.py) case "$*" in *sft_rea_grpo_rollout*) echo "boom"; exit 3 ;; '
                                 '*) sleep 0.5; echo trained ;; esac ;;\n  *) exit 0 ;;')
    run = tmp_path / "run"
    result = run_all(["--only", "sft_sources"], PRESET="smoke", RUN=run, PY=fake, JOBS=2)
    assert result.returncode != 0 and "sft_sources FAILED" in result.stderr, result.stdout + result.stderr
    assert "sft_rea_grpo_rollout FAILED (exit status 3)" in result.stderr and "boom" in result.stderr, result.stderr
    assert not (run / ".done" / "sft_sources").exists()


def test_a_stage_left_running_by_a_killed_run_all_keeps_the_folder_locked(tmp_path):
    """kill -9 of run_all.sh leaves its stage running (nothing can stop it then); the stage holds the run folder's
    flock it inherited, so a second run_all.sh is refused until that stage exits, never two writers at once."""
    marker = "stage-marker-" + uuid.uuid4().hex
    fake = fake_python(tmp_path, f'  toy.py) {PYTHON} -c "import time; time.sleep(120)" {marker} ;;\n  *) exit 0 ;;')
    run = tmp_path / "run"
    env = {**os.environ, "PY": str(fake), "PRESET": "smoke", "RUN": str(run)}
    proc = subprocess.Popen(["bash", "run_all.sh", "--only", "base"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not _processes_with(marker) and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
        assert _processes_with(marker), "the stage did not start"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        assert _processes_with(marker), "the stage died with run_all.sh: this test needs it orphaned"
        second = run_all(["--only", "data"], PRESET="smoke", RUN=run, PY=fake)
        assert second.returncode == 2 and "in use by another run" in second.stderr, second.stderr
    finally:
        for line in _processes_with(marker):
            os.kill(int(line.split()[0]), signal.SIGKILL)
    deadline = time.time() + 10
    while _processes_with(marker) and time.time() < deadline:
        time.sleep(0.2)
    third = run_all(["--only", "data"], PRESET="smoke", RUN=run, PY=fake)
    assert third.returncode == 0, third.stderr


@pytest.mark.parametrize("env,message", [
    ({"RFT_STPES": "500"}, "RFT_STPES (in the environment) is not a variable of this kit; did you mean RFT_STEPS?"),
    ({"SEEDS": "0"}, "SEEDS=0 must be >=1"),
    ({"SEEDS": "-1"}, "SEEDS=-1 must be >=1"),
    ({"GROUP_SIZE": "1"}, "GROUP_SIZE=1 must be >=2"),
    ({"LR_RFT": "fast"}, "LR_RFT='fast' must be a number"),
    ({"RFT_EARLY_STEP": "4"}, "RFT_EARLY_STEP=4 must be between 1 and RFT_STEPS - 1 = 3"),
])
def test_bad_variables_stop_before_anything_runs(tmp_path, env, message):
    run = tmp_path / "run"
    result = run_all(PRESET="smoke", RUN=run, **env)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert not run.exists()


def test_a_preset_that_misses_a_variable_or_misspells_one_is_named(tmp_path):
    presets = ROOT / "presets"
    broken = presets / f"broken_{uuid.uuid4().hex[:8]}.env"
    text = (presets / "smoke.env").read_text().replace(". presets/toy.env", "")
    toy = (presets / "toy.env").read_text().replace(': "${KL_SAMPLES:=4}"', ': "${KL_SAMPELS:=4}"')
    broken.write_text(text + "\n" + "\n".join(line for line in toy.splitlines() if "BETA:=" not in line) + "\n")
    try:
        result = run_all(["--list"], PRESET=broken.stem, RUN=tmp_path / "run")
    finally:
        broken.unlink()
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"BETA is not set: presets/{broken.name}" in result.stderr, result.stderr
    assert f"KL_SAMPELS (presets/{broken.name}) is not a variable of this kit; did you mean KL_SAMPLES?" in result.stderr


def test_the_sources_stage_asks_the_teacher_and_predicts_the_sampled_sources(tmp_path):
    """TEACHER_URL / TEACHER_MODEL make rea_external the paper's SFT-Rea-4o arm (rollout_sft.py's teacher client;
    the key stays in the environment and in no record); each sampled source is predicted from RFT's own rollouts
    at the step of its checkpoint before it decodes anything."""
    calls = tmp_path / "calls"
    fake = fake_python(tmp_path, f'  *) echo "$@" >> {calls}; exit 0 ;;')
    run = tmp_path / "run"
    result = run_all(["--only", "sources"], PRESET="smoke", RUN=run, PY=fake, TEACHER_URL="http://127.0.0.1:9/v1",
                     TEACHER_MODEL="gpt-4o", OPENAI_API_KEY="sk-secret-" + uuid.uuid4().hex)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = {line.split()[2]: line for line in calls.read_text().splitlines() if line.startswith("rollout_sft.py")}
    assert "--teacher_url http://127.0.0.1:9/v1 --teacher_model gpt-4o" in lines["rea_external"]
    assert "--teacher_url" not in lines["non_rea"] + lines["rea_grpo_rollout"]
    metrics = f"--sampler_metrics {run}/rft/metrics.jsonl"
    assert f"{metrics} --sampler_step 4 --min_rows 32" in lines["rea_grpo_rollout"]          # RFT_STEPS
    assert f"{metrics} --sampler_step 2 --min_rows 32" in lines["rea_self_generated"]        # RFT_EARLY_STEP
    recorded = (run / "settings" / "sources.json").read_text()
    assert "gpt-4o" in recorded and "sk-secret" not in recorded
    plain = run_all(["--only", "sources"], PRESET="smoke", RUN=tmp_path / "run2", PY=fake)
    assert plain.returncode == 0 and "--teacher_url" not in calls.read_text().split("run2")[-1]
