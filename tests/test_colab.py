"""colab.ipynb and its helpers (colab.py): the install that keeps Colab's torch, the pieces, the Drive sync, and
the notebook itself executed top to bottom by a real Jupyter kernel (nbclient) on the smoke preset."""
import os
import shutil
from pathlib import Path

import pytest

import colab

ROOT = Path(__file__).resolve().parents[1]


def test_install_keeps_the_installed_torch(tmp_path):
    requirements, constraints = colab.install_files(tmp_path, ("requirements-torchao.txt",))
    wanted = requirements.read_text()
    assert "transformers" in wanted and "accelerate" in wanted and "torchao" in wanted
    assert not any(line.split(">")[0].split("=")[0].strip() in ("torch", "torchvision") for line in wanted.splitlines())
    import importlib.metadata as metadata
    pins = constraints.read_text().split()
    assert f"torch=={metadata.version('torch')}" in pins and f"torchvision=={metadata.version('torchvision')}" in pins


def test_pieces_fit_a_session_and_a_long_stage_is_a_piece_of_its_own():
    hours = {"base": 0.1, "data": 0.1, "eval_base": 1.5, "sft_non_rea": 0.5, "rft": 26.0, "sources": 4.0,
             "sft_sources": 1.5, "eval": 7.0, "analyze": 2.0, "report": 0.1}
    assert colab.pieces(hours, 6) == [["base", "data", "eval_base", "sft_non_rea"], ["rft"], ["sources", "sft_sources"],
                                      ["eval"], ["analyze", "report"]]
    assert colab.pieces(hours, 100) == [list(hours)]


def _fake_run(run: Path) -> None:
    files = {"settings/rft.json": "{}", "settings.json": "{}", "logs/rft.log": "log", ".done/rft": "",
             ".done/rft.seconds": "12", "rft/metrics.jsonl": "{}\n", "rft/completions.jsonl": "{}\n",
             "rft/run.json": "{}", "rft/checkpoint-50/model.safetensors": "weights", "rft/checkpoint-50/config.json": "{}",
             "rft/resume/optimizer.bin": "state", "rft/resume/trainer_state.json": "{}",
             "data/sources/rea_grpo_rollout/stats.json": "{}", "data/sources/rea_grpo_rollout/data-00000.arrow": "rows",
             "data/sources/rea_grpo_rollout.shard.jsonl": "{}\n", "eval/base/results.json": "{}", "report.md": "# r",
             "report/frontier.png": "png", ".lock": "", ".lock.pid": "1"}
    for name, text in files.items():
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        (run / name).write_text(text)


def test_the_drive_gets_the_small_durable_outputs_after_every_stage(tmp_path):
    run, drive = tmp_path / "run", tmp_path / "drive"
    _fake_run(run)
    assert colab.sync(run, drive) == 13
    copied = {str(p.relative_to(drive)) for p in drive.rglob("*") if p.is_file()}
    assert copied == {"settings/rft.json", "settings.json", "logs/rft.log", ".done/rft", ".done/rft.seconds",
                      "rft/metrics.jsonl", "rft/completions.jsonl", "rft/run.json",
                      "data/sources/rea_grpo_rollout/stats.json", "data/sources/rea_grpo_rollout.shard.jsonl",
                      "eval/base/results.json", "report.md", "report/frontier.png"}
    assert colab.sync(run, drive) == 0   # nothing changed, nothing copied
    (run / "logs" / "rft.log").write_text("longer log")
    assert colab.sync(run, drive) == 1 and (drive / "logs" / "rft.log").read_text() == "longer log"
    everything = tmp_path / "everything"
    colab.sync(run, everything, models=True)
    assert (everything / "rft/checkpoint-50/model.safetensors").exists() and (everything / "rft/resume/optimizer.bin").exists()
    assert not (everything / ".lock").exists()
    # a recycled VM: the whole run comes back from Drive, a run folder already in use is left alone
    fresh = tmp_path / "fresh"
    assert colab.restore(everything, fresh) == 18 and (fresh / "rft/resume/optimizer.bin").exists()
    assert colab.restore(everything, fresh) == 0


def test_the_report_is_shown_as_markdown_and_images(tmp_path):
    (tmp_path / "report").mkdir()
    (tmp_path / "report" / "f.png").write_bytes(b"png")
    (tmp_path / "report.md").write_text("# T\n\n| a |\n\n![f](report/f.png)\n\nafter\n")
    parts = colab.report_parts(tmp_path / "report.md")
    assert [k for k, _ in parts] == ["markdown", "image", "markdown"]
    assert parts[1][1] == str((tmp_path / "report" / "f.png").resolve()) and "after" in parts[2][1]


