"""Sequence building: raw shard sample -> token ids, image slots, labels and image views.

Chat template (InternLM2's): `<s><|im_start|>user\\n{user}<|im_end|>\\n<|im_start|>assistant\\n{assistant}<|im_end|></s>`.

- generation:    user = `Generate an image of: {caption}` (or, with prob. `cfg_dropout`,
                 `Here is a random image <UNCOND>:`), assistant = `<boi>[IMG]<eoi>`; the image codes are
                 supervised through the unfolding head; text only with `supervise_generation_text`.
- understanding: user = `<boi>[IMG]<eoi>` per tile (tiles, then thumbnail) + `\\n{question}` (`question_first`:
                 `{question}\\n` + the image),
                 assistant = `{answer}`; only answers (+ their `<|im_end|>`, and the final `</s>`) supervised.
                 Formats: `caption` (KEY.txt), `conversation` (LLaVA `conversations` in KEY.json,
                 `<image>` marks the image), `qa` (one Q/A pair of a list in KEY.json, seeded per sample; `pairs_per_sample: k`
                 puts up to k pairs of the image in one conversation, skipping pairs whose answer the other's question names).
- text:          `<s>{text}</s>`, fully supervised (`{"prompt", "answer"}` lines: `{prompt} {answer}`).

`[IMG]` is `tokens_per_view` slots: `image_mask` True, input id = pad. Labels follow the HF convention
(`labels[t]` is the target of the prediction made at t-1; the model shifts), -100 = unsupervised.
"""

from __future__ import annotations

import io
import re
import zlib
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from synergen_lightning.data.sources import SkipSample, load_json, load_npy
from synergen_lightning.data.views import IMAGE_EXTS, dynamic_tiles, generation_view, tile_grids, to_uint8_tensor

CAPTION_PROMPT = "Provide a one-sentence caption for the image"
GENERATION_PROMPT = "Generate an image of: "
UNCOND_PROMPT_HEAD = "Here is a random image "  # + <UNCOND> + ":"
IGNORE = -100
CODES_EXT = "codes.npy"


@dataclass
class BuiltSample:
    """One sequence, ready for `batch.collate`."""

    input_ids: list[int]
    image_mask: list[bool]
    labels: list[int]
    task: str
    key: str
    pixel_values: torch.Tensor | None = None  # uint8 [n_views, 3, S, S]
    codes: torch.Tensor | None = None  # long [n_views, h, w]
    image_loss: bool = False  # views supervised through the unfolding head (generation targets)
    meta: dict = field(default_factory=dict)

    @property
    def n_views(self) -> int:
        v = self.codes if self.codes is not None else self.pixel_values
        return 0 if v is None else int(v.shape[0])

    def __len__(self) -> int:
        return len(self.input_ids)


class _Seq:
    """Accumulates ids / image flags / supervision flags piece by piece."""

    def __init__(self, tok, pad_id: int):
        self.tok, self.pad = tok, pad_id
        self.ids: list[int] = []
        self.img: list[bool] = []
        self.sup: list[bool] = []

    def special(self, token_id: int, sup: bool = False) -> None:
        self.ids.append(token_id)
        self.img.append(False)
        self.sup.append(sup)

    def text(self, s: str, sup: bool = False) -> None:
        if not s:
            return
        ids = self.tok.encode(s)
        self.ids += ids
        self.img += [False] * len(ids)
        self.sup += [sup] * len(ids)

    def image(self, n_views: int, tokens_per_view: int, boi: int, eoi: int) -> None:
        for _ in range(n_views):
            self.special(boi)
            self.ids += [self.pad] * tokens_per_view
            self.img += [True] * tokens_per_view
            self.sup += [False] * tokens_per_view
            self.special(eoi)


def _unit(*parts) -> float:
    """A deterministic uniform number in [0, 1) from the parts (cheap: crc32, no RNG object per sample)."""
    return zlib.crc32("|".join(map(str, parts)).encode()) / 2**32


def _leaks(a: dict, b: dict, q_key: str, a_key: str) -> bool:
    """True when either pair's answer is a word of the other's question ("What color is the square in the bottom
    left?" -> yellow / "Where is the yellow square?" -> bottom left): in one conversation, whichever comes second
    could be answered from the text instead of the image."""

    def said(answer, question) -> bool:
        return re.search(rf"\b{re.escape(str(answer).strip().lower())}\b", str(question).lower()) is not None

    return said(a[a_key], b[q_key]) or said(b[a_key], a[q_key])


