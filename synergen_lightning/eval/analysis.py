"""Paper Fig. 4: per-layer cosine similarity between understanding and generation visual features.

The same image's code grid is fed twice through the MMoE trunk:

    understanding:  `<s><|im_start|>user\\n<boi>[image]<eoi>\\n{question}...`   (the answering prompt)
    generation:     `<s>...Generate an image of: {caption}...<boi>[image]<eoi>`  (teacher-forced target)

At every layer the image-token hidden states (the folded patch tokens, after that layer's block) are
mean-pooled per sequence; the cosine of the two pooled vectors, averaged over images, is that layer's
similarity. The paper reports it low in shallow layers (the two tasks see images differently) and high
in deep layers (shared semantics). Hidden states are read with forward hooks on `llm.layers[i]`, so
no model code changes.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from synergen_lightning.data.sequences import generation_prompt_ids
from synergen_lightning.data.views import generation_view, to_uint8_tensor
from synergen_lightning.inference import understanding_prompt_ids

UNDERSTANDING_QUESTION = "Describe the image."


def _layer_image_features(model, ids: list[int], img: list[bool], codes: Tensor) -> Tensor:
    """Mean-pooled image-token hidden states after each layer: [num_layers, D] for one sequence."""
    captured: list[Tensor] = []
    hooks = [layer.register_forward_hook(lambda m, i, o: captured.append(o)) for layer in model.llm.model.layers]
    try:
        input_ids = torch.tensor([ids], device=model.device)
        image_mask = torch.tensor([img], device=model.device)
        embeds = model.embed_inputs(input_ids, image_mask, codes.to(model.device))
        model.llm.model(embeds, image_mask=image_mask)
    finally:
        for h in hooks:
            h.remove()
    stacked = torch.stack([c[0][image_mask[0]] for c in captured])  # [L, P, D]
    return stacked.float().mean(1)


@torch.no_grad()
def layer_cosine_similarity(model, codes: Tensor, captions: list[str], question: str = UNDERSTANDING_QUESTION
                            ) -> dict[str, list[float]]:
    """codes Long[N,h,w] (one view per image) + captions -> {"mean": [L], "std": [L], "per_image": [[L] x N]}."""
    if codes.ndim != 3 or codes.shape[0] == 0:
        raise ValueError(f"codes must be Long[N,h,w] with N >= 1, got shape {tuple(codes.shape)}")
    if len(captions) != codes.shape[0]:
        raise ValueError(f"got {len(captions)} captions for {codes.shape[0]} images; pass one caption per image")
    tok, P = model.text_tokenizer, model.tokens_per_view
    was_training = model.training
    model.eval()
    sims = []
    try:
        for i in range(codes.shape[0]):
            u_ids, u_img = understanding_prompt_ids(tok, 1, P, question, question_first=model.question_first)
            g_prompt = generation_prompt_ids(tok, captions[i])  # ends with <boi>
            g_ids = g_prompt + [tok.pad_id] * P + [tok.eoi_id]
            g_img = [False] * len(g_prompt) + [True] * P + [False]
            fu = _layer_image_features(model, u_ids, u_img, codes[i:i + 1])
            fg = _layer_image_features(model, g_ids, g_img, codes[i:i + 1])
            sims.append(F.cosine_similarity(fu, fg, dim=-1))
    finally:
        model.train(was_training)
    s = torch.stack(sims)  # [N, L]
    return {"mean": s.mean(0).tolist(), "std": s.std(0, unbiased=False).tolist(), "per_image": s.tolist()}


def plot_layer_similarity(result: dict, path: str | Path, title: str = "understanding vs generation visual features"
                          ) -> Path:
    """A PNG line plot (layer on x, cosine on y, +-1 std band), like the paper's Fig. 4."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mean, std = torch.tensor(result["mean"]), torch.tensor(result["std"])
    layers = torch.arange(1, len(mean) + 1)
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    ax.plot(layers, mean, marker="o")
    ax.fill_between(layers, mean - std, mean + std, alpha=0.25)
    ax.set_xlabel("layer")
    ax.set_ylabel("cosine similarity")
    ax.set_title(title)
    ax.set_ylim(min(-0.05, float((mean - std).min()) - 0.05), 1.05)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def images_to_codes(model, images) -> Tensor:
    """PIL images -> Long[N,h,w] through the generation view (one square view each) and the frozen tokenizer."""
    size = model.grid[0] * model.hparams.downsample
    views = to_uint8_tensor([generation_view(im, size) for im in images])
    return model.encode_images(views)