def test_the_notebook_runs_top_to_bottom_in_a_jupyter_kernel(smoke_run, tmp_path, monkeypatch):
    """colab.ipynb in a real kernel, on the CPU, preset smoke, Drive in a temporary folder. The situation: an
    earlier session ran every stage but the report, with KEEP_MODELS_ON_DRIVE, and its VM was recycled (local
    disk empty). The notebook must restore the run from Drive, print the machine and the plan, run the missing
    stage for real (report.py), sync it to Drive, and show the report's tables and figures inline."""
    import nbformat
    from nbclient import NotebookClient
    run, _ = smoke_run
    drive, local = tmp_path / "drive", tmp_path / "local"
    shutil.copytree(run, drive / "smoke", ignore=shutil.ignore_patterns(".lock", ".lock.pid"))
    (drive / "smoke" / ".done" / "report").unlink()
    (drive / "smoke" / "report.md").unlink()
    for name, value in {"COLAB_KIT_PRESET": "smoke", "COLAB_KIT_DRIVE": str(drive), "COLAB_KIT_KEEP_MODELS": "1",
                        "COLAB_KIT_LOCAL": str(local), "COLAB_KIT_INSTALL": "0", "COLAB_KIT_ALL_PIECES": "1"}.items():
        monkeypatch.setenv(name, value)
    notebook = nbformat.read(ROOT / "colab.ipynb", as_version=4)
    NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()

    text = "".join(output.get("text", "") for cell in notebook.cells if cell.cell_type == "code"
                   for output in cell.outputs if output.output_type == "stream")
    assert "no GPU: a CPU runtime" in text and "preset smoke (chosen in the notebook)" in text
    assert "not installing (COLAB_KIT_INSTALL=0); would keep: torch==" in text
    assert "plan for preset smoke" in text                                # run_all.sh --list
    assert "restored" in text and "(models too)" in text
    assert "piece 1: base data eval_base pilot sft_non_rea rft sources sft_sources eval analyze report" in text
    assert "[run_all] base: done, skipped" in text and "[run_all] report: running" in text
    assert "[run_all] report: done in" in text and "synced" in text and "All stages are done" in text
    shown = [output for output in notebook.cells[-1].outputs if output.output_type == "display_data"]
    assert any("# Reproduction report: preset `smoke`" in o["data"].get("text/markdown", "") for o in shown)
    assert sum("image/png" in o["data"] for o in shown) >= 3            # the report's figures, inline
    assert (local / "runs" / "smoke" / "report.md").exists()
    for name in ("report.md", ".done/report", "settings/report.json", "logs/report.log"):
        assert (drive / "smoke" / name).exists(), name
    assert os.environ["COLAB_KIT_LOCAL"] == str(local)


def test_the_readme_badge_opens_the_notebook_of_the_repository_it_clones():
    """The README's Colab badge and the notebook's KIT_REPO name the same repository (one place to change when
    the kit is published), and the badge is on the README's first screen."""
    import re
    readme = (ROOT / "README.md").read_text()
    badge = re.search(r"colab\.research\.google\.com/github/([\w.-]+/[\w.-]+)/blob/\w+/colab\.ipynb", readme)
    assert badge and readme.index(badge.group(0)) < 600
    notebook = (ROOT / "colab.ipynb").read_text()
    assert f"https://github.com/{badge.group(1)}" in notebook


def test_the_notebook_asks_for_its_repository_instead_of_cloning_a_placeholder(tmp_path, monkeypatch):
    """Opened outside the kit with KIT_REPO left at its placeholder, the notebook's clone cell stops with what to
    set instead of running git on a URL that does not exist (the kit's public address is not known here)."""
    import json
    cells = ["".join(c["source"]) for c in json.loads((ROOT / "colab.ipynb").read_text())["cells"]
             if c["cell_type"] == "code"]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("COLAB_KIT_LOCAL", str(tmp_path))
    monkeypatch.delenv("COLAB_KIT_REPO", raising=False)
    namespace = {}
    exec(compile(cells[0], "settings cell", "exec"), namespace)   # the notebook's own cells, not model output
    with pytest.raises(SystemExit, match="Set KIT_REPO"):
        exec(compile(cells[1], "clone cell", "exec"), namespace)
    assert not (tmp_path / "kit").exists()


def test_until_runs_the_stages_up_to_one_and_resumes_after_it(tmp_path):
    """run_all.sh --until STAGE (the notebook's pieces): the stages up to STAGE, the finished ones skipped and
    never restarted from scratch (unlike --only/--from, which redo their stage)."""
    import re
    import subprocess
    import sys
    fake = tmp_path / "py"   # the stage scripts succeed at once; the plumbing runs for real
    fake.write_text(f'#!/bin/bash\ncase "$1" in\n  plan.py|mirror.py|experiment.py|-c) exec {sys.executable} "$@" ;;\n'
                    '  *) exit 0 ;;\nesac\n')
    fake.chmod(0o755)
    run = tmp_path / "run"

    def until(stage):
        out = subprocess.run(["bash", "run_all.sh", "--until", stage], cwd=ROOT, capture_output=True, text=True,
                             timeout=300, env={**os.environ, "PY": str(fake), "PRESET": "smoke", "RUN": str(run)})
        assert out.returncode == 0, out.stdout + out.stderr
        return out.stdout
    first = until("data")
    assert colab.done_stages(run) == {"base", "data"} and f"stages up to data done: {run}" in first
    (run / "rft").mkdir()
    (run / "rft" / "half-done").write_text("an interrupted stage's state")
    second = until("rft")
    assert len(re.findall(r"^\[run_all\] (base|data): done, skipped", second, re.M)) == 2
    assert colab.done_stages(run) == {"base", "data", "eval_base", "pilot", "sft_non_rea", "rft"}
    assert (run / "rft" / "half-done").exists()   # resumed, not wiped
