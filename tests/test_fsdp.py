"""The sharded path: sft.py and rft.py under `accelerate launch --config_file configs/accelerate_fsdp2.yaml` with two
CPU processes (gloo) and the tiny model.

Which path these tests exercise, and why: accelerate's own FSDP2 path, through the kit's scripts. accelerate 1.16
turns FSDP on only for accelerator devices; on CPUs it would set up MULTI_CPU and wrap the model in DDP silently.
runs.make_accelerator hands accelerate the FSDP state it would have set up on GPUs (fsdp.enable_on_cpu), so the same
calls run here as on GPUs: accelerator.prepare (fully_shard per decoder layer and vision block, the shipped
config's auto-wrap), clip_grad_norm_, get_state_dict (export_model), save_state/load_state (sharded resume state).
Not raw fully_shard: that would test a path the scripts never take. What differs from a GPU: gloo instead of NCCL,
fp32 instead of bf16 mixed precision (no MixedPrecisionPolicy), and the tiny model.

Four launches in all (~15-25 s each on 2 cores), every one under a timeout so that a deadlock fails instead of
hanging: probe + straight SFT run, the SFT run killed after a save, its resume, one GRPO step.
"""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import common
import memory
import rft
import sequences
import sft

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "configs/accelerate_fsdp2.yaml"
LAUNCH_TIMEOUT = 240   # seconds per launch; a decode loop that left one rank behind would wait here
SFT_ARGS = ["--prompt_column", "prompt_no_think", "--completion_column", "target_non_rea", "--max_steps", "3",
            "--save_steps", "2", "--lr", "1e-3", "--warmup_ratio", "0", "--gradient_checkpointing"]
CAPS = [3, 24]   # max_new_tokens of rank 0 and rank 1 in the probe's decode


def launch(tmp_path: Path, name: str, tasks: list[dict]) -> subprocess.CompletedProcess:
    spec = tmp_path / f"{name}.json"
    spec.write_text(json.dumps(tasks))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    started = time.time()
    result = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", CONFIG,
                             "--num_processes", "2", str(ROOT / "tests" / "fsdp_worker.py"), str(spec)],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
    result.seconds = time.time() - started
    return result


def metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def probed(toy_model_dir, jigsaw_data, tmp_path_factory):
    """Launch 1: the probe (sharding, decode with different caps) on a perturbed copy of the tiny model, then the
    straight sharded SFT run (2 processes x batch 2, --optimizer adamw8bit: the sharded run must switch)."""
    from conftest import perturbed_copy
    tmp = tmp_path_factory.mktemp("fsdp")
    model, processor = common.load_model_and_processor(str(toy_model_dir))
    perturbed = perturbed_copy(model)   # the random init greedily repeats one token: equal outputs would be trivial
    perturbed.save_pretrained(tmp / "perturbed")
    processor.save_pretrained(tmp / "perturbed")
    tasks = [{"kind": "probe", "model": str(tmp / "perturbed"), "data": str(jigsaw_data), "out": str(tmp / "probe"),
              "caps": CAPS},
             {"kind": "sft", "argv": ["--model", str(toy_model_dir), "--data", str(jigsaw_data), *SFT_ARGS,
                                      "--batch_size", "2", "--optimizer", "adamw8bit",
                                      "--output_dir", str(tmp / "straight")]}]
    result = launch(tmp, "first", tasks)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    print(f"launch 1 (probe + SFT 3 steps): {result.seconds:.1f} s")
    return tmp, result


