"""``Signal``: Celery's observer pattern (``celery.utils.dispatch.Signal``), same names and calls.

    from celeriac.signals import task_success

    @task_success.connect
    def on_success(sender=None, result=None, **kwargs):
        ...

    @task_success.connect(sender=add)       # only for this task
    def on_add(sender=None, **kwargs):
        ...

Semantics, as Celery's:

* a receiver is called as ``receiver(signal=<the Signal>, sender=<sender>, **named)`` and must accept
  ``**kwargs`` (new arguments may be added in later versions); this is checked at ``connect``;
* ``sender=`` filters: strings compare by value (``before_task_publish`` is sent with the task
  *name*), other objects by identity (the task object for ``task_success``);
* ``dispatch_uid=`` makes a connection unique: connecting the same uid twice keeps the first;
* ``send`` calls every receiver, even when one raises: the exception is logged and returned as that
  receiver's response (Celery's ``send`` is ``send_robust``), so a broken receiver never breaks a
  task or the worker;
* ``send`` returns ``[(receiver, response), ...]``.

Differences, on purpose:

* ``weak`` defaults to **False** (Celery: True). A weakly held receiver defined inside a function
  (a closure, a lambda) silently disappears at the next garbage collection, which is a common and
  hard to see mistake; ``weak=True`` is available for bound methods of short-lived objects.
* ``async def`` receivers are refused at ``connect``. Signals are sent synchronously, from task
  threads as well as from the event loop, where nothing could await them; and a receiver that must
  finish before the task goes on (``task_prerun``) cannot be a coroutine scheduled for later. A
  receiver that needs the loop can schedule its own coroutine (``loop.call_soon_threadsafe``).
  A sync receiver that nevertheless returns a coroutine has it closed and an error logged.
* ``connect(retry=True)`` (Celery retries a failing receiver for ever) is refused.

Cost when nobody listens: ``receivers`` is a plain list, replaced (never mutated) on connect and
disconnect, so senders on a hot path test ``if signal.receivers:`` before building any arguments.
"""

from __future__ import annotations

import inspect
import logging
import threading
import weakref
from collections.abc import Callable, Hashable
from typing import Any, overload

from celeriac.exceptions import ImproperlyConfigured

__all__ = ["Receiver", "Signal"]

logger = logging.getLogger("celeriac.signals")

#: A signal receiver: called with ``signal=``, ``sender=`` and the signal's keyword arguments.
Receiver = Callable[..., Any]

_Ref = Callable[[], Receiver | None]


def _sender_key(sender: Any) -> Hashable:
    """How a sender is matched: strings (task names) by value, anything else by identity."""
    if isinstance(sender, str | bytes):
        return sender
    return id(sender)


def _receiver_key(receiver: Receiver) -> Hashable:
    # Bound methods are created anew on each attribute access: key them by instance and function.
    func = getattr(receiver, "__func__", None)
    if func is not None:
        return (id(getattr(receiver, "__self__", None)), id(func))
    return id(receiver)


def _accepts_kwargs(receiver: Receiver) -> bool:
    try:
        params = inspect.signature(receiver).parameters.values()
    except (TypeError, ValueError):
        return True  # a builtin or C callable: nothing to check
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def _is_async(receiver: Receiver) -> bool:
    if inspect.iscoroutinefunction(receiver):
        return True
    # An object whose __call__ is async def.
    if inspect.isroutine(receiver) or isinstance(receiver, type):
        return False
    return inspect.iscoroutinefunction(type(receiver).__call__)


class _Connection:
    """One connected receiver: its identity, sender filter and (possibly weak) reference."""

    __slots__ = ("key", "ref", "sender")

    def __init__(self, key: tuple[Hashable, Hashable | None], ref: _Ref, sender: Any) -> None:
        self.key = key
        self.ref = ref
        self.sender = sender


