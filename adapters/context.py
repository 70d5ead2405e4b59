"""The identity of one call, kept with the call and never on the shared modules.

A pipeline call opens its identity (``open_identity``) for as long as it runs and closes it in a
``finally``. The hooks that carry an identity into a model are registered once, when the adapter
is attached, as diffusers ``ModelHook``s named ``HOOK_NAME`` (so caches, offloading and compile see
one forward chain); each asks for the identity open *in its own thread* for its owner (the
adapter) and passes the forward through untouched when there is none. Threads and pipelines that
share a model therefore never see each other's identity, and a model outside a call runs plain.

The open identities live in a ``threading.local`` stack rather than a ``contextvars.ContextVar``:
``torch.compile`` traces a thread-local into one graph (``fullgraph=True``) and reads new tensors
from it without compiling again, while ``ContextVar.get`` breaks the graph. A pipeline call is
synchronous, so no two calls interleave in one thread.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import torch
from diffusers.hooks import HookRegistry, ModelHook

#: The name of idgen's hook in a module's diffusers hook registry.
HOOK_NAME = "idgen_identity"
#: Where a module keeps the hooks that serve one call's own functions (``call_hook``), a ``ModelHooks``.
CALL_HOOK_NAME = "_idgen_call_hooks"

_local = threading.local()
_registration = threading.RLock()


class CallState(Protocol):
    """What an open identity gives its hooks: ``owner`` (whose hooks it serves) and the two calls."""

    owner: Any

    def pre_forward(self, role: str, module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        """The forward's arguments, changed or not (None: unchanged)."""

    def post_forward(self, role: str, module: torch.nn.Module, output: Any) -> Any: ...


def _open() -> tuple:
    return getattr(_local, "calls", ())


@contextlib.contextmanager
def open_identity(state: CallState) -> Iterator[CallState]:
    """Make ``state`` the identity of its owner's hooks in this thread until the block ends."""
    before = _open()
    _local.calls = before + (state,)
    try:
        yield state
    finally:
        _local.calls = before


def current(owner: Any) -> CallState | None:
    """The innermost identity open for ``owner`` in this thread, or None."""
    for state in reversed(_open()):
        if state.owner is owner:
            return state
    return None


def keep_open(function: Callable) -> Callable:
    """``function`` running with this thread's open identities, wherever it is called from: for
    work the autograd engine replays on its own threads (gradient checkpointing on a GPU)."""
    calls = _open()

    def run(*args: Any, **kwargs: Any) -> Any:
        before = _open()
        _local.calls = calls
        try:
            return function(*args, **kwargs)
        finally:
            _local.calls = before

    return run


def checkpoint(function: Callable, *args: Any, **kwargs: Any) -> Any:
    """``torch.utils.checkpoint.checkpoint`` whose recomputation sees the identity of the forward
    (``ModelMixin.enable_gradient_checkpointing(gradient_checkpointing_func=checkpoint)``)."""
    kwargs.setdefault("use_reentrant", False)
    return torch.utils.checkpoint.checkpoint(keep_open(function), *args, **kwargs)


class IdentityHook(ModelHook):
    """One module's identity hook: hands the forward to the identity open for ``owner`` under
    ``role`` (which part of the model this module is), or passes it through."""

    def __init__(self, owner: Any, role: str):
        super().__init__()
        self.owner, self.role = owner, role

    def pre_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> tuple[tuple, dict]:
        state = current(self.owner)
        changed = None if state is None else state.pre_forward(self.role, module, args, kwargs)
        return (args, kwargs) if changed is None else changed

    def post_forward(self, module: torch.nn.Module, output: Any) -> Any:
        state = current(self.owner)
        return output if state is None else state.post_forward(self.role, module, output)


def register(module: torch.nn.Module, model_hook: ModelHook, name: str) -> None:
    """Register ``model_hook`` on ``module`` under ``name``, unless a hook of the same owner is
    there already (replacing one of another owner)."""
    with _registration:
        registry = HookRegistry.check_if_exists_or_initialize(module)
        there = registry.get_hook(name)
        if there is not None and getattr(there, "owner", None) is getattr(model_hook, "owner", None) \
                and type(there) is type(model_hook) and getattr(there, "role", None) == getattr(model_hook, "role", None):
            return
        if there is not None:
            registry.remove_hook(name, recurse=False)
        registry.register_hook(model_hook, name)