def test_fsdp_really_shards_every_parameter(probed):
    """Every parameter is a DTensor and each rank holds a part of it (the parts add up to the whole); every decoder
    layer and vision block is an FSDP unit of its own (the config's auto-wrap). Under DDP nothing here holds."""
    tmp, result = probed
    ranks = [json.loads((tmp / "probe" / f"shards.rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["distributed_type"] == "DistributedType.FSDP" for r in ranks)
    params = ranks[0]["params"]
    assert params and all(p["dtensor"] for r in ranks for p in r["params"].values())
    for name, p in params.items():
        locals_ = [r["params"][name]["local"] for r in ranks]
        assert sum(locals_) == p["full"], name
        if p["full"] >= 2:
            assert max(locals_) < p["full"], name      # nobody holds a whole parameter
    held = sum(p["local"] for p in ranks[0]["params"].values()) / sum(p["full"] for p in params.values())
    assert 0.4 < held < 0.6, held
    units = ranks[0]["units"]
    assert units.count("FSDPQwen2_5_VLDecoderLayer") == 2 and units.count("FSDPQwen2_5_VLVisionBlock") == 2, units
    # the start line of the sharded SFT run says so too, and the 8-bit optimizer was replaced by torch AdamW
    out = result.stdout + result.stderr
    assert "FSDP over 2 processes" in out and "using torch AdamW" in out


def test_ranks_asked_for_different_lengths_decode_together_and_as_one_process(probed, jigsaw_data):
    """Rank 0 asks for 3 new tokens, rank 1 for 24: under FSDP every forward gathers from both ranks, so a rank
    that left its decode loop early would leave the other waiting (the launch's timeout). Each rank's greedy
    tokens and log-probs equal one unsharded process decoding the same puzzles with the same cap."""
    tmp, _ = probed
    model, processor = common.load_model_and_processor(str(tmp / "perturbed"))
    rows = common.load_rows(str(jigsaw_data), "test")
    lengths = []
    for rank in (0, 1):
        sharded = json.loads((tmp / "probe" / f"decode.rank{rank}.json").read_text())
        mine = [rows[i] for i in sharded["rows"]]
        alone = sequences.generate(model, processor, [r["prompt"] for r in mine], [common.row_images(r) for r in mine],
                                   max_new_tokens=CAPS[rank], do_sample=False)
        assert sharded["completion_ids"] == alone["completion_ids"], rank
        assert sharded["truncated"] == alone["truncated"]
        for a, b in zip(sharded["logprobs"], alone["logprobs"]):
            assert a == pytest.approx(b, abs=1e-5)
        lengths.append(max(len(ids) for ids in alone["completion_ids"]))
    assert lengths[0] <= CAPS[0] < lengths[1], lengths   # rank 1 really decoded past rank 0's end


def test_sharded_sft_equals_one_process_on_the_union(probed, toy_model_dir, jigsaw_data):
    """2 processes x batch 2 under FSDP against 1 process x batch 4 on the same rows (rank r reads the data
    positions r*2.. of each step). Tolerances: step 1's loss and gradient norm to rel 1e-5 (the same weights and
    rows; only the reduce-scatter's summation order differs); the weights after 3 AdamW steps at lr 1e-3 to abs
    1e-5, 1% of one step (measured 4e-7: Adam divides by sqrt(v), so float noise in near-zero gradients grows)."""
    tmp, _ = probed
    sft.main(["--model", str(toy_model_dir), "--data", str(jigsaw_data), *SFT_ARGS, "--batch_size", "4",
              "--optimizer", "adamw", "--output_dir", str(tmp / "one")])
    runs_ = {run: metrics(tmp / run / "metrics.jsonl") for run in ("one", "straight")}
    for key in ("loss", "grad_norm", "tokens"):
        assert runs_["straight"][0][key] == pytest.approx(runs_["one"][0][key], rel=1e-5), key
    assert [m["lr"] for m in runs_["straight"]] == pytest.approx([m["lr"] for m in runs_["one"]])
    one, sharded = load_file(str(tmp / "one" / "final" / "model.safetensors")), \
        load_file(str(tmp / "straight" / "final" / "model.safetensors"))
    assert one.keys() == sharded.keys()   # final/ is a whole save_pretrained model (tied lm_head not duplicated)
    for name in one:
        assert torch.allclose(one[name], sharded[name], rtol=0, atol=1e-5), name
    initial = load_file(str(toy_model_dir / "model.safetensors"))
    assert any(not torch.equal(initial[n], sharded[n]) for n in sharded)
    common.load_model(str(tmp / "straight" / "checkpoint-2"))   # the sharded run's snapshots load like any


def test_sharded_resume_after_a_kill_equals_the_uninterrupted_run(probed, toy_model_dir, jigsaw_data):
    """The same sharded run, every rank killed (SIGKILL) right after the resume state of step 2 is written, then
    --resume: each rank reloads its shards, its optimizer shards and its RNG; the final weights equal the
    uninterrupted run's exactly."""
    tmp, _ = probed
    out = tmp / "killed"
    argv = ["--model", str(toy_model_dir), "--data", str(jigsaw_data), *SFT_ARGS, "--batch_size", "2",
            "--optimizer", "adamw8bit", "--output_dir", str(out)]
    killed = launch(tmp, "killed", [{"kind": "sft", "argv": argv, "kill_after_save": 2}])
    assert killed.returncode != 0 and not (out / "final").exists(), killed.stderr[-2000:]
    assert json.loads((out / "resume" / "trainer_state.json").read_text())["step"] == 2
    resumed = launch(tmp, "resumed", [{"kind": "sft", "argv": argv + ["--resume"]}])
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-4000:]
    assert "resumed from" in resumed.stdout + resumed.stderr
    print(f"killed launch {killed.seconds:.1f} s, resumed launch {resumed.seconds:.1f} s")
    straight, again = load_file(str(tmp / "straight" / "final" / "model.safetensors")), \
        load_file(str(out / "final" / "model.safetensors"))
    assert straight.keys() == again.keys()
    for name in straight:
        assert torch.equal(straight[name], again[name]), name
    assert [m["step"] for m in metrics(out / "metrics.jsonl")] == [1, 2, 3]


def test_sharded_grpo_step_equals_one_process_on_the_union(toy_model_dir, jigsaw_data, tmp_path):
    """One GRPO step (beta 0.04 with the reference model, dapo, gradient checkpointing on, the step-0 check and an
    evaluation before and after: greedy decoding and MI under FSDP) on 2 processes x 2 puzzles x 4 samples. Its
    logged loss and gradient norm equal one process computing the same loss on the union of both ranks'
    rollouts (their logged completion ids and advantages), with the unsharded model: loss rel 1e-5 (abs 1e-7),
    gradient norm rel 1e-4. A reference model that was wrong on rank 1 would show in the loss (k3 KL)."""
    out = tmp_path / "rft"
    argv = ["--model", str(toy_model_dir), "--data", str(jigsaw_data), "--output_dir", str(out), "--max_steps", "1",
            "--batch_size", "2", "--num_generations", "4", "--max_completion_length", "8", "--micro_batch_size", "4",
            "--beta", "0.04", "--loss_type", "dapo", "--lr", "1e-3", "--log_completions", "2", "--eval_steps", "1",
            "--eval_size", "4", "--eval_batch_size", "4", "--mi_puzzles", "2", "--min_answer_image_mi", "0"]
    result = launch(tmp_path, "rft", [{"kind": "rft", "argv": argv, "digit_reward": True}])
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    print(f"GRPO launch {result.seconds:.1f} s")
    logged = [m for m in metrics(out / "metrics.jsonl") if "reward" in m][0]
    assert any("answer_image_mi" in m for m in metrics(out / "metrics.jsonl"))   # the step-0 check ran sharded
    ranks = [[json.loads(line) for line in (out / name).read_text().splitlines()]
             for name in ("completions.jsonl", "completions.rank1.jsonl")]
    samples = [c for rank in ranks for group in rank for c in group["completions"]]
    assert any(c["advantage"] != 0 for c in samples)   # a step that teaches something

    model, processor = common.load_model_and_processor(str(toy_model_dir))
    reference = common.load_model(str(toy_model_dir))
    model.train()
    train = common.load_rows(str(jigsaw_data), "train")
    by_id = {train[i]["id"]: train[i] for i in range(len(train))}
    args = rft.Args(num_generations=4, micro_batch_size=4, beta=0.04, loss_type="dapo")
    union_tokens = sum(len(c["completion_ids"]) for c in samples)
    loss_sum = 0.0
    for rank in ranks:
        rows = [by_id[group["puzzle_id"]] for group in rank]
        completions = [c for group in rank for c in group["completions"]]
        batch = {"prompt_batch": sequences.build_batch(processor, [r["prompt"] for r in rows],
                                                       [common.row_images(r) for r in rows]),
                 "completion_ids": [c["completion_ids"] for c in completions],
                 "truncated": torch.tensor([c["truncated"] for c in completions]),
                 "advantages": torch.tensor([c["advantage"] for c in completions]),
                 "sampler_logprobs": [[0.0] * len(c["completion_ids"]) for c in completions]}   # not read here
        for mb in rft.micro_batches(processor, batch, args):
            ref = sequences.shared_prefix_logprobs(reference, mb["prefix"], mb["prefix_index"], mb["completion_ids"],
                                                   mb["completion_mask"])
            logprobs = sequences.completion_logprobs(model, mb).float()
            loss, _ = rft.grpo_loss(logprobs, logprobs.detach(), mb["advantages"].float(), mb["loss_mask"], ref,
                                    args.beta, loss_type="dapo", num_tokens=union_tokens)
            loss.backward()
            loss_sum += float(loss)
    grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf")))
    assert logged["loss"] == pytest.approx(loss_sum, rel=1e-5, abs=1e-7)
    assert logged["grad_norm"] == pytest.approx(grad_norm, rel=1e-4)


def test_run_all_launches_the_training_stages_with_the_shipped_config(tmp_path):
    """PRESET=7b_fsdp through run_all.sh with a PY that records what it is asked to run: sft.py and rft.py start
    under accelerate launch with configs/accelerate_fsdp2.yaml (per-process batch 1), every other stage as a plain
    process; --list parses the config and prints the launcher; a LAUNCH naming a missing config stops the run."""
    from accelerate.commands.config.config_args import load_config_from_file
    config = load_config_from_file(str(ROOT / CONFIG))   # accelerate's own reader of --config_file
    assert config.distributed_type == "FSDP" and config.fsdp_config["fsdp_version"] == 2
    assert config.fsdp_config["fsdp_transformer_layer_cls_to_wrap"] == "Qwen2_5_VLDecoderLayer,Qwen2_5_VLVisionBlock"

    log = tmp_path / "calls"
    fake = tmp_path / "py"
    fake.write_text(f'#!/bin/bash\ncase "$1" in\n  plan.py|mirror.py|experiment.py|-c) exec {sys.executable} "$@" ;;\n'
                    f'  *) echo "$@" >> {log}; exit 0 ;;\nesac\n')
    fake.chmod(0o755)
    env = {**os.environ, "PY": str(fake), "PRESET": "7b_fsdp", "RUN": str(tmp_path / "run"), "IGNORE_DISK_PLAN": "1"}
    listed = subprocess.run(["bash", "run_all.sh", "--list"], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=120)
    assert listed.returncode == 0, listed.stderr
    assert f"--config_file {CONFIG} --num_processes 4 (FSDP2, 4 processes" in listed.stdout, listed.stdout
    for stage in ("rft", "sources", "sft_sources"):   # the stages one at a time (a whole run records 10: 60 s)
        ran = subprocess.run(["bash", "run_all.sh", "--only", stage], cwd=ROOT, env=env, capture_output=True,
                             text=True, timeout=120)
        assert ran.returncode == 0, ran.stdout[-3000:] + ran.stderr[-3000:]
    calls = log.read_text().splitlines()
    prefix = f"-m accelerate.commands.launch --config_file {CONFIG} --num_processes 4 "
    training = [c for c in calls if " sft.py " in f" {c} " or " rft.py " in f" {c} "]
    assert len(training) == 4, calls   # rft, the three sft_sources runs
    assert all(c.startswith(prefix) for c in training), training
    # per process: SFT 1 row (4 x 1 = the 3b preset's 4), GRPO 8 puzzles (4 x 8 = its 32)
    assert all(f"--batch_size {1 if ' sft.py ' in f' {c} ' else 8} " in c for c in training), training
    assert any(c.startswith(prefix + "rft.py") and "--beta 0.04" in c for c in training)
    others = [c for c in calls if c not in training]
    assert others and all(c.split()[0] == "rollout_sft.py" for c in others), others   # the sources: plain
    broken = subprocess.run(["bash", "run_all.sh", "--list"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                            env={**env, "LAUNCH": f"{sys.executable} -m accelerate.commands.launch --config_file "
                                                  "configs/nope.yaml"})
    assert broken.returncode == 2 and "configs/nope.yaml, which does not exist" in broken.stderr, broken.stderr


def _preset(name: str) -> dict:
    names = "MODEL BETA OPTIMIZER BATCH_SIZE RFT_BATCH GROUP_SIZE RFT_MICRO_BATCH RFT_MAX_COMPLETION_LENGTH LAUNCH"
    shown = subprocess.run(["bash", "-c", f'PY=python; . presets/{name}.env; for v in {names}; do echo "$v=${{!v}}"; done'],
                           cwd=ROOT, capture_output=True, text=True, timeout=30, check=True).stdout
    return dict(line.split("=", 1) for line in shown.splitlines())


@pytest.mark.parametrize("preset,gib", [("7b", 141e9 / memory.GiB), ("7b_fsdp", 80)])
def test_the_7b_presets_pass_the_kits_headroom_rule(preset, gib, capsys):
    """Each 7B preset's SFT and GRPO plans (--dry_run with the preset's values, per GPU over the processes its
    LAUNCH starts), times the 1.45 headroom of print_memory_plan, fit its GPUs: one H200 (141 GB = 131.3 GiB),
    four 80 GB GPUs. And the rule decides: on one H200 the paper's beta 0.04 would not fit."""
    import plan
    s = _preset(preset)
    launch = plan.launcher(s)
    n = launch["processes"] if launch else 1
    assert (n, bool(launch and launch["fsdp"])) == ((4, True) if preset == "7b_fsdp" else (1, False))
    grpo = rft.Args(model=s["MODEL"], batch_size=int(s["RFT_BATCH"]), num_generations=int(s["GROUP_SIZE"]),
                    micro_batch_size=int(s["RFT_MICRO_BATCH"]), beta=float(s["BETA"]), optimizer=s["OPTIMIZER"],
                    max_completion_length=int(s["RFT_MAX_COMPLETION_LENGTH"]), plan_processes=n)
    sft_plan = sft.main(["--model", s["MODEL"], "--dry_run", "--optimizer", s["OPTIMIZER"], "--batch_size",
                         s["BATCH_SIZE"], "--gradient_checkpointing", "--plan_processes", str(n)])
    for total in (sft_plan["total"], rft.dry_run(grpo, "bf16_mixed", "bfloat16")["total"]):
        assert total * 1.45 / memory.GiB <= gib, (preset, total / memory.GiB)
    if preset == "7b":
        with_kl = rft.dry_run(rft.Args(**{**grpo.__dict__, "beta": 0.04}), "bf16_mixed", "bfloat16")
        assert with_kl["total"] * 1.45 / memory.GiB > gib
    capsys.readouterr()


def test_the_sharded_memory_plan_by_hand():
    """--plan_processes 4 on the 7B architecture: weights and fp32 gradients / 4, torch AdamW's 8 B/param / 4 even
    when 8-bit was asked for, the bf16 reference whole, and two decoder layers + embedding + lm_head gathered in bf16."""
    model = memory.meta_model("Qwen/Qwen2.5-VL-7B-Instruct")
    n = 8_292_166_656
    plan = memory.memory_plan(model, "adamw8bit", "bf16_mixed", reference_model=True, shards=4)
    assert plan["weights"] == plan["gradients"] == n * 4 / 4 and plan["optimizer_states"] == n * 8 / 4
    assert plan["reference_model"] == n * 2
    h, kv, inter, vocab = 3584, 4 * 128, 18944, 152064
    layer = (h * h + h) + 2 * (h * kv + kv) + h * h + 3 * h * inter + 2 * h
    assert plan["gathered_parameters"] == (2 * layer + 2 * vocab * h) * 2
    single = memory.memory_plan(model, "adamw8bit", "bf16_mixed", reference_model=True)
    assert "gathered_parameters" not in single and single["optimizer_states"] == n * 2
