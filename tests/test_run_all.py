"""The smoke preset of run_all.sh end to end (a few steps of every stage) on the tiny model, offline."""
import os
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHODS = ["base", "sft_non_rea", "rft", "sft_rea_external", "sft_rea_grpo_rollout", "sft_rea_self_generated"]


def test_smoke_preset_writes_full_report(tmp_path):
    run = tmp_path / "smoke"
    env = {**os.environ, "PRESET": "smoke", "RUN": str(run), "PY": "python"}
    result = subprocess.run(["bash", "run_all.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    report = (run / "report.md").read_text()
    for method in METHODS:
        assert re.search(rf"^\|\s*{method}\s*\|", report, re.M), f"row {method} missing from report.md"
    for image in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report):
        assert (run / image).exists(), f"figure {image} linked from report.md does not exist"
    assert len(re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)) >= 3
    # Rerun: every stage is skipped, nothing recomputed.
    again = subprocess.run(["bash", "run_all.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and again.stdout.count("done, skipped") >= 10, again.stdout


def test_a_failed_command_fails_its_stage(tmp_path):
    """A command failing in the middle of a stage stops it (bash ignores set -e inside `if !` / `||` contexts,
    where a stage would have run on and been marked done)."""
    fake = tmp_path / "py"
    fake.write_text('#!/bin/bash\ncase "$1" in toy.py) exit 3 ;; esac\nexit 0\n')  # later commands "succeed"
    fake.chmod(0o755)
    run = tmp_path / "run"
    env = {**os.environ, "PRESET": "smoke", "RUN": str(run), "PY": str(fake)}
    result = subprocess.run(["bash", "run_all.sh", "--only", "base"], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode != 0 and "base FAILED" in result.stderr, result.stdout + result.stderr
    assert not (run / ".done" / "base").exists()
