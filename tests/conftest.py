"""What every test shares: the test process keeps glibc's malloc as it starts. The commands that train or
evaluate change it for their whole process (loralab.host_memory), and tests call them in this one, where
that would carry over into every later test; tests/test_host_memory.py checks the real call in subprocesses."""

from __future__ import annotations

import pytest

import loralab.host_memory


@pytest.fixture(autouse=True)
def _malloc_as_it_starts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loralab.host_memory, "reuse_freed_memory", lambda: False)
