"""Shards from anywhere: every URL form (local paths, file://, globs, braces, directories, list files, `pipe:`,
`http://` from a server this test starts) reads the same samples; cut and dead transfers are retried with back-off,
then skipped and counted (`unreachable_shard`); a stage-1 MixedDataModule streamed over HTTP and `pipe:` gives the
local run's batches, key for key, and resumes mid-epoch the same, in a Lightning run of the tiny system too (killed
after a checkpoint and resumed; and with a dead shard, counted once per read)."""

from __future__ import annotations

import shutil

import lightning as L
import pytest

from datamodules.mixed import MixedDataModule
from synergen_lightning.data.sources import SkipCounter, expand_urls, finite_samples, url_name
from synergen_lightning.text_tokenizer import train_bpe
from synthetic_shards import write_shards, write_text_jsonl
from tests.shard_server import ShardServer
from tests.test_datamodule_mixed import keys, make_dm, run


@pytest.fixture(autouse=True)
def _fast_retries(monkeypatch):
    monkeypatch.setenv("SYNERGEN_SHARD_RETRIES", "2")
    monkeypatch.setenv("SYNERGEN_SHARD_BACKOFF", "0.01")
    monkeypatch.setenv("SYNERGEN_SHARD_TIMEOUT", "10")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("remote")
    write_shards(d / "train", n_shards=20, per_shard=4, seed=1)
    write_text_jsonl(d / "text.jsonl", 30)
    train_bpe([str(d / "text.jsonl")], 400, d / "tok")
    return d


@pytest.fixture(scope="module")
def server(shards):
    with ShardServer(shards) as s:
        yield s


def read(urls, counter=None):
    counter = counter if counter is not None else SkipCounter()
    return [s["__key__"] for s in finite_samples(expand_urls(urls), counter)], counter


def test_every_url_form_reads_the_same_samples(shards, server, tmp_path):
    d = shards / "train"
    expected, _ = read([str(p) for p in sorted(d.glob("*.tar"))])
    (tmp_path / "local.txt").write_text("\n".join(p.name for p in sorted(d.glob("*.tar"))))
    shutil.copy(tmp_path / "local.txt", d / "list.txt")
    (tmp_path / "remote.txt").write_text("# mirrors\n" + "\n".join(f"{server.url}/train/{p.name}"
                                                                   for p in sorted(d.glob("*.tar"))))
    forms = [f"{d}/shard-{{000000..000019}}.tar", f"{d}/*.tar", str(d), f"file://{d}/shard-{{000000..000019}}.tar",
             str(d / "list.txt"), f"pipe:cat {d}/shard-{{000000..000019}}.tar",
             f"{server.url}/train/shard-{{000000..000019}}.tar", str(tmp_path / "remote.txt")]
    for form in forms:
        got, counter = read(form)
        assert got == expected and not counter.counts, form
    text = shards / "text.jsonl"
    local, _ = read(str(text))
    assert len(local) == 30
    for form in (f"pipe:cat {text}", f"{server.url}/text.jsonl"):
        assert read(form)[0] == local, form


def test_cut_and_dead_transfers_are_retried_then_skipped_and_counted(shards, server):
    d = shards / "train"
    names = sorted(p.name for p in d.glob("*.tar"))
    by_shard = {n: read(str(d / n))[0] for n in names}
    urls = [f"{server.url}/train/{n}" for n in names]
    urls[3] = f"{server.url}/dead/train/{names[3]}"  # 503 on every try
    urls[7] = f"{server.url}/cut/train/{names[7]}"  # dropped half-way on every try
    urls[11] = f"{server.url}/flaky/train/{names[11]}"  # dropped once, whole on the retry
    urls[15] = f"pipe:sh -c 'head -c 3000 {d / names[15]}; exit 1'"  # a command that fails half-way
    urls[18] = f"{server.url}/train/no-such-shard.tar"  # 404: not retried
    got, counter = read(urls)
    assert counter.counts == {"unreachable_shard": 4}
    lost = {names[i] for i in (3, 7, 15, 18)}
    for n in names:
        if n not in lost:
            assert set(by_shard[n]) <= set(got), n
    assert not set(by_shard[names[3]]) & set(got)
    cut = [k for k in got if k in set(by_shard[names[7]])]
    assert cut == by_shard[names[7]][: len(cut)] and len(cut) < 4  # what came before the cut, once
    assert got.count(by_shard[names[11]][0]) == 1  # the retried shard's first samples are not repeated
    assert server.requests[f"dead/train/{names[3]}"] == 3 and server.requests[f"cut/train/{names[7]}"] == 3
    assert server.requests["train/no-such-shard.tar"] == 1
    assert "HTTP 503" in counter.examples["unreachable_shard"]  # the first loss, with its cause


