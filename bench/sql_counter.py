"""Count what an engine sends to its database: statements and transactions.

Counted, not timed, so the numbers are the same on a loaded machine; ``bench/run.py``
reports them beside the times and ``tests/pool/test_db_cost.py`` holds the trial path to them.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import sqlalchemy as sa


class SqlCounter:
    """Statements (each ``execute`` a cursor runs) and transactions (each BEGIN) of one
    engine, while ``counting``."""

    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine
        self.statements = 0
        self.transactions = 0
        self.by_statement: Counter[str] = Counter()
        self._on = False
        sa.event.listen(engine, "before_cursor_execute", self._statement)
        sa.event.listen(engine, "begin", self._begin)

    def _statement(self, conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if self._on:
            self.statements += 1
            self.by_statement[re.sub(r"\s+", " ", statement).strip()[:90]] += 1

    def _begin(self, conn: Any) -> None:
        if self._on:
            self.transactions += 1

    @contextmanager
    def counting(self) -> Iterator[SqlCounter]:
        self._on = True
        try:
            yield self
        finally:
            self._on = False

    def close(self) -> None:
        sa.event.remove(self.engine, "before_cursor_execute", self._statement)
        sa.event.remove(self.engine, "begin", self._begin)
