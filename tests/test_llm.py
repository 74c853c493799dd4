"""MMoELLM + TextDataModule: packing, training reduces loss, the skill evaluator, the tiny base LLM."""

import json
import random
from pathlib import Path

import lightning as L
import pytest
import torch

from datamodules.text import TextDataModule, pack_documents
from synergen_lightning.llm import MMoELLM, evaluate_text_skill

COLORS = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black"]
SHAPES = ["circle", "square", "triangle", "star", "heart", "cross"]


def skill_example(rng: random.Random) -> dict:
    """An in-context lookup: a short scene description, then the colour of one of its shapes."""
    shapes = rng.sample(SHAPES, 3)
    colors = rng.sample(COLORS, 3)
    desc = ", ".join(f"a {c} {s}" for c, s in zip(colors, shapes))
    k = rng.randrange(3)
    return {"prompt": f"scene: {desc}. what color is the {shapes[k]}?", "answer": colors[k]}


def write_toy_corpus(out: Path, n_train: int = 6000, n_val: int = 300, seed: int = 0) -> Path:
    """Stand-in for `synergen data synth`'s text corpus (same file layout): train/val text, and
    skill_{train,val}.jsonl whose train lines also appear in train.jsonl as `prompt answer`."""
    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    train = [skill_example(rng) for _ in range(n_train)]
    seen = {r["prompt"] for r in train}
    val = []
    while len(val) < n_val:
        r = skill_example(rng)
        if r["prompt"] not in seen:  # held out: never in the training text
            val.append(r)
            seen.add(r["prompt"])
    filler = [f"the {rng.choice(COLORS)} {rng.choice(SHAPES)} is next to the {rng.choice(SHAPES)}." for _ in range(n_train // 4)]
    texts = [f"{r['prompt']} {r['answer']}" for r in train] + filler
    rng.shuffle(texts)
    def dump(name, rows):
        (out / name).write_text("".join(json.dumps(r) + "\n" for r in rows))

    dump("train.jsonl", [{"text": t} for t in texts])
    dump("val.jsonl", [{"text": f"{r['prompt']} {r['answer']}"} for r in val[: n_val // 2]])
    dump("skill_train.jsonl", train)
    dump("skill_val.jsonl", val)
    return out


def write_world_skill_corpus(out: Path, seed: int = 0) -> Path:
    """The world's real held-out skill (number comparison, `synergen_lightning.world.text_corpus`),
    without the scene language: train.jsonl holds `prompt answer` lines of skill_train only."""
    from synergen_lightning.world.text_corpus import make_skill, skill_text

    train, val = make_skill(seed)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train.jsonl").write_text("".join(json.dumps({"text": skill_text(r)}) + "\n" for r in train))
    (out / "skill_val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in val))
    return out


def test_pack_documents():
    rows, labels = pack_documents([[5, 6], [7], [8, 9]], seq_len=4, bos_id=1, eos_id=2)
    assert rows.tolist() == [[1, 5, 6, 2], [1, 7, 2, 1]] and labels.tolist() == rows.tolist()  # ragged tail dropped
    with pytest.raises(ValueError, match="fewer than one sequence of seq_len=64"):
        pack_documents([[5]], 64, 1, 2)


def test_pack_whole_documents_never_cuts_one_that_fits_a_row():
    rows, labels = pack_documents([[5, 6], [7], [8, 9, 10], [11] * 9], seq_len=5, bos_id=1, eos_id=2,
                                  whole_documents=True, pad_id=0)
    assert rows.tolist() == [[1, 5, 6, 2, 0],   # [7] would not fit: next row
                             [1, 7, 2, 0, 0],   # [8, 9, 10] needs 5
                             [1, 8, 9, 10, 2],
                             [1, 11, 11, 11, 11], [11, 11, 11, 11, 11], [2, 0, 0, 0, 0]]  # longer than a row: cut
    P = -100  # padding is never a target
    assert labels.tolist() == [[1, 5, 6, 2, P], [1, 7, 2, P, P], [1, 8, 9, 10, 2],
                               [1, 11, 11, 11, 11], [11, 11, 11, 11, 11], [2, P, P, P, P]]


def test_training_reduces_loss_and_logs(tmp_path):
    corpus = write_toy_corpus(tmp_path / "text", n_train=400, n_val=20)
    dm = TextDataModule([str(corpus / "train.jsonl")], [str(corpus / "val.jsonl")], tokenizer_dir=str(tmp_path / "tok"),
                        bpe_vocab_size=320, seq_len=32, batch_size=8)
    model = MMoELLM.from_paths(config=dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128),
                               tokenizer_dir=str(tmp_path / "tok"), bpe_train_files=[str(corpus / "train.jsonl")],
                               bpe_vocab_size=320, lr=3e-3, warmup_steps=5,
                               skill_eval_jsonl=str(corpus / "skill_val.jsonl"), skill_eval_max=4)
    assert model.model.vocab_size == model.tokenizer.vocab_size <= 320
    trainer = L.Trainer(max_steps=25, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        val_check_interval=25, check_val_every_n_epoch=None, limit_val_batches=1, enable_model_summary=False)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    before = model._loss(batch).item()
    trainer.fit(model, dm)
    after = model._loss(batch).item()
    assert after < before - 1.0, (before, after)
    m = trainer.callback_metrics
    assert {"train/loss", "train/lr", "val/loss", "val/skill_acc"} <= set(m)
    assert 0.0 <= float(m["val/skill_acc"]) <= 1.0


def test_validation_loss_is_the_token_weighted_mean_over_batches():
    """val/loss weighs each batch by its supervised tokens: a batch of mostly padding counts for little."""
    torch.manual_seed(0)
    model = MMoELLM(config=dict(vocab_size=50, hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2,
                                intermediate_size=64))
    full = {"input_ids": torch.randint(0, 50, (4, 12))}
    padded = {"input_ids": torch.randint(0, 50, (1, 12))}
    padded["labels"] = padded["input_ids"].clone()
    padded["labels"][:, 4:] = -100
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
    got = trainer.validate(model, torch.utils.data.DataLoader([full, padded], batch_size=None), verbose=False)[0]
    with torch.no_grad():
        losses = [model._loss(b).item() for b in (full, padded)]
    weights = [4 * 11, 3]
    want = sum(x * w for x, w in zip(losses, weights)) / sum(weights)
    assert got["val/loss"] == pytest.approx(want, rel=1e-5)
    assert abs(want - sum(losses) / 2) > 1e-3  # a mean per batch would differ


def test_skill_eval_scores_an_oracle(tmp_path, monkeypatch):
    """evaluate_text_skill against a model whose greedy output is scripted: exact match, strip, eos."""
    corpus = write_toy_corpus(tmp_path / "text", n_train=50, n_val=4)
    from synergen_lightning.text_tokenizer import train_bpe

    tok = train_bpe([corpus / "train.jsonl"], 300, tmp_path / "tok")
    model = MMoELLM.from_paths(config=dict(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=32),
                               tokenizer_dir=str(tmp_path / "tok"))
    rows = [json.loads(line) for line in (corpus / "skill_val.jsonl").read_text().splitlines()]
    answers = [" " + r["answer"] for r in rows[:3]] + [" wrong"]
    scripted = [tok.encode(a) + [tok.eos_id, 5, 5] for a in answers]

    def fake_generate(ids, max_new_tokens, eos_id=None, attention_mask=None):
        assert ids.shape[0] == 4 and attention_mask[:, -1].all()  # left padded
        width = max(map(len, scripted))
        return torch.tensor([s + [eos_id] * (width - len(s)) for s in scripted])

    monkeypatch.setattr(model.model, "generate_greedy", fake_generate)
    assert evaluate_text_skill(model, tok, corpus / "skill_val.jsonl") == 0.75


@pytest.mark.slow
def test_tiny_base_llm_learns_the_held_out_skill(tmp_path):
    """The recipe's model, seed and schedule on the world's number-comparison skill (its train items as
    the corpus): exact match on held-out pairs >= 90%. About 8 minutes at one thread on a shared
    2-core machine (the recipe's steps of the 1.5M-parameter model)."""
    import yaml

    recipe = yaml.safe_load(Path("recipes/tiny/base_llm.yaml").read_text())
    L.seed_everything(recipe["seed_everything"])  # as `synergen fit` seeds it: the skill's plateau length is seed-dependent
    m, d = recipe["model"]["init_args"], recipe["data"]["init_args"]
    corpus = write_world_skill_corpus(tmp_path / "text")
    dm = TextDataModule([str(corpus / "train.jsonl")], None, tokenizer_dir=str(tmp_path / "tok"),
                        bpe_vocab_size=m["bpe_vocab_size"], seq_len=d["seq_len"], batch_size=d["batch_size"],
                        whole_documents=d["whole_documents"])
    model = MMoELLM.from_paths(config=m["config"], tokenizer_dir=str(tmp_path / "tok"), bpe_train_files=[str(corpus / "train.jsonl")],
                               bpe_vocab_size=m["bpe_vocab_size"], lr=m["lr"], warmup_steps=m["warmup_steps"])
    trainer = L.Trainer(max_steps=recipe["trainer"]["max_steps"], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, limit_val_batches=0, enable_model_summary=False,
                        gradient_clip_val=recipe["trainer"]["gradient_clip_val"])
    trainer.fit(model, dm)
    acc = evaluate_text_skill(model, model.tokenizer, corpus / "skill_val.jsonl", max_examples=500)
    assert acc >= 0.9, acc


def test_base_llm_recipe_parses_and_builds(tmp_path):
    from synergen_lightning.cli import lightning_cli

    corpus = write_toy_corpus(tmp_path / "text", n_train=200, n_val=10)
    tr = str(corpus / "train.jsonl")
    cli = lightning_cli(["--config", "recipes/tiny/base_llm.yaml",
                         f"--model.init_args.tokenizer_dir={tmp_path / 'tok'}", f"--model.init_args.bpe_train_files=[{tr}]",
                         "--model.init_args.bpe_vocab_size=320", f"--data.init_args.train_files=[{tr},{corpus / 'skill_train.jsonl'},{tr},{tr}]", f"--data.init_args.tokenizer_dir={tmp_path / 'tok'}",
                         f"--data.init_args.val_files=[{corpus / 'val.jsonl'}]", f"--trainer.default_root_dir={tmp_path}",
                         "--trainer.logger=false",
                         # make demo's addition to the recipe's callbacks (tests/test_makefile.py)
                         "--trainer.callbacks+=callbacks.threads.ThreadsWhenFree",
                         f"--trainer.callbacks.free_after={tmp_path / 'codes.done'}", "--trainer.callbacks.threads=2"],
                       run=False)
    assert isinstance(cli.model, MMoELLM) and isinstance(cli.datamodule, TextDataModule)
    kinds = {type(c).__name__: c for c in cli.trainer.callbacks}
    assert {"FinalCheckpoint", "StallWatchdog", "ThreadsWhenFree"} <= set(kinds)  # added to the recipe's, not instead
    assert kinds["ThreadsWhenFree"].threads == 2 and kinds["ThreadsWhenFree"].free_after == tmp_path / "codes.done"
    assert cli.datamodule.hparams.tokenizer_dir == str(tmp_path / "tok")
    assert cli.model.model.config.hidden_size == 128 and cli.model.model.config.num_kv_heads == 4  # one KV head per query head (docs/levels.md)
    assert 0.8e6 <= sum(p.numel() for p in cli.model.parameters()) <= 3e6
    assert cli.datamodule.hparams.train_repeats == [1, 5, 9, 3]  # the skill and binding files oversampled
    cli.datamodule.setup()
    assert len(cli.datamodule.train_set) > 0


def test_a_data_parallel_strategy_splits_the_text_batch(tmp_path):
    """The base LLM over several processes (`--trainer.strategy.init_args.global_batch_size datamodule`, as the
    Makefile passes for the stages): the recipe's batch is the global one, and each rank's loader yields its share."""
    from types import SimpleNamespace

    from synergen_lightning.distributed import DDPStrategy, derive_per_rank_batch

    corpus = write_toy_corpus(tmp_path / "text", n_train=200, n_val=10)
    dm = TextDataModule([str(corpus / "train.jsonl")], None, tokenizer_dir=str(tmp_path / "tok"), bpe_vocab_size=320,
                        seq_len=32, batch_size=16)

    class WorldOfTwo(DDPStrategy):
        world_size = 2

    strategy = WorldOfTwo(global_batch_size="datamodule")
    strategy._lightning_module = SimpleNamespace(trainer=SimpleNamespace(datamodule=dm))
    derive_per_rank_batch(strategy, strategy.global_batch_size)
    assert dm.batch_size == dm.hparams.batch_size == 8
    dm.setup()
    assert next(iter(dm.train_dataloader()))["input_ids"].shape == (8, 32)


def test_train_repeats_oversample_a_file_and_mix_it_into_rows(tmp_path):
    main, skill = tmp_path / "main.jsonl", tmp_path / "skill.jsonl"
    main.write_text("".join(json.dumps({"text": f"the red circle {i}"}) + "\n" for i in range(40)))
    skill.write_text("".join(json.dumps({"prompt": f"Q: is {i} larger than 3? A:", "answer": "yes"}) + "\n" for i in range(10)))
    from synergen_lightning.text_tokenizer import train_bpe

    tok = train_bpe([main, skill], 300, tmp_path / "tok")
    kw = dict(tokenizer_dir=str(tmp_path / "tok"), seq_len=16, batch_size=2)
    counts = {}
    for reps in ([1, 1], [1, 3]):
        dm = TextDataModule([str(main), str(skill)], train_repeats=reps, **kw)
        dm.setup()
        rows = dm.train_set.rows
        docs = [d for row in rows.tolist() for d in tok.decode(row, skip_special_tokens=False).split("<s>") if d]
        counts[reps[1]] = sum("larger than" in d for d in docs)
        assert counts[reps[1]] > 0
    assert counts[3] >= 2.5 * counts[1], counts  # three copies of the skill file
    # shuffled before packing: skill documents are spread over the rows, not only the last ones
    skill_rows = [i for i, row in enumerate(rows.tolist()) if "larger" in tok.decode(row)]
    assert min(skill_rows) < len(rows) // 2, skill_rows
    with pytest.raises(ValueError, match=r"train_repeats=\[1\] has 1 entries for 2 train_files"):
        TextDataModule([str(main), str(skill)], train_repeats=[1], **kw)
    with pytest.raises(ValueError, match="integer >= 0"):
        TextDataModule([str(main), str(skill)], train_repeats=[1, -2], **kw)


def test_base_llm_recipe_trains_to_the_same_weights_on_one_and_two_threads():
    """`make demo` trains the base LLM on one intra-op thread beside the image tokenizer and on 2 (DEMO_THREADS) after
    it: at the recipe's shapes (width, depth, vocabulary, batch, row length, padded rows) every step's weights are
    bit-equal at 1 and 2 threads, so when the switch happens moves its speed and not the chain's figures."""
    import yaml

    recipe = yaml.safe_load((Path(__file__).resolve().parents[1] / "recipes/tiny/base_llm.yaml").read_text())
    model_args, data_args = recipe["model"]["init_args"], recipe["data"]["init_args"]
    rows, seq = data_args["batch_size"], data_args["seq_len"]
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1, data_args["bpe_vocab_size"], (rows, seq), generator=gen)
    labels = ids.clone()
    for r in range(rows):  # whole-document rows end in padding
        labels[r, seq - int(torch.randint(0, seq // 4, (1,), generator=gen)):] = -100
    batch = {"input_ids": ids, "labels": labels, "attention_mask": labels != -100}

    config = {**model_args["config"], "vocab_size": data_args["bpe_vocab_size"]}

    def train(threads: int) -> dict:
        torch.manual_seed(0)
        model = MMoELLM(config=config)
        opt = torch.optim.AdamW(model.parameters(), lr=model_args["lr"], betas=(0.9, 0.95), weight_decay=0.1)
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            for _ in range(4):
                model._loss(batch).backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), recipe["trainer"]["gradient_clip_val"])
                opt.step()
                opt.zero_grad()
        finally:
            torch.set_num_threads(before)
        return {k: v.clone() for k, v in model.state_dict().items()}

    one, two = train(1), train(2)
    torch.manual_seed(0)
    start = MMoELLM(config=config).state_dict()
    assert all(not torch.equal(one[k], start[k]) for k in one if k.endswith("weight") and "vision" not in k)  # trained
    differing = [k for k in one if not torch.equal(one[k], two[k])]
    assert not differing, differing