def test_a_complete_transfer_of_a_cut_tar_is_a_truncated_shard(shards, tmp_path):
    src = shards / "train" / "shard-000000.tar"
    got, counter = read(f"pipe:head -c 3000 {src}")  # exits 0: the shard itself is cut
    assert counter.counts == {"truncated_tar": 1} and got == read(str(src))[0][: len(got)]


def test_fsspec_url_without_its_backend_names_the_package():
    pytest.importorskip("fsspec")
    try:
        import s3fs  # noqa: F401
        pytest.skip("s3fs is installed")
    except ImportError:
        pass
    with pytest.raises(ValueError, match=r"source 'gen': s3:// URLs need s3fs .*pip install s3fs"):
        expand_urls("s3://bucket/shard-{000000..000003}.tar", "gen")


def test_url_names():
    assert url_name("https://h/a/shard-1.tar?sig=x") == "shard-1.tar"
    assert url_name("pipe:curl -s -L 'https://h/a/shard-2.tar'") == "shard-2.tar"
    assert url_name("pipe:aws s3 cp s3://b/shard-3.tar -") == "shard-3.tar"


STAGE1 = dict(batch_size={"generation": 2, "understanding": 3}, steps_per_epoch=7, shuffle_buffer=4)


def stage1_sources(gen: str, und: str) -> list[dict]:
    return [dict(name="gen", urls=gen, task="generation"),
            dict(name="cap", urls=und, task="understanding", format="caption"),
            dict(name="qa", urls=und, task="understanding", format="qa", weight=2)]


def test_stage1_stream_over_http_and_pipe_matches_local_and_resumes(shards, server):
    d = shards / "train"
    local = stage1_sources(f"{d}/shard-{{000000..000019}}.tar", f"{d}/*.tar")
    remote = stage1_sources(f"{server.url}/train/shard-{{000000..000019}}.tar",
                            f"pipe:cat {d}/shard-{{000000..000019}}.tar")
    expected = run(make_dm(shards, local, **STAGE1))
    full = run(make_dm(shards, remote, **STAGE1))
    assert keys(full) == keys(expected)
    dm = make_dm(shards, remote, **STAGE1)
    first = run(dm, 3)
    resumed = make_dm(shards, remote, **STAGE1)
    resumed.load_state_dict(dm.state_dict())
    assert keys(first + run(resumed)) == keys(expected)


