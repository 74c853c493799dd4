"""The paper's benchmark protocols on small local files in the benchmarks' own formats: GenEval's official folder
layout (read back the way GenEval's scorer walks it), MJHQ-30K (overall and per category) and MSCOCO-30K FID
(checked against torchmetrics' FID on the same images and the same torch-fidelity feature extractor), and the
report's external-results section."""

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from synergen_lightning.eval.cli import coco_fid_main, geneval_official_main, mjhq_fid_main
from synergen_lightning.eval.geneval_official import read_metadata, summarize_results
from tests.inception_weights import write_random_inception_weights
from tests.test_eval_fid import _torchmetrics_fid
from tests.test_generation import _model

# three lines of GenEval's prompts/evaluation_metadata.jsonl, verbatim format
METADATA = [
    {"tag": "single_object", "include": [{"class": "bench", "count": 1}], "prompt": "a photo of a bench"},
    {"tag": "counting", "include": [{"class": "clock", "count": 2}], "exclude": [{"class": "clock", "count": 3}],
     "prompt": "a photo of two clocks"},
    {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "red"}], "prompt": "a photo of a red car"},
]


def _scorer_walk(imagedir):
    """GenEval's evaluation/evaluate_images.py main(): which (image, metadata) pairs its scorer would read."""
    found = []
    for subfolder in os.listdir(imagedir):
        folderpath = os.path.join(imagedir, subfolder)
        if not os.path.isdir(folderpath) or not subfolder.isdigit():
            continue
        with open(os.path.join(folderpath, "metadata.jsonl")) as fp:
            metadata = json.load(fp)
        for imagename in os.listdir(os.path.join(folderpath, "samples")):
            imagepath = os.path.join(folderpath, "samples", imagename)
            if not os.path.isfile(imagepath) or not re.match(r"\d+\.png", imagename):
                continue
            found.append((imagepath, metadata))
    return sorted(found, key=lambda x: x[0])


def test_geneval_official_layout_resumes_and_reads_back(tmp_path, monkeypatch, capsys):
    meta = tmp_path / "evaluation_metadata.jsonl"
    meta.write_text("".join(json.dumps(m) + "\n" for m in METADATA))
    model, out = _model(), tmp_path / "images"
    args = ["--ckpt", "in-memory", "--metadata", str(meta), "--out", str(out), "--samples", "2", "--seed", "5",
            "--cfg", "3", "--no-progress"]
    assert geneval_official_main(args, model=model) == 0
    assert sorted(os.listdir(out)) == [".made_by.json", "00000", "00001", "00002"]  # GenEval reads the digit folders
    walk = _scorer_walk(out)
    assert [(os.path.relpath(p, out), m) for p, m in walk] == [
        (f"{i:05d}/samples/{k:05d}.png", METADATA[i]) for i in range(3) for k in range(2)]
    # prompt N is drawn with seed SEED+N: the same images as a direct call
    for i, m in enumerate(METADATA):
        want = model.generate_images([m["prompt"]], num=2, cfg_scale=3, seed=5 + i)
        for k in range(2):
            assert np.array_equal(np.asarray(Image.open(out / f"{i:05d}/samples/{k:05d}.png")), np.asarray(want[k]))
    # resumable: only the prompt with a missing sample is drawn again, and identically
    before = (out / "00001/samples/00001.png").read_bytes()
    (out / "00001/samples/00001.png").unlink()
    calls = []
    real = model.generate_images
    monkeypatch.setattr(model, "generate_images", lambda p, **kw: calls.append(p) or real(p, **kw))
    assert geneval_official_main(args, model=model) == 0
    assert calls == [["a photo of two clocks"]]
    assert (out / "00001/samples/00001.png").read_bytes() == before

    # another CFG scale, or another metadata file at the same --out, would mix two runs' samples: refused
    with pytest.raises(SystemExit):
        geneval_official_main([*args[:-2], "2", "--no-progress"], model=model)
    assert "holds GenEval samples made with other settings (cfg_scale 3.0 there, 2.0 now)" in capsys.readouterr().err
    other = tmp_path / "other.jsonl"
    other.write_text("".join(json.dumps(dict(m, prompt=m["prompt"] + "!")) + "\n" for m in METADATA))
    with pytest.raises(SystemExit):
        geneval_official_main([*args[:2], "--metadata", str(other), *args[4:]], model=model)
    assert f"{out / '00000'} holds the samples of" in capsys.readouterr().err


