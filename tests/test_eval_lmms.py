"""The lmms-eval adapter (`synergen_lightning/eval/lmms_adapter.py`) against a STAND-IN of lmms-eval's model API, so
it runs where the optional lmms-eval extra is not installed (it brings ~90 packages and another protobuf major);
tests/test_eval_lmms_evaluator.py runs the adapter through the real `lmms-eval` command where the extra is installed.

The stand-in imitates lmms-eval 0.7's model API as its source defines it: `lmms_eval.api.model.lmms` (the abstract
base: `__init__` sets rank 0 / world size 1, a `cache_hook` and an empty `task_dict`; `create_from_arg_string`
parses `key=value,...` and adds the evaluator's `batch_size` / `max_batch_size` / `device`),
`lmms_eval.api.instance.Instance` (request_type, arguments, idx, metadata {task, doc_id, repeats}; `.args` is the
arguments tuple) and `GenerationResult` (a model output the evaluator keeps as it is: `.text`),
`lmms_eval.api.registry.register_model` and `lmms_eval.models.registry_v2.ModelManifest`. The test then calls the
adapter as lmms-eval's evaluator does for a simple model: `task_dict[task][split][doc_id]` holds the docs;
generate_until requests carry (context, gen_kwargs, doc_to_visual, doc_id, task, split); multiple-choice
loglikelihood requests (context, " " + choice, doc_to_visual, doc_id, task, split), answered with (loss, greedy) as
lmms-eval's models answer them. Answers and losses are checked against an unbatched, uncached recomputation with the
model's own modules."""

from __future__ import annotations

import abc
import sys
import types
from dataclasses import dataclass, field

import pytest
import torch
from PIL import Image

from tests.test_generation import _model


# ---------------------------------------------------------------------------------------- the stand-in
def _stand_in() -> dict[str, types.ModuleType]:
    registry: dict = {}

    class CacheHook:
        def __init__(self, cachinglm):
            self.dbdict = None

        def add_partial(self, attr, req, res):
            return None

    class lmms(abc.ABC):  # noqa: N801 - lmms-eval's name
        is_simple = True

        def __init__(self):
            self._rank, self._world_size = 0, 1
            self.cache_hook = CacheHook(None)
            self.task_dict = {}

        @abc.abstractmethod
        def loglikelihood(self, requests): ...

        @abc.abstractmethod
        def generate_until(self, requests): ...

        @abc.abstractmethod
        def generate_until_multi_round(self, requests): ...

        @classmethod
        def create_from_arg_string(cls, arg_string, additional_config=None):
            args = dict(kv.split("=", 1) for kv in arg_string.split(",") if kv)  # lmms_eval.utils.simple_parse_args_string
            extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
            return cls(**args, **extra)

        @property
        def rank(self):
            return self._rank

        @property
        def world_size(self):
            return self._world_size

    @dataclass
    class Instance:
        request_type: str
        arguments: tuple
        idx: int
        metadata: dict = field(default_factory=lambda: {"task": None, "doc_id": None, "repeats": None})
        resps: list = field(default_factory=list)
        task_name: str = None
        doc_id: int = None
        repeats: int = None

        def __post_init__(self):
            self.task_name, self.doc_id, self.repeats = (self.metadata["task"], self.metadata["doc_id"],
                                                         self.metadata["repeats"])

        @property
        def args(self):
            return self.arguments if isinstance(self.arguments, tuple) else (self.arguments,)

    def register_model(*names):
        def decorate(cls):
            for name in names:
                assert issubclass(cls, lmms), f"Model '{name}' ({cls.__name__}) must extend lmms class"
                registry[name] = cls
            return cls
        return decorate

    @dataclass
    class GenerationResult:
        text: object
        token_counts: object = None

    @dataclass(frozen=True)
    class ModelManifest:
        model_id: str
        simple_class_path: str | None = None
        chat_class_path: str | None = None
        aliases: tuple = ()

    mods = {name: types.ModuleType(name) for name in ("lmms_eval", "lmms_eval.api", "lmms_eval.api.model",
                                                      "lmms_eval.api.instance", "lmms_eval.api.registry",
                                                      "lmms_eval.models", "lmms_eval.models.registry_v2")}
    mods["lmms_eval.api.model"].lmms = lmms
    mods["lmms_eval.api.model"].CacheHook = CacheHook
    mods["lmms_eval.api.instance"].Instance = Instance
    mods["lmms_eval.api.instance"].GenerationResult = GenerationResult
    mods["lmms_eval.api.registry"].register_model = register_model
    mods["lmms_eval.api.registry"].MODEL_REGISTRY = registry
    mods["lmms_eval.models.registry_v2"].ModelManifest = ModelManifest
    return mods


