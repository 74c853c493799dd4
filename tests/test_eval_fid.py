"""FID / IS / KID through torch-fidelity, cross-checked against torchmetrics with the same local weights."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from synergen_lightning.eval.fid import (
    INCEPTION_KEY,
    EvalInputError,
    compute_fidelity,
    load_image_dir,
    load_inception,
    read_prompt_file,
)
from tests.inception_weights import write_random_inception_weights


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return write_random_inception_weights(tmp_path_factory.mktemp("inception") / "inception.pth", seed=0)


def _image_sets(n=96, size=32, shift=60, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(0, 196, (n, 3, size, size), generator=g, dtype=torch.int64)
    b = torch.randint(0, 196, (n, 3, size, size), generator=g, dtype=torch.int64) + shift  # a mean shift: FID clearly > 0
    return a.to(torch.uint8), b.clamp(0, 255).to(torch.uint8)


class _FidelityFeatures(torch.nn.Module):
    """torchmetrics' `feature` hook: the very torch-fidelity extractor, one feature layer, float output."""

    def __init__(self, weights, layer):
        super().__init__()
        self.net = load_inception(weights, (layer,))
        self.num_features = int(layer)

    def forward(self, x):
        return self.net(x)[0].reshape(x.shape[0], -1)


def _torchmetrics_fid(weights, gen, ref, layer="64"):
    from torchmetrics.image.fid import FrechetInceptionDistance

    tm = FrechetInceptionDistance(feature=_FidelityFeatures(weights, layer), normalize=False).double()
    tm.update(ref, real=True)
    tm.update(gen, real=False)
    return float(tm.compute())


def test_fid_agrees_with_torchmetrics_on_the_same_weights(weights):
    # 16 vs 16 images on the 64-channel layer: Inception at 299x299 on 2 CPU cores costs ~0.2 s an image
    gen, ref = _image_sets(n=16)
    ours = compute_fidelity(gen, ref, weights, fid=True, isc=False, kid=False, feature_layer_fid="64", batch_size=32)
    expected = _torchmetrics_fid(weights, gen, ref)
    assert expected > 1e-3  # the sets differ: a metric that always said 0 would fail here
    assert ours["fid"] == pytest.approx(expected, rel=1e-4)  # measured: ~5e-8


@pytest.mark.slow
def test_fid_agrees_with_torchmetrics_full_rank(weights):
    # 96 images > 64 features: full-rank covariances, so both matrix square roots are well posed (~100 s on CPU)
    gen, ref = _image_sets(n=96)
    ours = compute_fidelity(gen, ref, weights, fid=True, isc=False, kid=False, feature_layer_fid="64", batch_size=48)
    expected = _torchmetrics_fid(weights, gen, ref)
    assert ours["fid"] == pytest.approx(expected, rel=1e-4)
    same = compute_fidelity(gen, gen, weights, fid=True, isc=False, kid=False, feature_layer_fid="64", batch_size=48)
    assert abs(same["fid"]) < 1e-3 * expected


@pytest.mark.slow
def test_full_metrics_from_directories(weights, tmp_path):
    # full 2048-d Inception on 16 images + our KID reference: ~60 s on 2 CPU cores
    gen, ref = _image_sets(n=8, size=24)
    for name, imgs in (("gen", gen), ("ref", ref)):
        (tmp_path / name).mkdir()
        for i, im in enumerate(imgs):
            Image.fromarray(im.permute(1, 2, 0).numpy()).save(tmp_path / name / f"{i:03d}.png")
    assert torch.equal(load_image_dir(tmp_path / "gen"), gen)
    out = compute_fidelity(tmp_path / "gen", tmp_path / "ref", weights, batch_size=8)
    assert set(out) >= {"fid", "isc_mean", "isc_std", "kid_mean", "kid_std"}
    assert out["num_generated"] == out["num_reference"] == 8
    assert out["fid"] > 0 and out["isc_mean"] >= 1.0 - 1e-6 and np.isfinite(out["kid_mean"])
    # KID against an unbiased polynomial-kernel MMD of the same 2048-d features (one subset = all images)
    net = load_inception(weights, ("2048",))
    fx, fy = (net(x)[0].double() for x in (gen, ref))
    d = fx.shape[1]
    k = lambda a, b: (a @ b.T / d + 1) ** 3  # noqa: E731
    kxx, kyy, kxy = k(fx, fx), k(fy, fy), k(fx, fy)
    m = fx.shape[0]
    mmd = ((kxx.sum() - kxx.trace()) / (m * (m - 1)) + (kyy.sum() - kyy.trace()) / (m * (m - 1)) - 2 * kxy.mean())
    assert out["kid_mean"] == pytest.approx(float(mmd), rel=1e-3, abs=1e-6)


