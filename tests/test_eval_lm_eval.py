"""The lm-eval adapter against the real lm-eval package (the `lm-eval` extra), on local tasks defined by task YAMLs in
a temporary directory (json files, nothing downloaded): a multiple-choice task (log-likelihood) and a generation
task (generate_until), each checked against an unbatched computation with the model's own trunk."""

import json
import math

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval", reason="the lm-eval extra is not installed (pip install -e '.[lm-eval]')")

from tests.test_generation import _model  # noqa: E402

MC = [
    {"question": "2 + 2 =", "choices": ["4", "5", "22"], "answer": 0},
    {"question": "the sky is", "choices": ["blue", "green"], "answer": 0},
    {"question": "abc then", "choices": ["d", "e", "f", "g"], "answer": 2},
]
GEN = [{"prompt": "count: 1 2 3", "answer": "4"}, {"prompt": "letters: a b", "answer": "c"}]


def _tasks(tmp_path):
    (tmp_path / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in MC))
    (tmp_path / "gen.jsonl").write_text("".join(json.dumps(r) + "\n" for r in GEN))
    (tmp_path / "local_mc.yaml").write_text(f"""task: synergen_local_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {tmp_path / 'mc.jsonl'}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
""")
    (tmp_path / "local_gen.yaml").write_text(f"""task: synergen_local_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {tmp_path / 'gen.jsonl'}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 6
  do_sample: false
metric_list:
  - metric: exact_match
""")
    return tmp_path


def _reference_loglikelihood(model, context, continuation):
    """Unbatched: `<s>` + context + " " + continuation through the trunk's own ids -> logits path."""
    tok = model.text_tokenizer
    ctx, cont = [tok.bos_id] + tok.encode(context), tok.encode(" " + continuation)
    with torch.no_grad():
        logp = model.llm.model.forward_ids(torch.tensor([ctx + cont])).float().log_softmax(-1)[0]
    return sum(float(logp[len(ctx) - 1 + k, t]) for k, t in enumerate(cont))


@pytest.fixture(scope="module")
def results(tmp_path_factory, monkeypatch_module):
    monkeypatch_module.setenv("HF_DATASETS_OFFLINE", "1")
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from synergen_lightning.eval.lm_eval_adapter import SynerGenLM

    model = _model()
    lm = SynerGenLM(model=model, batch_size=2, max_gen_toks=6)
    tasks = _tasks(tmp_path_factory.mktemp("lm_eval_tasks"))
    out = simple_evaluate(model=lm, tasks=["synergen_local_mc", "synergen_local_gen"],
                          task_manager=TaskManager(include_path=str(tasks)), log_samples=True,
                          bootstrap_iters=0, random_seed=0)
    return model, out


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def test_multiple_choice_loglikelihoods_match_an_unbatched_reference(results):
    model, out = results
    samples = out["samples"]["synergen_local_mc"]
    assert len(samples) == len(MC)
    correct = 0
    for s in samples:
        doc = s["doc"]
        got = [r[0][0] for r in s["resps"]]
        want = [_reference_loglikelihood(model, doc["question"], c) for c in doc["choices"]]
        assert got == pytest.approx(want, abs=1e-4)
        correct += int(max(range(len(want)), key=want.__getitem__) == doc["answer"])
    assert out["results"]["synergen_local_mc"]["acc,none"] == pytest.approx(correct / len(MC))


def test_generation_matches_the_trunks_greedy_decode(results):
    model, out = results
    tok = model.text_tokenizer
    samples = out["samples"]["synergen_local_gen"]
    hits = 0
    for s in samples:
        ids = torch.tensor([[tok.bos_id] + tok.encode(s["doc"]["prompt"])])
        new = model.llm.model.generate_greedy(ids, 6, eos_id=tok.eos_id)[0].tolist()
        stops = [k for k, t in enumerate(new) if t in (tok.im_end_id, tok.eos_id)]
        text = tok.decode(new[: stops[0] if stops else len(new)]).split("\n")[0]
        assert s["resps"][0][0] == text
        hits += text.strip() == s["doc"]["answer"]
    assert out["results"]["synergen_local_gen"]["exact_match,none"] == pytest.approx(hits / len(GEN))


def test_rolling_loglikelihood_is_the_sum_over_the_text(results):
    from lm_eval.api.instance import Instance

    from synergen_lightning.eval.lm_eval_adapter import SynerGenLM

    model, _ = results
    lm = SynerGenLM(model=model, batch_size=4)
    text = "abc " * 50  # 200 characters: longer than the 128-token context, so several windows
    req = Instance(request_type="loglikelihood_rolling", doc={}, arguments=(text,), idx=0)
    (got,) = lm.loglikelihood_rolling([req])
    tok = model.text_tokenizer
    ids = tok.encode(text)
    # each token once, with as much context as fits (lm-eval's windows), recomputed one window at a time
    want, L = 0.0, lm.harness.max_length
    with torch.no_grad():
        for end in range(0, len(ids), L):
            target = ids[end: end + L]
            full = ([tok.bos_id] + ids)[max(0, end + len(target) - L): end + len(target)]
            logp = model.llm.model.forward_ids(torch.tensor([full])).float().log_softmax(-1)[0]
            want += sum(float(logp[len(full) - len(target) + k, t]) for k, t in enumerate(target))
    assert math.isfinite(got) and got == pytest.approx(want, rel=1e-4)