@pytest.fixture()
def adapter(monkeypatch):
    for name, mod in _stand_in().items():
        monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.delitem(sys.modules, "synergen_lightning.eval.lmms_adapter", raising=False)
    import synergen_lightning.eval.lmms_adapter as adapter

    yield adapter
    sys.modules.pop("synergen_lightning.eval.lmms_adapter", None)  # never keep the module bound to the stand-in


# ---------------------------------------------------------------------------------------- a local task
def _docs():
    g = torch.Generator().manual_seed(0)
    docs = []
    for i, (q, a) in enumerate([("What colour is it?", "red"), ("How many shapes?", "2"), ("Is it round?", "yes")]):
        arr = (torch.rand(24 + 8 * i, 20, 3, generator=g) * 255).to(torch.uint8).numpy()  # sizes differ: tiles do
        docs.append({"image": Image.fromarray(arr), "question": q, "answer": a, "choices": ["yes", "no", "red"]})
    return docs


def doc_to_visual(doc):
    return [doc["image"]]


def _requests(Instance, docs, kind):
    out = []
    for doc_id, doc in enumerate(docs):
        meta = {"task": "local_vqa", "doc_id": doc_id, "repeats": 1, "split": "test"}
        ctx = f"<image>\n{doc['question']}\nAnswer the question using a single word or phrase."
        if kind == "generate_until":
            gen = {"until": ["\n\n"], "max_new_tokens": 5, "temperature": 0, "do_sample": False}
            out.append(Instance("generate_until", (ctx, gen, doc_to_visual, doc_id, "local_vqa", "test"), 0, meta))
        else:
            out += [Instance("loglikelihood", (ctx, f" {c}", doc_to_visual, doc_id, "local_vqa", "test"), i, meta)
                    for i, c in enumerate(doc["choices"])]
    return out


def _prompt(model, doc, max_tiles):
    """Unbatched reference inputs: the chat prompt's ids, image flags and the views' codes."""
    from synergen_lightning.data.views import dynamic_tiles, to_uint8_tensor
    from synergen_lightning.inference import understanding_prompt_ids

    size = model.grid[0] * model.hparams.downsample
    codes = model.encode_images(to_uint8_tensor(dynamic_tiles(doc["image"], size, max_tiles=max_tiles)))
    q = f"{doc['question']}\nAnswer the question using a single word or phrase."
    ids, img = understanding_prompt_ids(model.text_tokenizer, codes.shape[0], model.tokens_per_view, q)
    return ids, img, codes


def _forward(model, ids, img, codes):
    ids_t, img_t = torch.tensor([ids]), torch.tensor([img])
    with torch.no_grad():
        h = model.llm.model(model.embed_inputs(ids_t, img_t, codes), image_mask=img_t)
        return model.llm.model.logits(h)[0].float().log_softmax(-1)


