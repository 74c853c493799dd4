import copy

import pytest
import torch
from lightning.pytorch import Callback, Trainer

from callbacks.stages import FrozenParameterGuard, StageCallback
from synergen_lightning.stages import STAGES, StageSchedule, apply_stage, get_stage
from tests.test_system_helpers import loader, make_batch, tiny_model


def _trainer(callbacks, steps):
    return Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks)


def _batches(n):
    tasks = [["generation", "understanding"], ["text", "generation"], ["understanding", "text"]]
    return [make_batch(tasks[i % 3], seed=i) for i in range(n)]


def test_stage_table_and_unknown_names_are_errors():
    assert set(get_stage("stage1")["trainable"]) == {"image_embed_fold", "vision_ffn", "unfolding_head",
                                                     "special_token_embeddings"}
    assert "self_attention" in get_stage("stage2")["trainable"] and "text_backbone" not in get_stage("stage2")["trainable"]
    assert set(get_stage("sft")["trainable"]) == set(STAGES["sft"]["trainable"])
    with pytest.raises(ValueError, match=r"unknown stage 'stage3': valid stages are"):
        get_stage("stage3")
    with pytest.raises(ValueError, match=r"unknown parameter group\(s\) \['vision_ffns'\]: valid groups are"):
        get_stage({"trainable": ["vision_ffns"], "lr": 1e-3})


def test_apply_stage_counts():
    model = tiny_model()
    counts = apply_stage(model, "stage1")
    total = sum(p.numel() for p in model.parameters())
    assert sum(t + f for t, f in counts.values()) == total
    assert counts["self_attention"][0] == 0 and counts["vision_ffn"][1] == 0
    assert all(not p.requires_grad for _, p in model.parameter_groups()["text_backbone"])


def test_stage1_text_logits_bit_identical_to_base_llm_after_training():
    model = tiny_model()
    base = copy.deepcopy(model.llm.model)  # the base LLM as loaded
    img_before = model.folder.mlp[1].weight.detach().clone()
    vis_before = model.llm.model.layers[0].vision_ffn.up_proj.weight.detach().clone()
    _trainer([StageCallback("stage1"), FrozenParameterGuard(every_n_steps=2)], 6).fit(model, loader(_batches(6)))
    assert not torch.equal(model.folder.mlp[1].weight, img_before)  # image-specific parameters trained
    assert not torch.equal(model.llm.model.layers[0].vision_ffn.up_proj.weight, vis_before)
    ids = torch.randint(8, 64, (3, 12))
    model.eval()
    with torch.no_grad():
        system_logits = model.llm.model.logits(model.llm.model(model.embed_text(ids), image_mask=torch.zeros_like(ids, dtype=torch.bool)))
        base_logits = base.forward_ids(ids)
    assert torch.equal(system_logits, base_logits)


