"""VQ model, VQTokenizer LightningModule, ImageShardDataModule and pretokenize on tiny self-made shards."""

import io
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import webdataset as wds
from einops import rearrange
from PIL import Image

from datamodules.image_shards import ImageShardDataModule, image_views
from synergen_lightning.image_tokenizer import ImageTokenizer, VQTokenizer, load_image_tokenizer
from synergen_lightning.image_tokenizer.pretokenize import PRETOKENIZE_STAMP
from synergen_lightning.image_tokenizer.pretokenize import main as pretokenize_main
from synergen_lightning.image_tokenizer.vq_tokenizer import codebook_stats
from synergen_lightning.models.vq import VectorQuantizer
from tests.toy_shards import write_toy_shards

SMALL = dict(codebook_size=32, code_dim=4, base_channels=8, channel_multiplier=(1, 2, 2, 2), z_channels=16, warmup_steps=1)


# ---- quantizer -----------------------------------------------------------------------------------------------
def test_quantizer_picks_nearest_code_and_passes_gradients_straight_through():
    q = VectorQuantizer(16, 4, l2_normalize=True, dead_code_restart=False)
    torch.nn.init.normal_(q.embedding.weight)
    z = torch.randn(2, 4, 3, 5, requires_grad=True)
    zq, codes, losses = q(z)
    flat = torch.nn.functional.normalize(z.detach().permute(0, 2, 3, 1).reshape(-1, 4), dim=-1)
    ref = torch.cdist(flat, torch.nn.functional.normalize(q.embedding.weight.detach(), dim=-1)).argmin(-1)
    assert torch.equal(codes.flatten(), ref)
    assert codes.shape == (2, 3, 5)
    torch.testing.assert_close(zq, q.lookup(codes))  # forward value is the code itself
    zq.sum().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0  # straight-through reaches the encoder
    assert losses["commitment"] > 0 and losses["codebook"] > 0


def test_dead_code_restart_revives_unused_codes():
    q = VectorQuantizer(64, 4, dead_code_restart=True, usage_decay=0.5, dead_threshold=0.5).train()
    with torch.no_grad():
        q.embedding.weight.copy_(torch.tensor([1.0, 0, 0, 0]).repeat(64, 1) + 1e-4 * torch.randn(64, 4))  # collapsed
    z = torch.randn(8, 4, 8, 8)
    for _ in range(5):
        q(z)
    q.eval()
    _, codes, _ = q(z)
    assert codes.unique().numel() > 32  # the collapsed codebook now spreads over the data
    with pytest.raises(ValueError, match=r"\[0, 64\)"):
        q.lookup(torch.tensor([[[64]]]))


def test_codebook_stats_against_hand_computation():
    counts = torch.tensor([3, 0, 1, 0])
    usage, ppl = codebook_stats(counts)
    p = np.array([0.75, 0.25])
    assert usage == 0.5
    assert ppl == pytest.approx(float(np.exp(-(p * np.log(p)).sum())))
    assert codebook_stats(torch.ones(10))[1] == pytest.approx(10.0)


# ---- pixel policy and bad input -----------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "CMYK", "I;16", "1", "RGB"])
def test_every_pil_mode_gives_rgb_views(mode):
    img = Image.new("RGB", (128, 96), (200, 30, 40)).convert(mode) if mode != "I;16" else Image.frombytes(
        "I;16", (128, 96), (np.arange(128 * 96) % 65535).astype("<u2").tobytes())
    views = image_views(img, 64, max_tiles=4)
    assert all(v.mode == "RGB" and v.size == (64, 64) for v in views)


def test_sizes_not_divisible_by_downsample_follow_the_view_policy_and_raw_tensors_are_refused():
    # policy: short edge -> size (bicubic), centre crop; tiles: closest grid of size x size tiles
    views = image_views(Image.new("RGB", (101, 77), "white"), 64, max_tiles=4)
    assert [v.size for v in views] == [(64, 64)] * len(views)
    tok = VQTokenizer(**SMALL)
    with pytest.raises(ValueError, match="20x16 is not divisible by the downsample factor 8"):
        tok.encode(torch.rand(1, 3, 20, 16))
    with pytest.raises(ValueError, match="dtype torch.uint8"):
        tok.encode(torch.zeros(1, 3, 16, 16, dtype=torch.uint8))


def test_undecodable_samples_are_skipped_and_counted(tmp_path):
    write_toy_shards(tmp_path / "s", 20, per_shard=10, corrupt_every=4)  # samples 3, 7, 11, 15, 19 are broken
    dm = ImageShardDataModule(str(tmp_path / "s"), str(tmp_path / "s"), size=64, max_tiles=4, batch_size=7, num_workers=0)
    dm.setup("validate")
    batches = list(dm.val_dataloader())
    assert sum(b["n_skipped"] for b in batches) == 5
    assert sum(len(b["pixel_values"]) for b in batches) == 15 * 5  # generation view + 2x2 tiles per good image
    assert batches[0]["pixel_values"].dtype == torch.uint8


