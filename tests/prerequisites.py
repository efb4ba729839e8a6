"""What a test does when this machine lacks a real part it needs: skip with the reason on a
developer's machine, fail under CI (which installs everything: a missing part there is a
broken setup, never a silent skip)."""

from __future__ import annotations

import os
from typing import NoReturn

import pytest


def unavailable(why: str) -> NoReturn:
    if os.environ.get("CI"):
        pytest.fail(f"missing under CI: {why}")
    pytest.skip(why)
