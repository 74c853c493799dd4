"""`synergen eval report` / `eval cosine` on a tiny random SynerGenVL and a tiny shape world."""

import copy
import json

import pytest
import torch
from PIL import Image

from synergen_lightning.eval.analysis import layer_cosine_similarity
from synergen_lightning.eval.cli import cosine_main, report_main
from synergen_lightning.eval.fid import EvalInputError
from synergen_lightning.eval.report import _fmt, check_system_checkpoint, read_scalars
from synergen_lightning.llm import evaluate_text_skill
from synergen_lightning.world.scorer import score_images
from tests.test_generation import _model


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from synergen_lightning.world.shards import SynthConfig, write_dataset

    root = tmp_path_factory.mktemp("world") / "tiny"
    write_dataset(SynthConfig(out=root, num_samples=12, shard_size=50, canvas=48, val_fraction=0.5, num_eval_prompts=6,
                              workers=1, progress=False))
    return root


@pytest.fixture(scope="module")
def logdir(tmp_path_factory):
    from torch.utils.tensorboard import SummaryWriter

    d = tmp_path_factory.mktemp("run")
    w = SummaryWriter(str(d))
    for step in range(0, 50, 10):
        w.add_scalar("train/loss", 5.0 - step / 20, step)
        w.add_scalar("train/loss_image", 3.0 - step / 40, step)
        w.add_scalar("val/loss", 4.0 - step / 30, step)
    w.close()
    return d


def _args(world, logdir, out, *extra):
    return ["--ckpt", "in-memory.ckpt", "--data", str(world), "--out", str(out), "--logdir", str(logdir),
            "--num-geneval", "3", "--num-und", "4", "--max-text", "3", "--batch-size", "4",
            "--grid-prompt", "a red circle", "--grid-prompt", "a blue square", "--grid-seeds", "0,1", "--device", "cpu", *extra]


def test_report_writes_json_md_grid_and_curves(world, logdir, tmp_path):
    model = _model()
    out = tmp_path / "report"
    assert report_main(_args(world, logdir, out, "--suite", "geneval,und,text"), model=model) == 0
    assert sorted(p.name for p in out.iterdir()) == ["curves_train.png", "curves_val.png", "report.json", "report.md",
                                                     "samples.png"]
    rep = json.loads((out / "report.json").read_text())
    # GenEval: the same seeds regenerate the same images; score them independently
    prompts = [json.loads(line) for line in (world / "eval_prompts.jsonl").read_text().splitlines()[:3]]
    images = model.generate_images([p["prompt"] for p in prompts], num=1, seed=0, batch_size=4)
    assert rep["results"]["geneval"] == score_images(images, prompts)
    # text: the trunk's skill accuracy, computed directly
    assert rep["results"]["text"]["accuracy"] == evaluate_text_skill(model.llm.model, model.text_tokenizer,
                                                                     world / "text" / "skill_val.jsonl", max_examples=3)
    und = rep["results"]["und"]
    assert und["num_items"] == 4 and 0.0 <= und["accuracy"] <= 1.0 and und["examples"]
    assert 0.0 < und["prior_accuracy"] <= 1.0 and set(und["top_answer_share"]) == set(und["per_kind"])
    # grid: 2 prompts x 2 seeds of 16-px images with 2-px borders
    assert Image.open(out / "samples.png").size == (2 * 18 + 2, 2 * 18 + 2)
    md = (out / "report.md").read_text()
    for needle in ("## GenEval", "## Understanding", "## Text skill retention", "![samples](samples.png)",
                   "![train](curves_train.png)", "| overall |", "| question-type prior: ",
                   "| share of the most common answer |"):
        assert needle in md, needle
    g = rep["results"]["geneval"]
    assert f"{_fmt(g['objects_per_image'])} shapes accepted, {_fmt(g['rejected_per_image'])} coloured blobs rejected" in md
    assert not list(tmp_path.glob(".report.partial-*"))
    # a second run into a full directory needs --overwrite
    with pytest.raises(SystemExit):
        report_main(_args(world, logdir, out, "--suite", "text"), model=model)
    assert report_main(_args(world, logdir, out, "--suite", "text", "--overwrite"), model=model) == 0
    assert set(json.loads((out / "report.json").read_text())["results"]) == {"text"}