def test_stage_switch_mid_run_adds_param_group_with_stage_lr():
    model = tiny_model(lr={"stage1": 3e-3, "stage2": 1e-3})
    attn_before = model.llm.model.layers[1].attn.q_proj.weight.detach().clone()
    seen = {}

    class Spy(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            opt = trainer.optimizers[0]
            seen[trainer.global_step] = ([g.get("name") for g in opt.param_groups], [g["lr"] for g in opt.param_groups],
                                         model.llm.model.layers[1].attn.q_proj.weight.detach().clone())

    trainer = _trainer([StageCallback("stage1", switch_at={3: "stage2"}), FrozenParameterGuard(every_n_steps=1), Spy()], 6)
    trainer.fit(model, loader(_batches(6)))
    names3, _, w3 = seen[3]
    assert not any(n.startswith("stage2") for n in names3)
    assert torch.equal(w3, attn_before)  # attention frozen during stage 1
    names6, lrs6, w6 = seen[6]
    assert [n for n in names6 if n.startswith("stage2")] == ["stage2/decay"]  # attention has no bias/norm here
    # the new group follows stage 2's own cosine schedule, started at the switch step
    expected = StageSchedule("cosine", warmup_steps=0, total_steps=6, start_step=3)
    for step in (4, 5):
        names, lrs, _ = seen[step]
        assert lrs[names.index("stage2/decay")] == pytest.approx(1e-3 * expected(step))
        assert lrs[names.index("stage2/decay")] > 0
    assert pytest.approx(lrs6[names6.index("stage1/decay")]) == 3e-3
    assert not torch.equal(w6, attn_before)  # attention trains after the switch
    assert model.stage == "stage2"
    # the text backbone stayed frozen throughout (the guard also checked it every step)
    assert not model.llm.model.embed_tokens.weight.requires_grad


def test_guard_fails_loudly_when_a_frozen_parameter_changes():
    model = tiny_model()

    class Vandal(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            with torch.no_grad():
                pl_module.llm.model.norm.weight[0] += 1e-6

    with pytest.raises(RuntimeError,
                       match=r"FrozenParameterGuard: frozen parameter\(s\) changed during training \(e.g. \['"):
        _trainer([StageCallback("stage1"), Vandal(), FrozenParameterGuard(every_n_steps=1)], 2).fit(model, loader(_batches(2)))


def test_stage2_without_stage1_checkpoint_is_an_error(tmp_path):
    model = tiny_model()
    with pytest.raises(ValueError, match="stage 'stage2' needs the previous stage's weights: set model.init_from"):
        _trainer([StageCallback("stage2")], 1).fit(model, loader(_batches(1)))
    # explicit opt-in (the paper's "S.2 only" ablation) is allowed
    _trainer([StageCallback("stage2")], 1).fit(tiny_model(init_from_base_llm=True), loader(_batches(1)))
    with pytest.raises(FileNotFoundError, match="init_from .* does not exist: train the previous stage first"):
        _trainer([StageCallback("stage2")], 1).fit(tiny_model(init_from=str(tmp_path / "nope.ckpt")), loader(_batches(1)))


def test_stage_chain_loads_previous_checkpoint_and_fresh_optimizer(tmp_path):
    model = tiny_model()
    t1 = _trainer([StageCallback("stage1")], 2)
    t1.fit(model, loader(_batches(2)))
    ckpt = tmp_path / "stage1.ckpt"
    t1.save_checkpoint(ckpt)
    model2 = tiny_model(init_from=str(ckpt), stage="stage2")
    _trainer([StageCallback("stage2"), FrozenParameterGuard()], 0 + 1).fit(model2, loader(_batches(1)))
    # stage-1 weights arrived (the stage-2 step only moves trainable groups a little)
    torch.testing.assert_close(model2.llm.model.embed_tokens.weight, model.llm.model.embed_tokens.weight, rtol=0, atol=0)


def test_schedule_warmup_and_cosine():
    s = StageSchedule("cosine", warmup_steps=10, total_steps=110)
    assert s(0) == pytest.approx(0.1) and s(9) == pytest.approx(1.0)
    assert s(60) == pytest.approx(0.5, abs=1e-2) and s(110) == pytest.approx(0.0, abs=1e-6)
    assert StageSchedule("constant", 5)(1000) == 1.0
    late = StageSchedule("cosine", warmup_steps=2, total_steps=12, start_step=10)
    assert late(10) == pytest.approx(0.5)


def test_resume_after_a_switch_restores_stage_and_optimizer_groups(tmp_path):
    model = tiny_model(lr={"stage1": 3e-3, "stage2": 1e-3})
    cb = lambda: [StageCallback("stage1", switch_at={2: "stage2"}), FrozenParameterGuard()]  # noqa: E731
    t1 = _trainer(cb(), 4)
    t1.fit(model, loader(_batches(4)))
    ckpt = tmp_path / "mid.ckpt"
    t1.save_checkpoint(ckpt)
    names = [g["name"] for g in t1.optimizers[0].param_groups]
    assert names == ["stage1/decay", "stage1/no_decay", "stage2/decay"]
    # logged to TensorBoard-bound metrics: per-task losses, grad norm, counts
    assert {"train/loss", "train/loss_text", "train/loss_image", "train/grad_norm", "train/text_tokens",
            "train/samples_generation", "train/tokens_understanding"} <= set(t1.callback_metrics)

    resumed = tiny_model(lr={"stage1": 3e-3, "stage2": 1e-3})
    t2 = _trainer(cb(), 6)
    t2.fit(resumed, loader(_batches(6)), ckpt_path=ckpt)
    assert resumed.stage_history == [(0, "stage1"), (2, "stage2")] and resumed.stage == "stage2"
    assert [g["name"] for g in t2.optimizers[0].param_groups] == names
    assert resumed.llm.model.layers[0].attn.q_proj.weight.requires_grad
    assert t2.global_step == 6


def test_lr_scale_gives_a_group_its_own_fraction_of_the_stage_lr():
    """lr_scale {self_attention: 0.1}: attention gets its own AdamW groups at 0.1 x the stage lr, same schedule;
    the other trainable groups keep the full lr; a misspelt group is an error."""
    model = tiny_model(stage="stage2", lr=1e-3, lr_scale={"self_attention": 0.1}, init_from_base_llm=True)
    seen = {}

    class Spy(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            opt = trainer.optimizers[0]
            seen[trainer.global_step] = {g["name"]: (g["lr"], {id(p) for p in g["params"]}) for g in opt.param_groups}

    _trainer([StageCallback("stage2"), Spy()], 4).fit(model, loader(_batches(4)))
    groups = seen[max(seen)]
    assert set(groups) == {"stage2/decay", "stage2/no_decay", "stage2/x0.1/decay"}
    attn = {id(p) for _, p in model.parameter_groups()["self_attention"]}
    assert groups["stage2/x0.1/decay"][1] == attn
    assert not attn & (groups["stage2/decay"][1] | groups["stage2/no_decay"][1])
    assert groups["stage2/x0.1/decay"][0] == pytest.approx(0.1 * groups["stage2/decay"][0])
    bad = tiny_model(stage="stage2", lr=1e-3, lr_scale={"attention": 0.1}, init_from_base_llm=True)
    with pytest.raises(ValueError, match="attention"):
        _trainer([StageCallback("stage2")], 1).fit(bad, loader(_batches(1)))


def test_stage_switch_honours_lr_scale_and_matches_the_resumed_layout(tmp_path):
    """A step-scheduled switch into stage 2 with lr_scale {self_attention: 0.1} adds attention at 0.1 x the stage-2 lr,
    with the group names configure_optimizers rebuilds on resume (so the saved optimizer state fits)."""
    kw = dict(lr={"stage1": 3e-3, "stage2": 1e-3}, lr_scale={"self_attention": 0.1})
    model = tiny_model(**kw)
    t1 = _trainer([StageCallback("stage1", switch_at={2: "stage2"})], 4)
    t1.fit(model, loader(_batches(4)))
    groups = {g["name"]: g for g in t1.optimizers[0].param_groups}
    assert [g["name"] for g in t1.optimizers[0].param_groups] == ["stage1/decay", "stage1/no_decay", "stage2/x0.1/decay"]
    expected = StageSchedule("cosine", warmup_steps=0, total_steps=4, start_step=2)
    assert groups["stage2/x0.1/decay"]["lr"] == pytest.approx(0.1 * 1e-3 * expected(4))
    ckpt = tmp_path / "mid.ckpt"
    t1.save_checkpoint(ckpt)
    resumed = tiny_model(**kw)
    t2 = _trainer([StageCallback("stage1", switch_at={2: "stage2"})], 5)
    t2.fit(resumed, loader(_batches(5)), ckpt_path=ckpt)
    assert [g["name"] for g in t2.optimizers[0].param_groups] == list(groups)


def test_init_from_a_checkpoint_with_another_fold_is_an_error(tmp_path):
    # (2, 2) and (1, 4) folds give the folder the same weight shapes: only the saved hyper-parameters tell them apart
    t1 = _trainer([StageCallback("stage1")], 1)
    t1.fit(tiny_model(), loader(_batches(1)))
    ckpt = tmp_path / "stage1.ckpt"
    t1.save_checkpoint(ckpt)
    other = tiny_model(init_from=str(ckpt), stage="stage2", fold=(1, 4))
    with pytest.raises(ValueError, match=r"another image geometry \(fold: checkpoint \[2, 2\] vs recipe \[1, 4\]\)"):
        _trainer([StageCallback("stage2")], 1).fit(other, loader(_batches(1)))


def test_a_data_tokenizer_other_than_the_models_is_an_error(tmp_path):
    from types import SimpleNamespace

    from synergen_lightning.model_parts import load_text_tokenizer
    from synergen_lightning.text_tokenizer import train_bpe

    dirs = {}
    for name, words in (("a", "red circle blue square"), ("b", "green triangle yellow cross")):
        corpus = tmp_path / f"{name}.jsonl"
        corpus.write_text("".join(f'{{"text": "a {words} {i}"}}\n' for i in range(50)))
        train_bpe([corpus], 300, tmp_path / name)
        dirs[name] = str(tmp_path / name)
    model = tiny_model(text_tokenizer=dirs["a"], special_token_ids=None,
                       llm={**tiny_model().hparams.llm, "vocab_size": 300})
    model._trainer = SimpleNamespace(datamodule=SimpleNamespace(tokenizer=load_text_tokenizer(dirs["a"])))
    model._check_data_tokenizer()  # the same tokenizer, loaded twice: fine
    model._trainer = SimpleNamespace(datamodule=SimpleNamespace(tokenizer=load_text_tokenizer(dirs["b"])))
    with pytest.raises(ValueError, match=r"the data's text tokenizer .*/b' .* is not the model's .*/a' .*same directory"):
        model._check_data_tokenizer()


def test_init_from_an_unfinished_run_warns_with_the_step(tmp_path):
    """A stage started from the mid-run checkpoint of an interrupted previous stage says so (step 2 of 4)."""
    ckpt = tmp_path / "stage1.ckpt"

    class SaveAtStep2(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 2:
                trainer.save_checkpoint(ckpt)

    _trainer([StageCallback("stage1"), SaveAtStep2()], 4).fit(tiny_model(), loader(_batches(4)))
    with pytest.warns(UserWarning, match=r"stopped at step 2 of its run's 4: starting from an unfinished run"):
        _trainer([StageCallback("stage2")], 1).fit(tiny_model(init_from=str(ckpt), stage="stage2"), loader(_batches(1)))
    finished = tmp_path / "finished.ckpt"
    t = _trainer([StageCallback("stage1")], 2)
    t.fit(tiny_model(), loader(_batches(2)))
    t.save_checkpoint(finished)
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*unfinished run.*")
        _trainer([StageCallback("stage2")], 1).fit(tiny_model(init_from=str(finished), stage="stage2"), loader(_batches(1)))


# ---- the one schedule and the one decay rule, against the formulas the base LLM and the tokenizer are defined by
def _base_llm_formula(step: int, warmup_steps: int, total: int, floor: float) -> float:
    """Linear warm-up over min(warmup_steps, total) steps, then cosine from 1 to `floor` at `total`."""
    import math

    warmup = min(warmup_steps, total)
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def _tokenizer_formula(step: int, warmup_steps: int, total: int, kind: str) -> float:
    """Linear warm-up, then 1 (constant) or cosine from 1 to 0 at `total`."""
    import math

    w = min(1.0, (step + 1) / max(1, warmup_steps))
    if kind == "cosine" and step >= warmup_steps:
        w = 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup_steps) / max(1, total - warmup_steps))))
    return w


