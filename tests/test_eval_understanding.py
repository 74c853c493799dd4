"""Understanding suite: exact match per kind, the question-type prior it must beat, and answer diversity."""

import torch

from synergen_lightning.eval.suites import question_type_prior, understanding_suite


def _items():
    # colour: 3 red, 1 blue; yes_no: 2 yes, 2 no; the image is just the item's index
    rows = [("color", "What color is the circle?", "red"), ("color", "What color is the square?", "red"),
            ("color", "What color is the cross?", "Red"), ("color", "What color is the triangle?", "blue"),
            ("yes_no", "Is there a red circle?", "yes"), ("yes_no", "Is there a blue cross?", "no"),
            ("yes_no", "Is there a green square?", "no"), ("yes_no", "Is there a cyan circle?", "yes")]
    return [{"image": i, "kind": k, "question": q, "answer": a} for i, (k, q, a) in enumerate(rows)]


class _Answerer(torch.nn.Module):
    """A stand-in with SynerGenVL's `answer` signature: a fixed answer per question kind, or the true one."""

    def __init__(self, items, constant=None):
        super().__init__()
        self.truth = {it["image"]: it["answer"] for it in items}
        self.constant = constant

    def answer(self, images, questions, **kw):
        if self.constant is None:
            return [self.truth[i] for i in images]
        return [self.constant["color" if "color" in q else "yes_no"] for q in questions]


def test_question_type_prior_is_the_best_constant_answer_per_kind():
    p = question_type_prior(_items())
    assert p["per_kind"] == {"color": 0.75, "yes_no": 0.5}  # case-insensitive: "Red" counts as "red"
    assert p["accuracy"] == (3 + 2) / 8


def test_a_constant_answerer_scores_the_prior_and_is_flagged():
    items = _items()
    res = understanding_suite(_Answerer(items, {"color": "red", "yes_no": "no"}), items, batch_size=3)
    assert res["accuracy"] == res["prior_accuracy"] == 5 / 8
    assert res["top_answer"] == {"color": "red", "yes_no": "no"}
    assert res["top_answer_share"] == {"color": 1.0, "yes_no": 1.0}


def test_an_oracle_beats_the_prior_and_answers_diversely():
    items = _items()
    res = understanding_suite(_Answerer(items), items, batch_size=3)
    assert res["accuracy"] == 1.0 > res["prior_accuracy"]
    assert res["per_kind"] == {"color": 1.0, "yes_no": 1.0}
    assert res["top_answer_share"] == {"color": 0.75, "yes_no": 0.5}


def test_per_kind_by_objects_separates_reading_one_object_from_finding_one_among_several():
    """A model that answers right on one-object scenes and wrong elsewhere: the split shows where it fails."""
    items = _items()
    for it in items:
        it["objects"] = 1 if it["image"] % 2 == 0 else 3
    truth = {it["image"]: it["answer"] if it["objects"] == 1 else "wrong" for it in items}

    class OneObjectReader(torch.nn.Module):
        def answer(self, images, questions, **kw):
            return [truth[i] for i in images]

    res = understanding_suite(OneObjectReader(), items, batch_size=3)
    assert res["per_kind_by_objects"] == {"color": {"1": 1.0, "3": 0.0}, "yes_no": {"1": 1.0, "3": 0.0}}
    assert res["per_kind"] == {"color": 0.5, "yes_no": 0.5}
    for it in items:
        del it["objects"]  # items without a scene size: no split
    assert understanding_suite(OneObjectReader(), items, batch_size=3)["per_kind_by_objects"] == {}
