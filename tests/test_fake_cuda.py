"""Device placement on a GPU, checked without one: torch's FakeTensorMode stands in for cuda:0 (tensors with shapes,
dtypes and devices, no values), so a tensor made on the CPU inside the model meets the cuda ones and raises as on a
GPU. Autograd's engine needs a real CUDA context, so forwards and no-grad decoding only; each check is proved by an
input left on the CPU, which it refuses."""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from synergen_lightning.data.batch import add_indices
from tests.test_system_helpers import make_batch, tiny_model

# each test in a fresh interpreter: the fake cuda state corrupts the process that ran it (tests/conftest.py)
pytestmark = pytest.mark.own_process

CUDA = torch.device("cuda", 0)
# the fake mode's refusal of a cuda:0 tensor meeting a CPU one (torch 2.14 raises a subclass of RuntimeError, 2.11 a
# RuntimeError; both name the two devices)
DEVICE_MISMATCH = {"expected_exception": RuntimeError, "match": r"(two devices|two different devices).*cpu"}


# ops whose kernels refuse a floating source of another dtype than the tensor written into; fake tensors do not check
SAME_DTYPE_OPS = {"index_copy", "index_copy_", "index_put", "index_put_", "_index_put_impl_", "masked_scatter",
                  "masked_scatter_", "index_add", "index_add_", "scatter", "scatter_", "scatter_add", "scatter_add_"}


class ValuelessFakeMode(FakeTensorMode):
    """Scalar reads give 0: a fake tensor has no value, and a training step's only reads are its id range checks
    (tests/test_host_syncs.py), which 0 passes. The dtype checks of `SAME_DTYPE_OPS` are made as the kernels make
    them (CUDA's autocast gives fp32 where the CPU's keeps bf16, e.g. `rms_norm`, so a mix the CPU never meets)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            return 0
        if func.overloadpacket.__name__ in SAME_DTYPE_OPS:
            dest, *rest = [t for t in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
            for source in rest:
                if source.is_floating_point() and source.dtype != dest.dtype:
                    raise RuntimeError(f"{func}: self and source expected to have the same dtype, but got (self) "
                                       f"{dest.dtype} and (source) {source.dtype}")
        return super().__torch_dispatch__(func, types, args, kwargs)


@pytest.fixture
def cuda_autocast(monkeypatch):
    """`torch.autocast("cuda")` as on a GPU (it turns itself off where CUDA is not available)."""
    monkeypatch.setattr(torch.cuda.amp.common, "amp_definitely_not_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)


@pytest.mark.parametrize("param_dtype", [torch.bfloat16, torch.float32], ids=["bf16 params (FSDP2)", "fp32 params"])
def test_training_forward_on_cuda_under_bf16_autocast(cuda_autocast, param_dtype):
    """Generation, understanding and text rows (folder, MMoE routing by index, head, chunked losses) as the 2b
    recipes run them: on cuda:0 under bf16 autocast, with FSDP2's bf16 parameters or fp32 ones (one GPU, DDP)."""
    batch = add_indices(make_batch(["generation", "understanding", "text", "generation"], seed=1))
    with ValuelessFakeMode() as mode:
        with torch.device("cuda"):
            model = tiny_model(stage="full")
        for t in (*model.parameters(), *model.buffers()):  # as FSDP2's param_dtype (`.to` cannot swap fake tensors)
            if t.is_floating_point():
                t.data = t.data.to(param_dtype)
        on_cuda = {k: mode.from_tensor(v).to("cuda") if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model.forward_losses(on_cuda)
            assert out["loss"].device == CUDA and out["loss"].dtype == torch.float32
            assert torch.is_autocast_enabled("cuda")
            on_cuda["input_ids"] = mode.from_tensor(batch["input_ids"])  # left on the CPU: refused
            with pytest.raises(**DEVICE_MISMATCH):
                model.forward_losses(on_cuda)


def test_patch_decoding_on_cuda(monkeypatch):
    """The unfolding head's decoding: cached steps, CFG, top-k, top-p, temperature, greedy, and uncached."""
    import synergen_lightning.models.unfolding_head as unfolding_head

    with FakeTensorMode():
        with torch.device("cuda"):
            model = tiny_model()  # held until the mode ends: one freed inside it crashed the process at exit
        head = model.head.model.eval()
        h = torch.randn(3, head.cond_proj.in_features, device="cuda")
        for cfg, kwargs in ((None, {"temperature": 0.0}), (None, {"temperature": 0.8, "top_k": 5}),
                            (2.0, {"temperature": 1.0, "top_p": 0.9}), (None, {"temperature": 1.0, "use_cache": False})):
            rows = torch.cat([h, h]) if cfg else h
            with torch.no_grad():
                codes = head.generate(rows, cfg_scale=cfg, **kwargs)
            assert codes.device == CUDA and codes.shape == (3, head.seq_len), (cfg, kwargs)
        real = unfolding_head.sample_uniforms
        monkeypatch.setattr(unfolding_head, "sample_uniforms", lambda *a: real(*a[:-1], device="cpu"))
        with pytest.raises(**DEVICE_MISMATCH), torch.no_grad():
            head.generate(h, temperature=1.0)  # its step uniforms drawn on the CPU: refused


def test_the_fake_mode_refuses_what_cuda_kernels_refuse(cuda_autocast):
    """The check the tests above lean on: an MMoE block routing by index under CUDA's autocast, where `rms_norm` gives
    fp32 and the experts bf16, fails as on a GPU when its output takes the norm's dtype."""
    from synergen_lightning.models import mmoe

    with ValuelessFakeMode():
        out = torch.empty(4, 8, device="cuda")
        with pytest.raises(RuntimeError, match="same dtype.*float32.*bfloat16"):
            out.index_copy_(0, torch.arange(2, device="cuda"), torch.ones(2, 8, device="cuda", dtype=torch.bfloat16))
        with torch.autocast("cuda", dtype=torch.bfloat16):
            assert mmoe.F.rms_norm(out.bfloat16(), (8,)).dtype == torch.float32  # CUDA's autocast: fp32


def test_the_gradient_norm_and_the_skip_flag_stay_on_the_gpu(monkeypatch):
    """Every optimizer step logs the total gradient norm and all-reduces the non-finite flag made from it: both on the
    gradients' device, as NCCL all-reduces no CPU tensor (Lightning's `grad_norm` returns one) and a CPU norm costs a
    host read per parameter."""
    from synergen_lightning import nonfinite
    from synergen_lightning.distributed import total_grad_norm

    reduced = []
    monkeypatch.setattr(nonfinite.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(nonfinite.dist, "get_world_size", lambda *a: 2)
    monkeypatch.setattr(nonfinite.dist, "all_reduce", lambda t, **kw: reduced.append(t.device))
    with ValuelessFakeMode():
        with torch.device("cuda"):
            model = torch.nn.Linear(4, 4)
        for p in model.parameters():
            p.grad = torch.ones_like(p)
        total = total_grad_norm(model.parameters())
        assert not nonfinite.NonFiniteGuard(3).check(model, total)
    assert total.device == CUDA and reduced == [CUDA]
