"""Issue #12: every bad input is named, with the exact exception type and the words of its message."""

from __future__ import annotations

from typing import Callable

import pytest


def assert_raises_exactly(call: Callable[[], object], error: type[Exception], message: str) -> None:
    """``call()`` raises exactly ``error`` (not a subclass, not a wrapper) whose message contains ``message``."""
    with pytest.raises(error) as info:
        call()
    assert type(info.value) is error, f"{type(info.value).__name__}: {info.value}"
    assert message in str(info.value), str(info.value)