def _attach(module, total_steps: int):
    from types import SimpleNamespace

    module._trainer = SimpleNamespace(estimated_stepping_batches=total_steps)
    return module


def _small_llm(**kw):
    from synergen_lightning.llm import MMoELLM

    return MMoELLM.from_paths(config=dict(vocab_size=64, hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2,
                                          intermediate_size=64, max_position_embeddings=64), **kw)


@pytest.mark.parametrize("warmup,total,floor", [(50, 2000, 0.1), (5, 25, 0.0), (0, 30, 0.25), (40, 10, 0.1), (1, 1, 0.5)])
def test_base_llm_schedule_is_its_formula_exactly(warmup, total, floor):
    opt = _attach(_small_llm(warmup_steps=warmup, min_lr_ratio=floor), total).configure_optimizers()
    schedule = opt["lr_scheduler"]["scheduler"].lr_lambdas[0]
    assert isinstance(schedule, StageSchedule)
    for step in range(total + 5):
        assert schedule(step) == _base_llm_formula(step, warmup, total, floor), step


@pytest.mark.parametrize("kind,warmup,total", [("constant", 50, 300), ("constant", 0, 10), ("cosine", 2, 6),
                                               ("cosine", 0, 20), ("cosine", 30, 10), ("cosine", 7, 200)])
