"""Strings the PostgreSQL ledger escapes, since PostgreSQL's text cannot hold NUL."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from receiver._postgres.text import escape, unescape

# Mostly the characters the escaping is about, so that they come up next to each other.
odd_text = st.text(st.sampled_from("\x00\ue000\ue001\ue002a\\") | st.characters())


@given(odd_text)
def test_escaping_is_undone_exactly(text: str) -> None:
    assert "\x00" not in escape(text)
    assert unescape(escape(text)) == text


@given(st.text(st.characters(blacklist_characters="\x00\ue000")))
def test_text_without_nul_or_the_escape_is_stored_unchanged(text: str) -> None:
    assert escape(text) == text
    assert unescape(text) == text
