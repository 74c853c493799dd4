import os

import pytest
import torch

# One intra-op thread: the models in tests are tiny, and on a loaded 2-core machine OpenMP threads
# spin-wait on each other (measured: 20 tiny system steps 129 s at 2 threads vs 0.38 s at 1).
torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


OWN_PROCESS_CHILD = "SYNERGEN_TEST_OWN_PROCESS"


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem):
    """A test marked `own_process` runs in a fresh interpreter (its pass or failure reported here): tests that fake
    CUDA (CUDA's autocast switched on without a GPU, fake cuda tensors) leave torch's native state corrupt for the
    rest of a process (it aborts later, in a garbage collection or at exit)."""
    if pyfuncitem.get_closest_marker("own_process") is None or os.environ.get(OWN_PROCESS_CHILD):
        return None
    import subprocess
    import sys

    # the child ends without the interpreter's teardown, whose frees would meet the heap the test leaves corrupt
    child = "import os, sys, pytest; code = pytest.main(sys.argv[1:]); sys.stdout.flush(); os._exit(int(code))"
    r = subprocess.run([sys.executable, "-c", child, "-q", "-p", "no:cacheprovider", pyfuncitem.nodeid],
                       cwd=pyfuncitem.config.rootpath, env={**os.environ, OWN_PROCESS_CHILD: "1"}, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, f"{pyfuncitem.nodeid} in its own process:\n{r.stdout[-4000:]}\n{r.stderr[-2000:]}"
    return True


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    """A tiny text tokenizer (`tok/`, trained on `corpus.jsonl`) + base LLM checkpoint (`base.ckpt`, naming it), as
    `make base-llm` writes them."""
    from synergen_lightning.llm import MMoELLM
    from synergen_lightning.text_tokenizer import train_bpe

    d = tmp_path_factory.mktemp("tiny")
    corpus = d / "corpus.jsonl"
    corpus.write_text("".join(f'{{"text": "a red circle left of {i} blue squares"}}\n' for i in range(200)))
    train_bpe([corpus], 300, d / "tok")
    llm = MMoELLM.from_paths(config=dict(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64),
                             tokenizer_dir=str(d / "tok"))
    llm.save_checkpoint_file(d / "base.ckpt")
    return d


@pytest.fixture(scope="session")
def sharded_checkpoint(tmp_path_factory):
    """A sharded (DCP) checkpoint directory as `synergen fit` under FSDP2Strategy writes it (`.metadata`, `*.distcp`,
    `meta.pt`, the optimizer's param groups as non-tensor entries): a tiny SynerGenVL after 2 steps, in one process."""
    import lightning.pytorch as pl

    from callbacks.stages import StageCallback
    from synergen_lightning.distributed import FSDP2Strategy
    from tests.distributed_worker import ParityData
    from tests.test_system_helpers import tiny_model

    path = tmp_path_factory.mktemp("sharded") / "last.ckpt"
    trainer = pl.Trainer(accelerator="cpu", devices=1, strategy=FSDP2Strategy(), max_steps=2, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[StageCallback("stage1")])
    try:
        trainer.fit(tiny_model(stage="stage1"), datamodule=ParityData(2))
        trainer.save_checkpoint(path)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return path