def test_read_scalars_from_event_files(logdir):
    s = read_scalars(logdir)
    assert set(s) == {"train/loss", "train/loss_image", "val/loss"}
    assert s["train/loss"] == [(0, 5.0), (10, 4.5), (20, 4.0), (30, 3.5), (40, 3.0)]


def test_text_retention_against_the_base_llm(world, logdir, tmp_path):
    model = _model()
    base = copy.deepcopy(model.llm.model)
    with torch.no_grad():  # a "base" that differs from the trunk
        for p in base.parameters():
            p.add_(0.05 * torch.randn_like(p))
    from synergen_lightning.eval.suites import text_suite

    skill = world / "text" / "skill_val.jsonl"
    res = text_suite(model, skill, base_llm=base, max_examples=5)
    base_acc = evaluate_text_skill(base, model.text_tokenizer, skill, max_examples=5)
    assert res["base_accuracy"] == base_acc
    assert res["retention"] == (res["accuracy"] / base_acc if base_acc > 0 else None)
    assert text_suite(model, skill, base_llm=copy.deepcopy(model.llm.model), max_examples=5).get("retention") in (1.0, None)


def _fails(capsys, argv, model, match):
    with pytest.raises(SystemExit) as e:
        report_main(argv, model=model)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert match in err, err
    return err


def test_bad_inputs_leave_no_report(world, logdir, tmp_path, capsys):
    model = _model()
    out = tmp_path / "report"
    empty = tmp_path / "empty"
    empty.mkdir()
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"x")  # only its existence is checked before the image inputs
    _fails(capsys, _args(world, logdir, out, "--suite", "fid", "--inception-weights", str(weights), "--fid-reference",
                         str(empty), "--fid-prompts", str(world / "eval_prompts.jsonl")), model, "has no images")
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    Image.new("RGB", (16, 16)).save(mixed / "0.png")
    Image.new("RGB", (8, 8)).save(mixed / "1.png")
    _fails(capsys, _args(world, logdir, out, "--suite", "fid", "--inception-weights", str(weights), "--fid-reference",
                         str(mixed), "--fid-prompts", str(world / "eval_prompts.jsonl")), model, "mixed sizes")
    bad_prompts = tmp_path / "prompts.jsonl"
    lines = (world / "eval_prompts.jsonl").read_text().splitlines()
    bad_prompts.write_text("\n".join(lines[:2] + ['{"tag": "colors", "prompt": '] + lines[2:]) + "\n")
    _fails(capsys, _args(world, logdir, out, "--suite", "geneval", "--eval-prompts", str(bad_prompts)), model, "line 3")
    _fails(capsys, _args(world, logdir, out, "--suite", "fid", "--inception-weights", str(tmp_path / "none.pth")),
           model, "fid_inception_weights")
    _fails(capsys, _args(world, logdir, out, "--suite", "und", "--val-shards", str(tmp_path / "nope-*.tar")), model,
           "match no file")
    assert not out.exists() and not list(tmp_path.glob(".report.partial-*"))


def test_val_shards_take_every_url_form_the_readers_take(world, tmp_path):
    """The report's input check and its readers expand val shards the same way: braces and list files pass both."""
    from synergen_lightning.eval.grounding import load_grounding_samples
    from synergen_lightning.eval.report import ReportInputs
    from synergen_lightning.eval.suites import load_qa_items

    listed = tmp_path / "val.txt"
    listed.write_text(str(world / "val" / "shard-000000.tar") + "\n")
    for shards in (str(world / "val" / "shard-{000000..000000}.tar"), str(listed)):
        ReportInputs(suites=("und", "grounding"), val_shards=shards, grid_prompts=["a red circle"]).validate()
        assert len(load_qa_items(shards, 2)) == 2 and len(load_grounding_samples(shards, 1)) == 1
    with pytest.raises(EvalInputError, match="match no file"):
        ReportInputs(suites=("grounding",), val_shards=str(tmp_path / "shard-{0..1}.tar"), grid_prompts=["x"]).validate()


