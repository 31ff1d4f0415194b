"""Bad input, stage by stage, as a user would give it: every case ends in one `error:` line (exit 2) that names
the file or flag and the fix, before any model is loaded; a full disk keeps the last complete state and says
so; a second writer on a folder is refused by the lock the first one holds; --resume compares what --data and
--model hold, not how their paths are spelt.

The tables are per stage; each row is (class, id, argv, words the message must hold). Every row also runs with
the model loader replaced by a failure, so an error found only after loading a model fails the test."""
import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

import analyze
import common
import eval as ev
import files
import jigsaw
import report
import rft
import rollout_sft
import runs
import sft
import toy

ROOT = Path(__file__).resolve().parents[1]
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


# ----------------------------------------------------------------------------------------------------------
# The bad inputs, made once
# ----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bad(tmp_path_factory, toy_model_dir, jigsaw_data):
    from datasets import DatasetDict, load_from_disk
    root = tmp_path_factory.mktemp("bad")

    def model_copy(name, keep_weights=True):
        folder = root / name
        shutil.copytree(toy_model_dir, folder, ignore=None if keep_weights else shutil.ignore_patterns("*.safetensors"))
        return folder
    weights = (toy_model_dir / "model.safetensors").read_bytes()
    no_weights = model_copy("no_weights", keep_weights=False)
    bin_only = model_copy("bin_only", keep_weights=False)
    (bin_only / "pytorch_model.bin").write_bytes(b"\0" * 64)
    truncated = model_copy("truncated")
    (truncated / "model.safetensors").write_bytes(weights[:len(weights) // 2])   # a copy cut short
    cut_header = model_copy("cut_header")
    (cut_header / "model.safetensors").write_bytes(weights[:40])                 # not even its header
    missing_shard = model_copy("missing_shard")
    (missing_shard / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors",
                                        "b": "model-00002-of-00002.safetensors"}}))

    data = load_from_disk(str(jigsaw_data))
    empty = root / "empty"        # both splits without rows (datasets itself cannot open such a folder)
    DatasetDict({"train": data["train"].select([]), "test": data["test"].select([])}).save_to_disk(str(empty))
    empty_test = root / "empty_test"
    DatasetDict({"train": data["train"], "test": data["test"].select([])}).save_to_disk(str(empty_test))
    empty_jsonl = root / "empty.jsonl"
    empty_jsonl.write_text("")
    latin_jsonl = root / "latin.jsonl"
    latin_jsonl.write_bytes(b'{"prompt": "caf\xe9", "completion": "x"}\n')

    a_file = root / "a_file"
    a_file.write_text("not a folder")
    not_json = root / "not_json.json"
    not_json.write_text('{"benchmarks": {"jigsaw": ')   # a write cut short
    latin = root / "latin.json"
    latin.write_bytes(b'{"model": "caf\xe9"}')
    a_list = root / "a_list.json"
    a_list.write_text("[1, 2]")
    return SimpleNamespace(root=root, model=toy_model_dir, data=jigsaw_data, no_weights=no_weights, bin_only=bin_only,
                           truncated=truncated, cut_header=cut_header, missing_shard=missing_shard, empty=empty,
                           empty_test=empty_test, empty_jsonl=empty_jsonl, latin_jsonl=latin_jsonl, a_file=a_file,
                           not_json=not_json, latin=latin, a_list=a_list)


