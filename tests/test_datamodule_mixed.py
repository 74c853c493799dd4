"""MixedDataModule: batch layout, mixing, determinism, rank/worker splitting, fault tolerance, setup
refusals, and resume (plain loop and a Lightning run killed mid-epoch)."""

from __future__ import annotations

import os
from collections import Counter

import lightning as L
import pytest
import torch

import datamodules.mixed as mixed
from datamodules.mixed import MixedDataModule
from synergen_lightning.text_tokenizer import train_bpe
from synthetic_shards import write_shards, write_text_jsonl

TPV = 4


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("world")
    text = write_text_jsonl(d / "text.jsonl", 60)
    train_bpe([text], 400, d / "tok")
    write_shards(d / "train", n_shards=4, per_shard=10, seed=1)
    write_shards(d / "val", n_shards=2, per_shard=5, seed=2, prefix="val")
    write_shards(d / "bad", n_shards=2, per_shard=10, seed=3, prefix="bad",
                 bad={"undecodable": [1], "no_caption": [2], "bad_json": [3]})
    write_shards(d / "codes", n_shards=2, per_shard=10, seed=4, prefix="code", image_size=None, codes_shape=(1, 4, 4))
    return d


def make_dm(world, sources=None, **kw):
    d = world
    sources = sources or [
        dict(name="gen", urls=f"{d}/train/shard-{{000000..000003}}.tar", task="generation"),
        dict(name="cap", urls=f"{d}/train/*.tar", task="understanding", format="caption", weight=1),
        dict(name="qa", urls=f"{d}/train/*.tar", task="understanding", format="qa", weight=3),
        dict(name="txt", urls=str(d / "text.jsonl"), task="text"),
    ]
    args = dict(tokenizer=str(d / "tok"), tokens_per_view=TPV, image_size=16, batch_size={"generation": 2, "understanding": 3, "text": 1},
                steps_per_epoch=6, shuffle_buffer=5, seed=0, max_tiles=2)
    args.update(kw)
    dm = MixedDataModule(sources=sources, **args)
    dm.setup("fit")
    return dm


def run(dm, n=None):
    """Iterate the train loader like Lightning does (commit via on_before_batch_transfer)."""
    out = []
    for i, batch in enumerate(dm.train_dataloader()):
        if n is not None and i >= n:
            break
        out.append(dm.on_before_batch_transfer(batch, 0))
    return out


def keys(batches):
    return [k for b in batches for k in b["keys"]]


def test_batches_follow_the_contract(world):
    dm = make_dm(world)
    batches = run(dm)
    assert len(batches) == 6
    for b in batches:
        assert b["task"] == ["generation"] * 2 + ["understanding"] * 3 + ["text"]
        assert "_stream" not in b
        B, T = b["input_ids"].shape
        assert b["labels"].shape == b["image_mask"].shape == b["attention_mask"].shape == b["position_ids"].shape == (B, T)
        assert b["pixel_values"].dtype == torch.uint8 and b["pixel_values"].shape[1:] == (3, 16, 16)
        assert int(b["image_mask"].sum()) == b["pixel_values"].shape[0] * TPV == b["image_loss_mask"].numel() * TPV
        assert int(b["image_loss_mask"].sum()) == 2  # one supervised view per generation row
        assert b["labels"][b["image_mask"]].eq(-100).all() and b["input_ids"][b["image_mask"]].eq(dm.tokenizer.pad_id).all()


def test_weights_mix_sources_within_a_task(world):
    dm = make_dm(world, steps_per_epoch=150)
    run(dm)
    consumed = {name: pos["emitted"] for name, pos in dm.state_dict()["lanes"][0].items()}
    # weight 3 vs 1 over 450 understanding draws: qa share 0.75 +- 0.02 (sd)
    assert 0.69 < consumed["qa"] / (consumed["qa"] + consumed["cap"]) < 0.81, consumed
    assert consumed["gen"] == 300 and consumed["txt"] == 150


def test_deterministic_for_a_seed(world):
    assert keys(run(make_dm(world))) == keys(run(make_dm(world)))
    assert keys(run(make_dm(world))) != keys(run(make_dm(world, seed=1)))


