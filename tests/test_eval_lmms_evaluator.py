"""The lmms-eval model `synergen` through the real lmms-eval command (the `lmms-eval` extra), on a tiny checkpoint the
test saves to disk, with local tasks defined by task YAMLs in a temporary directory (json + png files, offline,
nothing downloaded):

    lmms-eval --model synergen --model_args pretrained=CKPT --tasks ... --include_path TASKS --output_path OUT

The command runs in a subprocess of this interpreter (its own `lmms_eval.models` entry point finds the adapter) and
is skipped where lmms-eval is not installed; its answers and log-likelihoods are checked against the Harness
loaded from the same checkpoint with the checkpoint's tile policy. `Harness.from_pretrained` and the tile policy
are tested without lmms-eval as well."""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

# the checkpoint's data module trained 3 tiles + a thumbnail: the adapter must cut images the same way
POLICY = {"max_tiles": 3, "thumbnail": True}
WORDS = "red green blue yellow circle square triangle left right above below one two three yes no shape colour"
DOCS = [("What colour is the shape?", "red", [64, 32]), ("How many shapes?", "two", [32, 96]),
        ("Is it round?", "yes", [32, 32])]
CHOICES = ["yes", "no", "red", "two"]
SUFFIX = "\nAnswer the question using a single word or phrase."