def _rank_batches(shards: Path, rank: int, workers: int, **kwargs) -> list[dict]:
    """One epoch of rank `rank` of 2, as that rank's DataLoader gives it."""
    from synergen_lightning.data.image_stream import ImageViewStream, collate_views

    stream = ImageViewStream(sorted(map(str, shards.glob("*.tar"))), 32, 4, 1, shuffle=True, **kwargs)
    stream.rank_world = (rank, 2)  # as read in a rank's process
    loader = torch.utils.data.DataLoader(stream, batch_size=kwargs.get("batch_size", 1), num_workers=workers,
                                         collate_fn=collate_views)
    return list(loader)


@pytest.mark.parametrize("workers", [0, 2])
def test_every_rank_trains_the_same_number_of_batches_from_shards_of_unequal_length(tmp_path, workers):
    """Over 2 ranks a rank's epoch is `epoch_batches` full batches of its own shards, however long they are (one
    rank holding 1 image, the other 12), so no rank ends its epoch while another still trains."""
    write_toy_shards(tmp_path / "s", 13, per_shard=12, seed=3)  # shard 0: 12 images, shard 1: 1 image
    epochs = {rank: _rank_batches(tmp_path / "s", rank, workers, epoch_batches=5, batch_size=4) for rank in (0, 1)}
    for rank, batches in epochs.items():
        assert [len(b["pixel_values"]) for b in batches] == [4] * 5, rank
    one_pass = {rank: sum(len(b["pixel_values"]) for b in _rank_batches(tmp_path / "s", rank, 0, batch_size=4))
                for rank in (0, 1)}
    assert sorted(one_pass.values()) == [6, 72]  # 5 views + 1 random crop per image: the ranks' passes differ


@pytest.mark.parametrize("workers", [0, 2])
def test_ranks_and_workers_share_fewer_shards_than_they_are_without_repeating_a_sample(tmp_path, workers):
    """One shard of 5 images over 2 ranks (x 2 workers): one pass of validation sees every image once across the
    lanes, and in training the ranks' batches are their own (not the same views drawn alike on every rank)."""
    import hashlib

    write_toy_shards(tmp_path / "s", 5, per_shard=5, seed=4)
    from synergen_lightning.data.image_stream import ImageViewStream

    def views(rank: int, world: int, shuffle: bool, **kw) -> list[str]:
        stream = ImageViewStream([str(tmp_path / "s/shard-000000.tar")], 32, 4, 1, shuffle=shuffle, **kw)
        stream.rank_world = (rank, world)
        loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers if world > 1 else 0)
        return [hashlib.sha1(v["pixel_values"].numpy().tobytes()).hexdigest() for v in loader
                if v["pixel_values"] is not None]

    everything = views(0, 1, False)
    assert len(everything) == 5 * 5
    per_rank = [views(rank, 2, False) for rank in (0, 1)]
    assert sorted(per_rank[0] + per_rank[1]) == sorted(everything)
    trained = [views(rank, 2, True, epoch_batches=4, batch_size=2) for rank in (0, 1)]
    assert len(trained[0]) == len(trained[1]) == 8 and trained[0] != trained[1]


def test_cycling_ranks_read_every_shard_alike_when_they_do_not_divide_the_shards(tmp_path, monkeypatch):
    """3 shards over 2 ranks: a fixed split would read one rank's single shard twice as often as each of the other
    rank's two; the shared rounds read every shard alike (counts within one of each other)."""
    from collections import Counter

    import synergen_lightning.data.image_stream as image_stream

    write_toy_shards(tmp_path / "s", 6, per_shard=2, seed=5)
    reads, real = Counter(), image_stream.iter_shard

    def counting(url, counter):
        reads[Path(url).name] += 1
        return real(url, counter)

    monkeypatch.setattr(image_stream, "iter_shard", counting)
    for rank in (0, 1):
        _rank_batches(tmp_path / "s", rank, 0, epoch_batches=40, batch_size=4)
    assert len(reads) == 3 and max(reads.values()) - min(reads.values()) <= 1, reads


def test_a_rank_whose_shards_hold_no_decodable_image_says_so(tmp_path):
    write_toy_shards(tmp_path / "s", 4, per_shard=2, corrupt_every=1)
    with pytest.raises(ValueError, match="no decodable image in lane 0 of 2"):
        _rank_batches(tmp_path / "s", 0, 0, epoch_batches=2, batch_size=4)


def test_the_image_datamodule_gives_ranks_the_runs_length_as_their_epoch(tmp_path):
    from types import SimpleNamespace

    write_toy_shards(tmp_path / "s", 4, per_shard=2)
    dm = ImageShardDataModule(str(tmp_path / "s"), str(tmp_path / "s"), size=32, batch_size=4, num_workers=0)
    dm.trainer = SimpleNamespace(world_size=2, max_steps=30, accumulate_grad_batches=2)
    dm.setup("fit")
    assert dm.train_set.epoch_batches == 60
    dm.trainer = SimpleNamespace(world_size=2, max_steps=-1, accumulate_grad_batches=1)
    with pytest.raises(ValueError, match="set trainer.max_steps .* or data.init_args.batches_per_epoch"):
        dm.setup("fit")
    dm.trainer = SimpleNamespace(world_size=1, max_steps=30, accumulate_grad_batches=1)
    dm.setup("fit")
    assert dm.train_set.epoch_batches is None  # one process: an epoch is one pass


