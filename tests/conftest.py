"""Shared fixtures: everything is built locally (tiny model, tokenizer, data); nothing touches the network."""
import os
import sys
import tempfile
from pathlib import Path

# Offline before anything imports transformers/datasets; caches in a temp folder, never ~/.cache.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HOME", tempfile.mkdtemp(prefix="hf_home_"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """One intra-op thread for the whole suite: the tiny model's matmuls are too small to share, and on a
    2-core machine shared with other jobs OpenMP's spin-waiting made forward+backward 4-25x slower with 2
    threads (measured). Subprocesses the tests start get OMP_NUM_THREADS=1 for the same reason."""
    import torch
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
    """`PRESET=smoke bash run_all.sh` once per session (a few minutes): tests/test_run_all.py reads it, and the
    notebook test (tests/test_colab.py) continues a copy of it."""
    import subprocess
    run = tmp_path_factory.mktemp("smoke") / "run"
    result = subprocess.run(["bash", "run_all.sh"], cwd=ROOT, capture_output=True, text=True, timeout=900,
                            env={**os.environ, "PY": sys.executable, "PRESET": "smoke", "RUN": str(run)})
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return run, result


@pytest.fixture(scope="session")
def toy_model_dir(tmp_path_factory) -> Path:
    """A tiny random Qwen2.5-VL + processor saved with save_pretrained (loads like a hub id)."""
    import toy
    return toy.build_toy_model(str(tmp_path_factory.mktemp("toy") / "init"), size="tiny", seed=0)


@pytest.fixture(scope="session")
def jigsaw_data(tmp_path_factory) -> Path:
    """A 2x2 procedural jigsaw data set (train 16 / test 8) saved with save_to_disk."""
    import jigsaw
    out = tmp_path_factory.mktemp("data") / "jigsaw"
    jigsaw.build_dataset(jigsaw.BuildArgs(source="procedural", grid="2x2", train=16, test=8, output_dir=str(out),
                                          image_size=56))
    return out


@pytest.fixture(scope="session")
def prior_data(tmp_path_factory) -> Path:
    """The toy prior-knowledge questions (train 32 / test 16)."""
    import toy
    out = tmp_path_factory.mktemp("data") / "prior"
    toy.build_prior_dataset(str(out), train=32, test=16, seed=0, pretrain=16)
    return out


def perturbed_copy(model):
    """A copy of the tiny model with its language weights perturbed (seeded): the random init greedily repeats
    one token ('\\n' forever), which would make any comparison of generated tokens pass trivially."""
    import copy
    import torch
    model = copy.deepcopy(model).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "visual" not in name:
                param.add_(torch.randn(param.shape, generator=generator) * 0.3)
    return model
