import pytest
import torch
import torch.nn.functional as F

from synergen_lightning.stages import PARAMETER_GROUPS
from tests.test_system_helpers import SPECIAL, make_batch, tiny_model


def test_parameter_groups_cover_every_parameter_once():
    model = tiny_model()
    groups = model.parameter_groups()
    assert tuple(groups) == PARAMETER_GROUPS
    names = [n for g in groups.values() for n, _ in g]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())
    assert all(".vision_ffn." in n for n, _ in groups["vision_ffn"])
    assert all(".attn." in n for n, _ in groups["self_attention"])
    assert {n for n, _ in groups["special_token_embeddings"]} == {"special_embed.weight"}
    assert "llm.model.embed_tokens.weight" in {n for n, _ in groups["text_backbone"]}
    # vision FFNs start as copies of the text FFNs
    layer = model.llm.model.layers[0]
    assert torch.equal(layer.vision_ffn.up_proj.weight, layer.text_ffn.up_proj.weight)


def test_the_system_holds_the_component_lightning_modules_and_their_groups():
    """The trunk and the head are LightningModules with the pure modules inside; the system's groups are theirs under
    their prefixes plus its own folder and special table, and its val metrics are the components' own."""
    from lightning.pytorch import LightningModule

    from synergen_lightning.head import UnfoldingHeadModule
    from synergen_lightning.llm import MMoELLM
    from synergen_lightning.models.mmoe import MMoETransformer
    from synergen_lightning.models.unfolding_head import UnfoldingHead

    model = tiny_model()
    assert isinstance(model.llm, MMoELLM) and isinstance(model.llm.model, MMoETransformer)
    assert isinstance(model.head, UnfoldingHeadModule) and isinstance(model.head.model, UnfoldingHead)
    # the frozen image tokenizer (a VQTokenizer LightningModule) is held, never a submodule: not trained, not saved
    from synergen_lightning.image_tokenizer.vq_tokenizer import VQTokenizer
    from tests.test_image_tokenizer import SMALL

    keys = set(model.state_dict())
    vq = VQTokenizer(**{**SMALL, "codebook_size": 16})
    model.set_image_tokenizer(vq)
    assert model.image_tokenizer is vq and not vq.training and not any(p.requires_grad for p in vq.parameters())
    assert [n for n, m in model.named_modules() if isinstance(m, LightningModule)] == ["", "llm", "head"]
    assert set(model.state_dict()) == keys
    groups = model.parameter_groups()
    for prefix, component in (("llm.", model.llm), ("head.", model.head)):
        for g, members in component.parameter_groups().items():
            assert [prefix + n for n, _ in members] == [n for n, _ in groups[g]]
    assert [n for n, _ in groups["image_embed_fold"]] == ["folder." + n for n, _ in model.folder.named_parameters()]
    # each component saves its own constructor arguments only (not the system's, which Lightning's frame inspection
    # would add and let override: the system's lr in place of the component's)
    import inspect

    for component in (model.llm, model.head):
        assert set(component.hparams) == set(inspect.signature(type(component)).parameters)
    assert model.head.hparams.lr == inspect.signature(UnfoldingHeadModule).parameters["lr"].default != model.hparams.lr
    # the head config the system gives its component: the LLM's norm epsilon and RoPE base
    assert model.head.model.config.rms_norm_eps == model.llm.model.config.rms_norm_eps
    assert model.head.model.config.rope_theta == model.llm.model.config.rope_theta


def test_validation_logs_the_components_metrics_weighted_by_tokens_and_codes():
    """val/loss_text and val/loss_image are the trunk's and the head's MeanMetrics: over batches with different
    counts, the token- (code-) weighted mean of the per-batch losses, as an independent sum computes it."""
    from lightning.pytorch import Trainer

    model = tiny_model(stage="sft")
    batches = [make_batch(["text", "generation"], seed=1), make_batch(["understanding"], seed=2)]
    with torch.no_grad():
        outs = [model(b) for b in batches]
    trainer = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    got = trainer.validate(model, torch.utils.data.DataLoader(batches, batch_size=None, collate_fn=lambda b: b),
                           verbose=False)[0]
    for key, count in (("loss_text", "text_tokens"), ("loss_image", "image_codes")):
        weights = [float(o[count]) for o in outs]
        want = sum(float(o[key]) * w for o, w in zip(outs, weights)) / sum(weights)
        assert got[f"val/{key}"] == pytest.approx(want, rel=1e-5), key