def _gather_views(rank: int, store_file: str, out: str) -> None:
    import torch.distributed as dist

    from synergen_lightning.image_tokenizer.vq_tokenizer import views_on_rank_zero

    dist.init_process_group("gloo", init_method=f"file://{store_file}", rank=rank, world_size=2)
    try:
        mine = [torch.full((n, 3, 4, 4), 10 * rank + i, dtype=torch.uint8) for i, n in enumerate((2, 1))]
        got = views_on_rank_zero(mine)
        none = views_on_rank_zero([] if rank == 1 else mine[:1])  # a rank that kept no view
        torch.save({"got": got, "none": none}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_rfid_sees_the_views_of_every_rank(tmp_path):
    """Over 2 ranks (each validates its own shards) rank 0 holds every rank's views for the rFID, in rank order."""
    torch.multiprocessing.spawn(_gather_views, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert r1 == {"got": None, "none": None}
    assert r0["got"][:, 0, 0, 0].tolist() == [0, 0, 1, 10, 10, 11] and r0["got"].shape[1:] == (3, 4, 4)
    assert r0["none"][:, 0, 0, 0].tolist() == [0, 0]


def test_the_skip_count_is_carried_across_a_resume():
    model, resumed, checkpoint = VQTokenizer(**SMALL), VQTokenizer(**SMALL), {}
    model._log_skipped({"n_skipped": 3})
    model._log_skipped({"n_skipped": 2})
    model.on_save_checkpoint(checkpoint)
    resumed.on_load_checkpoint(checkpoint)
    assert checkpoint["synergen_skipped_samples"] == resumed._skipped_total == 5


def test_missing_shards_error_names_the_path(tmp_path):
    dm = ImageShardDataModule(str(tmp_path / "nope-*.tar"), str(tmp_path / "nope-*.tar"))
    with pytest.raises(FileNotFoundError, match="nope-"):
        dm.setup("fit")


# ---- the LightningModule ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A few seconds of training on toy shards; returns (checkpoint path, shard dir, trainer metrics)."""
    root = tmp_path_factory.mktemp("tok")
    write_toy_shards(root / "train", 20, per_shard=10, seed=1)
    write_toy_shards(root / "val", 4, per_shard=4, seed=2)
    torch.manual_seed(0)
    model = VQTokenizer(**SMALL, lr=3e-3)
    from synergen_lightning.image_tokenizer.evaluate import evaluate_tokenizer

    untrained_psnr = evaluate_tokenizer(model, str(root / "val"), size=32, max_tiles=4)["psnr"]
    dm = ImageShardDataModule(str(root / "train"), str(root / "val"), size=32, max_tiles=4, batch_size=8, num_workers=0)
    trainer = L.Trainer(max_steps=25, val_check_interval=25, check_val_every_n_epoch=None, num_sanity_val_steps=0,
                        logger=L.pytorch.loggers.TensorBoardLogger(root, name="tb"), enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=root, enable_checkpointing=False)
    trainer.fit(model, dm)
    ckpt = root / "tok.ckpt"
    trainer.save_checkpoint(ckpt)
    return ckpt, root, {**trainer.callback_metrics, "untrained_psnr": untrained_psnr}, model


def test_training_logs_metrics_and_reconstruction_improves(trained):
    ckpt, root, metrics, model = trained
    for key in ("val/psnr", "val/ssim", "val/codebook_usage", "val/perplexity", "train/recon"):
        assert key in metrics, key
    assert metrics["val/psnr"] > metrics["untrained_psnr"] + 3.0, (metrics["val/psnr"], metrics["untrained_psnr"])
    assert list((root / "tb").rglob("events.out.tfevents*"))


def test_val_psnr_equals_protocol_round_trip(trained):
    """val/psnr (training forward) == torchmetrics PSNR of decode(encode(x)) through the protocol."""
    from synergen_lightning.image_tokenizer.evaluate import evaluate_tokenizer

    ckpt, root, metrics, _ = trained
    tok = load_image_tokenizer(ckpt)
    assert isinstance(tok, ImageTokenizer) and tok.codebook_size == 32 and tok.downsample == 8
    res = evaluate_tokenizer(tok, str(root / "val"), size=32, max_tiles=4)
    assert res["views"] == 4 * 5
    assert res["psnr"] == pytest.approx(float(metrics["val/psnr"]), abs=1e-3)
    assert res["codebook_usage"] == pytest.approx(float(metrics["val/codebook_usage"]))
    assert 0.0 <= res["roundtrip_stable"] <= 1.0
    f = res["flat_fraction"]  # the flat / detail split partitions the codes
    assert 0.0 < f < 1.0
    assert f * res["roundtrip_flat"] + (1 - f) * res["roundtrip_detail"] == pytest.approx(res["roundtrip_stable"])


def test_another_models_checkpoint_is_refused_as_an_image_tokenizer(trained, tmp_path):
    """A Lightning checkpoint of another model (here: the tokenizer's hyperparameters beside an LLM's weights) would
    build a tokenizer of random weights; it is refused, naming the file and the weight it lacks."""
    ckpt, *_ = trained
    theirs = torch.load(ckpt, weights_only=False)
    other = tmp_path / "llm.ckpt"
    torch.save({"hyper_parameters": theirs["hyper_parameters"],
                "state_dict": {"llm.model.embed.weight": torch.zeros(4, 2)}}, other)
    with pytest.raises(ValueError, match=rf"^'{other}' is not a VQTokenizer checkpoint: it lacks (\d+) of the "
                                         r"tokenizer's \1 weights \(e\.g\. vq\."):
        load_image_tokenizer(other)
    assert load_image_tokenizer(ckpt).codebook_size == 32  # the tokenizer's own checkpoint loads


def test_checkpoint_with_other_codebook_size_is_refused(trained):
    ckpt, *_ = trained
    with pytest.raises(ValueError, match="codebook_size 32 but the recipe expects 64"):
        load_image_tokenizer(ckpt, expected_codebook_size=64)
    other = VQTokenizer(**{**SMALL, "codebook_size": 64})
    with pytest.raises(ValueError, match="checkpoint codebook has 32 codes but this model/recipe has codebook_size 64"):
        other.on_load_checkpoint(torch.load(ckpt, weights_only=False))


def test_perceptual_loss_needs_a_local_weights_file(tmp_path):
    with pytest.raises(ValueError, match="perceptual_weights"):
        VQTokenizer(**SMALL, perceptual_weight=1.0)
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        VQTokenizer(**SMALL, perceptual_weight=1.0, perceptual_weights=str(tmp_path / "missing.pth"))


def test_adversarial_option_trains_with_two_optimizers(tmp_path):
    write_toy_shards(tmp_path / "s", 8, per_shard=8)
    model = VQTokenizer(**SMALL, adversarial_weight=0.1)
    assert not model.automatic_optimization
    disc_before = [p.detach().clone() for p in model.discriminator.parameters()]
    dm = ImageShardDataModule(str(tmp_path / "s"), str(tmp_path / "s"), size=32, batch_size=8, num_workers=0)
    trainer = L.Trainer(max_steps=3, limit_val_batches=0, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path)
    trainer.fit(model, dm)
    assert any(not torch.equal(a, b) for a, b in zip(disc_before, model.discriminator.parameters()))
    assert "train/gan_d" in trainer.callback_metrics


# ---- pretokenize --------------------------------------------------------------------------------------------
def _read(path):
    return {s["__key__"]: s for s in wds.WebDataset(str(path), shardshuffle=False, empty_check=False)}


def test_pretokenize_writes_codes_resumes_and_skips_broken(trained, tmp_path, capsys):
    ckpt, *_ = trained
    src = tmp_path / "src"
    write_toy_shards(src, 12, per_shard=4, seed=3, corrupt_every=6)  # samples 5 and 11 are broken
    out = tmp_path / "out"
    assert pretokenize_main(["--tokenizer", str(ckpt), "--in", str(src), "--out", str(out), "--image-size", "32"]) == 0
    report = capsys.readouterr().out
    assert "2 undecodable skipped" in report and "images/s" in report
    tok = load_image_tokenizer(ckpt)
    samples = _read(out / "shard-000000.tar")
    originals = _read(src / "shard-000000.tar")
    for key, s in samples.items():
        codes = np.load(io.BytesIO(s["codes.npy"]))
        assert codes.dtype == np.int32 and codes.shape == (1, 4, 4)
        assert s["txt"] == originals[key]["txt"] and s["jpg"] == originals[key]["jpg"]
        img = Image.open(io.BytesIO(s["jpg"]))
        from synergen_lightning.data.views import generation_view, to_uint8_tensor

        ref = tok.encode(to_uint8_tensor([generation_view(img, 32)]).float() / 255)
        assert np.array_equal(codes[0], ref[0].numpy())
    assert sum(len(_read(p)) for p in sorted(out.glob("*.tar"))) == 10

    # resume: one shard lost, one half-written temp file; only that shard is redone
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    (out / "shard-000001.tar").unlink()
    (out / "shard-000001.tar.tmp").write_bytes(b"partial")
    # other views into the same --out would mix two geometries: refused, naming what differs
    with pytest.raises(SystemExit) as e:
        pretokenize_main(["--tokenizer", str(ckpt), "--in", str(src), "--out", str(out), "--image-size", "32",
                          "--task", "understanding", "--max-tiles", "4", "--thumbnail"])
    assert e.value.code == 2 and ("other views (--task generation there, understanding now, --thumbnail False there, "
                                  "True now;") in capsys.readouterr().err
    assert pretokenize_main(["--tokenizer", str(ckpt), "--in", str(src), "--out", str(out), "--image-size", "32"]) == 0
    assert "resuming: 2 of 3 shards" in capsys.readouterr().out
    assert not (out / "shard-000001.tar.tmp").exists()
    for name in ("shard-000000.tar", "shard-000002.tar"):
        assert (out / name).stat().st_mtime_ns == mtimes[name]
    redone = _read(out / "shard-000001.tar")
    assert {np.load(io.BytesIO(s["codes.npy"])).shape for s in redone.values()} == {(1, 4, 4)}

    # understanding views (2x2 tiles of the 128 canvas + a thumbnail) into a directory of their own
    assert pretokenize_main(["--tokenizer", str(ckpt), "--in", str(src), "--out", str(tmp_path / "und"),
                             "--image-size", "32", "--task", "understanding", "--max-tiles", "4", "--thumbnail"]) == 0
    tiles = _read(tmp_path / "und" / "shard-000001.tar")
    assert {np.load(io.BytesIO(s["codes.npy"])).shape for s in tiles.values()} == {(5, 4, 4)}

    # a tokenizer trained again at the same path: resuming would keep the old tokenizer's codes, so it is refused
    (out / "shard-000001.tar").unlink()
    new_ckpt = tmp_path / "retrained.ckpt"
    new_ckpt.write_bytes(ckpt.read_bytes())
    with pytest.raises(SystemExit) as e:
        pretokenize_main(["--tokenizer", str(new_ckpt), "--in", str(src), "--out", str(out), "--image-size", "32"])
    assert e.value.code == 2 and "pretokenized with another tokenizer" in capsys.readouterr().err
    assert not (out / "shard-000001.tar").exists()

    # a shard cut short and a file that is no tar: no output, counted, so they are not taken for done
    broken = tmp_path / "broken"
    broken.mkdir()
    data = (src / "shard-000000.tar").read_bytes()
    (broken / "cut-000000.tar").write_bytes(data[: len(data) // 2 + 100])
    (broken / "junk-000001.tar").write_bytes(b"not a tar" * 200)
    assert pretokenize_main(["--tokenizer", str(ckpt), "--in", str(broken), "--out", str(tmp_path / "fromb"),
                             "--image-size", "32"]) == 0
    said = capsys.readouterr().out
    assert "pretokenized 2 shards" in said and "2 shard(s) not read whole, no output written" in said
    assert said.count("could not be read whole") == 2 and not list((tmp_path / "fromb").glob("*.tar*"))
    # the codes beside their inputs would take the inputs' names
    with pytest.raises(SystemExit) as e:
        pretokenize_main(["--tokenizer", str(ckpt), "--in", str(src), "--out", str(src), "--image-size", "32"])
    assert e.value.code == 2 and f"--out {src} is where the input shards are" in capsys.readouterr().err

    # a damaged stamp: the shards already there have no known tokenizer, so resuming is refused, naming the file
    (out / ".pretokenize.json").write_text('["not the stamp"]')
    with pytest.raises(SystemExit) as e:
        pretokenize_main(["--tokenizer", str(ckpt), "--in", str(src), "--out", str(out), "--image-size", "32"])
    assert e.value.code == 2 and (f"--out {out}: {str(out / '.pretokenize.json')!r} is not the JSON `synergen data "
                                  "pretokenize` writes (no `tokenizer` and `views` entries): delete it with the "
                                  "shards beside it, or choose another --out") in capsys.readouterr().err


def test_pretokenize_workers_write_the_same_shards(trained, tmp_path, capsys):
    """`--workers 2` (one process per shard, as make demo runs it on 2 cores) writes byte-identical codes and
    skips the same broken samples as one process."""
    ckpt, *_ = trained
    src = tmp_path / "src"
    write_toy_shards(src, 12, per_shard=4, seed=3, corrupt_every=6)
    args = ["--tokenizer", str(ckpt), "--in", str(src), "--image-size", "32"]
    assert pretokenize_main(args + ["--out", str(tmp_path / "one")]) == 0
    assert pretokenize_main(args + ["--out", str(tmp_path / "two"), "--workers", "2"]) == 0
    assert "2 undecodable skipped" in capsys.readouterr().out.split("pretokenized")[-1]
    for shard in sorted((tmp_path / "one").glob("*.tar")):
        one, two = _read(shard), _read(tmp_path / "two" / shard.name)
        assert one.keys() == two.keys() and all(one[k]["codes.npy"] == two[k]["codes.npy"] for k in one)
    for option in ("--workers", "--batch-size", "--image-size"):
        with pytest.raises(SystemExit):
            pretokenize_main(args + ["--out", str(tmp_path / "bad"), option, "0"])
        assert f"{option} 0 must be >= 1" in capsys.readouterr().err


def test_pretokenize_reads_shards_over_http_and_pipe(trained, tmp_path, capsys, monkeypatch):
    """`--in` takes remote URL forms: shards served over HTTP and read through `pipe:cat` give the same codes as
    local ones, named after their input; a shard that cannot be read writes no output and is counted."""
    from tests.shard_server import ShardServer

    monkeypatch.setenv("SYNERGEN_SHARD_BACKOFF", "0.01")
    ckpt, *_ = trained
    src = tmp_path / "src"
    write_toy_shards(src, 8, per_shard=4, seed=5)
    args = ["--tokenizer", str(ckpt), "--image-size", "32"]
    assert pretokenize_main(args + ["--in", str(src), "--out", str(tmp_path / "local")]) == 0
    with ShardServer(tmp_path) as server:
        assert pretokenize_main(args + ["--in", f"{server.url}/src/shard-{{000000..000001}}.tar",
                                        "--out", str(tmp_path / "http")]) == 0
        assert pretokenize_main(args + ["--in", f"{server.url}/dead/src/shard-000000.tar",
                                        "--out", str(tmp_path / "dead")]) == 0
    assert "1 shard(s) not read whole, no output written" in capsys.readouterr().out
    assert not list((tmp_path / "dead").glob("*.tar"))
    assert pretokenize_main(args + ["--in", f"pipe:cat {src}/shard-{{000000..000001}}.tar",
                                    "--out", str(tmp_path / "pipe")]) == 0
    for shard in sorted((tmp_path / "local").glob("*.tar")):
        local = _read(shard)
        for form in ("http", "pipe"):
            got = _read(tmp_path / form / shard.name)
            assert got.keys() == local.keys() and all(got[k]["codes.npy"] == local[k]["codes.npy"] for k in local)


def test_pretokenize_refuses_bad_image_size(trained, tmp_path):
    ckpt, *_ = trained
    write_toy_shards(tmp_path / "src", 2, per_shard=2)
    with pytest.raises(SystemExit):
        pretokenize_main(["--tokenizer", str(ckpt), "--in", str(tmp_path / "src"), "--out", str(tmp_path / "o"), "--image-size", "60"])


# ---- pixel-unshuffle architecture, consistency loss, cosine schedule ---------------------------------------------
def test_unshuffle_stem_is_space_to_depth_and_sets_the_downsample():
    from einops import rearrange

    from synergen_lightning.models.vq import VQConfig, VQModel

    cfg = VQConfig(codebook_size=16, code_dim=4, base_channels=8, channel_multiplier=(1, 2), z_channels=8, unshuffle=4)
    assert cfg.downsample == 8
    model = VQModel(cfg)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    # the stem's first op is pixel_unshuffle: channel c*16 + i*4 + j of cell (h, w) is pixel (4h+i, 4w+j) of channel c
    stem = model.encoder.net[0](x)
    torch.testing.assert_close(stem, rearrange(x, "b c (h i) (w j) -> b (c i j) h w", i=4, j=4))
    recon, codes, _ = model(x)
    assert recon.shape == x.shape and codes.shape == (2, 4, 4)
    assert not any(isinstance(m, torch.nn.Conv2d) and m.in_channels == 3 for m in model.modules())  # nothing at full res
    with pytest.raises(ValueError, match="unshuffle 0"):
        VQConfig(unshuffle=0)


def test_consistency_loss_matches_a_direct_computation_and_trains_only_the_encoder_side():
    tok = VQTokenizer(**SMALL, consistency_weight=1.0)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    zq, codes, _ = tok.vq.encode(x)
    recon = tok.vq.decode_latent(zq)
    loss = tok._consistency_loss(recon, codes)
    with torch.no_grad():  # independent computation: cosine-normalised re-encoding vs the unit code vectors
        z_again = torch.nn.functional.normalize(tok.vq.quant_conv(tok.vq.encoder(recon.clamp(-1, 1))), dim=1)
        codebook = torch.nn.functional.normalize(tok.vq.quantizer.embedding.weight, dim=-1)
        ref = (z_again - codebook[codes].permute(0, 3, 1, 2)).pow(2).mean()
    torch.testing.assert_close(loss.detach(), ref)
    assert loss > 0
    loss.backward()
    assert tok.vq.encoder.net[0].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in tok.vq.decoder.parameters())  # the reconstruction is detached
    assert tok.vq.quantizer.embedding.weight.grad is None  # codes are the fixed target


def test_cosine_schedule_warms_up_then_decays_to_zero_at_max_steps(tmp_path):
    write_toy_shards(tmp_path / "s", 8, per_shard=8)
    model = VQTokenizer(**{**SMALL, "warmup_steps": 2}, lr=1e-2, lr_schedule="cosine", betas=(0.9, 0.99))
    dm = ImageShardDataModule(str(tmp_path / "s"), str(tmp_path / "s"), size=32, batch_size=4, num_workers=0)
    lrs = []

    class Record(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    trainer = L.Trainer(max_steps=6, limit_val_batches=0, logger=False, enable_progress_bar=False, callbacks=[Record()],
                        enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path)
    trainer.fit(model, dm)
    import math

    # warmup (step+1)/2, then cosine over the remaining max_steps - warmup = 4 steps (reaching 0 at step 6)
    expected = [1e-2 * 0.5, 1e-2] + [1e-2 * 0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(4)]
    assert lrs == pytest.approx(expected)
    assert trainer.optimizers[0].param_groups[0]["betas"] == (0.9, 0.99)
    with pytest.raises(ValueError, match="lr_schedule 'linear'"):
        VQTokenizer(**SMALL, lr_schedule="linear")


def test_error_sampled_restart_puts_dead_codes_where_the_codebook_fits_worst():
    """restart_sampling='error': dead codes restart onto the badly quantised encoder outputs, never onto ones a
    live code already fits exactly (the flat-background near-duplicates that broke round-trip stability)."""
    torch.manual_seed(0)
    q = VectorQuantizer(8, 4, l2_normalize=True, dead_code_restart=True, usage_decay=0.0, dead_threshold=0.5,
                        restart_sampling="error").train()
    with torch.no_grad():
        q.embedding.weight.copy_(torch.eye(4).repeat(2, 1))  # codes 0-3 and their duplicates 4-7
    fitted = torch.eye(4)[torch.tensor([0] * 60)]  # 60 outputs code 0 fits exactly
    odd = torch.nn.functional.normalize(torch.tensor([[1.0, 1, 1, 1], [-1.0, -1, 1, 1]]), dim=-1)  # 2 ill-fitted
    z = rearrange(torch.cat([fitted, odd]), "(b h w) d -> b d h w", b=2, h=31, w=1)
    _, codes, _ = q(z)
    dead = torch.tensor([c for c in range(8) if c not in codes.unique().tolist()])
    assert dead.numel() == 6  # codes 0 (60 fitted outputs + a tie) and 2 (the second odd output) were used
    restarted = torch.nn.functional.normalize(q.embedding.weight[dead].detach(), dim=-1)
    dist_to_odd = torch.cdist(restarted, odd).min(-1).values
    assert (dist_to_odd < 1e-2).all(), dist_to_odd  # every restarted code sits on one of the two ill-fitted outputs
    uniform = VectorQuantizer(8, 4, usage_decay=0.0, dead_threshold=0.5).train()
    with torch.no_grad():
        uniform.embedding.weight.copy_(torch.eye(4).repeat(2, 1))
    uniform(z)  # the old rule mostly lands on the 60 fitted outputs (duplicates of code 0)
    on_fitted = (torch.nn.functional.normalize(uniform.embedding.weight[dead].detach(), dim=-1) @ torch.eye(4)[0] > 0.99)
    assert on_fitted.sum() >= 4
    with pytest.raises(ValueError, match="restart_sampling 'kmeans'"):
        VectorQuantizer(8, 4, restart_sampling="kmeans")


def test_consistency_codebook_option_also_pulls_the_code_towards_the_re_encoding():
    tok = VQTokenizer(**SMALL, consistency_weight=1.0, consistency_codebook=True)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    zq, codes, _ = tok.vq.encode(x)
    recon = tok.vq.decode_latent(zq)
    loss = tok._consistency_loss(recon, codes)
    with torch.no_grad():
        z_again = torch.nn.functional.normalize(tok.vq.quant_conv(tok.vq.encoder(recon.clamp(-1, 1))), dim=1)
        codebook = torch.nn.functional.normalize(tok.vq.quantizer.embedding.weight, dim=-1)
        ref = (z_again - codebook[codes].permute(0, 3, 1, 2)).pow(2).mean()
    torch.testing.assert_close(loss.detach(), 2 * ref)  # encoder-side term + codebook-side term, equal in value
    loss.backward()
    used = codes.unique()
    grad = tok.vq.quantizer.embedding.weight.grad
    assert grad[used].abs().sum() > 0  # the codes decoded from move towards their re-encodings
    assert all(p.grad is None for p in tok.vq.decoder.parameters())


def test_per_patch_encoder_codes_depend_only_on_their_own_patch():
    """encoder_kernel_size=1 with unshuffle = downsample: changing every pixel outside patch (1, 2) leaves its
    latent (hence its code) unchanged; the default 3x3 encoder lets the whole image leak in."""
    from synergen_lightning.models.vq import VQConfig, VQModel

    torch.manual_seed(0)
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    y = torch.rand(1, 3, 32, 32) * 2 - 1
    y[:, :, 8:16, 16:24] = x[:, :, 8:16, 16:24]  # same patch (row 1, column 2 of the 4x4 grid), new surroundings
    latents = {}
    for k in (1, 3):
        model = VQModel(VQConfig(codebook_size=16, code_dim=4, base_channels=16, channel_multiplier=(1,), z_channels=8,
                                 unshuffle=8, num_res_blocks=2, encoder_kernel_size=k)).eval()
        with torch.no_grad():
            latents[k] = [model.quant_conv(model.encoder(v))[0, :, 1, 2] for v in (x, y)]
    torch.testing.assert_close(latents[1][0], latents[1][1])
    assert (latents[3][0] - latents[3][1]).abs().max() > 1e-3
    with pytest.raises(ValueError, match="encoder_kernel_size 5"):
        VQConfig(encoder_kernel_size=5)


def test_clamp_aware_loss_is_free_past_saturated_targets_and_unchanged_elsewhere():
    from synergen_lightning.image_tokenizer.vq_tokenizer import clamp_aware

    x = torch.tensor([1.0, 1.0, -1.0, 0.5, 0.5, 1.0])
    recon = torch.tensor([1.2, 0.9, -1.3, 1.1, 0.4, 1.0], requires_grad=True)
    eff = clamp_aware(recon, x)
    loss = torch.nn.functional.mse_loss(eff, x, reduction="none")
    # what the user gets: decode() clamps, so the error of a saturated target is that of the clamped prediction
    torch.testing.assert_close(loss[[0, 1, 2, 5]], (recon.detach().clamp(-1, 1) - x).pow(2)[[0, 1, 2, 5]])
    loss.sum().backward()
    assert recon.grad[0] == 0 and recon.grad[2] == 0  # overshoot past a saturated target: no pull back
    assert recon.grad[1] < 0  # undershoot of white is still pushed up
    assert recon.grad[3] > 0  # overshoot of an interior target still pulled down (a plain clamp would kill this)
    assert recon.grad[4] < 0


def test_encoder_noise_perturbs_only_the_encoder_input():
    tok = VQTokenizer(**SMALL, encoder_noise=0.05)
    seen = []
    encode = tok.vq.encode
    tok.vq.encode = lambda v: seen.append(v) or encode(v)
    batch = {"pixel_values": torch.full((4, 3, 32, 32), 128, dtype=torch.uint8)}
    tok.training_step(batch, 0)
    x = tok._pixels(batch)
    assert (seen[0] - x).std().item() == pytest.approx(0.1, rel=0.1)  # std 0.05 in [0, 1] units = 0.1 in [-1, 1]
    tok.hparams.encoder_noise = 0.0
    tok.training_step(batch, 0)
    assert torch.equal(seen[1], x)


def test_pretokenize_workers_take_the_gpus_in_turn(monkeypatch):
    """`--workers N --device cuda`: worker i encodes on GPU i mod the GPUs (one GPU would hold every worker's CUDA
    context and tokenizer); an indexed device or the CPU is every worker's."""
    from synergen_lightning.image_tokenizer.pretokenize import worker_device

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert [worker_device("cuda", i) for i in range(5)] == ["cuda:0", "cuda:1", "cuda:0", "cuda:1", "cuda:0"]
    assert worker_device("cuda:1", 2) == "cuda:1" and worker_device("cpu", 2) == "cpu"
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert worker_device("cuda", 3) == "cuda"


@pytest.mark.slow  # `make test-all`: a torchrun start-up of 2 processes
@pytest.mark.distributed
def test_pretokenize_over_torchrun_processes_writes_one_processs_shards(trained, tmp_path):
    """`torchrun --nproc-per-node 2 ... data pretokenize`: each process writes every other input shard (3 shards:
    2 and 1), rank 0 alone prints the totals of both, and the shards hold one process's samples and codes."""
    import os
    import subprocess
    import sys

    ckpt, *_ = trained
    write_toy_shards(tmp_path / "src", 12, per_shard=4, seed=3, corrupt_every=6)
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK",
                                                             "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", TMPDIR=str(tmp_path))  # torchrun's log folders in the test's own
    launch = {"one": [sys.executable], "two": [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                               "--nproc-per-node", "2"]}
    for name, cmd in launch.items():
        r = subprocess.run([*cmd, "-m", "synergen_lightning.cli", "data", "pretokenize", "--tokenizer", str(ckpt),
                            "--in", str(tmp_path / "src"), "--out", str(tmp_path / name), "--image-size", "32",
                            "--device", "cpu"], env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, f"{name}:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
        assert r.stdout.count("pretokenized 3 shards (0 skipped as done): 10 samples, 10 views, 2 undecodable "
                              "skipped") == 1, r.stdout
    shards = sorted(p.name for p in (tmp_path / "one").glob("*.tar"))
    assert len(shards) == 3 and shards == sorted(p.name for p in (tmp_path / "two").glob("*.tar"))
    for name in shards:  # (a tar's headers hold the time it was written)
        one, two = _read(tmp_path / "one" / name), _read(tmp_path / "two" / name)
        assert one.keys() == two.keys() and all(one[k]["codes.npy"] == two[k]["codes.npy"] for k in one), name
    assert (tmp_path / "one" / PRETOKENIZE_STAMP).read_text() == (tmp_path / "two" / PRETOKENIZE_STAMP).read_text()