def test_ranks_read_disjoint_shards(world, monkeypatch):
    seen = {}
    for rank in (0, 1):
        monkeypatch.setattr(mixed, "_rank_world", lambda r=rank: (r, 2))
        src = [dict(name="gen", urls=f"{world}/train/*.tar", task="generation")]
        seen[rank] = {k.split("_")[0] for k in keys(run(make_dm(world, src, batch_size={"generation": 4})))}
    assert seen[0] and seen[1] and not seen[0] & seen[1], seen


def test_ranks_sharing_a_single_file_source_read_disjoint_lines(world, monkeypatch):
    """One text file for two ranks: each keeps every other line, so the ranks never train on the same line, and
    together (over enough steps to pass the file) they cover it."""
    src = [dict(name="txt", urls=str(world / "text.jsonl"), task="text")]
    seen = {}
    for rank in (0, 1):
        monkeypatch.setattr(mixed, "_rank_world", lambda r=rank: (r, 2))
        seen[rank] = set(keys(run(make_dm(world, src, batch_size={"text": 2}, steps_per_epoch=40))))
    assert seen[0] and seen[1] and not seen[0] & seen[1], seen
    lines = (world / "text.jsonl").read_text().splitlines()
    assert len(seen[0] | seen[1]) == len(lines) == 60


def test_workers_split_and_match_the_lane_order(world):
    """Two workers: batch b comes from lane b % 2, the shards of the two lanes are disjoint."""
    src = [dict(name="gen", urls=f"{world}/train/*.tar", task="generation")]
    batches = run(make_dm(world, src, num_workers=2, batch_size={"generation": 3}))
    assert len(batches) == 6
    lanes = [{k.split("_")[0] for k in b["keys"]} for b in batches]
    even, odd = set().union(*lanes[0::2]), set().union(*lanes[1::2])
    assert not even & odd, (even, odd)


