"""Wake the waiters of a store kept in a file the moment another *process* changes it.

The SQLite broker and result store are files that several processes share. Inside one process a
change wakes waiters through :class:`~celeriac.utils.wakeup.WakeupRegistry`; this module carries the
same news between processes, so an idle worker sees a task a client publishes at once instead of at
its next poll, and a client's ``get()`` sees a result as soon as a worker has stored it.

Layout: next to the database ``<db>`` the directory ``<db>.wake/`` holds one Unix datagram socket per
process that waits on the store, named ``<pid>-<8 hex digits>``. A socket's path must fit in
``sun_path`` (104 bytes on macOS, 108 on Linux, the final NUL included): when ``<db>.wake/`` and the
longest socket name would take more than :data:`MAX_SOCKET_PATH` bytes, the directory is
``<temp dir>/celeriac-wake-<first 16 hex digits of the SHA-256 of the database path>/`` instead.
Anyone may create names in the temp dir, so that one is created with mode 0700 and used only while it
belongs to the current user: processes of other users then poll. Every process derives the same
directory from the database path (symbolic links resolved; the temp dir is ``tempfile``'s, so
processes that share a fallback directory must agree on ``TMPDIR``). The first process that waits
creates the directory, and the last to leave removes it (a process about to bind in it then makes
it again).

Datagrams: one per change and listening process, the byte ``0x01`` (the format's version) followed
by the names of the *channels* that changed — queue names for the broker, task ids for the result
store — in UTF-8, separated by NUL bytes. A change that touches more names than fit in
:data:`MAX_DATAGRAM` bytes is sent as several datagrams. A datagram of another version is ignored. A
datagram only says "look again": the receiver reads the store, so a duplicate or a spurious one costs
one read, never a wrong answer.

Listening: the first wait of a store instance (not its connect: a process that only writes needs no
socket) binds the process's socket for that file and has the running event loop read it
(``loop.add_reader``); every instance on the same file in the process shares it, and the names it
receives become :meth:`WakeupRegistry.notify` for the waiters of every loop of the process. A change
after a quiet spell is handed on at once; in a stream of changes the listener reads its socket once
per short gap (1 ms, widening to 16 ms while the stream lasts) and hands on all the names at once,
so a stream wakes the process once per gap instead of once per change (see :class:`_Listener`).
The socket is removed when the last instance using it closes, and at exit; a forked child closes
its copy of the parent's socket (without removing it) and binds one of its own when it waits.

Sending: once a change is committed, :meth:`FileWakeups.changed` wakes the waiters of its own
process directly and sends the datagram to every other socket in the directory. A send never blocks
and its errors are ignored, except that a socket nobody owns any more (refused: its process was
killed; or already gone) is unlinked or forgotten. The listing of the directory is cached until the
directory's modification time changes; a listing taken less than :data:`_RACY_NS` after that time is
not trusted (file times come from a coarse clock, so a socket bound just after the listing may leave
the time as it was), and is taken again at the next change.

No wake-up is lost between a check and a wait: the waiter registers in the registry and makes sure
its socket is bound *before* it checks the store, and the writer commits *before* it lists the
directory. A change the check missed was committed after the socket existed, so the writer's
listing includes the socket.

Failure modes: wake-ups only hasten what polling does anyway; waiters keep polling as before (a
broker's fetch from 1 ms up to ``polling_interval``, a result's wait from 1 ms up to ``interval``), so
a lost datagram delays a waiter by at most one poll. Linux queues only ``net.unix.max_dgram_qlen``
datagrams per socket (10 by default) and a writer drops what a full queue refuses: a listener that
finds its queue full therefore wakes *every* waiter of the store, which then reads the store again.
When a process cannot listen — no ``AF_UNIX``, an event loop without ``add_reader``
(Windows' proactor loop), a directory it cannot create or write, a fallback directory owned by
another user — it logs why once, at INFO, and only polls.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import hashlib
import logging
import os
import re
import secrets
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Collection, Iterable
from stat import S_ISDIR

from celeriac.utils.wakeup import WakeupRegistry

__all__ = ["MAX_DATAGRAM", "MAX_SOCKET_PATH", "FileWakeups", "wake_directory"]

logger = logging.getLogger(__name__)

#: Longest socket path used, in bytes: macOS's ``sun_path`` (104) without its final NUL.
MAX_SOCKET_PATH = 103
#: Room kept for "/<pid>-<8 hex>" after the directory (a pid has at most 10 digits).
_NAME_ROOM = 20
#: Largest datagram sent, in bytes; more names go in further datagrams.
MAX_DATAGRAM = 8192
#: Largest datagram read; one name longer than this is read cut short (and then wakes no one).
_RECV_SIZE = 65536
#: First byte of a datagram: the format's version.
_VERSION = 1
#: A listing taken less than this long (ns) after the directory's time is taken again.
_RACY_NS = 2_000_000_000


def _queue_length() -> int:
    """How many datagrams a socket queues before writers find it full (Linux's setting, or 10)."""
    try:
        with open("/proc/sys/net/unix/max_dgram_qlen", encoding="ascii") as setting:
            return max(1, int(setting.read()))
    except (OSError, ValueError):
        return 10


#: Datagrams a listener reads at once at most; reading that many means the queue was full.
_QUEUE_LENGTH = min(_queue_length(), 512)
#: Shortest time between two notifies of a listener (s), and how far it widens in a stream of
#: changes (see :class:`_Listener`). Woken for every single publish, an idle worker leases one
#: message per transaction, and the extra transactions and wake-ups slow the publisher down (on
#: 2 cores, 1,000 ``delay()`` calls with a worker running took 0.75 s instead of 0.5 s; with the
#: gap, 0.55 s). Waiters go on polling beside this, so a change held back for a gap is still seen
#: at the waiter's next poll if that comes first.
_MIN_GAP = 0.001
_MAX_GAP = 0.016

_SOCKET_NAME = re.compile(r"(\d{1,10})-[0-9a-f]{8}")

#: AF_UNIX is missing on some platforms (Windows builds of Python).
_AF_UNIX: int | None = getattr(socket, "AF_UNIX", None)


def wake_directory(db_path: str) -> tuple[str, bool]:
    """``(directory, private)``: where the sockets of the file ``db_path`` live.

    ``private`` is True for the fallback under the temp dir, which must belong to the current user.
    """
    real = os.path.realpath(db_path)
    beside = real + ".wake"
    if len(os.fsencode(beside)) + _NAME_ROOM <= MAX_SOCKET_PATH:
        return beside, False
    digest = hashlib.sha256(os.fsencode(real)).hexdigest()[:16]
    return os.path.join(tempfile.gettempdir(), f"celeriac-wake-{digest}"), True


def encode(channels: Iterable[str]) -> list[bytes]:
    """The datagrams that name ``channels`` (one unless they do not fit in :data:`MAX_DATAGRAM`)."""
    datagrams: list[bytes] = []
    names: list[bytes] = []
    size = 1
    for channel in channels:
        name = channel.encode("utf-8", "surrogatepass")
        if names and size + 1 + len(name) > MAX_DATAGRAM:
            datagrams.append(bytes([_VERSION]) + b"\0".join(names))
            names, size = [], 1
        names.append(name)
        size += len(name) + 1
    if names:
        datagrams.append(bytes([_VERSION]) + b"\0".join(names))
    return datagrams


def decode(datagram: bytes) -> list[str]:
    """The channel names in a datagram; none for a datagram of another version."""
    if not datagram or datagram[0] != _VERSION:
        return []
    return [name.decode("utf-8", "surrogatepass") for name in datagram[1:].split(b"\0") if name]


class _Peers:
    """The sockets of one directory as a writer sees them: a cached listing of the directory."""

    def __init__(self, directory: str, private: bool) -> None:
        self.directory = directory
        self.private = private
        self.lock = threading.Lock()
        #: (inode, mtime in ns) of the directory when it was listed; None: not listed.
        self.stamp: tuple[int, int] | None = None
        #: ``time.time_ns()`` when the listing started.
        self.listed_at = 0
        #: Sockets of other processes; replaced, never changed in place (callers iterate it).
        self.paths: tuple[str, ...] = ()

    def current(self) -> tuple[str, ...]:
        """The other processes' sockets, listed again when the directory changed."""
        try:
            stat = os.stat(self.directory)
        except OSError:
            return ()  # no directory: nobody listens yet
        if self.private and stat.st_uid != os.geteuid():
            return ()  # someone else's directory in the temp dir: tell it nothing
        stamp = (stat.st_ino, stat.st_mtime_ns)
        with self.lock:
            if stamp == self.stamp and stat.st_mtime_ns < self.listed_at - _RACY_NS:
                return self.paths
            listed_at = time.time_ns()
            try:
                names = os.listdir(self.directory)
            except OSError:
                return ()
            own = f"{os.getpid()}-"
            self.paths = tuple(
                os.path.join(self.directory, name)
                for name in names
                if _SOCKET_NAME.fullmatch(name) and not name.startswith(own)
            )
            self.stamp, self.listed_at = stamp, listed_at
            return self.paths

    def send(self, channels: Collection[str]) -> None:
        """Tell every other process's socket that ``channels`` changed; never blocks."""
        peers = self.current()
        if not peers:
            return
        sock = _process.sender()
        if sock is None:
            return
        datagrams = encode(channels)
        for path in peers:
            for data in datagrams:
                try:
                    sock.sendto(data, path)
                except (BlockingIOError, InterruptedError):
                    # Its queue is full: the listener finds it so and wakes all its waiters.
                    break
                except ConnectionRefusedError:
                    self._forget(path, unlink=True)  # nobody owns it: its process is gone
                    break
                except (FileNotFoundError, NotADirectoryError):
                    self._forget(path, unlink=False)
                    break
                except OSError as exc:
                    # Anything else (no permission, no buffer space): this wake-up is lost,
                    # and the listener's next poll finds the change.
                    logger.debug("could not wake %s: %s", path, exc)
                    break

    def _forget(self, path: str, *, unlink: bool) -> None:
        if unlink:
            with contextlib.suppress(OSError):
                os.unlink(path)
            logger.debug("removed %s: the process that listened there is gone", path)
        with self.lock:
            self.paths = tuple(p for p in self.paths if p != path)


class _Listener:
    """The socket a process waits on for one directory, read by one event loop (its *home*).

    Two modes. *Reading*: the loop watches the socket, and a datagram that comes at least a gap
    after the last notify is handed on at once. *Holding*, entered when datagrams come faster than
    that: the loop stops watching the socket and reads it once per gap instead, handing on all the
    names at once; the gap doubles (up to :data:`_MAX_GAP`) while several datagrams come per gap,
    halves when one does, and when none did the listener goes back to reading. A stream of changes
    thus wakes this process once per gap, not once per change. When one read finds the socket's
    whole queue (:data:`_QUEUE_LENGTH` datagrams), writers may have found it full and dropped
    some, so every waiter of the store is woken to check.
    """

    def __init__(
        self,
        directory: str,
        registry: WakeupRegistry,
        key: str,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        assert _AF_UNIX is not None
        self.registry = registry
        self.key = key
        self.path = os.path.join(directory, f"{os.getpid()}-{secrets.token_hex(4)}")
        self.pid = os.getpid()
        self.loop = loop
        #: The instances that use the socket, with the loop each waited on last.
        self.owners: dict[FileWakeups, asyncio.AbstractEventLoop] = {}
        #: Names received and not handed on yet (while holding).
        self._held: set[str] = set()
        #: Whether datagrams may have been dropped since the last notify.
        self._overflowed = False
        #: Shortest time between two notifies now: _MIN_GAP, widened in a stream.
        self._gap = _MIN_GAP
        #: ``time.monotonic()`` of the last notify.
        self._last_notify = -_MAX_GAP
        #: The timer of the holding mode (None: reading mode).
        self._timer: asyncio.TimerHandle | None = None
        self.sock = socket.socket(_AF_UNIX, socket.SOCK_DGRAM)
        try:
            self.sock.setblocking(False)
            self.sock.bind(self.path)
        except BaseException:
            self.sock.close()
            raise
        try:
            loop.add_reader(self.sock.fileno(), self._on_readable)
        except BaseException:
            self.unlink()
            self.sock.close()
            raise

    def _drain(self) -> int:
        """Read every queued datagram into :attr:`_held`; how many there were."""
        count = 0
        while count < _QUEUE_LENGTH:
            try:
                data = self.sock.recv(_RECV_SIZE)
            except (BlockingIOError, InterruptedError):
                return count
            except OSError as exc:  # the socket is unusable: polling finds the changes
                logger.debug("wake-up socket %s failed: %s", self.path, exc)
                return count
            self._held.update(decode(data))
            count += 1
        self._overflowed = True
        return count

    def _on_readable(self) -> None:
        """Reading mode: hand the news on at once, or start holding when it comes too fast."""
        count = self._drain()
        if not count:
            return
        now = time.monotonic()
        if count == 1 and now >= self._last_notify + self._gap:
            self._notify(now)
            return
        with contextlib.suppress(Exception):
            self.loop.remove_reader(self.sock.fileno())
        due = max(self._last_notify + self._gap, now)
        self._timer = self.loop.call_at(self.loop.time() + (due - now), self._on_timer)

    def _on_timer(self) -> None:
        """Holding mode, once per gap: hand on what came, then hold on or go back to reading."""
        self._timer = None
        count = self._drain()
        now = time.monotonic()
        if self._held or self._overflowed:
            self._notify(now)
        if count == 0:
            self._gap = _MIN_GAP
            with contextlib.suppress(Exception):
                self.loop.add_reader(self.sock.fileno(), self._on_readable)
            return
        self._gap = min(self._gap * 2, _MAX_GAP) if count > 1 else max(self._gap / 2, _MIN_GAP)
        self._timer = self.loop.call_at(self.loop.time() + self._gap, self._on_timer)

    def _notify(self, now: float) -> None:
        names, self._held = self._held, set()
        overflowed, self._overflowed = self._overflowed, False
        self._last_notify = now
        if overflowed:
            self.registry.notify_all(self.key)
        else:
            self.registry.notify(self.key, names)

    def serves(self, loop: asyncio.AbstractEventLoop) -> bool:
        """Whether datagrams are read for waiters on ``loop``: its home loop, or another running."""
        home = self.loop
        return home is loop or (home.is_running() and not home.is_closed())

    def move_to(self, loop: asyncio.AbstractEventLoop) -> None:
        """Have ``loop`` read the socket instead of the home loop (which stopped, or is closing)."""
        old, self.loop = self.loop, loop
        fd = self.sock.fileno()
        timer, self._timer = self._timer, None
        self._gap = _MIN_GAP

        def leave() -> None:
            if timer is not None:
                timer.cancel()
            old.remove_reader(fd)

        def arrive() -> None:
            loop.add_reader(fd, self._on_readable)
            self._on_readable()  # something may have come while nobody read

        _on_loop(old, leave)
        _on_loop(loop, arrive)

    def shut(self) -> None:
        """Remove the socket (first, so writers stop at once), then stop reading and close it."""
        self.unlink()
        sock, loop, timer = self.sock, self.loop, self._timer

        def stop() -> None:
            if timer is not None:
                timer.cancel()
            with contextlib.suppress(Exception):
                loop.remove_reader(sock.fileno())
            sock.close()

        _on_loop(loop, stop)

    def unlink(self) -> None:
        """Remove the socket's file (only in the process that bound it), and the directory if
        that leaves it empty (a process binding there meanwhile makes the directory again)."""
        if self.pid == os.getpid():
            with contextlib.suppress(OSError):
                os.unlink(self.path)
            with contextlib.suppress(OSError):
                os.rmdir(os.path.dirname(self.path))


def _on_loop(loop: asyncio.AbstractEventLoop, call: Callable[[], object]) -> None:
    """Run ``call`` on ``loop``'s thread; at once when that is this thread or the loop is idle.

    Reader registrations of a closed loop are gone with its selector: ``remove_reader`` is then a
    no-op, and whatever else ``call`` does still has to happen.
    """
    if _running_loop() is loop or not loop.is_running() or loop.is_closed():
        with contextlib.suppress(Exception):
            call()
        return
    try:
        loop.call_soon_threadsafe(call)
    except RuntimeError:  # closed meanwhile
        with contextlib.suppress(Exception):
            call()


class _Process:
    """What one process keeps for file wake-ups; forgotten in a fork child."""

    def __init__(self) -> None:
        self._reset()
        os.register_at_fork(after_in_child=self._after_fork)
        atexit.register(self._at_exit)

    def _reset(self) -> None:
        self.lock = threading.Lock()
        self._sender: socket.socket | None = None
        self.peers: dict[str, _Peers] = {}
        self.listeners: dict[str, _Listener] = {}
        #: Directories this process cannot listen in, and why (said once).
        self.off: dict[str, str] = {}

    def _after_fork(self) -> None:
        # The parent's sockets stay the parent's: close the child's copies (which would keep
        # them alive after the parent is gone) but leave the files alone.
        for listener in self.listeners.values():
            with contextlib.suppress(OSError):
                listener.sock.close()
        if self._sender is not None:
            with contextlib.suppress(OSError):
                self._sender.close()
        self._reset()

    def _at_exit(self) -> None:
        for listener in list(self.listeners.values()):
            listener.unlink()

    def sender(self) -> socket.socket | None:
        """The process's unbound, non-blocking socket that writers send from."""
        sock = self._sender
        if sock is not None or _AF_UNIX is None:
            return sock
        with self.lock:
            if self._sender is None:
                try:
                    made = socket.socket(_AF_UNIX, socket.SOCK_DGRAM)
                except OSError as exc:
                    logger.debug("cannot send wake-ups: %s", exc)
                    return None
                made.setblocking(False)
                self._sender = made
            return self._sender

    def peers_of(self, directory: str, private: bool) -> _Peers:
        peers = self.peers.get(directory)
        if peers is None:
            with self.lock:
                peers = self.peers.setdefault(directory, _Peers(directory, private))
        return peers


_process = _Process()


class FileWakeups:
    """Cross-process wake-ups of one store instance kept in the file ``db_path``.

    ``registry`` and ``key`` are what the store uses for its waiters in this process; ``label``
    names the store in the log line that says wake-ups are off (e.g. "SQLite broker").
    """

    def __init__(self, db_path: str, registry: WakeupRegistry, key: str, label: str) -> None:
        self.db_path = db_path
        self.registry = registry
        self.key = key
        self.label = label
        self.directory, self.private = wake_directory(db_path)

    def changed(self, channels: Iterable[str]) -> None:
        """Wake every waiter on ``channels``, in this process and others; call after the commit.

        Safe from any thread; never blocks.
        """
        names = frozenset(channels)
        if not names:
            return
        self.registry.notify(self.key, names)
        if _AF_UNIX is not None:
            _process.peers_of(self.directory, self.private).send(names)

    def listen(self) -> bool:
        """Make sure this process's socket for the file is bound and read; from a coroutine.

        Call it before checking the store. False when this process cannot listen (the reason is
        logged once): then only polling finds changes made by other processes.
        """
        loop = asyncio.get_running_loop()
        listener = _process.listeners.get(self.directory)
        if listener is not None and listener.loop is loop and self in listener.owners:
            return True  # the common case, without the lock
        with _process.lock:
            listener = _process.listeners.get(self.directory)
            if listener is None:
                if self.directory in _process.off:
                    return False
                reason = None
                for _ in range(3):
                    reason = self._cannot_listen()
                    if reason is not None:
                        break
                    try:
                        listener = _Listener(self.directory, self.registry, self.key, loop)
                        break
                    except FileNotFoundError:
                        # The last process to leave removed the directory after we made sure
                        # of it: make it again.
                        reason = f"{self.directory} keeps disappearing"
                    except NotImplementedError:
                        reason = "the event loop cannot watch sockets (no add_reader)"
                        break
                    except OSError as exc:
                        reason = f"cannot listen in {self.directory}: {_describe(exc)}"
                        break
                if listener is None:
                    _process.off[self.directory] = reason or "unknown"
                    logger.info(
                        "%s %s: changes made by other processes are found by polling only "
                        "(cross-process wake-ups are off: %s)",
                        self.label,
                        self.db_path,
                        reason,
                    )
                    return False
                _process.listeners[self.directory] = listener
            elif not listener.serves(loop):
                listener.move_to(loop)
            listener.owners[self] = loop
            return True

    def close(self) -> None:
        """Stop using the socket; the last instance to stop removes it."""
        with _process.lock:
            listener = _process.listeners.get(self.directory)
            if listener is None or listener.owners.pop(self, None) is None:
                return
            if not listener.owners:
                del _process.listeners[self.directory]
                listener.shut()
                return
            running = _running_loop()
            if running is not None and listener.loop is running:
                # This loop reads the socket and may end soon: hand it to a loop still running.
                for loop in listener.owners.values():
                    if loop is not running and loop.is_running():
                        listener.move_to(loop)
                        break

    def _cannot_listen(self) -> str | None:
        """Why this process cannot listen here, or None (then the directory exists)."""
        if _AF_UNIX is None:
            return "this platform has no Unix sockets"
        if len(os.fsencode(self.directory)) + _NAME_ROOM > MAX_SOCKET_PATH:
            return f"the socket paths in {self.directory} would be too long"
        try:
            os.mkdir(self.directory, 0o700 if self.private else 0o777)
        except FileExistsError:
            pass
        except OSError as exc:
            return f"cannot create {self.directory}: {_describe(exc)}"
        try:
            found = os.lstat(self.directory)
        except OSError as exc:
            return f"cannot use {self.directory}: {_describe(exc)}"
        if not S_ISDIR(found.st_mode):
            return f"{self.directory} is not a directory"
        if self.private and (found.st_uid != os.geteuid() or found.st_mode & 0o022):
            return f"{self.directory} belongs to another user or is writable by others"
        return None


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__
