"""Redaction (langgraph_scoped_conn.redaction): no password in any text the package shows.

Reproduction: a raw newline in a password was shown in an error.  Passwords with
control characters are hidden whole in every form, and every error the package raises
for such a URL leaves them out.
"""

from __future__ import annotations

from urllib.parse import quote

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import langgraph_scoped_conn as lsc
from langgraph_scoped_conn.redaction import redact_url

CONTROL = "\n\r\t\x0b\x0c\x00\x1b\x7f\x85\u2028"


def pieces(secret: str) -> set[str]:
    """Every 4-character piece of the password's printable runs: a partial leak is a leak."""
    runs = [r for r in "".join(c if c.isprintable() else " " for c in secret).split() if r]
    return {r[i : i + 4] for r in runs if len(r) >= 4 for i in range(len(r) - 3)}


def forms(password: str) -> list[str]:
    return [
        f"postgresql://app:{password}@db.example.com:5432/app",
        f"could not connect to postgresql+psycopg2://app:{password}@h/db: refused",
        # libpq needs a value with white space quoted
        f"host=h user=app password='{password}' dbname=app",
        f"postgresql://app@h/db?sslmode=require&password={password}",
        f"{{'password': '{password}'}}",
    ]


@pytest.mark.parametrize("control", list(CONTROL))
def test_a_password_with_a_control_character_is_hidden_whole(control: str) -> None:
    password = f"Sekr{control}et-Pass-7341"
    for text in forms(password):
        shown = redact_url(text)
        for piece in pieces(password):
            assert piece not in shown, (repr(text), repr(shown))


@settings(max_examples=300, deadline=None)
@given(
    st.text(
        st.characters(min_codepoint=0x20, max_codepoint=0x7E, exclude_characters="@/:&' \"")
        | st.sampled_from(list(CONTROL)),
        min_size=8,
        max_size=24,
    ).filter(lambda p: sum(c.isalnum() for c in p) >= 6)
)
def test_control_characters_never_uncover_a_password(password: str) -> None:
    for text, around in zip(forms(password), forms("***"), strict=True):
        shown = redact_url(text)
        for piece in pieces(password) - {p for p in pieces(password) if p in around}:
            assert piece not in shown, (repr(text), repr(shown))


@pytest.mark.parametrize("control", ["\n", "\r\n", "\t", "\x0b"])
def test_errors_for_such_a_url_leave_the_password_out(control: str) -> None:
    password = f"Sekr{control}et-Pass-7341"
    bad_urls = [
        f"postgresql://app:{password}@127.0.0.1:notaport/db",
        f"postgresql+nodriver://app:{password}@127.0.0.1/db",
        f"postgresql://app:{password}@h@x/db",
        f"postgresql://app:{quote(password, safe='')}@127.0.0.1:notaport/db",
    ]
    for url in bad_urls:
        with pytest.raises(lsc.ConfigurationError) as caught:
            lsc.ExecutionConnectionManager(url)
        for text in (str(caught.value), repr(caught.value)):
            for piece in pieces(password):
                assert piece not in text, (url, text)
