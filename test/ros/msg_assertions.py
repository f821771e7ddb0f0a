"""Assertions on rosbags message objects shared by the test/ros modules (imported by name: pytest
puts this folder on sys.path)."""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np


def assert_msg_equal(a: Any, b: Any) -> None:
    """Deep equality of rosbags messages (numpy arrays compared element-wise, NaN == NaN)."""
    if dataclasses.is_dataclass(a):
        assert type(a).__name__ == type(b).__name__
        for f in dataclasses.fields(a):
            if not f.name.startswith('__') and not f.name.isupper():
                assert_msg_equal(getattr(a, f.name), getattr(b, f.name))
    elif isinstance(a, np.ndarray):
        np.testing.assert_array_equal(a, np.asarray(b))
    elif isinstance(a, list):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_msg_equal(x, y)
    elif isinstance(a, float):
        assert a == b or (a != a and b != b)
    else:
        assert a == b
