"""Meta-layout checkpoints split over tensor-parallel ranks: microllama merges them exactly as fairscale
split them, and exactly as Meta's own loader merges them."""

import shutil

import pytest
import torch

from microllama.checkpoint.load import CheckpointError, convert, load_model, open_checkpoint, read_checkpoint
from microllama.checkpoint.meta_layout import load_pth, shard_count, shard_dim
from microllama.checkpoint.tiny import default_ckpt_dir

# (config, shard count): "tiny" has 2 key/value heads, so 2 ranks at most; "tiny-kv4" has 4.
SPLITS = [("tiny", 2), ("tiny-kv4", 2), ("tiny-kv4", 4)]


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """{(config, n): (original dir, sharded dir)} written by `convert --to meta --shards n`."""
    root = tmp_path_factory.mktemp("shards")
    out = {}
    for name, n in SPLITS:
        src = default_ckpt_dir(name)
        out[name, n] = src, convert(src, root / f"{name}-mp{n}", "meta", shards=n)
    return out


@pytest.mark.parametrize("name,n", SPLITS)
def test_shards_hold_fairscale_slices(sharded, name, n):
    src, dst = sharded[name, n]
    dense = load_pth(src / "consolidated.00.pth")
    paths = sorted(dst.glob("*.pth"))
    assert [p.name for p in paths] == [f"consolidated.{r:02d}.pth" for r in range(n)]
    for rank, path in enumerate(paths):
        shard = load_pth(path)
        assert shard.keys() == dense.keys()
        for key, t in shard.items():
            dim = shard_dim(key)
            expected = dense[key] if dim is None else dense[key].chunk(n, dim=dim)[rank]
            assert torch.equal(t, expected), (path, key)
    assert shard_dim("tok_embeddings.weight") == 0  # VocabParallelEmbedding: split along the vocabulary
    assert shard_dim("layers.0.attention.wo.weight") == 1  # RowParallelLinear: along its input


@pytest.mark.parametrize("name,n", SPLITS)
def test_merged_shards_equal_original_bit_for_bit(sharded, name, n):
    src, dst = sharded[name, n]
    _, original = read_checkpoint(src)
    _, merged = read_checkpoint(dst)
    assert merged.keys() == original.keys()
    for key in original:
        assert merged[key].dtype == original[key].dtype == torch.bfloat16
        assert torch.equal(merged[key], original[key]), key


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sharded_checkpoint_gives_dense_logits_bit_for_bit(sharded, dtype):
    src, dst = sharded["tiny-kv4", 4]
    tokens = torch.randint(0, 128256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        dense = load_model(src, max_seq_len=32, dtype=dtype)(tokens)
        merged = load_model(dst, max_seq_len=32, dtype=dtype)(tokens)
    assert torch.equal(dense, merged)


@pytest.mark.reference
@pytest.mark.parametrize("name,n", SPLITS)
def test_merge_equals_metas_reshard_to_one_rank(sharded, name, n):
    from reference_harness.meta import meta_merged_state_dict

    _, dst = sharded[name, n]
    ours = read_checkpoint(dst)[1]
    metas = meta_merged_state_dict(dst)
    assert metas.keys() == ours.keys()
    for key in ours:
        assert metas[key].dtype == ours[key].dtype
        assert torch.equal(metas[key], ours[key]), key


def test_shard_count_is_the_largest_divisor_of_the_world_size_that_meta_layout_allows():
    """What an FSDP2 export at N ranks writes: tiny (4 heads, 2 kv heads) at most 2 shards, tiny-kv4 4."""
    tiny, kv4 = open_checkpoint("tiny").args, open_checkpoint("tiny-kv4").args
    assert [shard_count(tiny, n) for n in (1, 2, 3, 4, 6, 8)] == [1, 2, 1, 2, 2, 2]
    assert [shard_count(kv4, n) for n in (2, 4, 8)] == [2, 4, 4]


def test_shard_count_the_heads_do_not_divide_is_refused(tmp_path, tiny_ckpt):
    for rank in range(3):  # tiny has n_heads 4 and n_kv_heads 2: 3 ranks cannot have split it
        shutil.copyfile(tiny_ckpt / "consolidated.00.pth", tmp_path / f"consolidated.{rank:02d}.pth")
    shutil.copyfile(tiny_ckpt / "params.json", tmp_path / "params.json")
    with pytest.raises(CheckpointError, match=r"3 \*\.pth shards.*n_heads \(4\) and n_kv_heads \(2\)"):
        load_model(tmp_path)
    with pytest.raises(ValueError, match="cannot split into 4 shards"):
        convert(tiny_ckpt, tmp_path / "mp4", "meta", shards=4)
    assert not (tmp_path / "mp4").exists()


def test_replicated_norm_differing_between_shards_is_refused(tmp_path, sharded):
    _, dst = sharded["tiny", 2]
    shutil.copytree(dst, tmp_path / "ckpt")
    shard = {k: v.clone() for k, v in load_pth(dst / "consolidated.01.pth").items()}
    shard["norm.weight"][0] += 1
    torch.save(shard, tmp_path / "ckpt" / "consolidated.01.pth")
    with pytest.raises(CheckpointError, match=r"consolidated\.01\.pth: replicated tensor 'norm.weight' differs"):
        load_model(tmp_path / "ckpt")


def test_mis_shaped_shard_names_file_and_key(tmp_path, sharded):
    _, dst = sharded["tiny", 2]
    shutil.copytree(dst, tmp_path / "ckpt")
    shard = dict(load_pth(dst / "consolidated.01.pth"))
    shard["layers.1.feed_forward.w2.weight"] = shard["layers.1.feed_forward.w2.weight"][:, :-1].clone()
    torch.save(shard, tmp_path / "ckpt" / "consolidated.01.pth")
    with pytest.raises(CheckpointError, match=r"consolidated\.01\.pth: tensor 'layers.1.feed_forward.w2.weight'"):
        load_model(tmp_path / "ckpt")


@pytest.mark.gpu
def test_cuda_load_of_shards_puts_every_tensor_on_the_gpu_and_equals_dense(sharded):
    src, dst = sharded["tiny-kv4", 4]
    tokens = torch.randint(0, 128256, (2, 12), generator=torch.Generator().manual_seed(0)).cuda()
    models = [load_model(d, max_seq_len=32, device="cuda", dtype=torch.bfloat16) for d in (src, dst)]
    assert all(p.is_cuda and p.dtype == torch.bfloat16 for m in models for p in m.parameters())
    with torch.inference_mode():
        assert torch.equal(models[0](tokens), models[1](tokens))