def test_skips_are_counted_and_logged_once(world, caplog):
    d = world
    # a truncated copy of a shard and a missing shard in a list file
    data = open(f"{d}/train/shard-000000.tar", "rb").read()
    open(f"{d}/truncated.tar", "wb").write(data[: len(data) // 2 + 100])
    (d / "list.txt").write_text("bad/bad-000000.tar\nbad/bad-000001.tar\nmissing-000000.tar\ntruncated.tar\n")
    src = [dict(name="gen", urls=str(d / "list.txt"), task="generation"),
           dict(name="qa", urls=str(d / "list.txt"), task="understanding", format="qa")]
    with caplog.at_level("WARNING", logger="datamodules.mixed"):
        dm = make_dm(world, src, steps_per_epoch=12)
        batches = run(dm)
    assert len(batches) == 12 and all(len(b["keys"]) == 5 for b in batches)
    for reason in ("undecodable_image", "missing_caption", "malformed_json", "missing_shard", "truncated_tar"):
        assert dm.skipped[reason] > 0, dm.skipped
        assert sum(reason in r.message for r in caplog.records) == 1
    assert dm.skipped_total == sum(dm.skipped.values())
    assert not any(k.startswith("bad") and k.endswith("_00001") for k in keys(batches))  # the undecodable image never gets out


def test_source_that_yields_nothing_is_an_error(world):
    d = world
    write_shards(d / "allbad", n_shards=1, per_shard=4, prefix="ab", bad={"undecodable": [0, 1, 2, 3]})
    dm = make_dm(world, [dict(name="broken", urls=f"{d}/allbad/*.tar", task="generation")], batch_size={"generation": 2})
    it = dm.train_dataloader()
    it.dataset.max_failures = 50
    with pytest.raises(RuntimeError, match="'broken'"):
        next(iter(it))


@pytest.mark.parametrize("source,kw,match", [
    (dict(name="nofile", urls="/nonexistent/x-{0..3}.tar", task="generation"), {}, "'nofile'.*match no file"),
    (dict(name="w0", urls="TRAIN", task="generation", weight=0), {}, "'w0'.*weight 0"),
    (dict(name="g", urls="TRAIN", task="generation"), {"batch_size": {"generation": 0}}, r"batch_size\['generation'\]=0"),
    (dict(name="und", urls="TRAIN", task="understanding"), {"max_tiles": 0}, "'und'.*max_tiles=0"),
    (dict(name="bad_task", urls="TRAIN", task="captioning"), {}, "'bad_task'.*captioning"),
])
def test_bad_settings_refused_at_setup_naming_the_source(world, source, kw, match):
    source = {**source, "urls": source["urls"].replace("TRAIN", f"{world}/train/*.tar")}
    with pytest.raises(ValueError, match=match):
        make_dm(world, [source], **kw)


def test_pretokenized_shards_give_image_codes(world):
    src = [dict(name="gen", urls=f"{world}/codes/*.tar", task="generation"),
           dict(name="und", urls=f"{world}/codes/*.tar", task="understanding")]
    dm = make_dm(world, src)
    assert dm.use_codes
    b = run(dm, 1)[0]
    assert "pixel_values" not in b and b["image_codes"].dtype == torch.long and b["image_codes"].shape == (5, 4, 4)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_continues_the_stream(world, num_workers):
    full = run(make_dm(world, num_workers=num_workers, steps_per_epoch=7))
    dm = make_dm(world, num_workers=num_workers, steps_per_epoch=7)
    first = run(dm, 3)
    state = dm.state_dict()
    resumed = make_dm(world, num_workers=num_workers, steps_per_epoch=7)
    resumed.load_state_dict(state)
    rest = run(resumed)
    assert keys(first + rest) == keys(full)
    for a, b in zip(first + rest, full):
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["pixel_values"], b["pixel_values"])
    # the next epoch is a new stream
    nxt = run(resumed)
    assert len(nxt) == 7 and keys(nxt) != keys(full) and resumed.state_dict()["epoch"] == 1


def test_val_loader_reads_each_sample_once(world):
    src = [dict(name="v", urls=f"{world}/val/*.tar", task="understanding", format="qa")]
    dm = make_dm(world, val_sources=src)
    batches = list(dm.val_dataloader())
    ks = keys(batches)
    assert len(ks) == 10 and len(set(ks)) == 10 and [len(b["keys"]) for b in batches] == [3, 3, 3, 1]


@pytest.mark.parametrize("urls", ["val/val-000000.tar", "val/*.tar"], ids=["one-shard", "two-shards"])
def test_val_ranks_share_a_source_even_with_fewer_shards_than_ranks(world, monkeypatch, urls):
    """3 ranks: with fewer shards than ranks the val samples are dealt out one by one (a one-shard val set used
    to leave rank 1 with no batch at all, and the other ranks waiting in its collectives under FSDP); every
    sample is still read once over the ranks."""
    src = [dict(name="v", urls=f"{world}/{urls}", task="understanding", format="qa")]
    per_rank = []
    for rank in range(3):
        monkeypatch.setattr(mixed, "_rank_world", lambda r=rank: (r, 3))
        per_rank.append(keys(list(make_dm(world, val_sources=src).val_dataloader())))
    n = 5 if urls.endswith("000.tar") else 10
    assert all(per_rank) and sorted(k for ks in per_rank for k in ks) == sorted(set(k for ks in per_rank for k in ks))
    assert sum(map(len, per_rank)) == n and max(map(len, per_rank)) - min(map(len, per_rank)) <= 1


class _KeyRecorder(L.LightningModule):
    def __init__(self, crash_at: int | None = None):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.crash_at, self.seen = crash_at, []

    def training_step(self, batch, batch_idx):
        if self.crash_at is not None and self.global_step == self.crash_at:
            raise RuntimeError("simulated crash")
        self.seen.append(list(batch["keys"]))
        return (self.w * batch["input_ids"].float().mean()).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def test_lightning_run_killed_and_resumed_continues_the_stream(world, tmp_path):
    kw = dict(enable_progress_bar=False, enable_model_summary=False, logger=False, accelerator="cpu", num_sanity_val_steps=0)
    full = _KeyRecorder()
    L.Trainer(max_steps=10, default_root_dir=tmp_path / "full", enable_checkpointing=False, **kw).fit(full, make_dm(world, num_workers=2))

    ckpt = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=4, save_top_k=-1)
    crashed = _KeyRecorder(crash_at=5)
    with pytest.raises(RuntimeError, match="simulated crash"):
        L.Trainer(max_steps=10, default_root_dir=tmp_path / "a", callbacks=[ckpt], **kw).fit(crashed, make_dm(world, num_workers=2))
    path = next(p for p in os.listdir(tmp_path / "ck") if "step=4" in p)
    resumed = _KeyRecorder()
    L.Trainer(max_steps=10, default_root_dir=tmp_path / "b", enable_checkpointing=False, **kw).fit(
        resumed, make_dm(world, num_workers=2), ckpt_path=tmp_path / "ck" / path)
    assert crashed.seen[:4] + resumed.seen == full.seen
    assert len(full.seen) == 10 and Counter(map(tuple, full.seen[:6])) != Counter(map(tuple, full.seen[6:]))