def test_failure_mid_report_leaves_nothing_that_looks_complete(world, logdir, tmp_path, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("understanding crashed")

    monkeypatch.setattr("synergen_lightning.eval.suites.understanding_suite", boom)
    out = tmp_path / "report"
    with pytest.raises(RuntimeError, match="understanding crashed"):
        report_main(_args(world, logdir, out, "--suite", "geneval,und"), model=_model())
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_wrong_checkpoint_kind_is_named(tmp_path, capsys, world, logdir):
    from synergen_lightning.image_tokenizer.vq_tokenizer import VQTokenizer
    from tests.test_image_tokenizer import SMALL

    tok = VQTokenizer(**SMALL)
    path = tmp_path / "tokenizer.ckpt"
    tok.save_checkpoint_file(path)
    with pytest.raises(EvalInputError, match=r"is an image-tokenizer \(VQTokenizer\) checkpoint, not a SynerGenVL"):
        check_system_checkpoint(path)
    argv = _args(world, logdir, tmp_path / "r", "--suite", "text")
    argv[1] = str(path)
    with pytest.raises(SystemExit):
        report_main(argv)
    assert "VQTokenizer" in capsys.readouterr().err and not (tmp_path / "r").exists()
    system = tmp_path / "system.ckpt"
    model = _model()
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}, system)
    assert "state_dict" in check_system_checkpoint(system)


def _reference_layer_features(model, ids, img, codes, k):
    """Hidden states after layer k by the model's own forward: a copy truncated to k layers, no final norm."""
    m = copy.deepcopy(model)
    m.llm.model.layers = m.llm.model.layers[:k]
    m.llm.model.norm = torch.nn.Identity()
    ids_t, img_t = torch.tensor([ids]), torch.tensor([img])
    h = m.llm.model(m.embed_inputs(ids_t, img_t, codes), image_mask=img_t)
    return h[0][img_t[0]].mean(0)


def test_layer_cosine_matches_truncated_forward_reference():
    from synergen_lightning.data.sequences import generation_prompt_ids
    from synergen_lightning.inference import understanding_prompt_ids

    model = _model()
    codes = torch.randint(0, 16, (2, 4, 4))
    captions = ["a red circle", "two squares"]
    res = layer_cosine_similarity(model, codes, captions)
    L = model.llm.model.config.num_layers
    assert len(res["mean"]) == L and len(res["per_image"]) == 2
    tok, P = model.text_tokenizer, model.tokens_per_view
    for i in range(2):
        u_ids, u_img = understanding_prompt_ids(tok, 1, P, "Describe the image.")
        g = generation_prompt_ids(tok, captions[i])
        g_ids, g_img = g + [tok.pad_id] * P + [tok.eoi_id], [False] * len(g) + [True] * P + [False]
        for k in range(1, L + 1):
            fu = _reference_layer_features(model, u_ids, u_img, codes[i:i + 1], k)
            fg = _reference_layer_features(model, g_ids, g_img, codes[i:i + 1], k)
            expected = torch.nn.functional.cosine_similarity(fu, fg, dim=0)
            assert res["per_image"][i][k - 1] == pytest.approx(float(expected), abs=1e-5)


def test_cosine_command_writes_plot(world, tmp_path):
    out = tmp_path / "cos"
    assert cosine_main(["--ckpt", "in-memory", "--val-shards", str(world / "val" / "shard-*.tar"), "--num-images", "3",
                        "--out", str(out), "--device", "cpu"], model=_model()) == 0
    data = json.loads((out / "cosine.json").read_text())
    assert data["num_images"] == 3 and len(data["mean"]) == 2
    assert Image.open(out / "cosine.png").size[0] > 100


def test_fid_keeps_generated_images_as_uint8_in_host_memory(monkeypatch):
    """What the FID sees: each chunk's images as uint8 on the CPU, as `generate_images` drew them (30k fp32 512-px
    images kept whole would be 94 GB)."""
    from synergen_lightning.eval import suites

    seen = {}
    monkeypatch.setattr(suites, "check_inception_weights", lambda path: path)
    monkeypatch.setattr(suites, "compute_fidelity", lambda gen, ref, *a, **k: seen.update(gen=gen) or {})
    model, captions = _model(), ["a red circle", "two blue squares", "a green triangle"]
    suites.fid_suite(model, captions, torch.zeros(2, 3, 16, 16, dtype=torch.uint8), "inc.pth", seed=3, batch_size=2)
    expected = torch.cat([model.generate_images(captions[i:i + 2], num=1, seed=3 + k, batch_size=2, output="tensor")
                          for k, i in enumerate((0, 2))])
    assert seen["gen"].dtype == torch.uint8 and seen["gen"].device.type == "cpu"
    assert torch.equal(seen["gen"], (expected.clamp(0, 1) * 255).round().to(torch.uint8))


