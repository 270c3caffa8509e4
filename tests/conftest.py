"""Shared fixtures: the tiny checkpoints, Meta's reference model in-process, hypothesis profiles."""

import dataclasses
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings

from microllama.tiny import default_ckpt_dir

# fast (the default, what a plain `pytest` and CI run): derandomized and bounded, so every run checks
# the same 25 examples per law in seconds. thorough (HYPOTHESIS_PROFILE=thorough): 200 examples, or
# $HYPOTHESIS_MAX_EXAMPLES, from a new seed each run. Tests with their own max_examples (costly ones) keep it.
settings.register_profile(
    "fast", derandomize=True, max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "thorough",
    max_examples=int(os.environ.get("HYPOTHESIS_MAX_EXAMPLES", 200)),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "fast"))

HAVE_REFERENCE = all(importlib.util.find_spec(m) is not None for m in ("llama_models", "fairscale"))
REPO = Path(__file__).resolve().parents[1]


def run_torchrun(world_size: int, script: str, *args: str, timeout: int = 600) -> None:
    """tests/SCRIPT ARGS on world_size gloo ranks of one thread each, under torchrun; fails with its stderr."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world_size}",
           str(REPO / "tests" / script), *args]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}  # fmt: skip
    done = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-4000:]


REFERENCE_REASON = "needs Meta's reference code: pip install -e '.[reference]' (llama-models==0.3.0, fairscale)"


def pytest_collection_modifyitems(config, items):
    skip_reference = pytest.mark.skip(reason=REFERENCE_REASON)
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device; torch.cuda.is_available() is False")
    for item in items:
        if "reference" in item.keywords and not HAVE_REFERENCE:
            item.add_marker(skip_reference)
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture
def foreign_platform(monkeypatch):
    """This machine made a platform other than every recording's for verify (a CPU capability no machine
    reports), so that its tolerance branch runs on the recording's own machine too."""
    from microllama import verify

    real = verify.platform_fingerprint
    monkeypatch.setattr(verify, "platform_fingerprint",
                        lambda device: dataclasses.replace(real(device), cpu_capability="FOREIGN"))  # fmt: skip


@pytest.fixture(scope="session")
def tiny_ckpt():
    """The embedded default checkpoint directory (built once into the microllama cache)."""
    return default_ckpt_dir("tiny")


@pytest.fixture(scope="session")
def tiny_hd128_ckpt():
    return default_ckpt_dir("tiny-hd128")


@pytest.fixture(scope="session")
def tokenizer():
    """microllama's Tokenizer. Without llama-models (the `core` tox env) tokenizer.model is found only
    through $MICROLLAMA_TOKENIZER: tests that need it (also through Llama.build) request this fixture
    and skip, naming what to set."""
    from microllama.tokenizer import Tokenizer, find_tokenizer_model

    try:
        find_tokenizer_model()
    except FileNotFoundError as e:
        if HAVE_REFERENCE:
            raise
        pytest.skip(f"needs tokenizer.model: {e}")
    return Tokenizer()


@pytest.fixture(scope="session")
def meta_tokenizer():
    from reference_harness.meta import import_meta

    return import_meta().tokenizer.Tokenizer.get_instance()


@pytest.fixture(scope="module")
def one_torch_thread():
    """torch on one thread for a module of many tiny ops: on a busy 2-core machine a second OpenMP
    thread makes each op wait for a time slice (one small-model generate: 2.7 s on 2 threads, 0.015 s on 1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _torch_defaults_restored():
    """Meta's code changes torch's default dtype and device; no test may leak that into the next."""
    yield
    torch.set_default_dtype(torch.float32)
    torch.set_default_device(None)
