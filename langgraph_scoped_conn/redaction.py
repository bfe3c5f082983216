"""Redaction: the one place that hides passwords in text and URLs.

Pure code.  Every message, log line, repr, stats payload and HTTP body that may hold a
database URL goes through :func:`redact_url` (text) or :func:`safe_url` (a parsed URL).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING
from urllib.parse import unquote_plus

if TYPE_CHECKING:
    from sqlalchemy.engine import URL

__all__ = ["redact_url", "safe_url"]

# The scheme is optional: "//user:pw@host" (a mistyped scheme) is redacted too.  The
# password runs to the last "@" of its line: a password with an un-encoded "@" or space is
# hidden whole, not cut at its first "@" (which would show the rest).  A password with a
# raw line break runs on to the next line that has an "@" (in doubt, hide more).
_USERINFO = re.compile(r"(?:[a-zA-Z][\w+.-]*:)?//[^:/@\s]*:(?P<pw>(?:[^\n]*\n)*?[^\n]*)@")
#: a URL with no scheme at all, ``user:pw@host/db`` (a mistyped URL in an error message)
_BARE_USERINFO = re.compile(r"(?<![\w/:@%.+-])[\w.%+-]+:(?P<pw>[^\s:/@](?:[^\n]*\n)*?[^\n]*)@")
#: ``key=value`` (keyword DSN, query string) or ``"key": value`` (dict, JSON); the key may
#: be quoted or percent-encoded
_PAIR = re.compile(r"(?<![\w%.+-])(?P<q>['\"]?)(?P<key>[\w%.+-]+)(?P=q)[ \t]*(?P<sep>[=:])[ \t]*")
#: keys whose value is a secret, searched in the percent-decoded, lower-cased key:
#: ``password``, ``PASSWORD``, ``sslpassword``, ``db_passwd``, ``client_secret``, and
#: ``pass``, ``pwd`` or ``token`` as a whole word (``access_token``, not ``max_tokens``)
_SECRET_KEY = re.compile(
    r"password|passwd|passphrase|secret|(?<![a-z0-9])(?:pass|pwd|token)(?![a-z0-9])"
)
#: a text that is one URL or one keyword DSN (nothing else): values may hold spaces then
_WHOLE = re.compile(r"\s*(?:(?:[a-zA-Z][\w+.-]*:)?//|[\w.-]+\s*=)")
# a doubled quote does not end the value either, nor a line break (in doubt, hide more)
_QUOTED = {q: re.compile(rf"{q}(?:[^{q}\\]|\\.|{q}{q})*(?:(?P<close>{q})|\Z)", re.S) for q in "'\""}
#: a control character inside a value (a raw line break or tab in a password) keeps the value
#: going, across white space, up to the next ``name=`` (or the end): in doubt, hide more
_CONTROL = r"[\x00-\x1f\x7f\x85\u2028\u2029](?:(?!\s+[\w%.+-]+[ \t]*[=:&])[\s\S])*"
#: where an unquoted value ends, by (in a query string?, the whole text is one URL/DSN?).
#: In a query string a value runs to the next ``&name=``, so a raw "&" does not end it.
_VALUE = {
    (True, False): re.compile(rf"(?:[^\s&]|{_CONTROL}|&(?![\w%.+-]+=))*"),
    (True, True): re.compile(r"(?:[^\n&]|&(?![\w%.+-]+=))*"),
    (False, False): re.compile(rf"(?:\S|{_CONTROL})*"),
    (False, True): re.compile(rf"(?:\S|{_CONTROL}|[ \t]++(?![\w%.+-]+[ \t]*=))*"),
}


def redact_url(text: str) -> str:
    """Replace every password in ``text`` with ``***``; the one redaction of the package.

    Hides the password of URL userinfo (``//user:***@host``), the value of any secret
    query parameter or keyword, in any case, percent-encoded or not, wherever it stands
    (``?password=``, ``&PassWord=``, ``?%70assword=``, ``sslpassword=``), of libpq keyword
    DSNs (``password=***``, ``password = '***'``) and of dict or JSON renderings
    (``'password': '***'``).  Works on text that is not a valid URL too, so it is safe
    for error messages; a password holding control characters (a raw line break) is
    hidden whole.  When ``text`` is one URL or DSN and nothing else, a value may hold
    spaces: it runs to the next parameter (``&name=`` or `` name=``).  In doubt it hides
    more, never less: overlapping secrets are hidden as one.
    """
    whole = "\n" not in text and _WHOLE.match(text) is not None
    spans = [m.span("pw") for m in _USERINFO.finditer(text)]
    spans += [m.span("pw") for m in _BARE_USERINFO.finditer(text)]
    for m in _PAIR.finditer(text):
        if m["sep"] == ":" and not m["q"]:
            continue  # "user:pw" or "scheme:": only a quoted key takes a colon
        if not _SECRET_KEY.search(unquote_plus(m["key"]).lower()):
            continue
        start = m.end()
        in_query = m.start() > 0 and text[m.start() - 1] in "?&"
        quote = text[start : start + 1]
        if quote in _QUOTED and not in_query:
            found = _QUOTED[quote].match(text, start)
            assert found is not None  # the pattern matches any text from a quote
            closed = found["close"] is not None
            spans.append((start + 1, found.end() - 1 if closed else found.end()))
        else:
            found = _VALUE[in_query, whole].match(text, start)
            assert found is not None  # the patterns match the empty string
            spans.append((start, len(found.group().rstrip(" \t")) + start))
    out, pos = [], 0
    for begin, end in _merge(spans):
        out += [text[pos:begin], "***"]
        pos = end
    out.append(text[pos:])
    return "".join(out)


def _merge(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for begin, end in sorted(s for s in spans if s[1] > s[0]):
        if merged and begin <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(end, merged[-1][1]))
        else:
            merged.append((begin, end))
    return merged


def safe_url(url: URL) -> str:
    """``url`` as text to show: no password, no secret query parameter.

    ``render_as_string(hide_password=True)`` hides only the userinfo password; a
    ``?password=`` or ``?sslpassword=`` in the query would still show.  Use this
    wherever a parsed URL is logged, shown in stats or in a repr.
    """
    return redact_url(url.render_as_string(hide_password=True))