def test_val_sources_take_turns_so_a_batch_cap_sees_every_task(world):
    """The tiny recipes cap validation at a few batches: with sources read one after the other, the cap was
    filled by the generation source alone and val/loss_text was never measured (logged as 0.0)."""
    src = [dict(name="gen", urls=f"{world}/val/*.tar", task="generation"),
           dict(name="qa", urls=f"{world}/val/*.tar", task="understanding", format="qa")]
    batches = list(make_dm(world, val_sources=src).val_dataloader())
    tasks = [set(b["task"]) for b in batches]
    assert tasks[:4] == [{"generation"}, {"understanding"}] * 2
    assert len(keys([b for b, t in zip(batches, tasks) if t == {"understanding"}])) == 10  # every sample, once
    capped = list(make_dm(world, val_sources=src, val_max_batches=2).val_dataloader())
    assert [set(b["task"]) for b in capped] == [{"generation"}, {"understanding"}]


def test_view_geometry_follows_the_model_when_the_recipe_leaves_it_out(world):
    """No image_size / tokens_per_view in the recipe: the DataModule takes the model's at setup (and keeps them out
    of its hyper-parameters, where Lightning would find a second image_size beside the model's)."""
    from types import SimpleNamespace

    from tests.test_system_helpers import tiny_model

    model = tiny_model(image_size=16, downsample=4, fold=(2, 2))  # 4x4 codes -> 4 folded tokens
    dm = MixedDataModule(sources=[dict(name="gen", urls=f"{world}/train/*.tar", task="generation")],
                         tokenizer=str(world / "tok"), batch_size={"generation": 2}, steps_per_epoch=1)
    assert "image_size" not in dm.hparams and "tokens_per_view" not in dm.hparams
    dm.trainer = SimpleNamespace(lightning_module=model)
    dm.setup("fit")
    assert (dm.image_size, dm.tokens_per_view) == (16, model.tokens_per_view) == (16, 4)
    batch = run(dm, 1)[0]
    assert batch["pixel_values"].shape[-2:] == (16, 16) and batch["image_mask"].sum(1).tolist() == [4, 4]
    assert dm.builder.question_first is False


def test_understanding_prompt_order_follows_the_model(world):
    """A model that reads the question first gets Q/A rows whose image slots follow the question's tokens."""
    from types import SimpleNamespace

    from tests.test_system_helpers import tiny_model

    firsts = {}
    for question_first in (False, True):
        dm = MixedDataModule(sources=[dict(name="qa", urls=f"{world}/train/*.tar", task="understanding", format="qa")],
                             tokenizer=str(world / "tok"), batch_size={"understanding": 3}, steps_per_epoch=1)
        dm.trainer = SimpleNamespace(lightning_module=tiny_model(image_size=16, downsample=4, fold=(2, 2),
                                                                 question_first=question_first))
        dm.setup("fit")
        batch = run(dm, 1)[0]
        firsts[question_first] = [int(row.nonzero()[0]) for row in batch["image_mask"]]
    # the same samples: the image slots start later by each question's length (+ its newline) when it comes first
    assert all(b > a + 3 for a, b in zip(firsts[False], firsts[True])), firsts


TWO_WEIGHTED = lambda d: [  # noqa: E731 - two weighted sources per task: each rank's lanes draw them differently
    dict(name="gen_a", urls=f"{d}/train/*.tar", task="generation", weight=1),
    dict(name="gen_b", urls=f"{d}/train/*.tar", task="generation", weight=2),
    dict(name="cap", urls=f"{d}/train/*.tar", task="understanding", format="caption", weight=1),
    dict(name="qa", urls=f"{d}/train/*.tar", task="understanding", format="qa", weight=3),
]