def _kind_weights(pairs: list[dict], options: dict) -> list[float]:
    """Pick weight of each Q/A pair: `qa_kind_weights[kind]` (default 1 for kinds it does not name), so a scene's rarer
    or harder kinds can be asked more often than the scene lists them."""
    weights = options.get("qa_kind_weights") or {}
    if not isinstance(weights, dict) or any(isinstance(w, bool) or not isinstance(w, (int, float)) or w < 0
                                            for w in weights.values()):
        raise ValueError(f"qa option qa_kind_weights={weights!r} must map question kinds to weights >= 0 "
                         "(e.g. {position: 3, relation: 2}; unnamed kinds weigh 1)")
    return [float(weights.get(p.get("kind"), 1.0)) for p in pairs]


def _weighted_index(u: float, weights: list[float]) -> int:
    """The index that u in [0, 1) falls on when [0, 1) is cut in proportion to `weights` (uniform if all are 0)."""
    total = sum(weights)
    if total <= 0:
        return int(u * len(weights))
    edge = 0.0
    for i, w in enumerate(weights):
        edge += w / total
        if u < edge:
            return i
    return len(weights) - 1


class SequenceBuilder:
    """Raw webdataset sample (dict of bytes) -> `BuiltSample`. Raises `SkipSample(reason)` for bad input.

    Args:
        tokenizer: a `TextTokenizer` (encode + special ids).
        tokens_per_view: folded LLM tokens per image view, `(h/m)*(w/n)`.
        image_size: side of every view in pixels (generation crop and understanding tile).
        max_seq_len: rows longer than this are truncated (text, understanding answers) or skipped (never cut an image).
        max_tiles / thumbnail / min_tiles: InternVL-1.5 dynamic tiles for understanding images.
        cfg_dropout: probability of the unconditional generation prompt.
        supervise_generation_text: also supervise the text tokens of generation rows.
        use_codes: read `KEY.codes.npy` (pretokenized) instead of decoding the image.
        seed: seeds the per-sample choices (cfg dropout, Q/A pair) together with the sample key and epoch.
        question_first: an understanding turn whose text does not place the image puts it after the question
            (`SynerGenVL(question_first=...)`; the data follows the model it trains).
    """

    def __init__(self, tokenizer, tokens_per_view: int, image_size: int, max_seq_len: int = 4096, max_tiles: int = 1,
                 thumbnail: bool = False, min_tiles: int = 1, cfg_dropout: float = 0.1,
                 supervise_generation_text: bool = False, use_codes: bool = False, seed: int = 0,
                 question_first: bool = False):
        if tokens_per_view < 1:
            raise ValueError(f"tokens_per_view={tokens_per_view} must be >= 1 (fold factor and downsample set it)")
        if image_size < 1:
            raise ValueError(f"image_size={image_size} must be >= 1")
        tile_grids(min_tiles, max_tiles)  # raises naming the bad tile settings
        if not 0.0 <= cfg_dropout <= 1.0:
            raise ValueError(f"cfg_dropout={cfg_dropout} must be in [0, 1]")
        self.tok = tokenizer
        self.tokens_per_view = int(tokens_per_view)
        self.image_size = int(image_size)
        self.max_seq_len = int(max_seq_len)
        self.max_tiles, self.thumbnail, self.min_tiles = int(max_tiles), bool(thumbnail), int(min_tiles)
        self.cfg_dropout = float(cfg_dropout)
        self.supervise_generation_text = bool(supervise_generation_text)
        self.use_codes = bool(use_codes)
        self.question_first = bool(question_first)
        self.seed = seed
        self.epoch = 0
        self._gen: dict | None = None  # constant generation-row pieces, built on first use

    # ---- views -------------------------------------------------------------------------------
    def _image(self, raw: dict, key: str) -> Image.Image:
        for ext in IMAGE_EXTS:
            if ext in raw:
                try:
                    img = Image.open(io.BytesIO(raw[ext]))
                    img.load()
                    if img.width < 1 or img.height < 1:
                        raise ValueError("empty image")
                    return img
                except Exception as exc:  # noqa: BLE001 - PIL raises many types for corrupt files
                    raise SkipSample("undecodable_image", f"{key}.{ext}: {exc}") from None
        raise SkipSample("missing_image", f"{key}: none of {IMAGE_EXTS}")

    def _codes(self, raw: dict, key: str, one_view: bool) -> torch.Tensor:
        if CODES_EXT not in raw:
            raise SkipSample("missing_codes", f"{key}: no .{CODES_EXT} in a pretokenized source")
        arr = load_npy(raw[CODES_EXT], key)
        if arr.ndim != 3 or arr.shape[0] < 1 or arr.dtype.kind not in "iu":  # signed/unsigned int
            raise SkipSample("bad_codes", f"{key}: codes {arr.dtype}{list(arr.shape)}, expected int [n_views, h, w]")
        if one_view and arr.shape[0] != 1:
            raise SkipSample("bad_codes", f"{key}: generation needs 1 view, codes have {arr.shape[0]}")
        return torch.from_numpy(arr.astype(np.int64))  # a copy: the loaded array is a read-only view of the shard bytes

    def views(self, raw: dict, key: str, task: str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(pixel_values uint8 [n,3,S,S], None) or (None, codes long [n,h,w])."""
        if self.use_codes:
            return None, self._codes(raw, key, one_view=task == "generation")
        img = self._image(raw, key)
        if task == "generation":
            return to_uint8_tensor([generation_view(img, self.image_size)]), None
        return to_uint8_tensor(dynamic_tiles(img, self.image_size, self.max_tiles, self.thumbnail, self.min_tiles)), None

    def has_image(self, raw: dict) -> bool:
        return (CODES_EXT in raw) if self.use_codes else any(e in raw for e in IMAGE_EXTS)

    # ---- formats -----------------------------------------------------------------------------
    def build(self, raw: dict, task: str, fmt: str = "caption", options: dict | None = None) -> BuiltSample:
        options = options or {}
        key = raw.get("__key__", "?")
        if task == "generation":
            sample = self._generation(raw, key, options)
        elif task == "understanding":
            sample = self._understanding(raw, key, fmt, options)
        elif task == "text":
            sample = self._text(raw, key, options)
        else:
            raise ValueError(f"unknown task {task!r}")
        return self.fit(sample)

    def _caption(self, raw: dict, key: str, options: dict) -> str:
        ext = options.get("caption_ext", "txt")  # null: read only `caption_field`
        if ext and ext in raw:
            text = raw[ext].decode("utf-8", errors="replace").strip() if isinstance(raw[ext], bytes) else str(raw[ext]).strip()
            if text:
                return text
        field_ = options.get("caption_field")
        if field_ and "json" in raw:
            value = load_json(raw["json"], key).get(field_)
            if isinstance(value, list):  # several phrasings (world: `captions`): one per sample and epoch, seeded
                value = [v for v in value if isinstance(v, str) and v.strip()]
                value = value[int(_unit(self.seed, self.epoch, "caption", key) * len(value))] if value else None
            if isinstance(value, str) and value.strip():
                return value.strip()
        raise SkipSample("missing_caption", f"{key}: no .{ext}" + (f" nor json[{field_!r}]" if field_ else ""))


    def _to_assistant(self, s: _Seq, sup_text: bool = False) -> None:
        t = self.tok
        s.special(t.im_end_id, sup_text)
        s.text("\n", sup_text)
        s.special(t.im_start_id, sup_text)
        s.text("assistant\n", sup_text)

    def _generation_pieces(self) -> dict:
        """The constant parts of every generation row, tokenized once per builder (the hot path of
        pretokenized loading encodes only `user\n` + prompt + caption per sample)."""
        if self._gen is None:
            t = self.tok
            s = _Seq(t, t.pad_id)
            self._to_assistant(s)
            s.image(1, self.tokens_per_view, t.boi_id, t.eoi_id)
            s.special(t.im_end_id)
            s.special(t.eos_id)
            u = _Seq(t, t.pad_id)
            u.text("user\n" + UNCOND_PROMPT_HEAD)
            u.special(t.uncond_id)
            u.text(":")
            # supervised text (option): everything but the image slots; <boi>/<eoi> are text
            tail_labels = [IGNORE if m else i for i, m in zip(s.ids, s.img)]
            self._gen = {"head": [t.bos_id, t.im_start_id], "uncond_user": u.ids, "tail": s.ids,
                         "tail_image_mask": s.img, "tail_labels": tail_labels}
        return self._gen

    def _generation(self, raw: dict, key: str, options: dict) -> BuiltSample:
        """`<s><|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n<boi>[IMG]<eoi><|im_end|></s>`."""
        g = self._generation_pieces()
        uncond = _unit(self.seed, self.epoch, "cfg", key) < self.cfg_dropout
        caption = None if uncond else self._caption(raw, key, options)
        pixels, codes = self.views(raw, key, "generation")
        # "user\n" and the prompt encoded as one string, as TextTokenizer.chat_prompt_ids does
        user = g["uncond_user"] if uncond else self.tok.encode("user\n" + GENERATION_PROMPT + caption)
        text = g["head"] + user
        input_ids = text + g["tail"]
        image_mask = [False] * len(text) + g["tail_image_mask"]
        if self.supervise_generation_text:
            labels = [IGNORE] + text[1:] + g["tail_labels"]  # nothing predicts the first token
        else:
            labels = [IGNORE] * len(input_ids)
        return BuiltSample(input_ids, image_mask, labels, "generation", key, pixels, codes, True, {"uncond": uncond})

    def _understanding(self, raw: dict, key: str, fmt: str, options: dict) -> BuiltSample:
        placeholder = options.get("image_placeholder", "<image>")
        if fmt == "caption":  # the image is required: placed here, a sample without one is skipped below
            turns = [("user", self._place_image(placeholder, options.get("prompt", CAPTION_PROMPT))),
                     ("assistant", self._caption(raw, key, options))]
        elif fmt == "conversation":
            turns = self._conversation(raw, key, options)
        elif fmt == "qa":
            turns = self._qa(raw, key, options)
        else:
            raise ValueError(f"unknown understanding format {fmt!r}")
        n_marks = sum(text.count(placeholder) for _, text in turns)
        if n_marks > 1:
            raise SkipSample("bad_conversation", f"{key}: {n_marks} {placeholder} marks for one image")
        has_image = self.has_image(raw)
        if n_marks == 0 and has_image:  # Q/A and LLaVA samples without the mark: the image joins the first user turn
            turns[0] = (turns[0][0], self._place_image(placeholder, turns[0][1]))
            n_marks = 1
        pixels = codes = None
        if n_marks:
            pixels, codes = self.views(raw, key, "understanding")  # raises missing_image without one
        n_views = 0 if pixels is None and codes is None else (pixels if pixels is not None else codes).shape[0]
        t = self.tok
        s = _Seq(t, t.pad_id)
        s.special(t.bos_id)
        for i, (role, text) in enumerate(turns):
            if i:
                s.text("\n")
            s.special(t.im_start_id)
            if role == "user":
                before, mark, after = text.partition(placeholder)
                s.text("user\n" + before)
                if mark:
                    s.image(n_views, self.tokens_per_view, t.boi_id, t.eoi_id)
                s.text(after)
                s.special(t.im_end_id)
            else:
                s.text("assistant\n")
                s.text(text, True)
                s.special(t.im_end_id, True)
        s.special(t.eos_id, True)
        return self._finish(s, "understanding", key, pixels, codes, image_loss=False)

    def _place_image(self, placeholder: str, text: str) -> str:
        """The user turn's text with the image before it, or after it for a model that reads the question first."""
        return text + "\n" + placeholder if self.question_first else placeholder + "\n" + text

    def _conversation(self, raw: dict, key: str, options: dict) -> list[tuple[str, str]]:
        if "json" not in raw:
            raise SkipSample("missing_json", f"{key}: conversation sources need KEY.json")
        conv = load_json(raw["json"], key).get(options.get("conversations_field", "conversations"))
        roles = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
        if not isinstance(conv, list) or not conv:
            raise SkipSample("bad_conversation", f"{key}: `conversations` missing or empty")
        turns = []
        for turn in conv:
            if not isinstance(turn, dict) or turn.get("from") not in roles or not isinstance(turn.get("value"), str):
                raise SkipSample("bad_conversation", f"{key}: turn {turn!r} needs from in {sorted(roles)} and a string value")
            turns.append((roles[turn["from"]], turn["value"]))
        if turns[0][0] != "user" or any(a[0] == b[0] for a, b in zip(turns, turns[1:])) or turns[-1][0] != "assistant":
            raise SkipSample("bad_conversation", f"{key}: turns must alternate user/assistant, starting with user, ending with assistant")
        return turns

    def _qa(self, raw: dict, key: str, options: dict) -> list[tuple[str, str]]:
        if "json" not in raw:
            raise SkipSample("missing_json", f"{key}: qa sources need KEY.json")
        qa_field = options.get("qa_field", "qa")
        q_key, a_key = options.get("question_key", "question"), options.get("answer_key", "answer")
        pairs = load_json(raw["json"], key).get(qa_field)
        kinds = options.get("qa_kinds")  # optional filter on each pair's `kind`
        if isinstance(pairs, list):
            pairs = [p for p in pairs if isinstance(p, dict) and isinstance(p.get(q_key), str) and p.get(a_key) is not None
                     and (not kinds or p.get("kind") in kinds)]
        if not pairs:
            raise SkipSample("missing_qa", f"{key}: json[{qa_field!r}] has no {{{q_key!r}, {a_key!r}}} pair")
        k = options.get("pairs_per_sample", 1)
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"qa option pairs_per_sample={k!r} must be an integer >= 1 (1 = one Q/A pair per row)")
        if k == 1:
            u = _unit(self.seed, self.epoch, "qa", key)
            pick = pairs[_weighted_index(u, _kind_weights(pairs, options)) if options.get("qa_kind_weights")
                         else int(u * len(pairs))]
            return [("user", str(pick[q_key])), ("assistant", str(pick[a_key]))]
        # several pairs of one image in one conversation: k times the supervision for one image's tokens
        order = sorted(range(len(pairs)), key=lambda i: _unit(self.seed, self.epoch, "qa", key, i))
        chosen: list[dict] = []
        for i in order:
            if len(chosen) == k:
                break
            if not any(_leaks(pairs[i], c, q_key, a_key) for c in chosen):
                chosen.append(pairs[i])
        turns = []
        for pick in chosen:
            turns += [("user", str(pick[q_key])), ("assistant", str(pick[a_key]))]
        return turns

    def _text(self, raw: dict, key: str, options: dict) -> BuiltSample:
        field_ = options.get("text_field", "text")
        if "json" in raw:
            obj = load_json(raw["json"], key)
            text = obj.get(field_)
            if text is None and isinstance(obj.get("prompt"), str) and obj.get("answer") is not None:
                # {"prompt", "answer"} lines (the text skill's train file), joined as the base LLM's corpus joins them
                text = f"{obj['prompt']} {obj['answer']}"
        elif "txt" in raw:
            text = raw["txt"].decode("utf-8", errors="replace")
        else:
            text = None
        if not isinstance(text, str) or not text.strip():
            raise SkipSample("missing_text", f"{key}: no text (json[{field_!r}] or .txt)")
        t = self.tok
        s = _Seq(t, t.pad_id)
        s.special(t.bos_id)
        s.text(text, True)
        s.special(t.eos_id, True)
        return self._finish(s, "text", key, None, None, image_loss=False)

    def _finish(self, s: _Seq, task, key, pixels, codes, image_loss, meta=None) -> BuiltSample:
        labels = [i if sup else IGNORE for i, sup in zip(s.ids, s.sup)]
        labels[0] = IGNORE  # nothing predicts the first token
        return BuiltSample(s.ids, s.img, labels, task, key, pixels, codes, image_loss, meta or {})

    # ---- length ------------------------------------------------------------------------------
    def fit(self, sample: BuiltSample) -> BuiltSample:
        """Cap at `max_seq_len`: truncate text and understanding answers, never an image (skip instead)."""
        n = len(sample)
        if n <= self.max_seq_len:
            return sample
        if sample.task != "text":
            img = [i for i, m in enumerate(sample.image_mask) if m]
            last_image_end = (img[-1] + 2) if img else 0  # keep the closing <eoi>
            if sample.task == "generation" or last_image_end > self.max_seq_len:
                raise SkipSample("too_long", f"{sample.key}: {n} tokens > max_seq_len={self.max_seq_len} and the image cannot be cut")
        cut = self.max_seq_len
        sample.input_ids, sample.image_mask, sample.labels = sample.input_ids[:cut], sample.image_mask[:cut], sample.labels[:cut]
        if all(lab == IGNORE for lab in sample.labels):
            raise SkipSample("too_long", f"{sample.key}: nothing supervised left within max_seq_len={self.max_seq_len}")
        return sample


def generation_prompt_ids(tokenizer, caption: str | None) -> list[int]:
    """Ids of a generation prompt up to and including `<boi>`, exactly as training builds them
    (`caption=None` gives the unconditional CFG prompt). For the generation engine."""
    t = tokenizer
    s = _Seq(t, t.pad_id)
    s.special(t.bos_id)
    s.special(t.im_start_id)
    if caption is None:
        s.text("user\n" + UNCOND_PROMPT_HEAD)
        s.special(t.uncond_id)
        s.text(":")
    else:
        s.text("user\n" + GENERATION_PROMPT + caption)
    s.special(t.im_end_id)
    s.text("\n")
    s.special(t.im_start_id)
    s.text("assistant\n")
    s.special(t.boi_id)
    return s.ids