@pytest.mark.slow
def test_report_fid_suite_with_local_weights(world, logdir, tmp_path):
    from tests.inception_weights import write_random_inception_weights

    weights = write_random_inception_weights(tmp_path / "inc.pth")
    out = tmp_path / "report"
    assert report_main(_args(world, logdir, out, "--suite", "fid", "--inception-weights", str(weights),
                             "--num-fid", "4"), model=_model()) == 0
    fid = json.loads((out / "report.json").read_text())["results"]["fid"]
    assert fid["num_generated"] == fid["num_reference"] == 4 and fid["fid"] > 0
    assert "## FID / IS / KID" in (out / "report.md").read_text()


def _lightning_ckpt(model, path):
    import lightning

    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams),
                "pytorch-lightning_version": lightning.__version__}, path)
    return path


def test_synergen_eval_report_command_from_disk(world, logdir, tmp_path):
    """The real path: `synergen eval report` loads a system checkpoint whose tokenizers are files on disk."""
    from synergen_lightning.cli import main
    from synergen_lightning.image_tokenizer.vq_tokenizer import VQTokenizer
    from synergen_lightning.system import SynerGenVL
    from synergen_lightning.text_tokenizer import train_bpe
    from tests.test_image_tokenizer import SMALL
    from tests.test_system_helpers import HEAD

    tok = train_bpe([str(world / "text" / "val.jsonl")], 320, tmp_path / "text_tokenizer")
    vq = VQTokenizer(**SMALL)
    vq_path = _lightning_ckpt(vq, tmp_path / "vq.ckpt")
    llm = dict(vocab_size=tok.vocab_size, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
               intermediate_size=64, max_position_embeddings=256)
    model = SynerGenVL.from_paths(llm=llm, text_tokenizer=str(tmp_path / "text_tokenizer"), image_tokenizer=str(vq_path),
                                  image_size=16 * vq.downsample // 4, fold=(2, 2), code_dim=8, head=HEAD)
    ckpt = _lightning_ckpt(model, tmp_path / "system.ckpt")
    out = tmp_path / "report"
    rc = main(["eval", "report", "--ckpt", str(ckpt), "--data", str(world), "--out", str(out), "--logdir", str(logdir),
               "--suite", "geneval,und,text", "--num-geneval", "2", "--num-und", "2", "--max-text", "2", "--max-tiles", "2", "--thumbnail",
               "--grid-seeds", "0", "--device", "cpu", "--no-progress"])
    assert rc == 0
    rep = json.loads((out / "report.json").read_text())
    assert set(rep["results"]) == {"geneval", "und", "text"} and rep["ckpt"] == str(ckpt)
    assert rep["results"]["und"]["num_items"] == 2
    side = model.grid[0] * vq.downsample
    assert Image.open(out / "samples.png").size == (side + 4, 6 * (side + 2) + 2)  # 6 GenEval prompts x 1 seed


def test_report_accepts_an_export_directory_and_names_a_wrong_one(tmp_path):
    """Multi-process runs save directories: the report loads those through the same loader as `synergen generate`."""
    from synergen_lightning.export import export
    from synergen_lightning.system import load_synergen

    model = _model(question_first=True)
    system = tmp_path / "system.ckpt"
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}, system)
    export(system, tmp_path / "exported")
    assert check_system_checkpoint(tmp_path / "exported")["hyper_parameters"]["fold"] == list(model.hparams.fold)
    loaded = load_synergen(tmp_path / "exported")
    assert loaded.question_first  # the prompt order travels with the weights
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    (tmp_path / "empty").mkdir()
    with pytest.raises(EvalInputError, match="neither a sharded checkpoint"):
        check_system_checkpoint(tmp_path / "empty")
    # a cut-short weights file: named, with the fix
    weights = tmp_path / "exported" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    with pytest.raises(ValueError, match=r"model.safetensors' cannot be read \(.*\): export the checkpoint again"):
        load_synergen(tmp_path / "exported")