def _reference_losses(model, batch):
    """Independent loops: per view / per patch, full-vocabulary logits, HF-style shifted CE."""
    codes = batch["image_codes"]
    m, n = model.fold_size
    x = model.llm.model.embed_tokens(batch["input_ids"]).clone()
    for b in range(x.shape[0]):
        for t in range(x.shape[1]):
            tok = int(batch["input_ids"][b, t])
            for k, name in enumerate(("boi", "eoi", "uncond")):
                if tok == SPECIAL[name] and not batch["image_mask"][b, t]:
                    x[b, t] = model.special_embed.weight[k]
    slots = [(b, t) for b in range(x.shape[0]) for t in range(x.shape[1]) if batch["image_mask"][b, t]]
    emb = model.folder.code_embed(codes) + model.folder.pos_embed
    h, w = model.grid
    patch_codes, k = [], 0
    for v in range(codes.shape[0]):
        for pi in range(h // m):
            for pj in range(w // n):
                cells = [(pi * m + r, pj * n + c) for r in range(m) for c in range(n)]
                b, t = slots[k]
                x[b, t] = model.folder.mlp(torch.cat([emb[v, r, c] for r, c in cells]))
                patch_codes.append((v, (b, t), torch.stack([codes[v, r, c] for r, c in cells])))
                k += 1
    hidden = model.llm.model(x, image_mask=batch["image_mask"], position_ids=batch["position_ids"],
                       attention_mask=batch["attention_mask"])
    logits = model.llm.model.logits(hidden)
    loss_text = F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=-100)
    conds, targets = [], []
    for v, (b, t), pc in patch_codes:
        if batch["image_loss_mask"][v]:
            conds.append(hidden[b, t - 1])
            targets.append(pc)
    head_logits = model.head(torch.stack(conds), torch.stack(targets))
    loss_image = F.cross_entropy(head_logits.flatten(0, 1), torch.stack(targets).flatten())
    return loss_text, loss_image


def test_losses_match_an_independent_loop_implementation():
    model = tiny_model()
    batch = make_batch(["generation", "understanding", "text", "generation"])
    out = model.forward_losses(batch)
    ref_text, ref_image = _reference_losses(model, batch)
    torch.testing.assert_close(out["loss_text"], ref_text)
    torch.testing.assert_close(out["loss_image"], ref_image)
    torch.testing.assert_close(out["loss"], ref_text + 2.0 * ref_image)
    assert out["image_codes"] == 2 * 4 * 4 * 4 // 4 * 1  # 2 generation views x 16 codes


def test_fold_reconstruction_adds_its_weighted_loss_over_every_view_and_trains_with_the_folder():
    plain = tiny_model()
    model = tiny_model(fold_reconstruction_weight=0.5)
    state = plain.state_dict()
    result = model.load_state_dict(state, strict=False)  # the same weights, plus the read-out
    assert result.missing_keys == ["folder.recon.weight", "folder.recon.bias"] and not result.unexpected_keys
    batch = make_batch(["generation", "understanding", "text", "generation"])
    out, ref = model.forward_losses(batch), plain.forward_losses(batch)
    torch.testing.assert_close(out["loss_text"], ref["loss_text"])
    torch.testing.assert_close(out["loss_image"], ref["loss_image"])
    # every view of the batch, understanding ones included, is read back
    expected = model.folder.reconstruction_loss(model.folder.fold(batch["image_codes"]), batch["image_codes"])
    torch.testing.assert_close(out["loss_fold_reconstruction"], expected)
    torch.testing.assert_close(out["loss"], ref["loss"] + 0.5 * expected)
    groups = {n for n, _ in model.parameter_groups()["image_embed_fold"]}
    assert {"folder.recon.weight", "folder.recon.bias"} <= groups
    with pytest.raises(ValueError, match="fold_reconstruction_weight=-1"):
        tiny_model(fold_reconstruction_weight=-1)


def test_text_only_batch_still_runs_folder_vision_ffn_and_head():
    model = tiny_model()
    calls = []
    for name, mod in [("folder", model.folder), ("head", model.head), ("vision", model.llm.model.layers[0].vision_ffn)]:
        mod.register_forward_hook(lambda m, i, o, name=name: calls.append(name))
    batch = make_batch(["text", "text"])
    out = model.forward_losses(batch)
    out["loss"].backward()
    assert {"folder", "head", "vision"} <= set(calls)
    assert out["loss_image"].item() == 0.0 and out["image_codes"] == 0
    # they are in the autograd graph (zero gradients, not None): FSDP's reduce-scatter runs on every rank
    assert model.head.model.classifier.weight.grad is not None
    assert model.llm.model.layers[0].vision_ffn.up_proj.weight.grad is not None


def test_bad_inputs_are_one_line_errors():
    with pytest.raises(ValueError, match="folding factor 3x2 does not divide the code grid 4x4"):
        tiny_model(fold=(3, 2))
    model = tiny_model()
    batch = make_batch(["generation"])
    batch["image_codes"] = torch.zeros(1, 8, 8, dtype=torch.long)
    with pytest.raises(ValueError, match="does not match the folder's grid"):
        model.forward_losses(batch)

    class FakeTok:
        codebook_size, downsample = 32, 4

    model.set_image_tokenizer(FakeTok())
    with pytest.raises(ValueError, match="codebook_size 32 != the model's code embedding table 16"):
        _ = model.image_tokenizer


def test_overfits_a_fixed_mixed_batch_in_stage1_and_sft():
    from synergen_lightning.stages import apply_stage

    for stage, key in (("stage1", "loss_image"), ("sft", "loss")):
        torch.manual_seed(0)
        model = tiny_model()
        apply_stage(model, stage)
        batch = make_batch(["generation", "understanding", "text", "generation"])
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        first = model.forward_losses(batch)[key].item()
        for _ in range(20):
            out = model.forward_losses(batch)
            out["loss"].backward()
            opt.step()
            opt.zero_grad()
        assert out[key].item() < 0.5 * first, (stage, first, out[key].item())


def test_per_task_text_loss_is_the_mean_of_each_tasks_token_mean():
    """text_loss="task": each task's own token mean, then their mean (independent per-row loop)."""
    torch.manual_seed(0)
    model = tiny_model(text_loss="task")
    batch = make_batch(["understanding", "text", "text", "generation", "understanding"])
    out = model.forward_losses(batch)
    ref_text, ref_image = _reference_losses(model, batch)
    # reference: per-row token losses from the same logits, grouped by the row's task in plain Python
    token_loss = {}
    model.hparams.text_loss = "token"
    for b, task in enumerate(batch["task"]):
        row = {k: (v[b:b + 1] if torch.is_tensor(v) and v.shape[0] == len(batch["task"]) else v) for k, v in batch.items()}
        if (row["labels"][:, 1:] != -100).sum() == 0:
            continue
        # the model's token mean on one row, scaled back to a sum
        views = [i for i, t in enumerate(batch["task"]) if t in ("generation", "understanding")]
        vi = [views.index(b)] if b in views else []
        row["image_codes"] = batch["image_codes"][vi]
        row["image_loss_mask"] = batch["image_loss_mask"][vi]
        row["task"] = [task]
        n = int((row["labels"][:, 1:] != -100).sum())
        s, c = token_loss.get(task, (0.0, 0))
        token_loss[task] = (s + model.forward_losses(row)["loss_text"] * n, c + n)
    expected = torch.stack([s / c for s, c in token_loss.values()]).mean()
    assert set(token_loss) == {"understanding", "text"}  # generation rows supervise no text
    torch.testing.assert_close(out["loss_text"], expected)
    assert not torch.allclose(out["loss_text"], ref_text)  # differs from the one batch-wide token mean
    torch.testing.assert_close(out["loss_image"], ref_image)
    with pytest.raises(ValueError, match="text_loss='row'"):
        tiny_model(text_loss="row")


def test_val_losses_are_token_weighted_over_batches_of_one_task_each():
    """A generation-only val batch has no text loss: it must not pull val/loss_text towards 0."""
    import lightning as L

    from tests.test_system_helpers import loader

    model = tiny_model()
    batches = [make_batch(["generation"] * 2, seed=0), make_batch(["understanding"] * 2, seed=1),
               make_batch(["understanding"], seed=2)]
    with torch.no_grad():
        outs = [model(b) for b in batches]
    und = [o for o in outs if o["text_tokens"] > 0]
    want_text = sum(float(o["loss_text"]) * o["text_tokens"] for o in und) / sum(o["text_tokens"] for o in und)
    want_img = sum(float(o["loss_image"]) * o["image_codes"] for o in outs) / sum(o["image_codes"] for o in outs)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    got = trainer.validate(model, loader(batches), verbose=False)[0]
    assert outs[0]["text_tokens"] == 0 and float(outs[0]["loss_text"]) == 0.0
    assert got["val/loss_text"] == pytest.approx(want_text, rel=1e-5) and want_text > 0.5
    assert got["val/loss_image"] == pytest.approx(want_img, rel=1e-5)


def test_code_embed_init_codebook_starts_the_folder_from_the_decoded_codes():
    with pytest.raises(ValueError, match="code_embed_init='pixels'"):
        tiny_model(code_embed_init="pixels")
    model = tiny_model(code_embed_init="codebook")
    with pytest.raises(ValueError, match="needs model.image_tokenizer"):
        model._init_weights_for_fit("stage1")

    class FlatColours:  # code c decodes to a flat patch of colour palette[c]
        codebook_size, downsample = 16, 4
        palette = torch.rand(16, 3)

        def decode(self, codes):
            img = self.palette[codes].repeat_interleave(4, 1).repeat_interleave(4, 2)
            return img.permute(0, 3, 1, 2)

    model.set_image_tokenizer(FlatColours())
    random_rows = model.folder.code_embed.weight.detach().clone()
    model._init_weights_for_fit("stage1")
    w = model.folder.code_embed.weight.detach()
    # 3 colour channels -> 3 components; the table now is a linear function of each code's colour
    assert not torch.equal(w[:, :3], random_rows[:, :3]) and torch.equal(w[:, 3:], random_rows[:, 3:])
    colours = FlatColours.palette - FlatColours.palette.mean(0)
    sol = torch.linalg.lstsq(colours, w[:, :3]).solution
    torch.testing.assert_close(colours @ sol, w[:, :3], atol=1e-4, rtol=1e-4)


class _RecordingTokenizer:
    """A frozen 'tokenizer' whose codes depend on the compute dtype, recording each call."""

    codebook_size, downsample = 16, 4

    def __init__(self):
        self.calls = []

    def encode(self, x):
        self.calls.append((x.shape[0], torch.is_autocast_enabled("cpu")))
        # a matmul (autocast would run it in bf16) whose result is turned into codes
        feats = (x.flatten(1) @ torch.linspace(-1, 1, x[0].numel())[:, None]).squeeze(1)
        return (feats * 1000).long().remainder(16)[:, None, None].expand(-1, 4, 4)


def test_online_tokenization_runs_outside_autocast_a_few_views_per_call():
    model = tiny_model()
    tok = _RecordingTokenizer()
    model.set_image_tokenizer(tok)
    pixels = torch.randint(0, 256, (2 * model.ENCODE_VIEWS + 3, 3, 16, 16), dtype=torch.uint8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        codes = model.encode_images(pixels)
    assert [n for n, _ in tok.calls] == [model.ENCODE_VIEWS, model.ENCODE_VIEWS, 3]
    assert not any(on for _, on in tok.calls)
    assert torch.equal(codes, tok.encode(pixels.float() / 255.0))  # fp32, in one call: the pretokenized codes


def test_an_fp32_model_trains_a_batch_of_both_tasks_under_bf16_autocast():
    """`precision: bf16-mixed` without FSDP2's bf16 parameters (one GPU, DDP): fp32 weights under bf16 autocast. A
    batch of both tasks routes text and image tokens to their experts by index, the norm in fp32 and the experts in
    bf16; the loss is the fp32 model's to bf16's precision and every gradient is finite."""
    from synergen_lightning.data.batch import add_indices

    batch = add_indices(make_batch(["generation", "understanding", "text", "generation"], seed=1))
    model = tiny_model(stage="full")
    with torch.no_grad():
        reference = model.forward_losses(batch)["loss"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model.forward_losses(batch)["loss"]
    loss.backward()
    assert loss.dtype == torch.float32 and loss.item() == pytest.approx(reference.item(), rel=0.02)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
