"""Sample grids, periodic evaluation and throughput/MFU callbacks in a real (tiny) Lightning run."""

import copy
import json

import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.flop_counter import FlopCounterMode

from callbacks.evaluator import PeriodicEvaluator, headline
from callbacks.sample_grid import SampleGridLogger
from callbacks.throughput import SynerGenThroughputMonitor, batch_flops, flops_per_token
from synergen_lightning.eval.grid import image_grid
from synergen_lightning.eval.suites import flatten_metrics
from synergen_lightning.llm import evaluate_text_skill
from tests.test_generation import _model
from tests.test_system_helpers import loader, make_batch

PROMPTS = [
    {"index": 0, "tag": "single_object", "prompt": "a photo of a circle", "include": [{"class": "circle", "count": 1}],
     "exclude": []},
    {"index": 1, "tag": "colors", "prompt": "a photo of a red square",
     "include": [{"class": "square", "count": 1, "color": "red"}], "exclude": []},
]


def _events(logdir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    return acc


def _skill(tmp_path, trunk, tok):
    """Skill lines whose answers are `trunk`'s own greedy continuations (so its accuracy is 1) but for one."""
    rows = []
    for i in range(4):
        prompt = f"Q: {i} + {i} A:"
        ids = torch.tensor([[tok.bos_id] + tok.encode(prompt)])
        gen = trunk.generate_greedy(ids, 16, eos_id=tok.eos_id)[0].tolist()
        gen = gen[: gen.index(tok.eos_id)] if tok.eos_id in gen else gen
        answer = tok.decode(gen).strip().split("\n")[0].strip()
        rows.append({"prompt": prompt, "answer": answer if i else answer + "x"})
    path = tmp_path / "skill.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_grid_layout_matches_a_manual_paste():
    imgs = torch.rand(5, 3, 4, 6)
    grid = image_grid(imgs, nrow=3, pad=1, pad_value=0.5)
    assert grid.shape == (3, 2 * 5 + 1, 3 * 7 + 1)
    for k in range(5):
        r, c = divmod(k, 3)
        assert torch.equal(grid[:, 1 + r * 5: 1 + r * 5 + 4, 1 + c * 7: 1 + c * 7 + 6], imgs[k])
    assert torch.all(grid[:, 6:10, 15:21] == 0.5)  # the blank sixth cell


def test_grid_logger_and_evaluator_write_tensorboard(tmp_path):
    model = _model()
    base = copy.deepcopy(model.llm.model)  # the "base LLM" before training: retention starts at exactly 1
    skill = _skill(tmp_path, base, model.text_tokenizer)
    base_acc = evaluate_text_skill(base, model.text_tokenizer, skill)
    assert base_acc == 0.75
    grid_cb = SampleGridLogger(prompts=["a red circle", "a blue square"], seeds=[0, 1], every_n_steps=2,
                               on_train_end=False)
    eval_cb = PeriodicEvaluator(every_n_steps=2, eval_prompts=PROMPTS, skill_jsonl=str(skill), base_llm=base,
                                batch_size=2, on_train_end=False, progress=False)
    # evaluated before any step: the trunk is the base, so retention is 1 whatever the accuracy
    eval_cb.setup(None, model, "fit")
    first = eval_cb.evaluate(model)
    assert first["text"]["accuracy"] == base_acc and first["text"]["base_accuracy"] == base_acc
    assert first["text"]["retention"] == 1.0
    assert set(first["geneval"]) >= {"overall", "single_object", "colors"}
    model.train()
    logger = TensorBoardLogger(tmp_path, name="run", version="")
    trainer = Trainer(max_steps=4, logger=logger, callbacks=[grid_cb, eval_cb], enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1, accelerator="cpu")
    batches = [make_batch(["generation", "understanding", "text"], seed=s) for s in range(4)]
    trainer.fit(model, loader(batches))
    assert grid_cb.logged_steps == [2, 4]
    assert [s for s, _ in eval_cb.history] == [2, 4]
    acc = _events(tmp_path / "run")
    images = acc.Images("samples/grid")
    assert [e.step for e in images] == [2, 4]
    # 2 prompts x 2 seeds of 16x16 images, 2-px borders
    assert (images[0].height, images[0].width) == (2 * 18 + 2, 2 * 18 + 2)
    tags = acc.Tags()["scalars"]
    for tag in ("eval/geneval/overall", "eval/geneval/colors", "eval/text/accuracy", "eval/text/retention",
                "eval/text/base_accuracy", "train/loss"):
        assert tag in tags, tag
    retention = [e.value for e in acc.Scalars("eval/text/retention")]
    text_acc = [e.value for e in acc.Scalars("eval/text/accuracy")]
    assert retention == pytest.approx([a / base_acc for a in text_acc])
    assert model.training  # the callbacks restored train mode


def test_grids_are_reproducible_for_fixed_seeds():
    model = _model()
    cb = SampleGridLogger(prompts=["a red circle"], seeds=[3, 4])
    a, b = cb.make_grid(model), cb.make_grid(model)
    assert torch.equal(a, b)
    assert not torch.equal(a[:, :, :18], a[:, :, 18:36])  # the two seeds differ


@pytest.mark.parametrize("board", [True, False], ids=["tensorboard", "csv logger"])
def test_every_rank_draws_the_same_grids_under_accumulation_and_at_the_end(tmp_path, monkeypatch, board):
    """A grid is a generation every rank runs together (FSDP gathers): each rank draws at the same steps, once per
    step whatever the micro-batches and the end of training, and none draws where nothing would log it."""
    from types import SimpleNamespace

    from lightning.pytorch.loggers import CSVLogger

    drawn = {0: [], 1: []}
    for rank in (0, 1):
        cb = SampleGridLogger(prompts=["a red circle"], every_n_steps=2)
        trainer = SimpleNamespace(global_step=0, is_global_zero=rank == 0, loggers=[
            TensorBoardLogger(tmp_path / str(rank)) if board else CSVLogger(tmp_path / str(rank))])
        monkeypatch.setattr(cb, "make_grid", lambda module, r=rank, t=trainer: drawn[r].append(t.global_step)
                            or torch.zeros(3, 4, 4))
        for step in (1, 1, 2, 2, 3, 3, 4, 4):  # two micro-batches a step
            trainer.global_step = step
            cb.on_train_batch_end(trainer, None, None, None, 0)
        cb.on_train_end(trainer, None)
        # closed as a Trainer closes its loggers: an open SummaryWriter's thread would go on flushing for the rest of
        # the pytest run
        trainer.loggers[0].finalize("success")
    assert drawn == ({0: [2, 4], 1: [2, 4]} if board else {0: [], 1: []})


def test_tokens_of_a_batch_come_from_the_collates_counts_as_from_its_mask():
    from callbacks.throughput import batch_tokens
    from synergen_lightning.data.batch import add_indices

    batch = add_indices(make_batch(["generation", "understanding", "text"], seed=3))
    batch["attention_mask"][0, -3:] = False
    batch["row_tokens"] = batch["attention_mask"].sum(-1).tolist()
    assert batch_tokens(batch) == int(batch["attention_mask"].sum()) == batch_tokens({**batch, "row_tokens": None})


def test_evaluator_refuses_missing_inputs(tmp_path):
    with pytest.raises(ValueError, match="nothing to run"):
        PeriodicEvaluator(every_n_steps=2)
    cb = PeriodicEvaluator(every_n_steps=2, eval_prompts=str(tmp_path / "missing.jsonl"))
    with pytest.raises(FileNotFoundError, match="missing.jsonl.*does not exist"):
        cb.setup(None, None, "fit")


def test_the_console_line_holds_each_suites_figures_and_counts_the_breakdowns():
    metrics = flatten_metrics({"geneval": {"overall": 0.5, "colors": 0.25},
                               "und": {"accuracy": 0.75, "per_kind": {"count": 1.0, "shape": 0.5},
                                       "per_kind_by_objects": {"count": {"1": 1.0, "2": 0.0}}}})
    assert headline(7, metrics) == ("eval @ step 7: geneval/colors=0.250, geneval/overall=0.500, und/accuracy=0.750 "
                                    "(+4 per kind and object count in the loggers)")
    assert headline(7, {"eval/text/accuracy": 1.0}) == "eval @ step 7: text/accuracy=1.000"


def test_batch_flops_match_torch_flop_counter():
    model = _model().train().requires_grad_(True)  # 6N assumes weight gradients everywhere (MFU convention)
    # all-generation rows have equal length: no padding, so the counter sees exactly the real tokens
    batch = make_batch(["generation", "generation", "understanding"], seed=1)
    batch["attention_mask"][:] = True
    with FlopCounterMode(display=False) as counter:
        out = model.forward_losses(batch)
        out["loss"].backward()
    ops = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    weight_matmuls = sum(n for op, n in ops.items() if op.split(".")[-1] in ("mm", "addmm"))
    assert weight_matmuls > 0
    # the chunked classifiers recompute their logits in the backward (models/chunked_ce.py): hardware work that
    # the model's FLOPs (the MFU convention, like activation checkpointing's recompute) leave out
    recompute = 2 * out["text_tokens"] * model.llm.model.lm_head.in_features * model.llm.model.lm_head.out_features \
        + 2 * out["image_codes"] * model.head.model.classifier.in_features * model.head.model.classifier.out_features
    # weight matmuls (forward + both backward matmuls) against our count without attention
    assert batch_flops(model, batch, attention=False) == pytest.approx(weight_matmuls - recompute, rel=1e-6)
    T = batch["input_ids"].shape[1]
    assert batch_flops(model, batch) > batch_flops(model, batch, attention=False)
    assert batch_flops(model, batch, training=False) == pytest.approx(batch_flops(model, batch) / 3)
    assert flops_per_token(model, T) > 6 * sum(p.numel() for n, p in model.llm.model.layers.named_parameters()
                                               if ".vision_ffn." not in n)


def test_throughput_monitor_logs_tokens_per_second_and_mfu(tmp_path):
    model = _model().train()
    mon = SynerGenThroughputMonitor(available_flops=1e12, window_size=2)
    logger = TensorBoardLogger(tmp_path, name="run", version="")
    trainer = Trainer(max_steps=4, logger=logger, callbacks=[mon], enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, log_every_n_steps=1, accelerator="cpu")
    trainer.fit(model, loader([make_batch(["generation", "text"], seed=s) for s in range(4)]))
    acc = _events(tmp_path / "run")
    tags = acc.Tags()["scalars"]
    for tag in ("train/device/items_per_sec", "train/device/samples_per_sec", "train/device/mfu",
                "train/device/flops_per_sec"):
        assert tag in tags, sorted(tags)
    mfu = [e.value for e in acc.Scalars("train/device/mfu")]
    fps = [e.value for e in acc.Scalars("train/device/flops_per_sec")]
    assert mfu == pytest.approx([f / 1e12 for f in fps], rel=1e-5) and all(f > 0 for f in fps)


def test_evaluator_understanding_on_val_shards(tmp_path):
    from synergen_lightning.world.shards import SynthConfig, write_dataset

    write_dataset(SynthConfig(out=tmp_path / "w", num_samples=6, shard_size=50, canvas=48, val_fraction=0.5,
                              num_eval_prompts=6, workers=1, progress=False))
    model = _model()
    cb = PeriodicEvaluator(every_n_steps=1, val_shards=str(tmp_path / "w" / "val" / "shard-*.tar"), num_und=5,
                           batch_size=5, progress=False)
    cb.setup(None, model, "fit")
    assert len(cb._qa) == 5 and all(it["question"] and it["answer"] for it in cb._qa)
    res = cb.evaluate(model)
    answers = model.answer([it["image"] for it in cb._qa], [it["question"] for it in cb._qa], max_new_tokens=16)
    expected = sum(a.strip().lower() == it["answer"].strip().lower() for a, it in zip(answers, cb._qa)) / 5
    assert res["und"]["accuracy"] == expected and res["und"]["num_items"] == 5
