"""Keep checkpoint loads from disturbing each other and the forward passes running beside them.

Loads run while the worker serves: the aligner loads on the first timestamp request while the batcher keeps
transcribing, and a second LoadModel replaces a model that is still answering. Two pieces of transformers'
`from_pretrained` touch state that is process-wide, not per thread:

* It builds the model's modules under `init_empty_weights`, which patches `nn.Module.register_parameter` for the
  whole process and restores it on exit. Two overlapping loads restore it out of order and leave every later
  module on the meta device. So loads never overlap: `loading()` takes one process-wide lock.
* It sets torch's default dtype to the load dtype (bf16, fp16) while it builds those modules, then restores it
  before it reads the weights. A forward pass running meanwhile creates its float tensors in that dtype and
  fails, or silently loses precision. So forward passes (`forward_pass()`) and that dtype switch exclude each
  other through a reader-writer gate. The switch lasts only while the modules are built on the meta device, a
  fraction of a second, so a plain request is never held for the whole aligner load.

The gate is held from transformers' `PreTrainedModel._set_default_dtype` until `_load_pretrained_model` starts
(the default dtype is restored just before it), through hooks that act only in a thread inside `loading()`, and
only when the load dtype differs from the default (a float32 load overlaps forward passes freely). The pinned
transformers (4.57.6) has both methods; a test fails if a forward pass ever overlaps the switch.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

_loads = threading.Lock()
_local = threading.local()


class ForwardGate:
    """A reader-writer gate: any number of forward passes, or one loader switching the default dtype.

    A waiting loader keeps new forward passes out, so a steady stream of requests cannot starve it. Holding is
    per thread and idempotent: `hold()` twice in one thread needs one `release()`.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._running = 0
        self._owner: int | None = None
        self._waiting = 0

    @contextmanager
    def shared(self) -> Iterator[None]:
        """Run a forward pass: waits while a loader holds or waits for the gate."""
        with self._cond:
            self._cond.wait_for(lambda: self._owner is None and not self._waiting)
            self._running += 1
        try:
            yield
        finally:
            with self._cond:
                self._running -= 1
                self._cond.notify_all()

    def hold(self) -> None:
        """Take the gate alone once the running forward passes have finished (no-op if this thread holds it)."""
        me = threading.get_ident()
        with self._cond:
            if self._owner == me:
                return
            self._waiting += 1
            try:
                self._cond.wait_for(lambda: self._owner is None and self._running == 0)
            finally:
                self._waiting -= 1
            self._owner = me

    def release(self) -> None:
        """Let forward passes run again (no-op unless this thread holds the gate)."""
        with self._cond:
            if self._owner == threading.get_ident():
                self._owner = None
                self._cond.notify_all()

    @property
    def held(self) -> bool:
        """Whether a loader holds the gate now."""
        return self._owner is not None


FORWARD = ForwardGate()


def forward_pass() -> AbstractContextManager[None]:
    """Context manager around every model call (ASR batch, alignment)."""
    return FORWARD.shared()


@contextmanager
def loading() -> Iterator[None]:
    """Context manager around every `from_pretrained`: one load at a time, the dtype switch gated."""
    _install_hooks()
    with _loads:
        _local.loading = True
        try:
            yield
        finally:
            _local.loading = False
            FORWARD.release()


def _in_load() -> bool:
    return getattr(_local, "loading", False)


@functools.cache
def _install_hooks() -> None:
    import torch
    from transformers import PreTrainedModel

    set_default_dtype = PreTrainedModel._set_default_dtype.__func__
    load_weights = PreTrainedModel._load_pretrained_model.__func__

    def gated_set_default_dtype(cls: type, dtype: Any) -> Any:
        if _in_load() and dtype != torch.get_default_dtype():  # a float32 load changes nothing: no need to wait
            FORWARD.hold()
        return set_default_dtype(cls, dtype)

    def load_weights_ungated(cls: type, *args: Any, **kwargs: Any) -> Any:
        if _in_load():
            FORWARD.release()  # from_pretrained restored the default dtype just before this call
        return load_weights(cls, *args, **kwargs)

    PreTrainedModel._set_default_dtype = classmethod(_wrapped(gated_set_default_dtype, set_default_dtype))
    PreTrainedModel._load_pretrained_model = classmethod(_wrapped(load_weights_ungated, load_weights))


def _wrapped(wrapper: Callable[..., Any], original: Callable[..., Any]) -> Callable[..., Any]:
    return functools.update_wrapper(wrapper, original)
