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


def test_the_source_names_are_one_list():
    import re
    from pathlib import Path
    import report
    run_all = (Path(__file__).resolve().parents[1] / "run_all.sh").read_text()
    for source in rollout_sft.SOURCES:
        assert source in run_all
    reported = [m[len("sft_"):] for m, _ in report.METHODS if m.startswith("sft_rea")]
    assert ["non_rea"] + reported == list(rollout_sft.SOURCES)
    assert set(re.findall(r"sft_(rea_\w+)", run_all)) <= set(rollout_sft.SOURCES)


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
