"""Text from records made safe for a markdown page.

Everything a page shows that comes from a record (criterion names and hyper-parameters,
options, budget and dataset names, devices, versions, dates, file names, reasons) was typed
by someone, so it passes through :func:`md` (or :func:`code`) on its way to a page: it is
shown as the text it is, and can neither end a table cell, open a link, an image, a heading
or HTML, nor start a new line. Plain names and numbers come through unchanged, so pages of
ordinary records read (and compare) as before. The CSV files hold the raw text.
"""

from __future__ import annotations

import re
import unicodedata

#: characters that are markdown syntax wherever they stand: backslash-escaped
_SYNTAX = set("\\`*[]|$~#!")
#: characters that open HTML or entities: written as entities
_ENTITIES = {"<": "&lt;", ">": "&gt;", "&": "&amp;"}
#: text shown in a code span as it is (no markdown syntax, no character a table or a line cares about)
_PLAIN = re.compile(r"[A-Za-z0-9 ._+:=,()/@%~'\"-]*")


def _invisible(c: str) -> bool:
    """Control, format (e.g. bidirectional overrides), line and paragraph separator characters."""
    return unicodedata.category(c) in ("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp")


def md(text: object) -> str:
    """``text`` as literal markdown text, fit for a table cell, a heading or a list item."""
    s = str(text)
    out = []
    for i, c in enumerate(s):
        if c in _ENTITIES:
            out.append(_ENTITIES[c])
        elif c in _SYNTAX:
            out.append("\\" + c)
        elif c == "_" and not (0 < i < len(s) - 1 and s[i - 1].isalnum() and s[i + 1].isalnum()):
            out.append("\\_")  # an underscore inside a word (vgg16_bn) is never emphasis
        elif _invisible(c):
            out.append("\\\\" + (repr(c)[2:-1] if c not in "\n\r\t" else {"\n": "n", "\r": "r", "\t": "t"}[c]))
        else:
            out.append(c)
    return "".join(out)


def code(text: object) -> str:
    """``text`` as a code span when it is plain (a name such as ``cpu-pretrained``); escaped
    text (:func:`md`) otherwise, since nothing can be escaped inside a code span."""
    s = str(text)
    return f"`{s}`" if _PLAIN.fullmatch(s) else md(s)