def test_missing_weights_name_the_recipe_key(tmp_path):
    gen, ref = _image_sets(n=4, size=16)
    with pytest.raises(EvalInputError, match=f"{INCEPTION_KEY} = .*does not exist") as e:
        compute_fidelity(gen, ref, tmp_path / "nope.pth")
    assert "\n" not in str(e.value)
    with pytest.raises(EvalInputError, match=f"set {INCEPTION_KEY}"):
        compute_fidelity(gen, ref, None)
    (tmp_path / "notes.pth").write_text("not weights")
    with pytest.raises(EvalInputError, match="are not torch-fidelity's Inception weights"):
        compute_fidelity(gen, ref, tmp_path / "notes.pth")


def test_empty_and_mixed_size_image_dirs(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(EvalInputError, match="has no images"):
        load_image_dir(tmp_path / "empty")
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    Image.new("RGB", (16, 16)).save(mixed / "a.png")
    Image.new("RGB", (16, 20)).save(mixed / "b.png")
    with pytest.raises(EvalInputError, match=r"mixed sizes: a.png is 16x16 but b.png is 16x20"):
        load_image_dir(mixed)


def test_prompt_file_malformed_line_is_reported_by_number(tmp_path):
    good = tmp_path / "p.jsonl"
    good.write_text(json.dumps({"caption": "a red circle"}) + "\n\n" + json.dumps({"prompt": "two squares"}) + "\n")
    assert read_prompt_file(good) == ["a red circle", "two squares"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"caption": "ok"}) + "\n" + "{not json\n")
    with pytest.raises(EvalInputError, match=r"line 2: not JSON"):
        read_prompt_file(bad)
    nokey = tmp_path / "nokey.jsonl"
    nokey.write_text(json.dumps({"caption": "ok"}) + "\n" + json.dumps({"text": "x"}) + "\n")
    with pytest.raises(EvalInputError, match=r"line 2: needs a non-empty string 'caption'"):
        read_prompt_file(nokey)
    txt = tmp_path / "p.txt"
    txt.write_text("a\n\nb\n")
    assert read_prompt_file(txt) == ["a", "b"]


def test_fid_command_names_the_recipe_key(tmp_path, capsys):
    from synergen_lightning.eval.cli import fid_main

    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        Image.new("RGB", (8, 8)).save(tmp_path / name / "0.png")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"{INCEPTION_KEY}: {tmp_path / 'missing.pth'}\n")
    with pytest.raises(SystemExit) as e:
        fid_main(["--generated", str(tmp_path / "a"), "--reference", str(tmp_path / "b"), "--config", str(recipe)])
    assert e.value.code == 2
    assert f"{INCEPTION_KEY} = '{tmp_path / 'missing.pth'}' does not exist" in capsys.readouterr().err


def test_inception_features_runs_the_network_where_torch_fidelity_sends_the_batches(monkeypatch):
    """torch-fidelity moves each batch with `.cuda()` (the current CUDA device) but not a network it is handed:
    `inception_features` puts the network on the device first and makes an indexed device current around it."""
    import contextlib

    import torch_fidelity.utils

    from synergen_lightning.eval import fid, fid_protocols

    moved, entered, seen, fidelity_device = [], [], {}, fid.fidelity_device

    class Net(torch.nn.Module):
        def to(self, device):
            moved.append(device)
            return self

    def features(dataset, net, batch_size, cuda, *flags):
        seen.update(moved=list(moved), entered=list(entered), cuda=cuda)
        return {"2048": torch.zeros(len(dataset), 4)}

    monkeypatch.setattr(fid, "load_inception", lambda weights, layers: Net())
    monkeypatch.setattr(fid, "fidelity_device", lambda device: contextlib.nullcontext(entered.append(device)))
    monkeypatch.setattr(torch_fidelity.utils, "get_featuresdict_from_dataset", features)
    out = fid_protocols.inception_features(torch.zeros(3, 3, 8, 8, dtype=torch.uint8), "w.pth", device="cuda:1")
    assert seen == {"moved": ["cuda:1"], "entered": ["cuda:1"], "cuda": True} and out.shape == (3, 4)
    current = fidelity_device("cuda:1")  # the real context: cuda:1 current while torch-fidelity runs
    assert isinstance(current, torch.cuda.device) and current.idx == 1
    assert isinstance(fidelity_device("cuda"), contextlib.nullcontext)
    assert isinstance(fidelity_device("cpu"), contextlib.nullcontext)
