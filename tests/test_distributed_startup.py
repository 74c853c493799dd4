"""What `parallelize` sends over the process group before FSDP2 takes over.

`configure_model` runs while the weights are still on the CPU, and an NCCL group serves only CUDA tensors (gloo
serves both, so a CPU run cannot show the crash): every tensor collective of the start-up must carry tensors of
the mesh's device type, and ranks that built different weights must be refused, not averaged into a mixed model.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from synergen_lightning.distributed import check_same_weights, parallelize, weight_fingerprint
from tests.distributed_worker import free_port, start_ranks
from tests.test_system_helpers import tiny_model

TENSOR_COLLECTIVES = ("broadcast", "all_reduce", "reduce", "all_gather", "all_gather_into_tensor", "gather",
                      "scatter", "reduce_scatter_tensor", "all_to_all_single", "send", "recv")


class _CudaMesh:
    """A one-dimensional mesh as an NCCL run has it (device type cuda, 2 ranks)."""

    device_type = "cuda"
    ndim = 1

    def get_group(self):
        return None

    def size(self):
        return 2


@pytest.fixture
def fake_two_ranks(monkeypatch):
    """A world of 2 where every collective is recorded instead of sent; `peer` is what rank 1 answers to the
    object all-gather (None: the same as this rank)."""
    import torch.distributed.fsdp as fsdp

    sent: list[tuple[str, str]] = []
    state = {"peer": None}

    def recorder(name):
        def collective(tensors, *args, **kwargs):
            for t in tensors if isinstance(tensors, (list, tuple)) else [tensors]:
                if isinstance(t, torch.Tensor):
                    sent.append((name, t.device.type))
        return collective

    def all_gather_object(out, obj, group=None):
        sent.append(("all_gather_object", "object"))
        out[:] = [obj, obj if state["peer"] is None else state["peer"](obj)]

    for name in TENSOR_COLLECTIVES:
        monkeypatch.setattr(dist, name, recorder(name))
    monkeypatch.setattr(dist, "all_gather_object", all_gather_object)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "get_global_rank", lambda group, rank: rank)
    monkeypatch.setattr(fsdp, "fully_shard", lambda module, **kwargs: module)  # sharding itself is FSDP2's
    monkeypatch.setattr(fsdp, "register_fsdp_forward_method", lambda module, method: None)
    return sent, state


def test_parallelize_sends_no_cpu_tensor_to_a_cuda_mesh(fake_two_ranks):
    sent, _ = fake_two_ranks
    parallelize(tiny_model(stage="stage1"), _CudaMesh())
    tensors = [(name, dev) for name, dev in sent if dev != "object"]
    assert all(dev == "cuda" for _, dev in tensors), f"CPU tensors sent to an NCCL group: {tensors[:3]} ({len(tensors)})"
    assert sent == [("all_gather_object", "object")]  # one exchange, not one broadcast per tensor


def test_ranks_with_different_weights_are_refused(fake_two_ranks):
    _, state = fake_two_ranks
    model = tiny_model(stage="stage1")
    state["peer"] = lambda fp: [(n, s + (1e-3 if n == "head.model.classifier.weight" else 0.0), v) for n, s, v in fp]
    with pytest.raises(ValueError, match="different weights.*head.model.classifier.weight.*seed_everything"):
        parallelize(model, _CudaMesh())


def test_fingerprint_tells_seeds_apart_and_ignores_rounding():
    torch.manual_seed(0)
    a = weight_fingerprint(tiny_model(stage="stage1"))
    torch.manual_seed(0)
    b = weight_fingerprint(tiny_model(stage="stage1"))
    torch.manual_seed(1)
    c = weight_fingerprint(tiny_model(stage="stage1"))
    assert a == b
    assert sum(x != y for x, y in zip(a, c)) > len(a) // 2  # randomly initialised tensors all differ


def _check_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    results = []
    try:
        for seeds in ([0, 0], [0, 1]):  # alike, then one per rank
            torch.manual_seed(seeds[rank])
            model = tiny_model(stage="stage1")
            try:
                check_same_weights(model)
                results.append("ok")
            except ValueError as e:
                results.append(str(e))
    finally:
        dist.destroy_process_group()
    Path(out, f"rank{rank}.txt").write_text("\n".join(results))


@pytest.mark.distributed
@pytest.mark.timeout(120)
def test_two_gloo_ranks_compare_their_weights(tmp_path):
    start_ranks(_check_worker, (2, free_port(), str(tmp_path)), 2)
    for r in range(2):
        same, different = (tmp_path / f"rank{r}.txt").read_text().split("\n")
        assert same == "ok"
        assert "ranks start from different weights" in different, different


# a model whose weights (~4 MB) outweigh DCP's metadata, so bytes read show whose shards a rank read
BIG = dict(llm={"vocab_size": 2048, "hidden_size": 128, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
                "intermediate_size": 256, "max_position_embeddings": 128})


def _bytes_read() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise RuntimeError("no rchar in /proc/self/io")


def _load_worker(rank: int, world: int, port: int, ckpt: str, out: str) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh

    from synergen_lightning.distributed import load_sharded_into, load_sharded_state_dict

    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        import torch.distributed.checkpoint as dcp

        # the previous stage's run: sharded over the same ranks, each writes its shards (as FSDP2Strategy saves)
        torch.manual_seed(5)
        previous = tiny_model(stage="stage2", **BIG)
        parallelize(previous, init_device_mesh("cpu", (world,)))
        dcp.save({"state_dict": previous.state_dict()}, checkpoint_id=ckpt)
        saved = get_model_state_dict(previous, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        torch.manual_seed(0)  # the next stage: the same seed on every rank, another init than the checkpoint's
        model = tiny_model(stage="stage2", **BIG)
        parallelize(model, init_device_mesh("cpu", (world,)))
        load_sharded_into(model, ckpt)  # warms up DCP's imports and caches: the next read is the load alone
        before = _bytes_read()
        load_sharded_into(model, ckpt)
        sharded = _bytes_read() - before
        before = _bytes_read()
        load_sharded_state_dict(ckpt)  # the whole model, as every rank read it before sharding
        whole = _bytes_read() - before
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        result = {"sharded": sharded, "whole": whole, "same": rank != 0 or all(torch.equal(full[k], v) for k, v in saved.items()),
                  "weights": sum(v.numel() * v.element_size() for v in saved.values()) if rank == 0 else None}
    except BaseException:  # noqa: BLE001 - reported to the parent
        import traceback

        result = {"error": traceback.format_exc()}
    finally:
        dist.destroy_process_group()
    torch.save(result, Path(out, f"rank{rank}.pt"))


@pytest.mark.distributed
@pytest.mark.timeout(180)
def test_each_rank_reads_about_its_share_of_a_sharded_checkpoint(tmp_path):
    """init_from a sharded checkpoint under FSDP2 at the world size that saved it: shard first, then each of 2 ranks
    reads about half of the bytes that reading the whole model takes, and the model holds the checkpoint's weights.
    (DCP reads whole stored chunks: at another world size a rank reads the saved shards that overlap its own.)"""
    start_ranks(_load_worker, (2, free_port(), str(tmp_path / "ckpt"), str(tmp_path)), 2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert all("error" not in r for r in ranks), [r.get("error") for r in ranks]
    weights = ranks[0]["weights"]
    for r in ranks:
        assert r["whole"] >= weights  # reading the whole checkpoint: every byte (and DCP's own overhead)
        # the reader's overhead per byte is the same either way: a rank reads half of what the whole read reads
        assert 0.4 * r["whole"] < r["sharded"] < 0.6 * r["whole"], ([(q["sharded"], q["whole"]) for q in ranks], weights)
    assert ranks[0]["same"]  # the sharded model holds the checkpoint's weights


# the base LLM of BIG as an InternLM2 directory (packed wqkv, bf16, two files) whose vocabulary lacks the special
# tokens: the model adds their rows, so the load also grows the embedding and LM head
BASE_VOCAB = 2045
BIG_SPECIAL = {"bos": 1, "eos": 2, "pad": 0, "boi": 2045, "eoi": 2046, "uncond": 2047, "im_start": 6, "im_end": 7}


def write_internlm2_dir(path: Path) -> int:
    """A random InternLM2-layout HF directory of BIG's trunk; returns its bytes of weights."""
    from standins_2b import write_internlm2_dir as write
    from synergen_lightning.models.config import LLMConfig

    return write(path, LLMConfig(**dict(BIG["llm"], vocab_size=BASE_VOCAB)), seed=11, noise=0.05)


