"""`RebuiltOnUnpickle`: how a step with state derived from its options travels to worker processes."""

from __future__ import annotations

from typing import Any


class RebuiltOnUnpickle:
    """Mixin for a step whose `__post_init__` derives state from its options (a compiled `_regex`): its pickle, the
    copy a worker process receives, leaves that state out, and unpickling runs `__post_init__` again."""

    def __post_init__(self) -> None:
        raise NotImplementedError

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("_regex", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.__post_init__()