def test_geneval_metadata_and_results(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(METADATA[0]) + "\n" + json.dumps({"prompt": "no tag"}) + "\n")
    with pytest.raises(Exception, match=r"line 2: needs string 'prompt' and 'tag'"):
        read_metadata(bad)
    with pytest.raises(Exception, match=r"--metadata '.*' is a directory; pass GenEval's"):
        read_metadata(tmp_path)
    # GenEval's results.jsonl -> summary_scores.py: mean correct per tag, overall = mean over tags
    rows = [("single_object", True, 0), ("single_object", False, 0), ("counting", False, 1), ("counting", True, 1),
            ("counting", True, 1), ("colors", False, 2)]
    res = tmp_path / "results.jsonl"
    res.write_text("".join(json.dumps({"filename": f"x{i}.png", "tag": t, "correct": c,
                                       "metadata": json.dumps(METADATA[m])}) + "\n" for i, (t, c, m) in enumerate(rows)))
    s = summarize_results(res)
    assert s["per_tag"] == {"single_object": 0.5, "counting": 2 / 3, "colors": 0.0}
    assert s["overall"] == pytest.approx((0.5 + 2 / 3 + 0.0) / 3)
    assert s["num_images"] == 6 and s["num_prompts"] == 3 and s["correct_prompts"] == pytest.approx(2 / 3)


# ---------------------------------------------------------------------------------------- FID
@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return write_random_inception_weights(tmp_path_factory.mktemp("inception") / "inception.pth", seed=0)


def _random_image(g, w, h):
    return Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy())


def _reference_views(paths, size):
    from synergen_lightning.data.views import generation_view, to_uint8_tensor

    return to_uint8_tensor([generation_view(Image.open(p), size) for p in paths])


def _generated(paths):
    return torch.from_numpy(np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths])).permute(0, 3, 1, 2)


def test_mjhq_fid_overall_and_per_category_match_torchmetrics(tmp_path, weights, monkeypatch, capsys):
    g = torch.Generator().manual_seed(0)
    meta, ref = {}, tmp_path / "mjhq30k_imgs"
    for c, cat in enumerate(("animals", "people")):
        (ref / cat).mkdir(parents=True)
        for k in range(6):
            key = f"{c}{k:03d}abc"
            meta[key] = {"category": cat, "prompt": f"{cat} number {k}"}
            _random_image(g, 30 + 4 * k, 24).save(ref / cat / f"{key}.jpg")  # not square: the resize policy crops
    (tmp_path / "meta_data.json").write_text(json.dumps(meta))
    model, out, cache = _model(), tmp_path / "out", tmp_path / "cache"
    args = ["--ckpt", "in-memory", "--meta", str(tmp_path / "meta_data.json"), "--reference", str(ref), "--out",
            str(out), "--inception-weights", str(weights), "--feature-layer", "64", "--cache-dir", str(cache),
            "--batch-size", "4", "--cfg", "3", "--no-progress"]
    assert mjhq_fid_main(args, model=model) == 0
    res = json.loads((out / "fid.json").read_text())
    assert res["num_images"] == 12 and res["generated_now"] == 12 and res["size"] == 16 and res["fid"] > 1e-3
    keys = list(meta)
    gen = _generated([out / "generated" / meta[k]["category"] / f"{k}.png" for k in keys])
    refs = _reference_views([ref / meta[k]["category"] / f"{k}.jpg" for k in keys], 16)
    assert res["fid"] == pytest.approx(_torchmetrics_fid(weights, gen, refs), rel=0.01)
    for c, cat in enumerate(("animals", "people")):
        sl = slice(6 * c, 6 * c + 6)
        assert res["per_category"][cat]["fid"] == pytest.approx(_torchmetrics_fid(weights, gen[sl], refs[sl]), rel=0.01)
    # a rerun generates nothing and reads the reference features from the cache
    assert len(list(cache.glob("ref-*.npy"))) == 2
    import synergen_lightning.eval.fid_protocols as fp

    monkeypatch.setattr(fp, "load_views", lambda paths, size, real=fp.load_views: (
        (_ for _ in ()).throw(AssertionError("reference re-read")) if "mjhq30k_imgs" in str(paths[0])
        else real(paths, size)))
    assert mjhq_fid_main(args, model=model) == 0
    again = json.loads((out / "fid.json").read_text())
    assert again["generated_now"] == 0 and again["fid"] == pytest.approx(res["fid"], rel=1e-9)
    # another checkpoint at the same --out: its images would be scored as this one's; refused, naming it
    ckpt = tmp_path / "other.ckpt"
    ckpt.write_bytes(b"weights")
    with pytest.raises(SystemExit):
        mjhq_fid_main(["--ckpt", str(ckpt), *args[2:]], model=model)
    assert f"holds generated images made with other settings (checkpoint {{'path': '{Path.cwd() / 'in-memory'}'" \
           in capsys.readouterr().err