def _base_worker(rank: int, world: int, port: int, hf_dir: str, out: str) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh

    import synergen_lightning.system as system

    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    whole_loads = []
    system.load_base_llm = lambda path: whole_loads.append(path)  # the whole base model: must not be built here
    try:
        def fit_start() -> tuple[torch.nn.Module, int]:
            """What FSDP2Strategy does at the start of a fit: setup (the stage's weights), then configure_model."""
            torch.manual_seed(0)
            model = tiny_model(stage="stage1", base_llm=hf_dir, special_token_ids=BIG_SPECIAL, **BIG)
            model._device_mesh = init_device_mesh("cpu", (world,))
            before = _bytes_read()
            model._init_weights_for_fit("stage1")
            model.configure_model()  # shards, then loads the base weights into the shards
            return model, _bytes_read() - before

        fit_start()  # warms up the imports and caches: the next start reads the weights alone
        model, read = fit_start()
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        result = {"read": read, "whole_loads": whole_loads, "state": full if rank == 0 else None}
        dist.barrier()  # both ranks done with every collective before the group is torn down
    except BaseException:  # noqa: BLE001 - reported to the parent
        import traceback

        result = {"error": traceback.format_exc()}
    finally:
        dist.destroy_process_group()
    torch.save(result, Path(out, f"rank{rank}.pt"))