def save_tiny_checkpoint(root: Path, datamodule_hp: dict | None = POLICY) -> Path:
    """A SynerGenVL run checkpoint on disk as `synergen fit` leaves it: weights, hyper-parameters naming a BPE
    tokenizer folder and a VQ checkpoint, and the data module's hyper-parameters (the tile policy)."""
    import lightning

    from synergen_lightning.image_tokenizer.vq_tokenizer import VQTokenizer
    from synergen_lightning.system import SynerGenVL
    from synergen_lightning.text_tokenizer import train_bpe
    from tests.test_image_tokenizer import SMALL
    from tests.test_system_helpers import HEAD

    root.mkdir(parents=True, exist_ok=True)
    corpus = root / "corpus.txt"
    words = WORDS.split()
    corpus.write_text("".join(" ".join(words[(i * k) % len(words)] for k in range(1, 9)) + "\n" for i in range(60)))
    tok = train_bpe([str(corpus)], 320, root / "text_tokenizer")
    torch.manual_seed(0)
    vq = VQTokenizer(**SMALL)
    version = {"pytorch-lightning_version": lightning.__version__}
    vq.save_checkpoint_file(root / "vq.ckpt")
    llm = dict(vocab_size=tok.vocab_size, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
               intermediate_size=64, max_position_embeddings=256)
    model = SynerGenVL.from_paths(llm=llm, text_tokenizer=str(root / "text_tokenizer"), image_tokenizer=str(root / "vq.ckpt"),
                                  image_size=16 * vq.downsample // 4, fold=(2, 2), code_dim=8, head=HEAD)
    ckpt = {"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams), **version}
    if datamodule_hp is not None:
        ckpt["datamodule_hyper_parameters"] = dict(datamodule_hp)
    torch.save(ckpt, root / "last.ckpt")
    return root / "last.ckpt"


def _image(i: int, size) -> Image.Image:
    g = torch.Generator().manual_seed(i)
    return Image.fromarray((torch.rand(size[1], size[0], 3, generator=g) * 255).to(torch.uint8).numpy())


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny_run"))


# ---------------------------------------------------------------------------------------- without lmms-eval
def test_from_pretrained_reads_the_checkpoints_tile_policy(ckpt, tmp_path):
    from synergen_lightning.data.views import dynamic_tiles
    from synergen_lightning.eval.harness import Harness, tile_policy
    from synergen_lightning.system import load_synergen

    h = Harness.from_pretrained(ckpt, device="cpu", batch_size=2)
    assert (h.max_tiles, h.thumbnail, h.batch_size) == (3, True, 2) and not h.model.training
    saved = torch.load(ckpt, weights_only=False)["state_dict"]
    assert all(torch.equal(h.model.state_dict()[k], v) for k, v in saved.items())
    # the views of a 2:1 image: 2 tiles + the thumbnail, each `tokens_per_view` image positions in the prompt
    img = _image(0, (64, 32))
    size = h.model.grid[0] * h.model.hparams.downsample
    assert len(dynamic_tiles(img, size, max_tiles=3, thumbnail=True)) == 3
    rows, codes = h._rows(["What colour?"], [[img]], chat=True)
    assert codes.shape[0] == 3 and sum(rows[0][1]) == 3 * h.model.tokens_per_view
    # model_args override the checkpoint's policy (strings as lmms-eval passes them)
    h1 = Harness(h.model, max_tiles=1, thumbnail="false")
    rows1, codes1 = h1._rows(["What colour?"], [[img]], chat=True)
    assert codes1.shape[0] == 1 and sum(rows1[0][1]) == h.model.tokens_per_view
    assert (Harness.from_pretrained(ckpt, device="cpu", max_tiles=2, thumbnail="0").max_tiles,
            Harness.from_pretrained(ckpt, device="cpu", thumbnail="0").thumbnail) == (2, False)
    # a checkpoint without data-module hyper-parameters: one view, no thumbnail
    plain = tmp_path / "plain.ckpt"
    torch.save({k: v for k, v in torch.load(ckpt, weights_only=False).items() if k != "datamodule_hyper_parameters"},
               plain)
    assert tile_policy(plain) == (1, False)
    h_plain = Harness.from_pretrained(plain, device="cpu")
    assert (h_plain.max_tiles, h_plain.thumbnail) == (1, False)
    assert load_synergen(plain).grid == h.model.grid


# ---------------------------------------------------------------------------------------- the real lmms-eval
UTILS = '''
from PIL import Image


def doc_to_visual(doc):
    with Image.open(doc["image"]) as img:
        return [img.convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    kw = lmms_eval_specific_kwargs or {}
    return f"{kw.get('pre_prompt', '')}{doc['question']}{kw.get('post_prompt', '')}"


def doc_to_choice(doc):
    return doc["choices"]


def doc_to_target(doc):
    return doc["choices"].index(doc["answer"])
'''

VQA_YAML = """task: synergen_local_vqa
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  until: ["\\n\\n"]
  max_new_tokens: 5
  temperature: 0
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
lmms_eval_specific_kwargs:
  default:
    pre_prompt: "<image>\\n"
    post_prompt: "{suffix}"
"""

MC_YAML = """task: synergen_local_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_choice: !function utils.doc_to_choice
doc_to_target: !function utils.doc_to_target
metric_list:
  - metric: acc
lmms_eval_specific_kwargs:
  default:
    pre_prompt: ""
    post_prompt: ""
"""


def _tasks(root: Path) -> Path:
    rows = []
    for i, (q, a, size) in enumerate(DOCS):  # sizes differ: so do their tiles
        _image(i, size).save(root / f"{i}.png")
        rows.append({"image": str(root / f"{i}.png"), "question": q, "answer": a, "choices": CHOICES})
    (root / "docs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "utils.py").write_text(UTILS)
    (root / "local_vqa.yaml").write_text(VQA_YAML.format(data=root / "docs.jsonl", suffix=SUFFIX.replace("\n", "\\n")))
    (root / "local_mc.yaml").write_text(MC_YAML.format(data=root / "docs.jsonl"))
    return root


@pytest.fixture(scope="module")
def lmms_run(ckpt, tmp_path_factory):
    """`lmms-eval --model synergen ...` on the two local tasks, offline; (results JSON, {task: samples})."""
    if importlib.util.find_spec("lmms_eval") is None:
        pytest.skip("lmms-eval is not installed (the optional extra: pip install -e '.[lmms-eval]')")
    tasks = _tasks(tmp_path_factory.mktemp("lmms_tasks"))
    out, home = tmp_path_factory.mktemp("lmms_out"), tmp_path_factory.mktemp("hf_home")
    env = {**os.environ, "HF_HOME": str(home), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "WANDB_MODE": "disabled",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]),
                                                       os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "lmms_eval", "--model", "synergen", "--model_args", f"pretrained={ckpt},device=cpu",
           "--tasks", "synergen_local_vqa,synergen_local_mc", "--include_path", str(tasks), "--batch_size", "2",
           "--output_path", str(out), "--log_samples", "--seed", "0", "--verbosity", "WARNING"]
    proc = subprocess.run(cmd, env=env, cwd=out, capture_output=True, text=True, timeout=600)
    # lmms-eval logs an error in the evaluation and still exits 0: its results file is the check
    found = glob.glob(str(out / "**" / "*_results.json"), recursive=True)
    assert proc.returncode == 0 and len(found) == 1, (found, (proc.stdout + proc.stderr)[-4000:])
    samples = {}
    for task in ("synergen_local_vqa", "synergen_local_mc"):
        (path,) = glob.glob(str(out / "**" / f"*_samples_{task}.jsonl"), recursive=True)
        samples[task] = sorted((json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()),
                               key=lambda s: s["doc_id"])
    return Path(found[0]), samples


def test_lmms_eval_generates_with_the_checkpoints_tile_policy(ckpt, lmms_run):
    from synergen_lightning.eval.harness import Harness

    path, samples = lmms_run
    got = samples["synergen_local_vqa"]
    assert [s["doc_id"] for s in got] == list(range(len(DOCS)))
    h = Harness.from_pretrained(ckpt, device="cpu", batch_size=1)
    hits = 0
    for s, (i, (q, a, size)) in zip(got, enumerate(DOCS)):
        (want,) = h.generate([f"<image>\n{q}{SUFFIX}"], [[_image(i, size)]], until=["\n\n"], max_new_tokens=5)
        assert s["filtered_resps"] == want
        hits += want == a
    results = json.loads(path.read_text())["results"]
    assert results["synergen_local_vqa"]["exact_match,none"] == pytest.approx(hits / len(DOCS))


def test_lmms_eval_scores_choices_by_the_answers_loss(ckpt, lmms_run):
    """lmms-eval's multiple choice: each option's loss (mean negative log-likelihood per token) as the assistant's
    answer to the tiled image, the smallest wins."""
    from synergen_lightning.eval.harness import Harness

    path, samples = lmms_run
    got = samples["synergen_local_mc"]
    h = Harness.from_pretrained(ckpt, device="cpu", batch_size=1)
    one_view = Harness(h.model, max_tiles=1, thumbnail=False)

    def losses(harness, q, img):
        return [-harness.loglikelihood([q], [c], img, chat=True)[0][0] / len(h.tokenizer.encode(c)) for c in CHOICES]

    correct, differs = 0, False
    for s, (i, (q, a, size)) in zip(got, enumerate(DOCS)):
        img = [[_image(i, size)]]
        want = losses(h, q, img)
        # the samples file writes each option's (loss, greedy) as strings
        assert [float(loss) for loss, _ in s["filtered_resps"]] == pytest.approx(want, abs=1e-4)
        differs |= size != [32, 32] and want != pytest.approx(losses(one_view, q, img), abs=1e-4)
        correct += min(range(len(CHOICES)), key=want.__getitem__) == CHOICES.index(a)
    assert differs, "the tiled images scored as one view: the tile policy did not reach lmms-eval's requests"
    results = json.loads(path.read_text())["results"]
    assert results["synergen_local_mc"]["acc,none"] == pytest.approx(correct / len(DOCS))


def test_the_report_reads_lmms_evals_results_file(lmms_run):
    from synergen_lightning.eval.external import external_markdown, read_external

    path, _ = lmms_run
    e = read_external(path)
    assert e["kind"] == "lmms-eval" and set(e["tasks"]) == {"synergen_local_vqa", "synergen_local_mc"}
    assert "pretrained=" in e["model"]
    md = "\n".join(external_markdown([e]))
    assert "| synergen_local_mc | acc,none |" in md


@pytest.mark.slow  # `make test-all` with the extra: two lmms-eval runs' start-ups
@pytest.mark.distributed
def test_two_torchrun_processes_answer_as_one(ckpt, tmp_path):
    """`torchrun --nproc-per-node 2 -m lmms_eval --model synergen ...` (gloo on the CPU; lmms-eval deals the requests
    and gathers the metrics itself): rank 0 alone writes the results, with the same figures and per-doc answers as
    one process."""
    if importlib.util.find_spec("lmms_eval") is None:
        pytest.skip("lmms-eval is not installed (the optional extra: pip install -e '.[lmms-eval]')")
    (tmp_path / "tasks").mkdir()
    tasks = _tasks(tmp_path / "tasks")
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK",
                                                             "LOCAL_RANK")}
    env.update(HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", WANDB_MODE="disabled", OMP_NUM_THREADS="1", TMPDIR=str(tmp_path),
               PYTHONPATH=os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]),
                                                        os.environ.get("PYTHONPATH")])))
    launch = {"one": [sys.executable], "two": [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                               "--nproc-per-node", "2"]}
    runs = {}
    for name, cmd in launch.items():
        out = tmp_path / name
        out.mkdir()
        proc = subprocess.run([*cmd, "-m", "lmms_eval", "--model", "synergen", "--model_args",
                               f"pretrained={ckpt},device=cpu", "--tasks", "synergen_local_vqa,synergen_local_mc",
                               "--include_path", str(tasks), "--batch_size", "2", "--output_path", str(out),
                               "--log_samples", "--seed", "0", "--verbosity", "WARNING"],
                              env=env, cwd=out, capture_output=True, text=True, timeout=600)
        found = glob.glob(str(out / "**" / "*_results.json"), recursive=True)  # rank 0 alone writes
        assert proc.returncode == 0 and len(found) == 1, (name, found, (proc.stdout + proc.stderr)[-4000:])
        answers = {}
        for task in ("synergen_local_vqa", "synergen_local_mc"):
            (path,) = glob.glob(str(out / "**" / f"*_samples_{task}.jsonl"), recursive=True)
            rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
            answers[task] = sorted((r["doc_id"], r["filtered_resps"]) for r in rows)
        runs[name] = json.loads(Path(found[0]).read_text())["results"], answers
    assert [len(a) for a in runs["one"][1].values()] == [len(DOCS), len(DOCS)]
    assert runs["one"] == runs["two"]