def test_generate_until_batched_matches_an_uncached_reference(adapter):
    from lmms_eval.api.instance import Instance
    from lmms_eval.api.registry import MODEL_REGISTRY

    assert MODEL_REGISTRY["synergen"] is adapter.SynerGenLMMS
    model, docs = _model(), _docs()
    lm = adapter.SynerGenLMMS(model=model, batch_size=2, max_tiles=2)
    lm.task_dict = {"local_vqa": {"test": docs}}
    got = lm.generate_until(_requests(Instance, docs, "generate_until"))
    tok = model.text_tokenizer
    for doc, text in zip(docs, got):
        ids, img, codes = _prompt(model, doc, max_tiles=2)
        new = []
        for _ in range(5):  # greedy, the whole sequence recomputed every token (no KV cache, no padding)
            nxt = int(_forward(model, ids + new, img + [False] * len(new), codes)[-1].argmax())
            if nxt in (tok.im_end_id, tok.eos_id):
                break
            new.append(nxt)
        assert text == tok.decode(new).strip()


def test_multiple_choice_loss_matches_an_unbatched_reference(adapter):
    """lmms-eval's convention: (mean negative log-likelihood per answer token, greedy), the smallest loss wins."""
    from lmms_eval.api.instance import GenerationResult, Instance

    model, docs = _model(), _docs()
    lm = adapter.SynerGenLMMS(model=model, batch_size=4)
    lm.task_dict = {"local_vqa": {"test": docs}}
    reqs = _requests(Instance, docs, "loglikelihood")
    got = lm.loglikelihood(reqs)
    assert len(got) == len(reqs) == 9 and all(isinstance(g, GenerationResult) for g in got)
    tok = model.text_tokenizer
    for r, (loss, greedy) in zip(reqs, (g.text for g in got)):
        doc = docs[r.args[3]]
        ids, img, codes = _prompt(model, doc, max_tiles=1)
        cont = tok.encode(r.args[1].lstrip())
        logp = _forward(model, ids + cont, img + [False] * len(cont), codes)
        want = [logp[len(ids) - 1 + k] for k in range(len(cont))]
        assert loss == pytest.approx(-sum(float(w[t]) for w, t in zip(want, cont)) / len(cont), abs=1e-4)
        assert greedy == all(int(w.argmax()) == t for w, t in zip(want, cont))


def test_registration_and_bad_inputs(adapter, tmp_path):
    from pathlib import Path

    import tomllib

    manifest = adapter.model_manifest()
    assert manifest.model_id == "synergen" and manifest.simple_class_path.endswith(".SynerGenLMMS")
    module, cls = manifest.simple_class_path.rsplit(".", 1)
    assert getattr(sys.modules[module], cls) is adapter.SynerGenLMMS and adapter.SynerGenLMMS.is_simple
    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    assert project["project"]["entry-points"]["lmms_eval.models"]["synergen"] == \
        "synergen_lightning.eval.lmms_adapter:model_manifest"
    from synergen_lightning.eval.fid import EvalInputError

    with pytest.raises(EvalInputError, match="pretrained=.*does not exist") as e:
        adapter.SynerGenLMMS.create_from_arg_string(f"pretrained={tmp_path / 'nope.ckpt'}",
                                                    {"batch_size": 2, "max_batch_size": None, "device": "cpu"})
    assert "\n" not in str(e.value)
    lm = adapter.SynerGenLMMS(model=_model())
    lm.task_dict = {"t": {"test": [{"video": "clip.mp4"}]}}
    from lmms_eval.api.instance import Instance

    req = Instance("generate_until", ("describe", {}, lambda d: [d["video"]], 0, "t", "test"), 0,
                   {"task": "t", "doc_id": 0, "repeats": 1})
    with pytest.raises(EvalInputError, match="neither a PIL image nor an image file"):
        lm.generate_until([req])


def test_missing_extra_names_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "lmms_eval", None)  # import lmms_eval -> ImportError
    monkeypatch.delitem(sys.modules, "synergen_lightning.eval.lmms_adapter", raising=False)
    with pytest.raises(ImportError, match=r"pip install 'synergen-lightning\[lmms-eval\]'"):
        import synergen_lightning.eval.lmms_adapter  # noqa: F401
    sys.modules.pop("synergen_lightning.eval.lmms_adapter", None)