class Signal:
    """A signal receivers connect to and senders send: ``Signal(name="my_signal")``."""

    def __init__(
        self,
        providing_args: Any = None,
        use_caching: bool = False,
        name: str | None = None,
    ) -> None:
        # ``providing_args`` and ``use_caching`` are accepted for Celery's constructor; the
        # arguments are documentation only, and lookups are cheap enough not to need a cache.
        del use_caching
        self.name = name
        self.providing_args: set[str] = set(providing_args or ())
        #: The connections, replaced as a whole on every change (see the module docstring).
        self.receivers: list[_Connection] = []
        self._lock = threading.Lock()

    # -- connecting ------------------------------------------------------------------------------

    @overload
    def connect(
        self,
        receiver: Receiver,
        /,
        *,
        sender: Any = None,
        weak: bool = False,
        dispatch_uid: Hashable | None = None,
        retry: bool = False,
    ) -> Receiver: ...

    @overload
    def connect(
        self,
        /,
        *,
        sender: Any = None,
        weak: bool = False,
        dispatch_uid: Hashable | None = None,
        retry: bool = False,
    ) -> Callable[[Receiver], Receiver]: ...

    def connect(
        self,
        receiver: Receiver | None = None,
        /,
        *,
        sender: Any = None,
        weak: bool = False,
        dispatch_uid: Hashable | None = None,
        retry: bool = False,
    ) -> Receiver | Callable[[Receiver], Receiver]:
        """Connect ``receiver``; without it, return a decorator (``@sig.connect(sender=add)``).

        ``sender`` limits the receiver to one sender; ``weak=True`` holds it by weak reference;
        ``dispatch_uid`` identifies the connection so that connecting it again is a no-op.
        """
        if retry:
            raise ImproperlyConfigured(
                f"{self!r}: connect(retry=True) is not supported; handle errors in the receiver"
            )

        def register(fun: Receiver) -> Receiver:
            self._connect(fun, sender, weak, dispatch_uid)
            return fun

        if receiver is None:
            return register
        return register(receiver)

    def _connect(
        self, receiver: Receiver, sender: Any, weak: bool, dispatch_uid: Hashable | None
    ) -> None:
        if not callable(receiver):
            raise ImproperlyConfigured(f"{self!r}: a receiver must be callable, not {receiver!r}")
        if _is_async(receiver):
            raise ImproperlyConfigured(
                f"{self!r}: {receiver!r} is async def; signal receivers are called synchronously "
                "(from task threads as well as the event loop), so they must be plain functions"
            )
        if not _accepts_kwargs(receiver):
            raise ImproperlyConfigured(
                f"{self!r}: receiver {receiver!r} must accept keyword arguments (**kwargs)"
            )
        sender_key = None if sender is None else _sender_key(sender)
        key = (dispatch_uid if dispatch_uid is not None else _receiver_key(receiver), sender_key)
        ref: _Ref
        if weak:
            if inspect.ismethod(receiver):
                ref = weakref.WeakMethod(receiver, self._forget_dead)
            else:
                ref = weakref.ref(receiver, self._forget_dead)
        else:
            ref = _StrongRef(receiver)
        with self._lock:
            if any(c.key == key for c in self.receivers):
                return
            self.receivers = [*self.receivers, _Connection(key, ref, sender_key)]

    def disconnect(
        self,
        receiver: Receiver | None = None,
        sender: Any = None,
        weak: bool | None = None,
        dispatch_uid: Hashable | None = None,
    ) -> bool:
        """Disconnect a receiver (by itself or by ``dispatch_uid``); whether one was connected."""
        del weak  # accepted for Celery's signature; it has no effect there either
        if receiver is None and dispatch_uid is None:
            raise ImproperlyConfigured(f"{self!r}: disconnect() needs a receiver or a dispatch_uid")
        sender_key = None if sender is None else _sender_key(sender)
        ident = dispatch_uid if dispatch_uid is not None else _receiver_key(receiver)  # type: ignore[arg-type]
        key = (ident, sender_key)
        with self._lock:
            kept = [c for c in self.receivers if c.key != key]
            found = len(kept) != len(self.receivers)
            self.receivers = kept
        return found

    def _forget_dead(self, _ref: Any) -> None:
        # Called by the garbage collector, possibly while a thread holds the lock: do not take it;
        # replacing the list in one assignment is atomic and safe against concurrent senders.
        self.receivers = [c for c in self.receivers if c.ref() is not None]

    # -- sending ---------------------------------------------------------------------------------

    def has_listeners(self, sender: Any = None) -> bool:
        """Whether any live receiver would be called for ``sender``."""
        return bool(self._live(sender))

    def _live(self, sender: Any) -> list[Receiver]:
        key = _sender_key(sender) if sender is not None else None
        live = []
        for connection in self.receivers:
            if connection.sender is not None and connection.sender != key:
                continue
            fun = connection.ref()
            if fun is not None:
                live.append(fun)
        return live

    def send(self, sender: Any, **named: Any) -> list[tuple[Receiver, Any]]:
        """Call every receiver connected for ``sender``; ``[(receiver, response), ...]``.

        A receiver that raises is logged and its exception is its response; the others still run.
        """
        if not self.receivers:
            return []
        responses: list[tuple[Receiver, Any]] = []
        for receiver in self._live(sender):
            try:
                response = receiver(signal=self, sender=sender, **named)
            except Exception as exc:
                logger.exception("Signal handler %r of %s raised: %r", receiver, self, exc)
                responses.append((receiver, exc))
                continue
            if inspect.isawaitable(response):
                if inspect.iscoroutine(response):
                    response.close()
                logger.error(
                    "Signal handler %r of %s returned an awaitable, which is never awaited: "
                    "signal receivers must be plain functions",
                    receiver,
                    self,
                )
            responses.append((receiver, response))
        return responses

    #: Celery's (and Django's) name for the same thing: ``send`` never lets a receiver's error out.
    send_robust = send

    def __repr__(self) -> str:
        return f"<Signal: {self.name}>"

    __str__ = __repr__


class _StrongRef:
    """A strong reference with the interface of :class:`weakref.ref`."""

    __slots__ = ("_target",)

    def __init__(self, target: Receiver) -> None:
        self._target = target

    def __call__(self) -> Receiver:
        return self._target
