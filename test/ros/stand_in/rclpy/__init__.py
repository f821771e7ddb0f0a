"""Stand-in for rclpy's top level: init / shutdown / ok / spin (see ../README.md)."""
from __future__ import annotations

from typing import Any, Optional

_ok = False


def init(*, args: Optional[list[str]] = None, context: Any = None,
         domain_id: Optional[int] = None, signal_handler_options: Any = None) -> None:
    global _ok
    _ok = True


def ok(*, context: Any = None) -> bool:
    return _ok


def shutdown(*, context: Any = None, uninstall_handlers: Optional[bool] = None) -> None:
    global _ok
    _ok = False


def try_shutdown(*, context: Any = None, uninstall_handlers: Optional[bool] = None) -> None:
    shutdown()


def spin(node: Any, executor: Any = None) -> None:
    """Returns at once: tests drive callbacks themselves."""