def test_stream_with_lost_shards_runs_on_and_counts_each_loss(shards, server, tmp_path):
    """2 of 20 shards lost over HTTP (one dead, one cut half-way): the run goes on, and the counts equal those of
    the same stream read locally with that shard missing and that shard cut at the same byte."""
    d = shards / "train"
    names = sorted(p.name for p in d.glob("*.tar"))
    cut_copy = tmp_path / "cut"
    cut_copy.mkdir()
    for n in names:
        shutil.copy(d / n, cut_copy / n)
    (cut_copy / names[2]).unlink()
    data = (d / names[9]).read_bytes()
    (cut_copy / names[9]).write_bytes(data[: len(data) // 2])
    remote = [f"{server.url}/{'dead/' if i == 2 else 'cut/' if i == 9 else ''}train/{n}" for i, n in enumerate(names)]
    local = [str(cut_copy / n) for n in names]
    settings = dict(STAGE1, steps_per_epoch=30)
    dm_r = make_dm(shards, stage1_sources(remote, remote), **settings)
    dm_l = make_dm(shards, stage1_sources(local, local), **settings)
    got, expected = run(dm_r), run(dm_l)
    assert len(got) == 30 and keys(got) == keys(expected)
    assert dm_r.skipped["unreachable_shard"] == dm_l.skipped["missing_shard"] + dm_l.skipped["truncated_tar"] > 0


def test_eval_suites_read_val_shards_over_http(shards, server):
    from synergen_lightning.eval.suites import load_qa_items, load_reference_images

    local = load_qa_items(f"{shards}/train/shard-{{000000..000003}}.tar")
    remote = load_qa_items(f"{server.url}/train/shard-{{000000..000003}}.tar")
    assert [(i["key"], i["question"]) for i in remote] == [(i["key"], i["question"]) for i in local]
    captions, views = load_reference_images(f"pipe:cat {shards}/train/shard-000000.tar", 16, 3)
    assert len(captions) == 3 and views.shape == (3, 3, 16, 16)


# ---------------------------------------------------------------------------------------- a Lightning run over remote shards
class _Recorder(L.Callback):
    """The keys and token ids of every step's batch; raises at `crash_at` (a run killed mid-epoch)."""

    def __init__(self, crash_at: int | None = None):
        self.crash_at, self.keys, self.ids = crash_at, [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.crash_at:
            raise RuntimeError("simulated crash")
        self.keys.append(list(batch["keys"]))
        self.ids.append(batch["input_ids"].tolist())


def _system():
    from tests.test_generation import CharTokenizer, GridTokenizer
    from tests.test_system_helpers import tiny_model

    model = tiny_model(stage="stage1")
    model.set_text_tokenizer(CharTokenizer())
    model.set_image_tokenizer(GridTokenizer())  # 16-px views -> 4x4 codes of the tiny model's 16
    return model


def _dm(sources, steps: int) -> MixedDataModule:
    """The tiny system's data: an epoch of exactly `steps` batches, so every batch read is trained on."""
    from tests.test_generation import CharTokenizer

    # image_input given: "auto" would probe each source's first shard at setup, a read outside the training stream
    return MixedDataModule(sources=sources, tokenizer=CharTokenizer(), image_input="pixels", image_size=16,
                           tokens_per_view=4, **dict(STAGE1, steps_per_epoch=steps))


def _fit(sources, steps: int, root, ckpt_every: int | None = None, crash_at: int | None = None,
         resume: str | None = None):
    """`steps` steps of the tiny system on `sources`: (recorder, datamodule, trainer)."""
    rec = _Recorder(crash_at)
    callbacks = [rec] + ([L.pytorch.callbacks.ModelCheckpoint(dirpath=root / "ck", every_n_train_steps=ckpt_every,
                                                              save_top_k=-1)] if ckpt_every else [])
    dm = _dm(sources, steps)
    trainer = L.Trainer(accelerator="cpu", max_steps=steps, limit_val_batches=0, logger=False, callbacks=callbacks,
                        enable_checkpointing=bool(ckpt_every), enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=root)
    try:
        trainer.fit(_system(), datamodule=dm, ckpt_path=resume)
    except RuntimeError as exc:
        if "simulated crash" not in str(exc):
            raise
    return rec, dm, trainer


def test_lightning_run_over_http_and_pipe_resumes_and_survives_a_dead_shard(shards, server, tmp_path):
    """The tiny system trained by Lightning on shards served over HTTP (generation) and `pipe:cat` (understanding):
    the batches of the local files; killed after a checkpoint and resumed, it sees the uninterrupted run's samples,
    batch for batch. With 1 shard of the 20 dead (HTTP 503), the run finishes and `unreachable_shard` counts each read
    of it, as many as the server saw."""
    d = shards / "train"
    remote = stage1_sources(f"{server.url}/train/shard-{{000000..000019}}.tar",
                            f"pipe:cat {d}/shard-{{000000..000019}}.tar")
    local = stage1_sources(f"{d}/shard-{{000000..000019}}.tar", f"{d}/*.tar")
    steps = 6
    before = dict(server.requests)  # the module's server: other tests' requests too
    full, dm, trainer = _fit(remote, steps, tmp_path / "full")
    assert trainer.global_step == steps and not dm.skipped
    dm = _dm(local, steps)
    dm.setup("fit")
    from_local = run(dm)
    assert full.keys == [b["keys"] for b in from_local] and full.ids == [b["input_ids"].tolist() for b in from_local]

    crashed, _, _ = _fit(remote, steps, tmp_path / "a", ckpt_every=3, crash_at=4)
    ckpt = next((tmp_path / "a" / "ck").glob("*step=3.ckpt"))
    resumed, _, trainer = _fit(remote, steps, tmp_path / "b", resume=str(ckpt))
    assert trainer.global_step == steps
    assert crashed.keys[:3] + resumed.keys == full.keys
    assert crashed.ids[:3] + resumed.ids == full.ids  # the same rows, captions and questions, not only the same keys

    # a shard the generation source read over HTTP above, dead now: the same seed draws it again at the same point
    read = sorted(p.split("/")[-1] for p, n in server.requests.items()
                  if p.startswith("train/shard-") and n > before.get(p, 0))
    dead = f"dead/train/{read[0]}"
    urls = [f"{server.url}/{'dead/' if n == read[0] else ''}train/{n}" for n in sorted(p.name for p in d.glob("*.tar"))]
    dead_before = server.requests[dead]
    lost, dm, trainer = _fit(stage1_sources(urls, f"pipe:cat {d}/shard-{{000000..000019}}.tar"), steps,
                             tmp_path / "dead")
    tries = 1 + 2  # SYNERGEN_SHARD_RETRIES=2 (the autouse fixture)
    reads_of_dead, rest = divmod(server.requests[dead] - dead_before, tries)
    assert trainer.global_step == steps and len(lost.keys) == steps
    assert rest == 0 and reads_of_dead >= 1 and dm.skipped == {"unreachable_shard": reads_of_dead}
