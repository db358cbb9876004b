"""Which module is running: a stack of fully qualified names kept by global forward hooks.

Shared by the saved-tensor recorder and the live-memory tracker so that both attribute
to the same names. Modules outside ``model`` are named by their class.
"""

from __future__ import annotations

from torch import nn


class ModuleScope:
    """Context manager; ``current`` is the innermost running module's name ("" = none)."""

    def __init__(self, model: nn.Module | None = None):
        self._names = {id(m): n for n, m in model.named_modules()} if model is not None else {}
        self._stack: list[str] = []
        self._handles: list = []

    @property
    def current(self) -> str:
        return self._stack[-1] if self._stack else ""

    def _pre(self, module, args):
        self._stack.append(self._names.get(id(module), type(module).__name__))

    def _post(self, module, args, output):
        if self._stack:
            self._stack.pop()

    def __enter__(self) -> "ModuleScope":
        reg = nn.modules.module
        self._handles = [reg.register_module_forward_pre_hook(self._pre),
                         reg.register_module_forward_hook(self._post, always_call=True)]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles, self._stack = [], []
