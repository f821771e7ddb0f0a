"""Stand-in for rclpy.parameter.Parameter."""
from __future__ import annotations

from enum import Enum
from typing import Any, Optional


class Parameter:
    class Type(Enum):
        NOT_SET = 0
        BOOL = 1
        INTEGER = 2
        DOUBLE = 3
        STRING = 4
        BYTE_ARRAY = 5
        BOOL_ARRAY = 6
        INTEGER_ARRAY = 7
        DOUBLE_ARRAY = 8
        STRING_ARRAY = 9

        @classmethod
        def from_parameter_value(cls, value: Any) -> 'Parameter.Type':
            if value is None:
                return cls.NOT_SET
            if isinstance(value, bool):
                return cls.BOOL
            if isinstance(value, int):
                return cls.INTEGER
            if isinstance(value, float):
                return cls.DOUBLE
            if isinstance(value, str):
                return cls.STRING
            if isinstance(value, (list, tuple)):
                if all(isinstance(v, bool) for v in value) and value:
                    return cls.BOOL_ARRAY
                if all(isinstance(v, int) for v in value) and value:
                    return cls.INTEGER_ARRAY
                if all(isinstance(v, float) for v in value) and value:
                    return cls.DOUBLE_ARRAY
                if all(isinstance(v, str) for v in value):
                    return cls.STRING_ARRAY
            raise TypeError(f'The given value is not one of the allowed types {value!r}')

    def __init__(self, name: str, type_: Optional['Parameter.Type'] = None,
                 value: Any = None) -> None:
        if type_ is None:
            type_ = Parameter.Type.from_parameter_value(value)
        self._name, self._type, self._value = name, type_, value

    @property
    def name(self) -> str:
        return self._name

    @property
    def type_(self) -> 'Parameter.Type':
        return self._type

    @property
    def value(self) -> Any:
        return self._value