def test_model_args_dtype_sets_the_parameters_dtype(tmp_path):
    from synergen_lightning.eval.fid import EvalInputError
    from synergen_lightning.eval.lm_eval_adapter import SynerGenLM
    from tests.test_checkpoint import _cli_like_checkpoint
    from tests.test_system_helpers import tiny_model

    ckpt = _cli_like_checkpoint(tmp_path, tiny_model(stage="full"))
    for arg, dtype in (("bf16", torch.bfloat16), ("auto", torch.float32)):  # auto on a CPU: fp32
        lm = SynerGenLM.create_from_arg_string(f"pretrained={ckpt},dtype={arg}", {"batch_size": 2, "device": "cpu"})
        assert {p.dtype for p in lm.harness.model.parameters()} == {dtype}
    with pytest.raises(EvalInputError, match="dtype 'half' is not one of auto, bf16, fp32: e.g. --model_args"):
        SynerGenLM.create_from_arg_string(f"pretrained={ckpt},dtype=half", {"batch_size": 2, "device": "cpu"})


def test_missing_checkpoint_is_one_line(tmp_path):
    from synergen_lightning.eval.fid import EvalInputError
    from synergen_lightning.eval.lm_eval_adapter import SynerGenLM

    with pytest.raises(EvalInputError, match="pretrained=.*does not exist") as e:
        SynerGenLM.create_from_arg_string(f"pretrained={tmp_path / 'nope.ckpt'}", {"batch_size": 2, "device": "cpu"})
    assert "\n" not in str(e.value)


def test_command_line_names_a_missing_checkpoint(tmp_path, capsys, monkeypatch_module):
    """`synergen eval lm-eval run ...`: lm-eval's own command line, the adapter's one-line error."""
    from synergen_lightning.cli import main

    tasks = _tasks(tmp_path)
    code = main(["eval", "lm-eval", "run", "--model", "synergen", "--model_args", f"pretrained={tmp_path / 'no.ckpt'}",
                 "--tasks", "synergen_local_mc", "--include_path", str(tasks)])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-2].startswith("synergen eval lm-eval: error: pretrained=") and "does not exist" in err[-2]


@pytest.mark.slow  # `make test-all`: 30 s of process start-ups, beyond what CI's budget leaves
@pytest.mark.distributed
def test_two_torchrun_processes_score_as_one(tmp_path):
    """`torchrun --nproc-per-node 2 ... eval lm-eval run`: each rank scores its share (3 multiple-choice docs over 2
    ranks: lm-eval pads the shorter share), rank 0 gathers and writes; the figures and every sample's responses
    equal one process's, on a checkpoint the test saves to disk."""
    import glob
    import os
    import subprocess
    import sys

    from tests.test_eval_lmms_evaluator import save_tiny_checkpoint

    ckpt = save_tiny_checkpoint(tmp_path / "run")
    (tmp_path / "tasks").mkdir()
    tasks = _tasks(tmp_path / "tasks")
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK",
                                                             "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", TMPDIR=str(tmp_path))
    args = ["-m", "synergen_lightning.cli", "eval", "lm-eval", "run", "--model", "synergen", "--model_args",
            f"pretrained={ckpt},max_gen_toks=6", "--batch_size", "2", "--device", "cpu", "--tasks",
            "synergen_local_mc,synergen_local_gen", "--include_path", str(tasks), "--log_samples", "--seed", "0"]
    runs = {"one": [sys.executable], "two": [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                             "--nproc-per-node", "2"]}
    for name, launch in runs.items():
        r = subprocess.run([*launch, *args, "--output_path", str(tmp_path / name)], env=env, capture_output=True,
                           text=True, timeout=300)
        assert r.returncode == 0, f"{name}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"

    def read(name):
        (results,) = glob.glob(str(tmp_path / name / "**" / "results_*.json"), recursive=True)
        samples = {}
        for task in ("synergen_local_mc", "synergen_local_gen"):
            (path,) = glob.glob(str(tmp_path / name / "**" / f"samples_{task}_*.jsonl"), recursive=True)
            rows = [json.loads(line) for line in open(path)]
            # what each doc is scored on (`resps` of a padded share also hold the padding's repeats)
            samples[task] = sorted((r["doc_id"], r["filtered_resps"]) for r in rows)
            responses[name] = responses.get(name, 0) + sum(len(sum(r["resps"], [])) for r in rows)
        return json.loads(open(results).read())["results"], samples

    responses = {}  # one results file each (`read`): only rank 0 writes

    one, two = read("one"), read("two")
    assert [len(one[1][t]) for t in one[1]] == [len(MC), len(GEN)]
    assert one == two
    # the shares were scored apart: the shorter one was padded with repeats of its last request (5 of them)
    assert responses["two"] == responses["one"] + 5
