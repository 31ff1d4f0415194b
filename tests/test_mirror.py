"""The offline mirror (mirror.py): the fake stand-ins have the hub's schemas and eval.py reads them; a missing
entry names the data set and the command that fetches it; --download writes the layout run_all.sh reads; and the
dress rehearsal of the 3b preset runs end to end on the CPU through the mirror."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAPER_BENCHMARKS = ["refcoco", "docvqa", "mme", "mmstar", "pope", "mmmu"]


@pytest.fixture(scope="module")
def fake_mirror(tmp_path_factory):
    import mirror
    root = tmp_path_factory.mktemp("mirror") / "bench"
    mirror.fake(root, "Qwen/Qwen2.5-VL-3B-Instruct", PAPER_BENCHMARKS, coco_images=6, rows=4)
    return root


def test_fake_benchmarks_have_the_hub_schema_and_eval_reads_them(fake_mirror):
    import benchmarks
    from datasets import Image, load_from_disk
    for name in PAPER_BENCHMARKS:
        bench = benchmarks.REGISTRY[name]
        saved = load_from_disk(str(fake_mirror / name))
        assert list(saved) == [bench.split], f"{name}: splits {list(saved)}"
        dataset = benchmarks.open_data(bench, str(fake_mirror / name))  # checks the columns it reads
        image_columns = [c for c, f in dataset.features.items() if isinstance(f, Image)]
        assert image_columns, name
        samples = bench.build(dataset[0], benchmarks.Context())
        assert samples and all(s["images"] for s in samples), f"{name}: no image reached the prompt"
    mmmu = load_from_disk(str(fake_mirror / "mmmu"))["validation"]
    assert [f"image_{k}" for k in range(1, 8)] == [c for c in mmmu.column_names if c.startswith("image_")]
    assert isinstance(mmmu[0]["options"], str) and mmmu[0]["options"].startswith("[")
    mme = load_from_disk(str(fake_mirror / "mme"))["test"]
    assert len(set(mme["question_id"])) * 2 == len(mme)       # MME: two questions per image (acc+ pairs)
    assert json.loads((fake_mirror / "mirror.json").read_text())["benchmarks"]["docvqa"]["config"] == "DocVQA"
    import mirror
    assert mirror.check(fake_mirror, "Qwen/Qwen2.5-VL-3B-Instruct", PAPER_BENCHMARKS, "detection-datasets/coco") == []


def test_missing_entries_name_the_data_set_and_the_fetch_command(fake_mirror, tmp_path):
    import shutil
    import mirror
    copy = tmp_path / "bench"
    shutil.copytree(fake_mirror, copy)
    shutil.rmtree(copy / "pope")
    problems = mirror.check(copy, "Qwen/Qwen2.5-VL-3B-Instruct", PAPER_BENCHMARKS, "detection-datasets/coco", "3b")
    assert len(problems) == 1 and "pope" in problems[0]
    assert f"PRESET=3b BENCH_DIR={copy} bash run_all.sh --download" in problems[0]
    wrong_model = mirror.check(copy, "Qwen/Qwen2.5-VL-7B-Instruct", ["mme"], "detection-datasets/coco", "7b")
    assert wrong_model and "7B" in wrong_model[0]
    result = subprocess.run([sys.executable, "mirror.py", "--check", str(tmp_path / "none"), "--benchmarks", "mme"],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2 and "not a mirror" in result.stderr and "--download" in result.stderr


def test_download_writes_the_layout_that_run_all_reads(fake_mirror, tmp_path, monkeypatch):
    """--download with the hub replaced by the fake copies (the hub is unreachable here): each benchmark's
    evaluated split only, the COCO image folder, the model snapshot, then --check passes."""
    from datasets import load_from_disk
    import jigsaw
    import mirror
    from PIL import Image
    calls = []

    def fake_load(hub_id, config=None, split=None):
        name = next(n for n, spec in mirror.benchmark_specs().items() if spec[0] == hub_id)
        calls.append((hub_id, config, split))
        return load_from_disk(str(fake_mirror / name))[split]

    def fake_snapshot(repo_id, local_dir):
        import shutil
        shutil.copytree(fake_mirror / "model", local_dir)

    monkeypatch.setattr(jigsaw, "iter_hub_images", lambda *a, **k: ((f"id{i}", Image.new("RGB", (64, 48), (i, 0, 0)))
                                                                   for i in range(10)))
    root = tmp_path / "bench"
    mirror.download(root, "Qwen/Qwen2.5-VL-3B-Instruct", ["docvqa", "mme"], "detection-datasets/coco", 5,
                    load_dataset=fake_load, snapshot_download=fake_snapshot)
    specs = mirror.benchmark_specs()   # the registry's hub ids (benchmarks/<name>.py), the split evaluated only
    assert calls == [specs["docvqa"][:3], specs["mme"][:3]] and specs["docvqa"][1:3] == ("DocVQA", "validation")
    assert len(list((root / "coco").glob("*.jpg"))) == 5
    assert mirror.check(root, "Qwen/Qwen2.5-VL-3B-Instruct", ["docvqa", "mme"], "detection-datasets/coco") == []
    calls.clear()
    mirror.download(root, "Qwen/Qwen2.5-VL-3B-Instruct", ["docvqa", "mme"], "detection-datasets/coco", 5,
                    load_dataset=fake_load, snapshot_download=fake_snapshot)
    assert calls == []   # a rerun fetches nothing that is there


def test_rehearsal_of_the_3b_preset_end_to_end(tmp_path):
    """The 3b preset's stages and flags on the CPU through a fake offline mirror (presets/rehearsal.env)."""
    run = tmp_path / "rehearsal"
    env = {**os.environ, "PRESET": "rehearsal", "RUN": str(run), "PY": sys.executable}
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        env.pop(key, None)   # run_all.sh must set them itself when it reads from a mirror
    result = subprocess.run(["bash", "run_all.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    settings = json.loads((run / "settings" / "eval.json").read_text())["settings"]
    assert settings["BENCHMARKS"] == "refcoco,docvqa,mme,mmstar,pope,mmmu"      # the 3b preset's list
    assert settings["MODEL"] == str(run / "mirror" / "model")
    base = json.loads((run / "eval" / "base" / "results.json").read_text())
    text = json.dumps(base)
    for name in PAPER_BENCHMARKS:
        assert name in text, f"{name} was not evaluated"
    data = json.loads((run / "settings" / "data.json").read_text())["settings"]
    assert data["SOURCE"] == str(run / "mirror" / "coco") and data["GRID"] == "3x3"
    assert (run / "report.md").is_file()
    # The pilot gate ran on RFT's first step (a random model: a flat trend at 0%) and passed its minimum of 0
    # points; the same pilot against a minimum of 10 stops the run, naming the numbers and what would help.
    pilot = json.loads((run / "pilot" / "pilot.json").read_text())
    assert pilot["passed"] and pilot["measured"]["points"] == [[0, 0.0], [1, 0.0]], pilot
    assert "[pilot] PASSED" in result.stdout and "projected at RFT_STEPS=2: 0.0%" in result.stdout
    settings = {**json.loads((run / "settings.json").read_text()), "PLAN_DEVICE": "cpu", "PILOT_MIN_GAIN": "10"}
    (tmp_path / "strict.json").write_text(json.dumps(settings))
    gate = [sys.executable, "pilot.py", "--run", str(run), "--settings", str(tmp_path / "strict.json"),
            "--stages", "base data eval_base pilot sft_non_rea rft"]
    stopped = subprocess.run(gate, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert stopped.returncode == 2 and "RFT does not learn enough in this budget" in stopped.stderr, stopped.stderr
    assert "short of 10.0%" in stopped.stderr and "GRID=2x2" in stopped.stderr    # 3x3: the 2x2 grid is advised
    forced = subprocess.run(gate + ["--ignore"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert forced.returncode == 0 and "going on because IGNORE_PILOT=1" in forced.stdout
