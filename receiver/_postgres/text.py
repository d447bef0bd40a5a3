"""Text as SQLite keeps it: PostgreSQL's text cannot hold NUL characters, so they are escaped.

A delivery may carry NUL in the strings the ledger keeps as text (a status message, an
unknown status word); SQLite stores them as they are, PostgreSQL refuses them, which would
refuse the delivery forever. So every string this backend sends is escaped on the way in and
unescaped on the way out, through psycopg adapters registered on each connection: NUL is
stored as U+E000 U+E002, and U+E000 itself (a private-use character) as U+E000 U+E001.
Strings holding neither, which is all of them in practice, are stored unchanged, so SQL
reads them as they are; the records the ledger returns are the same as on SQLite.
"""

from __future__ import annotations

import re
from typing import Any

from psycopg.abc import AdaptContext, Buffer
from psycopg.types.string import StrDumperUnknown, TextLoader

__all__ = ["escape", "register", "unescape"]

_ESCAPE = "\ue000"
_ESCAPED = re.compile("\ue000([\ue001\ue002])")


def escape(text: str) -> str:
    """`text` as PostgreSQL can hold it (unchanged unless it holds NUL or U+E000)."""
    if "\x00" not in text and _ESCAPE not in text:
        return text
    return text.replace(_ESCAPE, "\ue000\ue001").replace("\x00", "\ue000\ue002")


def unescape(text: str) -> str:
    """The string `escape` was given."""
    if _ESCAPE not in text:
        return text
    return _ESCAPED.sub(lambda found: _ESCAPE if found[1] == "\ue001" else "\x00", text)


class _Dumper(StrDumperUnknown):
    def dump(self, obj: str) -> Buffer | None:
        return super().dump(escape(obj))


class _Loader(TextLoader):
    def load(self, data: Buffer) -> Any:
        loaded = super().load(data)
        return unescape(loaded) if isinstance(loaded, str) else loaded


def register(context: AdaptContext) -> None:
    """Escape every string sent through `context` (a connection) and unescape text read."""
    context.adapters.register_dumper(str, _Dumper)
    for name in ("text", "varchar"):
        context.adapters.register_loader(name, _Loader)
