"""Incremental detokenization (UTF-8 split across tokens) and stop sequences across tokens."""

from __future__ import annotations

from loraserve.engine.detokenizer import REPLACEMENT, IncrementalDetokenizer, StopChecker
from loraserve.toy import build_tokenizer

TEXT = "Olá, ação e coração! 東京 🙂 fim"


def test_multibyte_characters_split_across_tokens_never_stream_broken() -> None:
    tokenizer = build_tokenizer(["plain ascii words only"], vocab_size=300)  # multi-byte chars stay split
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    pieces = [tokenizer.decode([i]) for i in ids]
    assert any(REPLACEMENT in p for p in pieces), "the test needs characters split over several tokens"
    detok = IncrementalDetokenizer(tokenizer)
    deltas = [detok.add(i) for i in ids]
    deltas.append(detok.flush())
    assert all(REPLACEMENT not in d for d in deltas)
    assert "".join(deltas) == TEXT


def test_stop_sequence_split_across_deltas() -> None:
    checker = StopChecker(["<END>", "zz"])
    emitted = []
    stopped = False
    for delta in ["hello <E", "N", "D> never"]:
        text, stopped = checker.push(delta)
        emitted.append(text)
        if stopped:
            break
    assert stopped and "".join(emitted) == "hello "
    assert "<" not in "".join(emitted[:2])  # the possible start of "<END>" was held back


def test_held_back_text_is_released_when_it_is_not_a_stop() -> None:
    checker = StopChecker(["abc"])
    out = [checker.push(d)[0] for d in ["xa", "b", "d", "a"]]
    assert out == ["x", "", "abd", ""]
    assert checker.flush() == "a"


def test_stop_sequence_through_the_detokenizer() -> None:
    tokenizer = build_tokenizer(["plain ascii words only"], vocab_size=300)
    ids = tokenizer("coração STOP depois", add_special_tokens=False)["input_ids"]
    detok, checker = IncrementalDetokenizer(tokenizer), StopChecker(["ção ST"])
    emitted = ""
    for i in ids:
        text, stopped = checker.push(detok.add(i))
        emitted += text
        if stopped:
            break
    assert stopped and emitted == "cora"
