"""Bounded text for log lines and spans (observability/bounds.py)."""

from __future__ import annotations

from nexus_bus.observability.bounds import MAX_TRACEBACK, cut, cut_traceback, text_of


def test_short_text_is_kept_whole() -> None:
    assert cut("x" * 100, 100) == "x" * 100


def test_long_text_keeps_its_head_and_tail_and_says_how_much_was_cut() -> None:
    text = "head" + "x" * 1000 + "tail"
    kept = cut(text, 100)
    assert kept.startswith("headxxx") and kept.endswith("xxxtail")
    assert "...[908 characters cut]..." in kept
    assert len(kept) < 150


def test_a_traceback_keeps_every_small_frame_around_a_huge_message() -> None:
    parts = ["Traceback (most recent call last):\n", '  File "a.py", line 1, in boom\n']
    parts.append("RuntimeError: " + "x" * 1_000_000 + " end\n")
    kept = cut_traceback(parts)
    assert len(kept) <= MAX_TRACEBACK + 50
    assert "in boom" in kept and kept.endswith(" end\n")


class Unprintable(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no message")


def test_an_exception_whose_str_raises_has_a_placeholder_text() -> None:
    assert text_of(ValueError("bad")) == "bad"
    assert text_of(Unprintable()) == "<exception str() failed>"
