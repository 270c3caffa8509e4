"""Shared fixtures: the tiny checkpoints (and one with a planted bug), Meta's reference model in-process, hypothesis
profiles."""

import dataclasses
import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from typing import Union

import pytest

# OpenMP threads waiting for work sleep instead of spinning. The suite runs one pytest-xdist worker per core, and the
# golden checks at the recording's thread count: a spinning thread takes the time slice another worker needs
# (measured on 2 cores: the four CPU golden sets 61-72 s -> 41-43 s, user time halved). It changes no arithmetic.
# OpenMP reads it once, when torch loads it: set here, in the process that starts the workers, it reaches them and
# every process a test starts. A value of the user's own is kept.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from hypothesis import HealthCheck, settings

from microllama.checkpoint.load import Checkpoint, open_checkpoint
from microllama.checkpoint.meta_layout import save_meta
from microllama.checkpoint.tiny import default_ckpt_dir
from microllama.golden.capture import platform_fingerprint
from microllama.golden.inference_set import Manifest
from microllama.golden.training_set import TrainingManifest

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

# pytest-xdist (addopts: -n auto) runs one worker per core. Each worker, and each process a test starts, runs torch
# on one thread: a worker's OpenMP threads would wait for time slices the other workers hold (see one_torch_thread).
# Tests compare computations made under one count, and the golden checks set the recording's count themselves.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

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


def platform_differs(m: Union[Manifest, TrainingManifest]) -> bool:
    """Whether this machine's CPU fingerprint, at the recording's thread count, differs from a set's recording's."""
    here = dataclasses.replace(platform_fingerprint("cpu"), threads=m.platform.threads)
    return m.platform.differences(here) != []


def recording_platform(m: Union[Manifest, TrainingManifest]) -> bool:
    """Whether this machine is the platform a set was recorded on, at its world size: verify's rule for
    bit-identity, decided here from the fingerprint on its own (a platform made foreign for a test is not)."""
    return m.world_size == 1 and m.device == "cpu" and not platform_differs(m)


def run_main(capsys, *args: str) -> tuple[int, str, str]:
    """Exit status, stdout and stderr of microllama's command line main(args) in this process."""
    from microllama.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


REFERENCE_REASON = "needs Meta's reference code: pip install -e '.[reference]' (llama-models==0.3.0, fairscale)"


# The quick tier (`pytest -m quick`, about a minute on 2 cores): what a refactor most often breaks, checked where it
# shows first. The model against Meta's live in-process and the layer laws (shapes, masks, cache, RoPE, GQA,
# sizing, norms), generation and tokenizer and chat format against their corpora, two golden sets bit for bit
# (float32 and bfloat16: every capture point, completions, chat replies), one training golden (4 AdamW steps),
# and the import graph. The property tests run at QUICK_EXAMPLES examples each. The full suite adds the other
# golden sets and tensor-parallel ranks, checkpoints and their layouts, the CLI and tools, training runs, resume and
# ranks, the compiled path, and the golden format's own laws.
QUICK_FILES = ["test_model.py", "test_parity.py", "test_generation.py", "test_tokenizer.py", "test_chat_format.py",
               "test_prop_batching.py", "test_prop_gqa.py", "test_prop_kv_cache.py", "test_prop_rope_scaling.py",
               "test_prop_rotary.py", "test_prop_sizing_norms.py", "test_prop_tokenizer.py"]  # fmt: skip
QUICK_TESTS = [
    "test_goldens.py::test_microllama_reproduces_golden_set[tiny-fp32-cpu-ws1]",
    "test_goldens.py::test_microllama_reproduces_golden_set[tiny-bf16-cpu-ws1]",
    "test_training_goldens.py::test_microllamas_trainer_reproduces_metas_fine_tune[train-tiny-fp32-cpu-ws1-native]",
    "test_checkpoint.py::test_package_import_graph_has_no_cycle_counting_imports_inside_functions",
    "test_checkpoint.py::test_rooms_import_downward_only_and_nothing_imports_the_command_line",
]
QUICK_EXAMPLES = 5


