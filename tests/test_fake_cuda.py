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

CUDA = torch.device("cuda", 0)
# the fake mode's refusal of a cuda:0 tensor meeting a CPU one (torch 2.14 raises a subclass of RuntimeError, 2.11 a
# RuntimeError; both name the two devices)
DEVICE_MISMATCH = {"expected_exception": RuntimeError, "match": r"(two devices|two different devices).*cpu"}


class ValuelessFakeMode(FakeTensorMode):
    """Scalar reads give 0: a fake tensor has no value, and a training step's only reads are its id range checks
    (tests/test_host_syncs.py), which 0 passes."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            return 0
        return super().__torch_dispatch__(func, types, args, kwargs)


@pytest.fixture
def cuda_autocast(monkeypatch):
    """`torch.autocast("cuda")` as on a GPU (it turns itself off where CUDA is not available)."""
    monkeypatch.setattr(torch.cuda.amp.common, "amp_definitely_not_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)


def test_training_forward_on_cuda_under_bf16_autocast(cuda_autocast):
    """Generation, understanding and text rows (folder, MMoE routing by index, head, chunked losses) as the 2b
    recipes run them: on cuda:0 under bf16 autocast."""
    batch = add_indices(make_batch(["generation", "understanding", "text", "generation"], seed=1))
    with ValuelessFakeMode() as mode:
        with torch.device("cuda"):
            model = tiny_model(stage="full")
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