def test_coco_fid_from_a_captions_file(tmp_path, weights, capsys):
    g = torch.Generator().manual_seed(1)
    (tmp_path / "val2014").mkdir()
    images, anns = [], []
    for i in range(6):
        name = f"COCO_val2014_{i + 100:012d}.jpg"
        images.append({"id": i + 100, "file_name": name})
        anns += [{"image_id": i + 100, "id": 2 * i + a, "caption": f"caption {a} of {i}"} for a in range(2)]
        _random_image(g, 40, 30).save(tmp_path / "val2014" / name)
    (tmp_path / "captions_val2014.json").write_text(json.dumps({"images": images, "annotations": anns}))
    model, out = _model(), tmp_path / "out"
    args = ["--ckpt", "in-memory", "--captions", str(tmp_path / "captions_val2014.json"), "--reference",
            str(tmp_path / "val2014"), "--num", "5", "--out", str(out), "--inception-weights", str(weights),
            "--feature-layer", "64", "--cache-dir", str(tmp_path / "cache"), "--cfg", "3", "--no-progress"]
    assert coco_fid_main(args, model=model) == 0
    res = json.loads((out / "fid.json").read_text())
    from synergen_lightning.eval.fid_protocols import read_coco_captions

    items = read_coco_captions(tmp_path / "captions_val2014.json", 5, seed=0)
    assert len({it["file_name"] for it in items}) == 5 and all(it["prompt"].startswith("caption") for it in items)
    gen = _generated([out / "generated" / f"{it['id']}.png" for it in items])
    refs = _reference_views([tmp_path / "val2014" / it["file_name"] for it in items], 16)
    assert res["fid"] == pytest.approx(_torchmetrics_fid(weights, gen, refs), rel=0.01)
    # bad input: one line naming the input and the fix
    with pytest.raises(SystemExit):
        coco_fid_main([*args[:6], "--num", "50", *args[8:]], model=model)
    assert "has only 6 captioned images; lower --num" in capsys.readouterr().err


