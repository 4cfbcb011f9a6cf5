"""The demo tenants' data, scores and training schedule: fast checks without a model."""

from __future__ import annotations

import random
import time

import pytest

from loraserve.demo import scoring
from loraserve.demo.schedule import TrainingSchedule
from loraserve.demo.status import (
    QUEUED,
    READY,
    TRAINING,
    AdapterProgress,
    TrainingStatus,
    about,
    read_status,
    write_status,
)
from loraserve.demo.tasks import sentiment, support, translation
from loraserve.demo.tenants import TENANTS, plan, tenant_data, tenants_build, write_data
from loraserve.errors import Unavailable


@pytest.mark.parametrize("tenant", TENANTS, ids=lambda t: t.adapter_id)
def test_held_out_sets_share_no_sentence_with_training(tenant) -> None:
    train, held = tenant_data(tenant)
    assert len(held) == tenant.held_out_examples and len(train) >= tenant.train_examples * 0.95
    train_prompts = {p for p, _ in train}
    assert not train_prompts & {p for p, _ in held}
    if tenant.adapter_id == "pt-en":  # the English side is a sentence too
        assert not {a for _, a in train} & {a for _, a in held}
    assert tenant_data(tenant) == (train, held)  # seeded: the same data on every machine


def test_translation_grammar() -> None:
    rng = random.Random(3)
    pairs = dict(translation.pair(rng) for _ in range(4000))
    assert len(pairs) > 3000  # broad: few repeats
    # Agreement, contraction and word order, wherever the grammar put them.
    for pt, en in pairs.items():
        assert " em o " not in pt and " de a " not in pt, pt
        assert " a a" not in f" {en}" and " a e" not in f" {en}" and " a o" not in f" {en}", en
    words = {w for pt in pairs for w in pt.split()}
    assert {"na", "no", "do", "da", "vou", "comprou", "não"} <= words
    rng = random.Random(0)
    noun = next(n for n in translation.NOUNS if n.pt == "casa" or n.pt == "praia")
    phrase = translation.noun_phrase(rng, noun, ("the",), plural_ok=False, adjective_ok=False)
    assert phrase.after("em") == f"na {noun.pt}" and phrase.en == f"the {noun.en}"


def test_sentiment_reviews_are_balanced_and_labelled_with_one_word() -> None:
    rng = random.Random(0)
    pairs = [sentiment.pair(rng) for _ in range(2000)]
    labels = [label for _, label in pairs]
    assert set(labels) == {"positivo", "negativo"}
    assert 0.45 < labels.count("positivo") / len(labels) < 0.55
    assert len({review for review, _ in pairs}) > 1900
    assert any(" mas " in review or "pena que" in review for review, _ in pairs)  # mixed reviews
    assert all("*" not in review for review, _ in pairs)  # every judgement agreed


def test_support_questions_are_phrasings_never_seen_in_training() -> None:
    split = support.support_split(0, train_per_topic=10, held_out_per_topic=2)
    answers = {t.answer for t in support.TOPICS}
    assert {a for _, a in split.held_out} == answers == {a for _, a in split.train}
    assert not {q for q, _ in split.train} & {q for q, _ in split.held_out}
    assert support.expand("{How do I|How can I} load {it|them}{?| now?}")[:2] == [
        "How do I load it?",
        "How do I load it now?",
    ]


def test_write_data_writes_chat_jsonl(tmp_path) -> None:
    from loraserve.adapters.training import read_jsonl

    train_path, eval_path = write_data(TENANTS[1], tmp_path)
    examples = read_jsonl(train_path)
    assert examples[0].messages[0][0] == "user" and examples[0].messages[1][1] in ("positivo", "negativo")
    assert len(read_jsonl(eval_path)) == TENANTS[1].held_out_examples


def test_scores() -> None:
    assert scoring.exact_match("the black cat", "The black cat.") == 1.0
    assert scoring.exact_match("positivo", "positivo, with a great film") == 0.0
    assert scoring.word_f1("the black cat", "the black cat") == 1.0
    assert scoring.word_f1("the black cat", "a dog") == 0.0
    # 2 of 3 words right, 2 of 4 words said: precision 1/2, recall 2/3.
    assert scoring.word_f1("the black cat", "the white cat runs") == pytest.approx(
        2 * (1 / 2 * 2 / 3) / (1 / 2 + 2 / 3)
    )
    assert scoring.score("exact_match", ["a", "b"], ["a", "c"]) == 0.5


def test_steps_and_held_out_sizes_can_be_shrunk_for_quick_runs(monkeypatch) -> None:
    assert plan() == TENANTS
    monkeypatch.setenv("LORASERVE_DEMO_STEPS", "2")
    monkeypatch.setenv("LORASERVE_DEMO_HELD_OUT", "4")
    assert {(t.steps, t.held_out_examples) for t in plan()} == {(2, 4)}
    assert all(len(tenant_data(t)[1]) == 4 for t in plan())


def test_status_file_round_trip(tmp_path) -> None:
    status = TrainingStatus(42, adapters={"pt-en": AdapterProgress(TRAINING, 3, 70, 120.0)})
    write_status(tmp_path / "status.json", status)
    back = read_status(tmp_path / "status.json")
    assert back == status and back.updated > 0
    assert read_status(tmp_path / "missing.json") is None
    (tmp_path / "torn.json").write_text('{"pid": 4')
    assert read_status(tmp_path / "torn.json") is None


def test_schedule_answers_unavailable_with_progress_and_estimate() -> None:
    now = time.time()
    status = TrainingStatus(
        1,
        now,
        {
            "pt-en": AdapterProgress(READY, 70, 70, 0.0),
            "pt-sentiment": AdapterProgress(TRAINING, 12, 30, 200.0),
            "support-bot": AdapterProgress(QUEUED, 0, 70, 600.0),
        },
    )
    schedule = TrainingSchedule(status)
    schedule.check("pt-en")  # written: served as usual
    schedule.check("someone-else")  # not the trainer's: the store decides (NOT_FOUND or served)
    with pytest.raises(Unavailable) as training:
        schedule.check("pt-sentiment")
    assert training.value.code == "UNAVAILABLE"
    assert training.value.message == (
        "adapter 'pt-sentiment' is still training (step 12 of 30); ready in about 3 min: retry then"
    )
    with pytest.raises(Unavailable, match=r"queued after pt-sentiment\); ready in about 10 min"):
        schedule.check("support-bot")
    schedule.update(None)  # the trainer is gone
    schedule.check("support-bot")


def test_rough_durations() -> None:
    assert about(10) == "less than a minute"
    assert about(-5) == "less than a minute"  # an estimate already passed
    assert about(100) == "about 2 min"


def test_build_location_follows_the_cache_dir(tmp_path) -> None:
    build = tenants_build(tmp_path)
    assert build.adapters_dir.parent.parent == tmp_path
    assert build.missing() == [t.adapter_id for t in TENANTS]