def _resume_worker(rank: int, world_size: int, port: int, d: str, out: str) -> None:
    import traceback
    from pathlib import Path

    import torch.distributed as dist

    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        kw = dict(sources=TWO_WEIGHTED(d), steps_per_epoch=7, batch_size={"generation": 3, "understanding": 3})
        full = keys(run(make_dm(Path(d), **kw)))
        dm = make_dm(Path(d), **kw)
        first = run(dm, 3)
        dm.skipped.update({"undecodable": rank + 1})  # what this rank's lanes skipped
        state = dm.state_dict()  # every rank calls it; the checkpoint keeps rank 0's copy
        if rank == 0:
            torch.save(state, Path(out) / "state.pt")
        dist.barrier()
        resumed = make_dm(Path(d), **kw)
        resumed.load_state_dict(torch.load(Path(out) / "state.pt", weights_only=False))
        result = {"full": full, "resumed": keys(first) + keys(run(resumed)), "saved_skips": state["skipped"],
                  "restored_skips": dict(resumed.skipped)}
    except BaseException:  # noqa: BLE001 - reported to the parent
        result = {"error": traceback.format_exc()}
    finally:
        dist.destroy_process_group()
    torch.save(result, Path(out) / f"rank{rank}.pt")


@pytest.mark.distributed
@pytest.mark.timeout(180)
def test_two_rank_resume_continues_every_rank_stream(world, tmp_path):
    """2 gloo ranks, two weighted sources per task, a checkpoint after 3 batches holding rank 0's copy of the state:
    on every rank the resumed run's batches are those of the uninterrupted run, and its skip counts its own (the
    checkpoint's `skipped` their sum)."""
    from tests.distributed_worker import free_port, start_ranks

    start_ranks(_resume_worker, (2, free_port(), str(world), str(tmp_path)), 2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert all("error" not in r for r in ranks), [r.get("error") for r in ranks]
    assert ranks[0]["full"] != ranks[1]["full"]  # the ranks read different streams
    for rank, r in enumerate(ranks):
        assert r["resumed"] == r["full"]
        assert r["restored_skips"] == {"undecodable": rank + 1} and r["saved_skips"] == {"undecodable": 3}


def test_skip_counts_keep_their_total_at_another_world_size():
    from collections import Counter

    from synergen_lightning.data.sources import restored_skips, skip_state

    state = skip_state(Counter(), [{"undecodable": 1}, {"undecodable": 2, "no_caption": 1}])
    assert state["skipped"] == {"undecodable": 3, "no_caption": 1}
    assert restored_skips(state, 1, 2) == Counter({"undecodable": 2, "no_caption": 1})
    at_three = [restored_skips(state, r, 3) for r in range(3)]  # rank 0 carries the sum
    assert sum(at_three, Counter()) == Counter(state["skipped"]) and at_three[1] == at_three[2] == Counter()
    assert restored_skips(skip_state(Counter(a=2), None), 0, 1) == Counter(a=2)


def test_resume_at_another_world_size_goes_on_from_the_epochs_batch_with_fresh_lanes(world, monkeypatch, caplog):
    """Lightning's loop resumes at the checkpoint's batch whatever the world size: the stream goes on from there (its
    lanes, which differ, read afresh), so the epoch ends where Lightning's does, and an epoch's last checkpoint goes
    on to the next epoch instead of replaying it."""
    dm = make_dm(world)
    run(dm, 3)
    state = dm.state_dict()
    monkeypatch.setattr(mixed, "_rank_world", lambda: (0, 2))
    resumed = make_dm(world)
    resumed.load_state_dict(state)
    assert "world size changed from 1 to 2" in caplog.text and "goes on from batch 3" in caplog.text
    assert (resumed.state_dict()["batches"], resumed.state_dict()["epoch"], resumed.state_dict()["lanes"]) == (3, 0, {})
    assert len(run(resumed)) == 6 - 3  # the rest of the epoch (steps_per_epoch 6)
    monkeypatch.setattr(mixed, "_rank_world", lambda: (0, 1))
    done = make_dm(world)
    run(done)  # a whole epoch
    monkeypatch.setattr(mixed, "_rank_world", lambda: (0, 2))
    nxt = make_dm(world)
    nxt.load_state_dict(done.state_dict())
    run(nxt, 1)
    assert nxt.state_dict()["epoch"] == 1  # the next epoch, not the finished one again


def test_fewer_shards_than_lanes_is_one_warning_per_source(world, monkeypatch, caplog):
    monkeypatch.setattr(mixed, "_rank_world", lambda: (0, 4))
    dm = make_dm(world, num_workers=2)  # 8 lanes; the train sources have 4 shards, the text source 1
    dm.train_dataloader()
    lines = [r.getMessage() for r in caplog.records if "lanes" in r.getMessage()]
    assert len(lines) == 4 and all("for 8 lanes (4 ranks x 2 workers)" in ln for ln in lines), lines


def test_shards_that_do_not_divide_among_the_lanes_weigh_alike(world, monkeypatch):
    """4 shards of 10 samples over 3 ranks: each rank consumes 120 samples, 12 shard reads, so 36 reads in all, 9
    rounds of the 4 shards: every shard gives exactly 90 samples (a fixed partition would give two lanes one shard
    each and read those twice as often as the other two)."""
    src = [dict(name="gen", urls=f"{world}/train/*.tar", task="generation")]
    per_shard: Counter = Counter()
    for rank in range(3):
        monkeypatch.setattr(mixed, "_rank_world", lambda r=rank: (r, 3))
        dm = make_dm(world, src, batch_size={"generation": 3}, steps_per_epoch=40)
        per_shard.update(k.split("_")[0] for k in keys(run(dm)))
    assert per_shard == dict.fromkeys(per_shard, 90) and len(per_shard) == 4, per_shard


def test_the_lanes_of_a_round_read_different_shards(world, monkeypatch):
    """2 ranks, 4 shards: the first round's 4 reads (2 per rank, 20 samples each) cover every shard once."""
    src = [dict(name="gen", urls=f"{world}/train/*.tar", task="generation")]
    seen = {}
    for rank in (0, 1):
        monkeypatch.setattr(mixed, "_rank_world", lambda r=rank: (r, 2))
        batches = run(make_dm(world, src, batch_size={"generation": 4}), n=5)
        seen[rank] = Counter(k.split("_")[0] for k in keys(batches))
    assert sorted(seen[0].values()) == sorted(seen[1].values()) == [10, 10] and not set(seen[0]) & set(seen[1])
    assert len(set(seen[0]) | set(seen[1])) == 4


# ---- length buckets
@pytest.fixture(scope="module")
def mixed_lengths(world):
    """Understanding rows (1 or 2 tiles) and text lines of 2 to 60 phrases: rows of very different lengths per task."""
    import json
    import random

    rng = random.Random(0)
    path = world / "mixed_lengths.jsonl"
    with path.open("w") as f:
        for _ in range(80):
            words = [rng.choice(["red circle", "blue square", "green star"]) for _ in range(rng.choice([2, 4, 30, 60]))]
            f.write(json.dumps({"text": " ".join(words)}) + "\n")
    return [dict(name="qa", urls=f"{world}/train/*.tar", task="understanding", format="qa"),
            dict(name="txt", urls=str(path), task="text")]


BUCKET_ARGS = dict(steps_per_epoch=16, batch_size={"understanding": 2, "text": 4}, max_seq_len=256)


def padded_tokens(batches) -> int:
    return sum(b["input_ids"].numel() - sum(b["row_tokens"]) for b in batches)


def rows(batches) -> Counter:
    return Counter((k, tuple(ids[:n].tolist())) for b in batches
                   for k, ids, n in zip(b["keys"], b["input_ids"], b["row_tokens"]))


def test_length_buckets_pad_less_and_use_every_row_once(world, mixed_lengths, monkeypatch):
    plain = run(make_dm(world, mixed_lengths, **BUCKET_ARGS))
    bucketed = run(make_dm(world, mixed_lengths, bucket_batches=8, **BUCKET_ARGS))
    assert rows(bucketed) == rows(plain)  # the same rows, each once, only grouped otherwise
    for b in bucketed:
        assert b["task"] == ["understanding"] * 2 + ["text"] * 4  # every batch keeps the per-task rows
        assert b["source"] == ["qa"] * 2 + ["txt"] * 4
    assert padded_tokens(bucketed) < 0.6 * padded_tokens(plain), (padded_tokens(bucketed), padded_tokens(plain))

    # 2 ranks: a synchronised step lasts as long as the longer of the ranks' batches; the bucket order is shared
    step_length = {}
    for g in (1, 8):
        lengths = []
        for rank in range(2):
            monkeypatch.setattr(mixed, "_rank_world", lambda rank=rank: (rank, 2))
            lengths.append([b["input_ids"].shape[1] for b in run(make_dm(world, mixed_lengths, bucket_batches=g, **BUCKET_ARGS))])
        assert lengths[0] != lengths[1]  # each rank its own rows
        step_length[g] = sum(map(max, zip(*lengths)))
    assert step_length[8] < 0.8 * step_length[1], step_length


def test_packed_rows_hold_the_same_samples_in_fewer_fuller_rows(world, mixed_lengths):
    plain = run(make_dm(world, mixed_lengths, **BUCKET_ARGS))
    packed = run(make_dm(world, mixed_lengths, pack_rows=True, **BUCKET_ARGS))

    def samples(batch):  # (key, ids) of each sample, read back from its document in the packed rows
        out = []
        for r in range(batch["input_ids"].shape[0]):
            docs = batch["document_ids"][r]
            for d in range(int(docs.max()) + 1):
                out.append(tuple(batch["input_ids"][r][docs == d].tolist()))
        return out

    for p, b in zip(packed, plain, strict=True):
        assert sorted(p["keys"]) == sorted(b["keys"]) and sorted(p["source"]) == sorted(b["source"])
        assert dict(zip(p["keys"], p["source"])) == dict(zip(b["keys"], b["source"]))  # each sample keeps its source
        assert Counter(samples(p)) == Counter(tuple(ids[:n].tolist()) for ids, n in zip(b["input_ids"], b["row_tokens"]))
        assert p["input_ids"].shape[1] <= 256
    assert sum(b["input_ids"].shape[0] for b in packed) < sum(b["input_ids"].shape[0] for b in plain)
    assert padded_tokens(packed) < 0.5 * padded_tokens(plain), (padded_tokens(packed), padded_tokens(plain))
    val = next(iter(make_dm(world, pack_rows=True, val_sources=[dict(name="v", urls=f"{world}/val/*.tar",
                                                                        task="understanding", format="qa")]).val_dataloader()))
    assert "document_ids" in val and val["input_ids"].shape[0] < len(val["keys"])


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_inside_a_length_bucket_group(world, mixed_lengths, num_workers):
    """Resumed after 3 and after 9 batches (inside a group of 4 of a lane's batches): the run goes on with exactly the
    batches of the uninterrupted one (the last group is cut short by the epoch's end)."""
    kw = dict(BUCKET_ARGS, steps_per_epoch=14, bucket_batches=4, num_workers=num_workers)
    full = run(make_dm(world, mixed_lengths, **kw))
    for stop in (3, 9):
        dm = make_dm(world, mixed_lengths, **kw)
        first = run(dm, stop)
        resumed = make_dm(world, mixed_lengths, **kw)
        resumed.load_state_dict(dm.state_dict())
        rest = run(resumed)
        assert keys(first + rest) == keys(full)
        for a, b in zip(first + rest, full):
            assert torch.equal(a["input_ids"], b["input_ids"])


def test_changed_bucket_batches_go_on_from_the_epochs_batch(world, mixed_lengths, caplog):
    dm = make_dm(world, mixed_lengths, bucket_batches=4, **BUCKET_ARGS)
    run(dm, 3)
    resumed = make_dm(world, mixed_lengths, bucket_batches=2, **BUCKET_ARGS)
    resumed.load_state_dict(dm.state_dict())
    assert len(run(resumed)) == BUCKET_ARGS["steps_per_epoch"] - 3
    assert "bucket_batches changed from 4 to 2" in caplog.text


@pytest.mark.parametrize("urls", ["val/val-000000.tar", "val/*.tar"], ids=["one-shard", "two-shards"])
def test_capped_validation_runs_as_many_batches_on_every_rank(world, monkeypatch, urls, caplog):
    """Ranks whose share of the val samples differs (uncapped, a batch apart or more: here 7 ranks over 5 or 10
    samples, some with none of their own) run the same number of batches when validation is capped: under FSDP2 the rank that finished first
    would wait in a collective the others, still in a forward, never join. A share that runs out is read again, an
    empty one is the whole source; without a cap rank 0 says so."""
    import logging
    import types

    src = [dict(name="v", urls=f"{world}/{urls}", task="understanding", format="qa")]
    counts = []
    for rank in range(7):
        monkeypatch.setattr(mixed, "_rank_world", lambda r=rank: (r, 7))
        dm = make_dm(world, val_sources=src)
        dm.trainer = types.SimpleNamespace(limit_val_batches=3)  # the trainer's cap, as a count
        counts.append(len(list(dm.val_dataloader())))
    assert counts == [3] * 7
    monkeypatch.setattr(mixed, "_rank_world", lambda: (6, 7))
    assert len(list(make_dm(world, val_sources=src, val_max_batches=2).val_dataloader())) == 2
    monkeypatch.setattr(mixed, "_rank_world", lambda: (0, 7))
    with caplog.at_level(logging.WARNING):
        list(make_dm(world, val_sources=src).val_dataloader())
    assert "has no cap on its batches" in caplog.text


def test_capped_validation_counts_each_sample_once_over_the_ranks(world, monkeypatch):
    """7 ranks over 5 val samples, 3 batches each: the batches a rank reads again to keep pace are marked
    `val_repeat` (they run, and weigh nothing in the metrics); the unmarked ones hold each sample once."""
    import types

    src = [dict(name="v", urls=f"{world}/val/val-000000.tar", task="understanding", format="qa")]
    counted, ran = [], []
    for rank in range(7):
        monkeypatch.setattr(mixed, "_rank_world", lambda r=rank: (r, 7))
        dm = make_dm(world, val_sources=src, batch_size={"generation": 1, "understanding": 1, "text": 1})
        dm.trainer = types.SimpleNamespace(limit_val_batches=3)
        for b in dm.val_dataloader():
            ran += b["keys"]
            counted += [] if b.get("val_repeat") else b["keys"]
    assert len(ran) == 21 and len(set(ran)) == 5  # every rank ran 3 batches, most of them read again
    assert sorted(counted) == sorted(set(ran))  # the counted ones: each sample once


def test_a_repeated_val_batch_runs_and_weighs_nothing():
    from synergen_lightning.data.batch import add_indices
    from tests.test_system_helpers import make_batch, tiny_model

    model = tiny_model(stage="full").eval()
    first = add_indices(make_batch(["generation", "understanding"], seed=1))
    again = {**add_indices(make_batch(["text", "generation"], seed=2)), "val_repeat": True}
    with torch.no_grad():
        model.validation_step(first, 0)
        alone = [m.compute().clone() for m in (model.val_loss, model.llm.val_loss, model.head.val_loss)]
        model.validation_step(again, 1)
    assert [m.compute() for m in (model.val_loss, model.llm.val_loss, model.head.val_loss)] == alone
    assert torch.isclose(alone[0], model(first)["loss"].detach())


def test_streams_take_their_rank_where_they_are_built_not_in_their_workers(world, monkeypatch):
    """A DataLoader worker started by spawn or forkserver (Python 3.14's default on Linux) has no process group, and
    would take every rank for rank 0 (every rank reading rank 0's lanes, the same batches): the streams read rank
    and world in the process that builds them."""
    from itertools import islice

    def first_keys(built_as, iterated_as):
        monkeypatch.setattr(mixed, "_rank_world", lambda: built_as)
        loader = make_dm(world).train_dataloader()
        monkeypatch.setattr(mixed, "_rank_world", lambda: iterated_as)  # what a spawned worker would see
        return keys(list(islice(iter(loader), 3)))

    assert first_keys((1, 2), (0, 1)) == first_keys((1, 2), (1, 2)) != first_keys((0, 2), (0, 2))