def test_report_includes_external_results(tmp_path, capsys):
    from synergen_lightning.eval.cli import report_main

    geneval = tmp_path / "results.jsonl"
    geneval.write_text("".join(json.dumps({"tag": t, "correct": c, "metadata": json.dumps(METADATA[i])}) + "\n"
                               for i, (t, c) in enumerate([("single_object", True), ("counting", False),
                                                           ("colors", True)])))
    fid = tmp_path / "fid.json"
    fid.write_text(json.dumps({"protocol": "mjhq", "fid": 12.5, "num_images": 4, "resize_policy": "r",
                               "per_category": {"people": {"fid": 10.0, "num_images": 2},
                                                "animals": {"fid": 15.0, "num_images": 2}}}))
    harness = tmp_path / "lm_eval.json"  # lm-eval's results JSON (--output_path), trimmed
    harness.write_text(json.dumps({"results": {"mmlu": {"alias": "mmlu", "acc,none": 0.3, "acc_stderr,none": 0.01},
                                               "cmmlu": {"acc,none": 0.25, "acc_norm,none": 0.26}},
                                   "config": {"model": "synergen", "model_args": "pretrained=ckpt"},
                                   "lm_eval_version": "0.4.13"}))
    # lmms-eval 0.7's OUT/<model>/<date>_results.json, trimmed (its "N/A" clustered stderr is a string)
    lmms = tmp_path / "20260101_000000_results.json"
    lmms.write_text(json.dumps({"results": {
        "pope": {"alias": "pope", "pope_accuracy,none": 0.8, "pope_accuracy_stderr,none": "N/A"},
        "textvqa_val": {"alias": "textvqa_val", "exact_match,none": 0.4, "exact_match_stderr,none": 0.01,
                        "exact_match_stderr_clustered,none": "N/A"}},
        "config": {"model": "synergen", "model_args": "pretrained=runs/tiny/sft/last.ckpt,device=cpu",
                   "model_backend": "synergen_lightning.eval.lmms_adapter.SynerGenLMMS (simple)"},
        "lmms_eval_version": "0.7.3", "n-samples": {"pope": {"original": 9000, "effective": 9000}}}))
    out = tmp_path / "report"
    args = ["--ckpt", "in-memory.ckpt", "--suite", "none", "--out", str(out), "--logdir", str(tmp_path / "nologs"),
            "--device", "cpu", "--external", str(geneval), "--external", str(fid), "--external", str(harness),
            "--external", str(lmms)]
    assert report_main(args, model=_model()) == 0
    ext = json.loads((out / "report.json").read_text())["results"]["external"]
    assert [e["kind"] for e in ext] == ["geneval", "fid", "lm-eval", "lmms-eval"]
    assert ext[0]["overall"] == pytest.approx(2 / 3) and ext[1]["per_category"]["people"]["fid"] == 10.0
    assert ext[2]["tasks"] == {"mmlu": {"acc,none": 0.3}, "cmmlu": {"acc,none": 0.25, "acc_norm,none": 0.26}}
    assert ext[3]["tasks"] == {"pope": {"pope_accuracy,none": 0.8}, "textvqa_val": {"exact_match,none": 0.4}}
    assert ext[3]["model"] == "pretrained=runs/tiny/sft/last.ckpt,device=cpu"
    md = (out / "report.md").read_text()
    for needle in ("## Benchmarks", "| **0.6667** | 1.0000 | 0.0000 | 1.0000 |", "MJHQ-30K FID", "| mmlu | acc,none | 0.3000 |",
                   "lmms-eval (`", "| textvqa_val | exact_match,none | 0.4000 |"):
        assert needle in md, needle
    assert "samples.png" not in md
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"something": 1}))
    with pytest.raises(SystemExit):
        report_main([*args[:-8], "--external", str(bad), "--overwrite"], model=_model())
    assert "neither GenEval results" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------- several processes
def test_shares_of_the_prompts_draw_the_images_one_process_draws(tmp_path, weights):
    """Two shares (`sharing.Share`, as two torchrun processes get them) written one after the other: every
    GenEval sample and every FID image is byte-equal to one process's, each drawn by exactly one share."""
    from synergen_lightning.eval.fid_protocols import generate_missing, generated_path
    from synergen_lightning.eval.geneval_official import write_layout
    from synergen_lightning.sharing import Share

    model = _model()
    items = [{"id": f"{k:03d}", "prompt": f"shape number {k}"} for k in range(7)]
    made = {}
    for name, shares in (("one", [Share()]), ("two", [Share(0, 2), Share(1, 2)])):
        made[name] = [write_layout(model, METADATA, tmp_path / name / "geneval", samples=2, cfg_scale=3, seed=5,
                                   share=s)["generated"] for s in shares]
        made[name] += [generate_missing(model, items, tmp_path / name / "fid", cfg_scale=3, seed=1, batch_size=2,
                                        share=s) for s in shares]
    assert made == {"one": [3, 7], "two": [2, 1, 4, 3]}  # prompts 0, 2 | 1; chunks 0, 2 (4 images) | 1, 3 (3)
    files = sorted(p.relative_to(tmp_path / "one") for p in (tmp_path / "one").rglob("*.png"))
    assert len(files) == 3 * 2 + 7 and files == sorted(p.relative_to(tmp_path / "two")
                                                        for p in (tmp_path / "two").rglob("*.png"))
    for f in files:
        assert (tmp_path / "one" / f).read_bytes() == (tmp_path / "two" / f).read_bytes(), f
    assert generated_path(tmp_path / "one" / "fid", items[6]).is_file()


