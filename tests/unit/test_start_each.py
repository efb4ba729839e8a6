"""A pass that starts several migrations (an evacuation, a drain, a balancing round) goes on
past one whose create fails, and says which one failed."""

from __future__ import annotations

import asyncio
import logging

import pytest

from gtvp.handlers.start_each import start_each


def test_one_failed_start_holds_back_none_of_the_others(caplog: pytest.LogCaptureFixture) -> None:
    started: list[str] = []

    async def start(name: str) -> None:
        if name == "b":
            raise RuntimeError("the API server timed out")
        started.append(name)

    with caplog.at_level(logging.ERROR):
        asyncio.run(start_each(["a", "b", "c"], start, lambda n: f"evacuation {n}"))
    assert started == ["a", "c"]
    (record,) = caplog.records
    assert "starting evacuation b failed; planned again on the next pass" in record.getMessage()
    assert record.exc_info is not None
