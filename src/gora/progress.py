"""Progress bars that are nothing at all when switched off.

``tqdm(disable=True)`` draws nothing but still starts tqdm's monitor thread (any tqdm instance does), so a switched-off
bar here is no tqdm: an iterable is returned as it is, and a bar without one is an object whose methods do nothing.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from tqdm.auto import tqdm


class NoBar:
    """What loops call on a tqdm bar (``with``, ``update``, ``set_postfix_str``, ``set_postfix``, ``close``), doing
    nothing."""

    def __enter__(self) -> NoBar:
        return self

    def __exit__(self, *exc_info: object) -> None:
        pass

    def update(self, n: float = 1) -> None:
        pass

    def set_postfix_str(self, text: str = "", refresh: bool = True) -> None:
        pass

    def set_postfix(self, *args: Any, **kwargs: Any) -> None:
        pass

    def close(self) -> None:
        pass


def progress(iterable: Iterable | None = None, *, enabled: bool, **kwargs: Any) -> Any:
    """``tqdm(iterable, **kwargs)`` when ``enabled``; otherwise ``iterable`` itself, or a :class:`NoBar` without one."""
    if enabled:
        return tqdm(iterable, **kwargs)
    return NoBar() if iterable is None else iterable


__all__ = ["NoBar", "progress"]