@pytest.mark.distributed
@pytest.mark.timeout(180)
def test_each_rank_reads_about_its_share_of_the_base_llm(tmp_path):
    """The base LLM under FSDP2 (an InternLM2 directory: packed wqkv, two files, a vocabulary the model grows): the
    model is sharded first, then each of 2 ranks reads about half of the weights' bytes, and the sharded model holds
    what the one-process load gives (`load_base_weights`)."""
    from synergen_lightning.model_parts import load_base_llm

    hf_dir = tmp_path / "internlm2"
    weights = write_internlm2_dir(hf_dir)
    start_ranks(_base_worker, (2, free_port(), str(hf_dir), str(tmp_path)), 2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert all("error" not in r for r in ranks), [r.get("error") for r in ranks]
    for r in ranks:
        assert r["whole_loads"] == []  # no rank builds the whole base model
        assert 0.4 * weights < r["read"] < 0.6 * weights, ([q["read"] for q in ranks], weights)
    assert sum(r["read"] for r in ranks) < 1.05 * weights  # every byte about once over the ranks

    torch.manual_seed(0)
    ref = tiny_model(stage="stage1", base_llm=str(hf_dir), special_token_ids=BIG_SPECIAL, **BIG)
    ref.load_base_weights(load_base_llm(hf_dir))
    sharded = ranks[0]["state"]
    _assert_same_start(sharded, ref.state_dict(), BASE_VOCAB)
    for part in ("gate_proj", "up_proj", "down_proj"):  # the vision FFNs start as copies of the text FFNs
        assert torch.equal(sharded[f"llm.model.layers.1.vision_ffn.{part}.weight"], sharded[f"llm.model.layers.1.text_ffn.{part}.weight"])


def _assert_same_start(a: dict, b: dict, base_vocab: int) -> None:
    assert a.keys() == b.keys()
    for key, value in b.items():
        if key in ("llm.model.embed_tokens.weight", "llm.model.lm_head.weight", "special_embed.weight"):
            torch.testing.assert_close(a[key], value, rtol=0, atol=1e-6)  # the added rows: a mean, up to rounding
            n = base_vocab if key.startswith("llm.model.") else 0
            assert torch.equal(a[key][:n], value[:n]), key
        else:
            assert torch.equal(a[key], value), key


@pytest.mark.parametrize("kind", ["internlm2", "ckpt"])
def test_base_llm_row_readers_give_the_whole_load(tmp_path, kind):
    """One process, unsharded: `load_base_into_sharded` over `base_llm_rows` (an InternLM2 directory read by row
    ranges, or a memory-mapped MMoELLM checkpoint with vision experts) starts the model as `load_base_weights` does."""
    from dataclasses import asdict

    from synergen_lightning.distributed import load_base_into_sharded
    from synergen_lightning.model_parts import base_llm_rows, load_base_llm

    path = tmp_path / "internlm2"
    write_internlm2_dir(path)
    if kind == "ckpt":
        trunk = load_base_llm(path)  # a trunk with vision experts, saved as the tiny base LLM's checkpoint
        path = tmp_path / "base.ckpt"
        torch.save({"hyper_parameters": {"config": asdict(trunk.config), "vision_experts": True},
                    "state_dict": {f"model.{k}": v for k, v in trunk.state_dict().items()}}, path)
    models = []
    for load in (lambda m: m.load_base_weights(load_base_llm(path)), lambda m: load_base_into_sharded(m, base_llm_rows(path))):
        torch.manual_seed(0)
        model = tiny_model(stage="stage1", special_token_ids=BIG_SPECIAL, **BIG)
        load(model)
        models.append(model.state_dict())
    _assert_same_start(models[1], models[0], BASE_VOCAB)
