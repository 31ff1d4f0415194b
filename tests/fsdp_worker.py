"""One process of tests/test_fsdp.py's launches: `accelerate launch --config_file configs/accelerate_fsdp2.yaml
--num_processes 2 tests/fsdp_worker.py TASK.json`, on CPUs with gloo. Not a test file itself (pytest does not
collect it). Tasks, in the order given (a training run must come last: its end closes the process group):

  {"kind": "probe", "model": DIR, "data": DIR, "out": DIR, "caps": [c0, c1]}
      the model prepared as sft.py/rft.py prepare it (runs.make_accelerator + accelerator.prepare); writes
      out/shards.rank{r}.json (every parameter: DTensor or not, local and full element counts, which modules
      are FSDP units), then greedy sequences.generate of rank r's two test puzzles with max_new_tokens = caps[r]
      into out/decode.rank{r}.json, then a barrier.
  {"kind": "sft" | "rft", "argv": [...], "kill_after_save": N (optional), "digit_reward": bool (optional)}
      sft.main / rft.main with these arguments; kill_after_save: every rank SIGKILLs itself right after the
      resume state of step N is written (a run killed there); digit_reward: the reward test_rft.py uses, which the
      random tiny model reaches (so advantages are not all 0).
"""
import json
import os
import signal
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def probe(task: dict) -> None:
    import torch
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor
    import common
    import files
    import runs
    import sequences
    out = Path(task["out"])
    accelerator = runs.make_accelerator("no", "none", out)
    rank = accelerator.process_index
    model, processor = common.load_model_and_processor(task["model"])
    model = accelerator.prepare(model)
    params = {name: {"dtensor": isinstance(p, DTensor), "full": p.numel(),
                     "local": p.to_local().numel() if isinstance(p, DTensor) else p.numel()}
              for name, p in model.named_parameters()}
    units = sorted(type(m).__name__ for m in model.modules() if isinstance(m, FSDPModule))
    files.write_json_atomic(out / f"shards.rank{rank}.json", {
        "distributed_type": str(accelerator.distributed_type), "params": params, "units": units})
    rows = common.load_rows(task["data"], "test")
    mine = [rows[i] for i in (2 * rank, 2 * rank + 1)]
    result = sequences.generate(model, processor, [r["prompt"] for r in mine], [common.row_images(r) for r in mine],
                                max_new_tokens=task["caps"][rank], do_sample=False)
    files.write_json_atomic(out / f"decode.rank{rank}.json", {
        "rows": [2 * rank, 2 * rank + 1], "cap": task["caps"][rank], "completion_ids": result["completion_ids"],
        "logprobs": result["logprobs"], "truncated": result["truncated"]})
    accelerator.wait_for_everyone()   # every rank got past its decode loop


def main() -> None:
    for task in json.loads(Path(sys.argv[1]).read_text()):
        if task["kind"] == "probe":
            probe(task)
            continue
        import runs
        if task.get("kill_after_save"):
            original = runs.save_resume_state

            def save_then_die(accelerator, output_dir, step, extra, _original=original, _at=task["kill_after_save"]):
                path = _original(accelerator, output_dir, step, extra)   # ends with a barrier: every rank saved
                if step == _at:
                    os.kill(os.getpid(), signal.SIGKILL)
                return path
            runs.save_resume_state = save_then_die
        if task.get("digit_reward"):
            import jigsaw

            def digit_reward(completion, answer, thinking=True, w_hit=1.0, w_acc=1.0, w_fmt=1.0):
                digits = min(1.0, sum(ch.isdigit() for ch in completion) / 4)
                return {"reward": digits, "hit": 0.0, "acc": 0.0, "fmt": digits, "parsed": False}
            jigsaw.jigsaw_reward = digit_reward
        stage = __import__(task["kind"])
        stage.main(task["argv"])


if __name__ == "__main__":
    main()