def test_tokenizer_schedule_is_its_formula_exactly(kind, warmup, total):
    from synergen_lightning.image_tokenizer.vq_tokenizer import VQTokenizer
    from tests.test_image_tokenizer import SMALL

    tok = _attach(VQTokenizer(**{**SMALL, "warmup_steps": warmup}, lr_schedule=kind), total)
    schedule = tok.configure_optimizers()["lr_scheduler"]["scheduler"].lr_lambdas[0]
    assert isinstance(schedule, StageSchedule)
    for step in range(total + 5):
        assert schedule(step) == _tokenizer_formula(step, warmup, total if kind == "cosine" else 0, kind), step


def test_base_llm_param_groups_keep_the_embedding_and_1d_parameters_undecayed():
    llm = _attach(_small_llm(weight_decay=0.1), 10)
    frozen = next(p for n, p in llm.named_parameters() if p.ndim >= 2 and "embed_tokens" not in n)
    frozen.requires_grad_(False)  # in neither group
    groups = llm.configure_optimizers()["optimizer"].param_groups
    named = [(n, p) for n, p in llm.named_parameters() if p.requires_grad]
    want_decay = [p for n, p in named if p.ndim >= 2 and "embed_tokens" not in n]
    want_no_decay = [p for n, p in named if p.ndim < 2 or "embed_tokens" in n]
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    assert [id(p) for p in groups[0]["params"]] == [id(p) for p in want_decay]
    assert [id(p) for p in groups[1]["params"]] == [id(p) for p in want_no_decay]
    assert any("embed_tokens" in n for n, _ in named) and any(p.ndim < 2 for _, p in named)
    assert all("name" not in g for g in groups)


def test_stage_groups_decay_matrices_but_not_norms_or_1d_parameters():
    from synergen_lightning.stages import STAGE_NO_DECAY, decay_split, optimizer_param_groups

    model = tiny_model()
    named = list(model.named_parameters())
    decay, no_decay = decay_split(named)
    assert STAGE_NO_DECAY == ("norm",)
    assert [id(p) for p in decay] == [id(p) for n, p in named if p.ndim >= 2 and "norm" not in n]
    assert [id(p) for p in no_decay] == [id(p) for n, p in named if p.ndim < 2 or "norm" in n]
    groups = optimizer_param_groups(named, 1e-3, 0.05, tag="stage1")
    assert [(g["name"], g["weight_decay"], len(g["params"])) for g in groups] == [
        ("stage1/decay", 0.05, len(decay)), ("stage1/no_decay", 0.0, len(no_decay))]
