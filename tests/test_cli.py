"""One flag vocabulary across the stages, and every numeric flag of every stage range-checked before any model
is loaded (a clear message, exit 2)."""
import dataclasses

import pytest

import analyze
import common
import importlib
import jigsaw
import report
import rft
import rollout_sft
import sft
import toy

evaluate = importlib.import_module("eval")  # the stage's file name shadows the builtin only as a module name
STAGES = {"sft.py": sft.Args, "rft.py": rft.Args, "rollout_sft.py": rollout_sft.Args, "analyze.py": analyze.Args,
          "jigsaw.py": jigsaw.BuildArgs, "eval.py": evaluate.Args, "toy.py": toy.Args, "report.py": report.Args}
# The old spellings of one concept each; the kit uses the name on the right everywhere.
RETIRED = {"out": "output_dir", "output": "output_dir", "out_dir": "output_dir", "dtype": "precision",
           "k": "num_generations", "group_size": "num_generations", "no_think": "prompt_style",
           "jigsaw_prompt": "prompt_style", "max_new_tokens": "max_completion_length",
           "max_completion_tokens": "max_completion_length", "target_column": "completion_column",
           "dry_run_seq_len": "plan_prompt_length", "plan_prompt_tokens": "plan_prompt_length",
           "ref_dtype": "ref_precision"}


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_one_name_per_concept(stage):
    names = {f.name for f in dataclasses.fields(STAGES[stage])}
    assert not names & set(RETIRED), {n: RETIRED[n] for n in names & set(RETIRED)}
    assert "output_dir" in names
    if "precision" in names:
        assert "dtype" not in names


def test_every_list_of_methods_and_sources_derives_from_experiment_py():
    import experiment
    assert report.METHODS == [(m.name, m.paper_name) for m in experiment.METHODS]
    assert rollout_sft.SOURCES == experiment.SOURCE_NAMES
    assert set(experiment.TRAINING_ORDER) == {m.name for m in experiment.METHODS} - {"base"}


def test_adding_a_source_is_one_row_of_experiment_py(tmp_path):
    """A fifth SFT source (SFT on the base model's own correct samples) added as one row of experiment.SOURCES in a
    copy of the kit: run_all.sh samples it from the base model, trains an SFT run on it, evaluates that run and
    its checkpoints, analyses the source and tracks the run; the plan counts one more run."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    kit = tmp_path / "kit"
    shutil.copytree(root, kit, ignore=shutil.ignore_patterns(".git", ".venv", "runs", "tests", "__pycache__"))
    table = (kit / "experiment.py").read_text()
    row = '    Source("rea_self_generated", "SFT-Rea-Self-Generated", made_from="rft_early", keeps="own_think"),\n'
    assert row in table
    (kit / "experiment.py").write_text(table.replace(row, row + '    Source("rea_base_rollout", '
                                                     '"SFT-Rea-Base-Rollout", made_from="base", keeps="correct_sample"),\n'))
    calls = tmp_path / "calls"
    fake = tmp_path / "py"
    fake.write_text(f'#!/bin/bash\ncase "$1" in\n  plan.py|experiment.py) exec {sys.executable} "$@" ;;\nesac\n'
                    f'echo "$@" >> {calls}\nexit 0\n')
    fake.chmod(0o755)
    run = tmp_path / "run"
    result = subprocess.run(["bash", "run_all.sh"], cwd=kit, capture_output=True, text=True, timeout=300,
                            env={**__import__("os").environ, "PY": str(fake), "PRESET": "smoke", "RUN": str(run),
                                 "IGNORE_DISK_PLAN": "1"}, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "4 runs x 2 steps" in result.stdout and "5 sources" in result.stdout, result.stdout
    lines = calls.read_text().splitlines()
    model = f"{run}/base/final"
    assert any(line.startswith("rollout_sft.py --source rea_base_rollout") and f"--model {model} " in line
               for line in lines), lines
    assert any(line.startswith("sft.py") and f"--output_dir {run}/sft_rea_base_rollout " in line for line in lines)
    assert any(line.startswith("eval.py") and f"--model {run}/sft_rea_base_rollout/final " in line
               and "--checkpoints" in line for line in lines)
    analyze = next(line for line in lines if line.startswith("analyze.py"))
    assert f"rea_base_rollout={run}/data/sources/rea_base_rollout" in analyze
    assert f"sft_rea_base_rollout={run}/sft_rea_base_rollout" in analyze


BAD = {
    "sft.py": [("--max_steps", "-1"), ("--batch_size", "0"), ("--grad_accum", "0"), ("--lr", "-1"),
               ("--warmup_ratio", "2"), ("--max_grad_norm", "-1"), ("--max_completion_length", "0"),
               ("--logging_steps", "0"), ("--save_steps", "-1"), ("--min_pixels", "-5"), ("--num_epochs", "0"),
               ("--optimizer", "sgd"), ("--save_at", "5,x"),
               ("--save_at", "0")],
    "rollout_sft.py": [("--num_generations", "0"), ("--max_completion_length", "0"), ("--batch_size", "0"),
                       ("--max_per_puzzle", "0"), ("--top_p", "0"), ("--temperature", "-1"), ("--limit", "-1"),
                       ("--max_rows", "-2")],
    "analyze.py": [("--n_train", "0"), ("--n_probe", "0"), ("--eta", "0"), ("--exact_pairs", "-1"),
                   ("--proj_dim", "-1"), ("--max_completion_length", "0"), ("--kl_samples", "0"),
                   ("--precision", "fp8")],
    "jigsaw.py": [("--train", "0"), ("--test", "0"), ("--image_size", "1"), ("--grid", "1x1")],
    "eval.py": [("--limit", "-1"), ("--batch_size", "0"), ("--max_completion_length", "0"),
                ("--prompt_style", "nope"), ("--precision", "fp8")],
}
MODULES = {"sft.py": sft, "rollout_sft.py": rollout_sft, "analyze.py": analyze, "jigsaw.py": jigsaw,
           "eval.py": evaluate}
CASES = [(stage, flag, value) for stage, cases in BAD.items() for flag, value in cases]


@pytest.mark.parametrize("stage,flag,value", CASES)
def test_bad_numbers_stop_before_any_model_loads(stage, flag, value, tmp_path, capsys, monkeypatch, jigsaw_data):
    monkeypatch.setattr(common, "load_model_and_processor", lambda *a, **k: pytest.fail("a model was loaded"))
    base = {"sft.py": ["--model", str(tmp_path), "--data", str(jigsaw_data), "--output_dir", str(tmp_path / "o")],
            "rollout_sft.py": ["--source", "rea_grpo_rollout", "--model", str(tmp_path), "--data", str(jigsaw_data),
                               "--output_dir", str(tmp_path / "o")],
            "analyze.py": ["--model", str(tmp_path), "--sources", f"a={jigsaw_data}", "--probes", str(jigsaw_data),
                           "--output_dir", str(tmp_path / "o")],
            "jigsaw.py": ["--output_dir", str(tmp_path / "o"), "--train", "2", "--test", "1"],
            "eval.py": ["--model", str(tmp_path), "--benchmarks", "jigsaw", "--data", f"jigsaw={jigsaw_data}",
                        "--output_dir", str(tmp_path / "o")]}[stage]
    with pytest.raises(SystemExit) as err:
        MODULES[stage].main(base + [flag, value])
    message = capsys.readouterr().err
    assert err.value.code == 2 and message.startswith("error: ") and flag.lstrip("-") in message, message
    assert not (tmp_path / "o").exists()  # nothing written either
