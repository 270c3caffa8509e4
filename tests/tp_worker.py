"""One rank of the tensor-parallel checks of tests/test_tensor_parallel.py, started by torchrun:

    torchrun --standalone --nproc_per_node N tests/tp_worker.py OUT SPEC_JSON

Every rank computes the same checks on its own and writes what it saw to OUT/rank{RANK}.json; the test
compares the ranks' files with each other and with the expectations. SPEC_JSON names the golden set, the
checkpoint directories to load, and whether to run Meta's reference code and the command line too.
"""

import contextlib
import io
import json
import os
import sys
import time
from pathlib import Path

import torch

from microllama.checkpoint.load import open_checkpoint
from microllama.cli import main as cli_main
from microllama.distributed import tensor_parallel as parallel
from microllama.distributed.launch import leave_process_group, torchrun_world_size
from microllama.files import tensor_sha256
from microllama.generation import Llama
from microllama.golden.inference_set import read_set
from microllama.golden.verify import comparison_mode, format_comparison, verify

START = time.time()
PROMPT = "Clearly, the meaning of life is"


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max())


def against_goldens(llama: Llama, golden_dir: str, world_size: int) -> dict:
    """Each prompt's logits (no cache, as recorded) against the set: whether they have the recorded sha256 of all
    their bits, the largest error at the recorded top-k entries of every row, and whether verify's rule expects
    bit-identity here (the recording's platform and world size)."""
    g = read_set(golden_dir)
    logits = [llama.model(torch.tensor([ids]))[0] for ids in g.outputs.prompt_ids]
    recorded = g.outputs.logits_sha256[: len(logits)]  # then the long-range case's, checked by verify
    rows = torch.cat(logits)  # the prompts' rows come first in the set, in order
    indices = torch.from_numpy(g.logits.topk_indices[: len(rows)]).long()
    topk_error = (rows.gather(1, indices) - torch.from_numpy(g.logits.topk_values[: len(rows)])).abs().max()
    exact = comparison_mode(g, "cpu", world_size).exact
    return {"sha256_equal": [tensor_sha256(t) == s for t, s in zip(logits, recorded, strict=True)],
            "topk_max_abs": topk_error.item(), "exact_expected": exact}  # fmt: skip


def against_meta(llama: Llama, ckpt_dir: str, world_size: int) -> dict:
    """Meta's Llama3 at the same world size, live: logits of random tokens, greedy and seeded top-p completions
    with their log-probabilities."""
    from reference_harness.meta import meta_generate, meta_llama

    p = llama.model.params
    meta = meta_llama(ckpt_dir, torch.float32, p.max_seq_len, p.max_batch_size, 1, "cpu", world_size)
    tokens = torch.randint(0, p.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    ours_logits = llama.model(tokens)
    with torch.device("cpu"):
        meta_logits = meta.model.forward(tokens, 0)
    prompts = [[128000, 791, 7438, 315, 2324, 374], [128000, 50, 6517, 2231], [128000, 791, 16246]]
    out = {"logits_equal": torch.equal(ours_logits, meta_logits), "logits_max_abs": max_abs(ours_logits, meta_logits)}
    for kind, temperature in (("greedy", 0.0), ("top_p", 0.6)):
        seed = 1 if temperature else None
        ours = llama.generate(prompts, 12, temperature, 0.9, logprobs=True, seed=seed)
        metas = meta_generate(meta, prompts, 12, temperature, 0.9, seed=seed)
        out[f"{kind}_tokens_equal"] = ours[0] == metas[0]
        out[f"{kind}_logprobs_equal"] = ours[1] == metas[1]
    return out


@torch.inference_mode()
def main(out: str, spec_json: str) -> None:
    spec = json.loads(spec_json)
    torch.set_num_threads(1)  # the thread count the golden sets' ranks recorded with (manifest platform.threads)
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    result: dict = {"rank": rank, "seconds": {}}

    def lap(phase: str) -> None:
        result["seconds"][phase] = round(time.time() - START - sum(result["seconds"].values()), 2)

    llama = Llama.build(spec["ckpt_dirs"][0], spec["max_seq_len"], spec["max_batch_size"], tensor_parallel=True)
    model = llama.model
    result["placements"] = {k: str(v.placements) for k, v in model.state_dict().items() if hasattr(v, "placements")}
    result["local_shapes"] = {k: list(getattr(v, "_local_tensor", v).shape) for k, v in model.state_dict().items()}
    result["cache_shape"] = None
    with model.kv_cache(2, 8):
        result["cache_shape"] = list(model.layers[0].attention.cache.cache_k.shape)
    lap("start and build")
    if spec.get("golden"):
        result["golden"] = against_goldens(llama, spec["golden"], torchrun_world_size())

    lap("goldens")
    # The same weights from every other layout (one dense file, Hugging Face's), sliced as read: same logits.
    tokens = torch.randint(0, model.params.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    reference = model(tokens)
    mesh = parallel.mesh_of(model)
    result["other_layouts_equal"] = {
        d: torch.equal(open_checkpoint(d).load_model(32, 2, mesh=mesh)(tokens), reference)
        for d in spec["ckpt_dirs"][1:]
    }
    result["logits_sha256"] = tensor_sha256(reference)

    lap("other layouts")
    # Sampling without a seed: each rank's global generator differs, the tokens may not.
    torch.manual_seed(1000 + rank)
    result["unseeded_tokens"] = llama.generate([[128000, 791]], 8, 1.0, 0.95)[0]

    lap("unseeded")
    if spec.get("meta"):
        result["meta"] = against_meta(llama, spec["ckpt_dirs"][0], world_size)
    lap("meta")
    if spec.get("verify"):
        c = verify(spec["verify"], spec["ckpt_dirs"][0], tensor_parallel=True)
        result["verify"] = {"passed": c.passed, "exact": c.exact, "max_abs": {p.name: p.max_abs for p in c.points},
                            "report": format_comparison(c)}  # fmt: skip
    lap("verify")
    if spec.get("cli"):
        stdout = io.StringIO()
        with contextlib.redirect_stdout(stdout):
            cli_main(["generate", "--prompt", PROMPT, "--ckpt_dir", spec["ckpt_dirs"][0], "--temperature", "0",
                      "--max_gen_len", "8"])  # fmt: skip
        result["cli_stdout"] = stdout.getvalue()
        result["greedy_text"] = llama.text_completion([PROMPT], 0.0, max_gen_len=8)[0].generation
    lap("cli")
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(*sys.argv[1:])
    leave_process_group()