@pytest.mark.slow  # `make test-all`: four commands' start-ups
@pytest.mark.distributed
def test_torchrun_processes_share_the_benchmarks_generation(tmp_path, weights):
    """`torchrun --nproc-per-node 2 -m synergen_lightning.cli eval geneval-official|mjhq-fid` on a checkpoint saved to
    disk (gloo on the CPU): the images byte-equal one process's, and rank 0 alone writes fid.json, equal to one
    process's."""
    import subprocess
    import sys

    from tests.test_eval_lmms_evaluator import save_tiny_checkpoint

    ckpt = save_tiny_checkpoint(tmp_path / "run")
    (tmp_path / "meta.jsonl").write_text("".join(json.dumps(m) + "\n" for m in METADATA))
    g, meta, ref = torch.Generator().manual_seed(0), {}, tmp_path / "mjhq30k_imgs"
    for c, cat in enumerate(("animals", "people")):
        (ref / cat).mkdir(parents=True)
        for k in range(3):
            meta[f"{c}{k:03d}"] = {"category": cat, "prompt": f"a red circle {k}"}
            _random_image(g, 32, 32).save(ref / cat / f"{c}{k:03d}.jpg")
    (tmp_path / "meta_data.json").write_text(json.dumps(meta))
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK",
                                                             "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", TMPDIR=str(tmp_path))  # torchrun's log folders in the test's own
    launch = {"one": [sys.executable], "two": [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                               "--nproc-per-node", "2"]}
    common = ["--ckpt", str(ckpt), "--cfg", "3", "--device", "cpu", "--no-progress"]
    for name, cmd in launch.items():
        for args in (["geneval-official", "--metadata", str(tmp_path / "meta.jsonl"), "--out",
                      str(tmp_path / name / "geneval"), "--samples", "2"],
                     ["mjhq-fid", "--meta", str(tmp_path / "meta_data.json"), "--reference", str(ref), "--out",
                      str(tmp_path / name / "mjhq"), "--inception-weights", str(weights), "--feature-layer", "64",
                      "--cache-dir", str(tmp_path / name / "cache"), "--batch-size", "2"]):
            r = subprocess.run([*cmd, "-m", "synergen_lightning.cli", "eval", *args, *common], env=env,
                               capture_output=True, text=True, timeout=300)
            assert r.returncode == 0, f"{name} {args[0]}:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
            if args[0] == "geneval-official":  # rank 0 alone reports, with the whole run's count
                assert r.stdout.count("geneval-official: 3 prompts generated, 0 already done") == 1, r.stdout
    files = sorted(p.relative_to(tmp_path / "one") for p in (tmp_path / "one").rglob("*.png"))
    assert len(files) == 3 * 2 + 6
    assert files == sorted(p.relative_to(tmp_path / "two") for p in (tmp_path / "two").rglob("*.png"))
    for f in files:
        assert (tmp_path / "one" / f).read_bytes() == (tmp_path / "two" / f).read_bytes(), f
    one, two = (json.loads((tmp_path / n / "mjhq" / "fid.json").read_text()) for n in ("one", "two"))
    assert one["generated_now"] == two["generated_now"] == 6
    for a, b in ((one, two), *((one["per_category"][c], two["per_category"][c]) for c in ("animals", "people"))):
        assert b["fid"] == pytest.approx(a["fid"], rel=1e-9) and a["fid"] > 0


def test_an_indexed_gpu_under_torchrun_is_refused_before_any_group_starts(monkeypatch):
    """Every process would take that one GPU: a one-line error naming the fix, before CUDA or a process group."""
    from synergen_lightning.sharing import WHOLE, join

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match=r"--device cuda:1 under torchrun would put all 2 processes on one GPU: "
                                             r"give cuda \(or auto\), and each process takes GPU LOCAL_RANK"):
        join("cuda:1")
    assert not torch.distributed.is_initialized()
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert join("cuda:1") == (WHOLE, "cuda:1") and join(None)[1] == ("cuda" if torch.cuda.is_available() else "cpu")