def test_both_report_commands_answer_on_the_checkpoints_views_and_fail_alike_without_one(world, logdir, tmp_path,
                                                                                      capsys):
    """One tile policy (`suites.tile_policy`): the views the checkpoint's last stage trained with unless given; a
    missing --ckpt is the same one-line error, exit 2, from `eval report` and `demo report`."""
    from synergen_lightning.cli import main
    from synergen_lightning.eval.suites import tile_policy

    model = _model()
    ckpt = tmp_path / "tiled.ckpt"
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams),
                "datamodule_hyper_parameters": {"max_tiles": 2, "thumbnail": True}}, ckpt)
    assert tile_policy(ckpt) == (2, True) and tile_policy(ckpt, 1, False) == (1, False)
    assert tile_policy(tmp_path / "missing.ckpt") == (1, False)
    for extra, want in (((), (2, True)), (("--max-tiles", "1", "--no-thumbnail"), (1, False))):
        argv = _args(world, logdir, tmp_path / f"r{len(extra)}", "--suite", "und", *extra)
        argv[1] = str(ckpt)
        assert report_main(argv, model=model) == 0
        inputs = json.loads((tmp_path / f"r{len(extra)}" / "report.json").read_text())["inputs"]
        assert (inputs["max_tiles"], inputs["thumbnail"]) == want
    capsys.readouterr()
    missing = str(tmp_path / "nope.ckpt")
    errors = []
    for cmd in (["eval", "report", "--ckpt", missing, "--out", str(tmp_path / "e")],
                ["demo", "report", "--ckpt", missing, "--base-llm", missing, "--out", str(tmp_path / "d")]):
        assert main(cmd) == 2
        errors.append(capsys.readouterr().err.splitlines()[0].split(": error: ", 1))
    assert errors[0][0] == "synergen eval report" and errors[1][0] == "synergen demo report"
    assert errors[0][1] == errors[1][1] and f"'{missing}' does not exist" in errors[0][1]
    assert not (tmp_path / "e").exists() and not (tmp_path / "d").exists()


def test_val_shards_take_every_shard_url_form(world, logdir, tmp_path):
    """`--val-shards` takes what the shard readers take: a brace pattern, locally and over HTTP from a server this test
    starts (and `pipe:`); the und suite then reads the same items as from the local glob."""
    from tests.shard_server import ShardServer

    model = _model()

    def und(val_shards: str, name: str) -> dict:
        out = tmp_path / name
        assert report_main(_args(world, logdir, out, "--suite", "und", "--val-shards", val_shards), model=model) == 0
        return json.loads((out / "report.json").read_text())["results"]["und"]

    shards = sorted((world / "val").glob("shard-*.tar"))
    brace = f"shard-{{000000..{len(shards) - 1:06d}}}.tar"
    expected = und(str(world / "val" / "shard-*.tar"), "glob")
    assert expected["num_items"] == 4
    assert und(f"{world}/val/{brace}", "brace") == expected
    assert und(f"pipe:cat {world}/val/{brace}", "pipe") == expected
    with ShardServer(world) as server:
        assert und(f"{server.url}/val/{brace}", "http") == expected
        assert server.requests["val/shard-000000.tar"] == 1


def test_reference_images_skip_and_count_what_they_cannot_use(tmp_path, caplog):
    """An undecodable image or a sample without a caption is skipped and counted, named by the command that reads."""
    from synergen_lightning.eval.suites import load_reference_images
    from synthetic_shards import write_shards

    write_shards(tmp_path / "s", n_shards=1, per_shard=6, seed=2, bad={"undecodable": [1], "no_caption": [2]})
    with caplog.at_level("WARNING", logger="synergen_lightning.eval.suites"):
        captions, views = load_reference_images(str(tmp_path / "s" / "*.tar"), 16, 10, suite="cosine")
    assert len(captions) == views.shape[0] == 4
    (said,) = [r.getMessage() for r in caplog.records]
    assert said.startswith("cosine: skipped {'undecodable_image': 1, 'missing_caption': 1} in the reference shards")
    with pytest.raises(EvalInputError, match=r"^cosine: source 'cosine val shards': urls 'nope/\*.tar' match no file"):
        load_reference_images("nope/*.tar", 16, 10, suite="cosine")