def pytest_configure(config):
    if "quick" in (config.option.markexpr or ""):
        settings.register_profile("quick", parent=settings.get_profile("fast"), max_examples=QUICK_EXAMPLES)
        settings.load_profile("quick")


# Modules whose tests share module-scoped jobs (torchrun runs, a converted model, the docs commands' one directory,
# where a block uses what an earlier one made): pytest-xdist gives each to one worker, so each job runs once. xdist's
# own xdist_group mark is not applied under pytest 9.2 (xdist 3.8 renames item._nodeid, which pytest 9.2 no longer
# reads: measured, every torchrun job ran once per worker).
ONE_WORKER_MODULES = ["test_tensor_parallel.py", "test_train_distributed.py", "test_hf.py", "test_docs.py"]


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist, absent where it is not installed
def pytest_xdist_make_scheduler(config, log):
    """-n N: xdist's load scheduling, one test at a time, except that ONE_WORKER_MODULES go whole to one worker.
    They are sent first (xdist orders work units by their number of tests), so their long jobs start at once."""
    if config.getvalue("dist") != "load":
        return None  # another --dist asked for on the command line
    from xdist.scheduler import LoadScopeScheduling

    class OneWorkerModules(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::")[0]
            return module if Path(module).name in ONE_WORKER_MODULES else nodeid

    return OneWorkerModules(config, log)


@pytest.hookimpl(tryfirst=True)  # before -m selects by the marks added here
def pytest_collection_modifyitems(config, items):
    skip_reference = pytest.mark.skip(reason=REFERENCE_REASON)
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device; torch.cuda.is_available() is False")
    for item in items:
        where = item.nodeid.removeprefix("tests/")
        if "slow" not in item.keywords and (where.split("::")[0] in QUICK_FILES or where in QUICK_TESTS):
            item.add_marker(pytest.mark.quick)
        if "reference" in item.keywords and not HAVE_REFERENCE:
            item.add_marker(skip_reference)
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture
def foreign_platform(monkeypatch):
    """This machine made a platform other than every recording's for verify (a CPU capability no machine
    reports), so that its tolerance branch runs on the recording's own machine too."""
    from microllama.golden import verify

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
def planted_ckpt(tmp_path_factory, tiny_ckpt):
    """The tiny checkpoint with layers.0.ffn_norm's weight doubled (exact in bfloat16): a bug that first
    shows at layers.0.ffn_norm, far beyond any tolerance."""
    ckpt = open_checkpoint(tiny_ckpt)
    state_dict = ckpt.read_state_dict()
    state_dict["layers.0.ffn_norm.weight"] = state_dict["layers.0.ffn_norm.weight"] * 2
    return save_meta(state_dict, ckpt.params, tmp_path_factory.mktemp("planted") / "ckpt")


# The tiny checkpoint trained on the shipped corpus, every weight (full mode): 20 AdamW steps of 4 x 32 tokens, lr
# 1e-2 after 2 warm-up steps, down to 1e-3. The held-out loss (16 rows of the 40 held-out stories) falls from 19.66
# to 5.09: enough learnt for quantization to have something to lose (the README's 60-step recipe reaches 1.8).
TRAINED_TINY = dict(data=str(REPO / "corpus" / "tinytales.txt"), mode="full", max_seq_len=32, batch_size=4,
                    max_steps=20, warmup_steps=2, lr=1e-2, min_lr=1e-3, eval_every=0, eval_rows=16,
                    save_every=0)  # fmt: skip


@pytest.fixture(scope="session")
def trained_tiny(tokenizer) -> Path:
    """The directory of a finished run of TRAINED_TINY (its final weights in RUN/final): trained on first use into
    the microllama cache, keyed by the recipe (about 10 s of one core), then reused by every test and worker."""
    from microllama.train.quality import trained_run

    return trained_run(TRAINED_TINY)


@pytest.fixture
def no_model(monkeypatch):
    """Fails the test if verify gets as far as building a model."""

    def load_model(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(Checkpoint, "load_model", load_model)


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