def hook(module: torch.nn.Module, owner: Any, role: str) -> None:
    """Register ``owner``'s identity hook on ``module`` (replacing one there)."""
    register(module, IdentityHook(owner, role), HOOK_NAME)


def unhook(module: torch.nn.Module) -> None:
    """Remove the identity hook from ``module``, if it has one."""
    with _registration:
        registry = getattr(module, "_diffusers_hook", None)
        if registry is not None and registry.get_hook(HOOK_NAME) is not None:
            registry.remove_hook(HOOK_NAME, recurse=False)


def hook_owner(module: torch.nn.Module) -> Any:
    """The owner of ``module``'s identity hook, or None."""
    registry = getattr(module, "_diffusers_hook", None)
    found = None if registry is None else registry.get_hook(HOOK_NAME)
    return None if found is None else found.owner


def hook_model(model: torch.nn.Module, owner: Any, role: str, outside: Callable[[], None] | None = None) -> list:
    """``owner``'s identity hook on a whole model (the UNet), as torch forward hooks. On a
    ``torch.compile``'d model they sit on the compiled wrapper and run eagerly, outside the graph,
    so what they track from step to step (the step, the batch) never asks the graph to compile
    again. ``outside()`` runs ahead of a forward outside any identity of ``owner``. Returns the
    handles to remove."""

    def before(module: torch.nn.Module, args: tuple, kwargs: dict):
        state = current(owner)
        if state is None:
            if outside is not None:
                outside()
            return None
        return state.pre_forward(role, module, args, kwargs)

    def after(module: torch.nn.Module, args: tuple, output: Any) -> Any:
        state = current(owner)
        return None if state is None else state.post_forward(role, module, output)

    return [model.register_forward_pre_hook(before, with_kwargs=True), model.register_forward_hook(after)]


class ModelHooks:
    """``owner``'s ``hook_model`` hooks on one model object at a time: moved when the object the
    pipeline calls changes (``torch.compile`` wraps the model, or the wrapper is taken off)."""

    def __init__(self) -> None:
        self.model: torch.nn.Module | None = None
        self.handles: list = []

    def follow(self, model: torch.nn.Module, owner: Any, role: str, outside: Callable[[], None] | None = None) -> None:
        """Have the hooks on ``model`` (nothing to do when they are there already)."""
        if self.model is model:
            return
        self.remove()
        self.model, self.handles = model, hook_model(model, owner, role, outside)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.model, self.handles = None, []


class _CallFunctions:
    """A call's own functions for one module, and values its other hooks read (``call_hook``)."""

    def __init__(self, owner: torch.nn.Module, pre: Callable | None, post: Callable | None, values: dict):
        self.owner, self.pre, self.post, self.values = owner, pre, post, values

    def pre_forward(self, role: str, module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return (args, kwargs) if self.pre is None else self.pre(args, kwargs)

    def post_forward(self, role: str, module: torch.nn.Module, output: Any) -> Any:
        return output if self.post is None else self.post(output)


@contextlib.contextmanager
def call_hook(module: torch.nn.Module, pre: Callable[[tuple, dict], tuple[tuple, dict]] | None = None,
              post: Callable[[Any], Any] | None = None, **values: Any) -> Iterator[None]:
    """Within the block, and in this thread only, ``module``'s forward takes its inputs through
    ``pre(args, kwargs) -> (args, kwargs)`` and its output through ``post(output)``; hooks of its
    submodules owned by ``module`` read ``values``. The hooks stay registered (``hook_model``,
    once per module; on a compiled model, on its wrapper), passing through outside such a block."""
    with _registration:
        module.__dict__.setdefault(CALL_HOOK_NAME, ModelHooks()).follow(module, module, "call")
    with open_identity(_CallFunctions(module, pre, post, values)):
        yield


def registration_lock() -> threading.RLock:
    """Held while hooks are added or moved, so two threads never register the same module at once."""
    return _registration