@pytest.fixture
def no_model_loads(monkeypatch):
    """Loading a model fails the test: every error of the tables must come before it."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the error")
    monkeypatch.setattr(common, "load_model", refuse)
    monkeypatch.setattr(common, "load_processor", refuse)


@pytest.fixture
def read_only(monkeypatch):
    """make(folder): a folder nothing can be written in. Modes alone do not stop root, so as root the write
    probe of files.check_writable is made to get the EACCES a read-only folder gives."""
    made = []

    def make(folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        folder.chmod(0o555)
        made.append(folder)
        return folder
    if IS_ROOT:
        probe = files._write_probe

        def refusing_probe(folder):
            if any(Path(folder).resolve() == m.resolve() for m in made):
                raise PermissionError(errno.EACCES, "Permission denied", str(folder))
            return probe(folder)
        monkeypatch.setattr(files, "_write_probe", refusing_probe)
    yield make
    for folder in made:
        folder.chmod(0o755)


def expect_error(capsys, main, argv, *words):
    """main(argv) stops with exit 2 and one error line holding every word; returns that line."""
    with pytest.raises(SystemExit) as stop:
        main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert stop.value.code == 2 and len(lines) == 1, err
    for word in words:
        assert str(word) in lines[0], (word, lines[0])
    return lines[0]


# ----------------------------------------------------------------------------------------------------------
# The tables: one per stage
# ----------------------------------------------------------------------------------------------------------
SFT = ["--prompt_column", "prompt_no_think", "--completion_column", "target_non_rea", "--max_steps", "1",
       "--batch_size", "2"]
SFT_CASES = [  # (class, id, argv(b, out), words)
    ("no weights", "config only", lambda b, o: ["--model", b.no_weights, "--data", b.data, "--output_dir", o],
     ["no_weights", "no weights", "copy the model again"]),
    ("no weights", ".bin only", lambda b, o: ["--model", b.bin_only, "--data", b.data, "--output_dir", o],
     ["pytorch_model.bin", "safetensors only", "save_pretrained"]),
    ("truncated weights", "body cut", lambda b, o: ["--model", b.truncated, "--data", b.data, "--output_dir", o],
     ["truncated", "model.safetensors", "(truncated)", "download the model again"]),
    ("truncated weights", "header cut", lambda b, o: ["--model", b.cut_header, "--data", b.data, "--output_dir", o],
     ["cut_header", "not a complete safetensors file"]),
    ("truncated weights", "shard missing", lambda b, o: ["--model", b.missing_shard, "--data", b.data,
                                                         "--output_dir", o],
     ["model-00001-of-00002.safetensors is missing", "copy the model folder again"]),
    ("output folder", "is a file", lambda b, o: ["--model", b.model, "--data", b.data, "--output_dir", b.a_file],
     ["--output_dir", "a_file is a file", "choose another --output_dir"]),
    ("output folder", "under a file", lambda b, o: ["--model", b.model, "--data", b.data, "--output_dir",
                                                    b.a_file / "run"],
     ["a_file is a file, so no folder can be made there"]),
    ("empty split", "train split", lambda b, o: ["--model", b.model, "--data", b.empty, "--output_dir", o],
     ["empty split train has no rows", "rebuild it"]),
    ("empty split", "empty jsonl", lambda b, o: ["--model", b.model, "--data", b.empty_jsonl, "--output_dir", o],
     ["empty.jsonl: no rows"]),
    ("unreadable data", "jsonl not UTF-8", lambda b, o: ["--model", b.model, "--data", b.latin_jsonl,
                                                         "--output_dir", o], ["latin.jsonl line 1: not UTF-8"]),
    ("attention", "bogus", lambda b, o: ["--model", b.model, "--data", b.data, "--output_dir", o,
                                         "--attn_implementation", "bogus"],
     ["--attn_implementation bogus unknown", "sdpa"]),
]
RFT = ["--max_steps", "1", "--batch_size", "1", "--num_generations", "2", "--max_completion_length", "4",
       "--optimizer", "adamw"]
RFT_CASES = [
    ("no weights", "config only", lambda b, o: ["--model", b.no_weights, "--data", b.data, "--output_dir", o],
     ["no_weights", "no weights"]),
    ("truncated weights", "body cut", lambda b, o: ["--model", b.truncated, "--data", b.data, "--output_dir", o],
     ["(truncated)"]),
    ("output folder", "is a file", lambda b, o: ["--model", b.model, "--data", b.data, "--output_dir", b.a_file],
     ["a_file is a file"]),
    ("empty split", "train split", lambda b, o: ["--model", b.model, "--data", b.empty, "--output_dir", o],
     ["split train has no rows"]),
    ("empty split", "eval split", lambda b, o: ["--model", b.model, "--data", b.empty_test, "--output_dir", o],
     ["empty_test split test has no rows"]),
    ("attention", "bogus", lambda b, o: ["--model", b.model, "--data", b.data, "--output_dir", o,
                                         "--attn_implementation", "flash_attn"],
     ["--attn_implementation flash_attn unknown"]),
]
EVAL = ["--benchmarks", "jigsaw", "--limit", "2", "--max_completion_length", "2"]
EVAL_CASES = [
    ("no weights", "config only", lambda b, o: ["--model", b.no_weights, "--data", f"jigsaw={b.data}",
                                                "--output_dir", o], ["no_weights", "no weights"]),
    ("truncated weights", "body cut", lambda b, o: ["--model", b.truncated, "--data", f"jigsaw={b.data}",
                                                    "--output_dir", o], ["(truncated)"]),
    ("output folder", "is a file", lambda b, o: ["--model", b.model, "--data", f"jigsaw={b.data}", "--output_dir",
                                                 b.a_file], ["a_file is a file"]),
    ("empty split", "test split", lambda b, o: ["--model", b.model, "--data", f"jigsaw={b.empty}", "--output_dir", o],
     ["--data jigsaw=", "split test has no rows"]),
    ("attention", "bogus", lambda b, o: ["--model", b.model, "--data", f"jigsaw={b.data}", "--output_dir", o,
                                         "--attn_implementation", "bogus"], ["bogus unknown"]),
    ("attention", "not installed", lambda b, o: ["--model", b.model, "--data", f"jigsaw={b.data}", "--output_dir", o,
                                                 "--attn_implementation", "flash_attention_2"],
     ["flash_attention_2 needs the flash-attn 2 package", "use sdpa"]),
    ("checkpoints without a run", "bare model folder", lambda b, o: ["--model", b.model, "--data", f"jigsaw={b.data}",
                                                                     "--output_dir", o, "--checkpoints"],
     ["--checkpoints", "is not in a training run's folder", "run.json", "drop --checkpoints"]),
    ("checkpoints without a run", "hub id", lambda b, o: ["--model", "Qwen/Qwen2.5-VL-3B-Instruct", "--data",
                                                          f"jigsaw={b.data}", "--output_dir", o, "--checkpoints"],
     ["Qwen/Qwen2.5-VL-3B-Instruct is not in a training run's folder"]),
]
ROLLOUT = ["--num_generations", "2", "--max_completion_length", "4", "--limit", "2"]
ROLLOUT_CASES = [
    ("no weights", "config only", lambda b, o: ["--source", "rea_self_generated", "--model", b.no_weights,
                                                "--data", b.data, "--output_dir", o], ["no_weights", "no weights"]),
    ("truncated weights", "body cut", lambda b, o: ["--source", "rea_grpo_rollout", "--model", b.truncated,
                                                    "--data", b.data, "--output_dir", o], ["(truncated)"]),
    ("output folder", "is a file", lambda b, o: ["--source", "non_rea", "--data", b.data, "--output_dir", b.a_file],
     ["a_file is a file"]),
    ("empty split", "train split", lambda b, o: ["--source", "non_rea", "--data", b.empty, "--output_dir", o],
     ["split train has no rows"]),
    ("attention", "bogus", lambda b, o: ["--source", "rea_self_generated", "--model", b.model, "--data", b.data,
                                         "--output_dir", o, "--attn_implementation", "bogus"], ["bogus unknown"]),
]
ANALYZE = ["--n_train", "2", "--n_probe", "2", "--no_first_order", "--no_exact"]
ANALYZE_CASES = [
    ("no weights", "config only", lambda b, o: ["--model", b.no_weights, "--sources",
                                                f"non_rea={b.data}:prompt_no_think:target_non_rea", "--probes",
                                                b.data, "--probe_prompt_column", "prompt_no_think",
                                                "--probe_answer_column", "target_non_rea", "--output_dir", o],
     ["no_weights", "no weights"]),
    ("truncated weights", "body cut", lambda b, o: ["--model", b.truncated, "--sources",
                                                    f"non_rea={b.data}:prompt_no_think:target_non_rea", "--probes",
                                                    b.data, "--probe_prompt_column", "prompt_no_think",
                                                    "--probe_answer_column", "target_non_rea", "--output_dir", o],
     ["(truncated)"]),
    ("output folder", "is a file", lambda b, o: ["--model", b.model, "--sources", f"non_rea={b.data}", "--probes",
                                                 b.data, "--output_dir", b.a_file], ["a_file is a file"]),
    ("empty split", "source split", lambda b, o: ["--model", b.model, "--sources", f"non_rea={b.empty}", "--probes",
                                                  b.data, "--output_dir", o], ["split train has no rows"]),
]
STAGES = {"sft": (sft.main, SFT, SFT_CASES), "rft": (rft.main, RFT, RFT_CASES), "eval": (ev.main, EVAL, EVAL_CASES),
          "rollout_sft": (rollout_sft.main, ROLLOUT, ROLLOUT_CASES),
          "analyze": (analyze.main, ANALYZE, ANALYZE_CASES)}
ROWS = [pytest.param(stage, case, id=f"{stage}-{case[0]}-{case[1]}".replace(" ", "_"))
        for stage, (_, _, cases) in STAGES.items() for case in cases]


@pytest.mark.parametrize("stage, case", ROWS)
def test_bad_input_stops_before_any_model_loads(stage, case, bad, tmp_path, capsys, no_model_loads):
    main, extra, _ = STAGES[stage]
    _, _, argv, words = case
    out = tmp_path / "out"
    expect_error(capsys, main, [str(a) for a in argv(bad, out)] + extra, *words)
    assert not out.exists() or not [p for p in out.iterdir() if p.name not in runs.NOT_OUTPUTS]  # nothing written


@pytest.mark.parametrize("stage", list(STAGES))
def test_read_only_output_folder(stage, bad, tmp_path, capsys, no_model_loads, read_only):
    main, extra, cases = STAGES[stage]
    argv = next(c[2] for c in cases if c[1] == "is a file")   # the same command, into a read-only folder instead
    locked = read_only(tmp_path / "ro")
    args = [str(a) for a in argv(bad, tmp_path)] + extra
    args[args.index("--output_dir") + 1] = str(locked / "run")
    expect_error(capsys, main, args, "--output_dir", f"cannot write in {locked}", "permission")
    assert not (locked / "run").exists()


# ----------------------------------------------------------------------------------------------------------
# Results files report.py and toy.py's think check read: corrupt ones are named, never shown as "-"
# ----------------------------------------------------------------------------------------------------------
def _run_folder(root: Path) -> Path:
    run = root / "run"
    for method in ("base", "rft"):
        (run / "eval" / method).mkdir(parents=True)
        (run / "eval" / method / "results.json").write_text(json.dumps({"model": method, "benchmarks": {}}))
    return run


REPORT_CASES = [  # (id, file under the run folder, bytes, words)
    ("results not JSON", "eval/rft/results.json", b'{"benchmarks": {', ["eval/rft/results.json", "not valid JSON"]),
    ("results not UTF-8", "eval/rft/results.json", b'{"model": "caf\xe9"}', ["eval/rft/results.json",
                                                                             "not UTF-8"]),
    ("results a list", "eval/rft/results.json", b"[]", ["eval/rft/results.json", "JSON list, not the dict"]),
    ("metrics not UTF-8", "rft/metrics.jsonl", b'{"step": 1}\n\xff\xfe\n', ["rft/metrics.jsonl", "not UTF-8"]),
    ("think check not JSON", "eval/base/think_check.json", b"{", ["think_check.json", "not valid JSON"]),
    ("dynamics not JSON", "analysis/dynamics.json", b"nan", ["dynamics.json", "not valid JSON"]),
]


@pytest.mark.parametrize("case", REPORT_CASES, ids=[c[0].replace(" ", "_") for c in REPORT_CASES])
def test_report_refuses_a_file_it_cannot_read(case, tmp_path, capsys):
    _, name, content, words = case
    run = _run_folder(tmp_path)
    (run / name).parent.mkdir(parents=True, exist_ok=True)
    (run / name).write_bytes(content)
    expect_error(capsys, report.main, ["--run_dir", str(run)], *words, "Rerun the stage that writes it")
    assert not (run / "report.md").exists()
    (run / name).unlink()  # without the bad file the same folder gives a report: the file was the one fault
    report.main(["--run_dir", str(run)])
    assert (run / "report.md").exists()


@pytest.mark.parametrize("name, words", [("not_json", ["not_json.json", "not valid JSON"]),
                                         ("latin", ["latin.json", "not UTF-8", "0xe9"]),
                                         ("a_list", ["a_list.json", "JSON list"])])
def test_think_check_refuses_a_results_file_it_cannot_read(name, words, bad, capsys):
    expect_error(capsys, toy.main, ["--think_check", str(getattr(bad, name)), "--jigsaw_data", str(bad.data)], *words,
                 "--think_check")


# ----------------------------------------------------------------------------------------------------------
# jigsaw.py: source images too small for the grid, a source that is not there
# ----------------------------------------------------------------------------------------------------------
def _images(folder: Path, sizes) -> Path:
    from PIL import Image
    folder.mkdir(parents=True)
    for i, size in enumerate(sizes):
        Image.new("RGB", size, (40 * i, 90, 200)).save(folder / f"img_{i}.png")
    return folder


@pytest.mark.parametrize("sizes, grid, words", [
    ([(4, 4)] * 3, "3x3", ["4x4 pixels is smaller than the 3x3 grid", "at least 6x6", "smaller --grid"]),
    ([(60, 60), (60, 60), (1000, 5)], "2x2", ["448x2 pixels", "at least 4x4", "Remove it"]),
], ids=["tiny_images", "thin_after_max_side"])
def test_jigsaw_source_images_too_small(sizes, grid, words, tmp_path, capsys):
    folder = _images(tmp_path / "src", sizes)
    line = expect_error(capsys, jigsaw.main, ["--source", str(folder), "--grid", grid, "--train", "2", "--test", "1",
                                              "--output_dir", str(tmp_path / "out")], *words)
    assert "img_" in line and not (tmp_path / "out").exists()


def test_jigsaw_source_missing_is_an_error_line(tmp_path, capsys):
    expect_error(capsys, jigsaw.main, ["--source", str(tmp_path / "no" / "such" / "folder"), "--grid", "2x2",
                                       "--train", "2", "--test", "1", "--output_dir", str(tmp_path / "out")],
                 "no such folder")


# ----------------------------------------------------------------------------------------------------------
# One writer per folder: the lock a stage holds until it exits
# ----------------------------------------------------------------------------------------------------------
HOLDER = """
import fcntl, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import files
run = Path(sys.argv[2])
outer = open(run / ".lock", "a+")                 # what run_all.sh holds on $RUN/.lock
fcntl.flock(outer.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
for name in ("sft", "rft", "eval", "analysis"):
    files.lock_output_dir(run / name, "holder.py")
source = run / "sources" / "non_rea"
files.lock_output_dir(source, "holder.py", lock_path=source.with_name(source.name + ".lock"))
print("locked", flush=True)
sys.stdin.read()
"""


def test_a_second_writer_is_refused_while_the_first_holds_the_folder(bad, tmp_path, capsys, no_model_loads):
    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(ROOT), str(run)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert files.LOCK_FILE != ".lock"   # run_all.sh's lock is another file: the stages it starts are not refused
        files.lock_output_dir(run, "test")  # (even a stage writing into $RUN itself)
        data = str(bad.data)
        commands = {
            "sft": (sft.main, ["--model", str(bad.model), "--data", data, "--output_dir", str(run / "sft"), *SFT]),
            "rft": (rft.main, ["--model", str(bad.model), "--data", data, "--output_dir", str(run / "rft"), *RFT]),
            "eval": (ev.main, ["--model", str(bad.model), "--data", f"jigsaw={data}", "--output_dir",
                               str(run / "eval"), *EVAL]),
            "analysis": (analyze.main, ["--model", str(bad.model), "--sources", f"non_rea={data}", "--probes", data,
                                        "--output_dir", str(run / "analysis"), *ANALYZE]),
            "sources/non_rea": (rollout_sft.main, ["--source", "non_rea", "--data", data, "--output_dir",
                                                   str(run / "sources" / "non_rea")]),
        }
        for folder, (main, argv) in commands.items():
            line = expect_error(capsys, main, argv, f"--output_dir {run / folder} is in use by another process",
                                f"PID {holder.pid} (holder.py", f"kill {holder.pid}")
            assert "Two writers would mix two runs" in line
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    # the holder is gone: the kernel released its locks, whatever way it ended
    rollout_sft.main(["--source", "non_rea", "--data", str(bad.data), "--output_dir", str(run / "sources" / "non_rea")])
    assert (run / "sources" / "non_rea" / "stats.json").exists()
    files.lock_output_dir(run / "sft", "test")


# ----------------------------------------------------------------------------------------------------------
# A full disk: the previous complete state is intact, and the message says which it is
# ----------------------------------------------------------------------------------------------------------
def _sft(model, data, out, *extra):
    return sft.main(["--model", str(model), "--data", str(data), "--output_dir", str(out), "--prompt_column",
                     "prompt_no_think", "--completion_column", "target_non_rea", "--batch_size", "2", "--lr", "1e-3",
                     "--seed", "1", *extra])


def test_full_disk_mid_save_keeps_the_previous_resume_state_and_says_so(bad, tmp_path, capsys, monkeypatch):
    """The save of step 4's resume state runs out of space half-way (a file cut short, then ENOSPC): the run
    stops with an error line naming step 2's state, that state and checkpoint-2 are untouched, and a --resume
    after the disk is freed ends exactly where an uninterrupted run ends."""
    from accelerate import Accelerator
    args = ("--max_steps", "4", "--save_steps", "2")
    straight = load_file(str(_sft(bad.model, bad.data, tmp_path / "straight", *args) / "model.safetensors"))

    original, calls = Accelerator.save_state, []

    def disk_fills(self, output_dir=None, **kwargs):
        calls.append(output_dir)
        result = original(self, output_dir, **kwargs)
        if len(calls) == 2:  # the last step's state: written in part, then the disk is full
            half = Path(output_dir) / "optimizer.bin"
            half.write_bytes(half.read_bytes()[:100])
            raise OSError(errno.ENOSPC, "No space left on device", str(half))
        return result
    monkeypatch.setattr(Accelerator, "save_state", disk_fills)
    out = tmp_path / "run"
    line = expect_error(capsys, lambda argv: _sft(bad.model, bad.data, out, *argv), list(args))
    assert "No space left on device" in line or "no space left" in line
    assert f"{out / 'resume'} (step 2), is intact" in line and "checkpoint-2" in line and "--resume" in line
    assert json.loads((out / "resume" / "trainer_state.json").read_text())["step"] == 2
    assert not (out / ".resume.tmp").exists() and not (out / "final").exists()   # the half-written copy is gone
    common.check_weights(out / "checkpoint-2")
    monkeypatch.setattr(Accelerator, "save_state", original)
    resumed = load_file(str(_sft(bad.model, bad.data, out, *args, "--resume") / "model.safetensors"))
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def _write_fails_half_way(monkeypatch, module, name):
    """files.write_text_atomic writes half the text of file `name` into its temp file, then the disk is full."""
    original = module.write_text_atomic

    def half(path, text):
        if Path(path).name != name:
            return original(path, text)
        with files.atomic_path(path) as tmp:
            tmp.write_text(text[:len(text) // 2])
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp))
    monkeypatch.setattr(module, "write_text_atomic", half)


def test_full_disk_keeps_eval_results_and_report(bad, tmp_path, capsys, monkeypatch):
    out = tmp_path / "eval"
    argv = ["--model", str(bad.model), "--data", f"jigsaw={bad.data}", "--output_dir", str(out), *EVAL]
    ev.main(argv)
    before = (out / "results.json").read_bytes()
    _write_fails_half_way(monkeypatch, files, "results.json")
    expect_error(capsys, ev.main, argv, f"writing {out / 'results.json'} failed", "no space left",
                 "keeps its previous complete version", "reuses every cached prediction")
    assert (out / "results.json").read_bytes() == before and not list(out.glob("*.tmp"))
    run = _run_folder(tmp_path)
    (run / "report.md").write_text("the previous report\n")
    _write_fails_half_way(monkeypatch, files, "report.md")
    expect_error(capsys, report.main, ["--run_dir", str(run)], "report.md failed", "keeps its previous version")
    assert (run / "report.md").read_text() == "the previous report\n"


def test_full_disk_keeps_a_data_source_folder(bad, tmp_path, capsys, monkeypatch):
    from datasets import DatasetDict
    out = tmp_path / "sources" / "non_rea"
    rollout_sft.main(["--source", "non_rea", "--data", str(bad.data), "--output_dir", str(out)])
    stats = (out / "stats.json").read_text()
    original = DatasetDict.save_to_disk

    def disk_fills(self, path, **kwargs):
        original(self, path, **kwargs)
        raise OSError(errno.ENOSPC, "No space left on device", str(path))
    monkeypatch.setattr(DatasetDict, "save_to_disk", disk_fills)
    expect_error(capsys, rollout_sft.main, ["--source", "non_rea", "--data", str(bad.data), "--output_dir", str(out)],
                 f"writing {out} failed", "was not replaced")
    assert (out / "stats.json").read_text() == stats and not out.with_name("non_rea.tmp").exists()


def test_write_failure_reads_full_disks_that_carry_no_errno(tmp_path, monkeypatch):
    """torch.save reports a full disk as RuntimeError('... unexpected pos ...') and safetensors as its own error
    type (both seen on a full tmpfs): read by the free space left; the same error with space free is a bug."""
    torch_full = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
    assert files.write_failure(torch_full, tmp_path) is None
    assert "no space left" in files.write_failure(Exception("I/O error: No space left on device (os error 28)"),
                                                 tmp_path)
    assert "Read-only file system" in files.write_failure(OSError(errno.EROFS, "Read-only file system"), tmp_path)
    monkeypatch.setattr(files.shutil, "disk_usage", lambda path: SimpleNamespace(free=4096))
    assert "no space left" in files.write_failure(torch_full, tmp_path)


# ----------------------------------------------------------------------------------------------------------
# --resume compares what the paths hold
# ----------------------------------------------------------------------------------------------------------
def _jigsaw(out: Path, grid: str = "2x2", overwrite: bool = False) -> Path:
    jigsaw.build_dataset(jigsaw.BuildArgs(source="procedural", grid=grid, train=4, test=2, output_dir=str(out),
                                          image_size=56 if grid == "2x2" else 84, overwrite=overwrite))
    return out


def test_resume_refuses_data_rebuilt_under_the_same_name(bad, tmp_path, capsys, monkeypatch):
    data = _jigsaw(tmp_path / "jigsaw")
    out = tmp_path / "run"
    _sft(bad.model, data, out, "--max_steps", "2", "--save_steps", "1")
    _jigsaw(data, "3x3", overwrite=True)   # same path, other puzzles
    monkeypatch.setattr(common, "load_model", lambda *a, **k: pytest.fail("loaded a model"))
    line = expect_error(capsys, lambda argv: _sft(bad.model, data, out, *argv),
                        ["--max_steps", "2", "--save_steps", "1", "--resume"])
    assert f"--data {data} does not hold what {out} was trained on" in line and "rebuilt or replaced" in line
    recorded = json.loads((out / runs.RUN_FILE).read_text())["fingerprints"]
    assert recorded["data"] != runs.data_fingerprint(data) and recorded["model"] == runs.model_fingerprint(bad.model)


def test_a_moved_run_resumes_exactly_from_data_and_model_moved_with_it(bad, tmp_path, monkeypatch):
    """Run, data and model moved to another folder (every path spelt differently): --resume continues, and
    ends where the run would have ended in place."""
    here, there = tmp_path / "here", tmp_path / "there"
    data, model = _jigsaw(here / "jigsaw"), here / "model"
    shutil.copytree(bad.model, model)
    args = ("--max_steps", "4", "--save_steps", "2")
    straight = load_file(str(_sft(model, data, here / "straight", *args) / "model.safetensors"))

    class Killed(Exception):
        pass

    def killed(*a, **k):
        raise Killed  # killed after step 4, before its final save: resume/ holds step 2
    monkeypatch.setattr(runs, "finish_run", killed)
    with pytest.raises(Killed):
        _sft(model, data, here / "run", *args)
    monkeypatch.undo()
    shutil.move(str(here), str(there))
    final = _sft(there / "model", there / "jigsaw", there / "run", *args, "--resume")
    resumed = load_file(str(final / "model.safetensors"))
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    steps = [json.loads(line)["step"] for line in (there / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_model_fingerprint_reads_a_sample_of_the_weights_not_all(bad, tmp_path):
    moved = tmp_path / "moved"
    shutil.copytree(bad.model, moved)
    assert runs.model_fingerprint(moved) == runs.model_fingerprint(bad.model)
    retrained = tmp_path / "retrained"   # same architecture and file sizes, other weights
    shutil.copytree(bad.model, retrained)
    from safetensors import safe_open
    from safetensors.torch import save_file
    weights = load_file(str(retrained / "model.safetensors"))
    with safe_open(str(retrained / "model.safetensors"), "pt") as f:
        metadata = f.metadata()
    save_file({k: v + 0.01 if v.is_floating_point() else v for k, v in weights.items()},
              str(retrained / "model.safetensors"), metadata=metadata)
    assert (retrained / "model.safetensors").stat().st_size == (bad.model / "model.safetensors").stat().st_size
    assert runs.model_fingerprint(retrained) != runs.model_fingerprint(bad.model)
    assert runs.model_fingerprint("Qwen/Qwen2.5-VL-3B-Instruct") == "hub:Qwen/Qwen2.5-VL-3B-Instruct"


def test_rollout_shard_refuses_rebuilt_data_and_resumes_moved_data(bad, tmp_path, capsys):
    data = _jigsaw(tmp_path / "jigsaw")
    drawn = []

    def sampler(model, processor, rows, args):
        drawn.extend(r["id"] for r in rows)
        return [[f"<think>t{r['id']}</think><answer>1 1\n1 1</answer>"] * args.num_generations for r in rows]
    argv = ["--source", "rea_self_generated", "--model", str(bad.model), "--num_generations", "2",
            "--max_completion_length", "4", "--output_dir", str(tmp_path / "source")]
    rollout_sft.main(argv + ["--data", str(data)], sample_fn=sampler)
    assert len(drawn) == 4
    moved = tmp_path / "elsewhere" / "jigsaw"
    shutil.copytree(data, moved)
    rollout_sft.main(argv + ["--data", str(moved)], sample_fn=sampler)   # same content: nothing drawn again
    assert len(drawn) == 4
    _jigsaw(data, "3x3", overwrite=True)
    line = expect_error(capsys, rollout_sft.main, argv + ["--data", str(data)])
    assert f"--data '{data}' holds other content than when the shard was drawn" in line and "delete" in line
