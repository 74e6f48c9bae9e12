"""A fresh directory under the test's own temp dir (``mktemp`` names one; this makes it)."""

from __future__ import annotations

import os
from typing import Any


def made_dir(testcase: Any) -> str:
    """A new, empty directory that trial cleans up with the test's other files."""
    path = os.path.abspath(testcase.mktemp())
    os.makedirs(path)
    return path
