"""A lean asyncio-compatible transport over a non-blocking socket, plain TCP or TLS.

Why: asyncio's selector transport and, above all, its SSL layer (``sslproto``: a MemoryBIO
pair shuffled by several Python methods per read and per write) cost a measurable share of
proxyd's CPU per request. Here the sockets of a loop sit in one epoll set of their own
(:class:`_Reactor`, itself one asyncio reader) whose events call the transports directly,
and TLS goes through ``ssl.SSLSocket`` on the socket itself, so OpenSSL reads and writes
the kernel socket with no Python copy in between.

Only the subset of :class:`asyncio.Transport` that proxyd uses is implemented, with
asyncio's semantics: ``write``/``writelines``, ``close`` (flush, then close), ``abort``,
``is_closing``, ``pause_reading``/``resume_reading``, ``write_eof``/``can_write_eof``,
``get_extra_info`` (``socket``, ``peername``, ``sockname``, ``ssl_object``), the write
buffer size and limits; and the protocol callbacks ``connection_made``, ``data_received``,
``eof_received`` (a truthy answer keeps the connection open for writing),
``pause_writing``/``resume_writing`` at asyncio's water marks and ``connection_lost``
(exactly once, never from inside ``close``/``abort``: at the end of the batch of events
being dispatched, or from a fresh loop callback).

Differences from asyncio that are deliberate:

* ``connection_made`` runs synchronously inside :meth:`SocketTransport.start`.
* Closing a TLS transport sends close_notify if the socket takes it at once and never waits
  for the peer's (asyncio waits up to 30 s); the socket is closed as soon as the write
  buffer is flushed, before ``connection_lost`` runs.
* ``eof_received`` returning true keeps a TLS transport open too (asyncio ignores it).
* ``write`` after ``write_eof`` is dropped like one after ``close`` (asyncio raises).
* TLS EOF tells a clean close_notify from a bare TCP close: :attr:`tls_clean_eof`.
"""

from __future__ import annotations

import asyncio
import logging
import math
import select
import selectors
import socket
import ssl
import struct
import weakref
from typing import Any

log = logging.getLogger("proxyd")

# Bytes asked of one recv. Not asyncio's 256 KiB: CPython allocates the whole size and then
# shrinks it, and above glibc's mmap threshold (128 KiB until a large block happens to be
# freed) that is an mmap, an mremap and a munmap per read: 14 µs more per read was measured.
_READ_SIZE = 65536
_TLS_RECORD = 16384  # largest TLS plaintext record (RFC 8446 §5.1); SSL_read returns at most one
_READ_BUDGET = 262144    # decrypted bytes gathered per TLS read pass before yielding
_TLS_PIECE = 262144      # most bytes handed to one SSL_write, so a retried piece stays bounded
_LINGER_TIME = 2.0       # longest a lingering close reads and drops the peer's bytes
_HIGH_WATER = 65536      # asyncio's default write-buffer limits
_LOW_WATER = _HIGH_WATER // 4
_LINGER_ZERO = struct.pack("ii", 1, 0)  # struct linger {on, 0 s}: close() sends a RST
_PEEK_FLAGS = socket.MSG_PEEK | socket.MSG_DONTWAIT
_IN = select.EPOLLIN
_OUT = select.EPOLLOUT
_READ_EVENTS = select.EPOLLIN | select.EPOLLERR | select.EPOLLHUP   # as selectors maps them
_WRITE_EVENTS = select.EPOLLOUT | select.EPOLLERR | select.EPOLLHUP


class _Reactor:
    """The SocketTransports of a loop, served straight from epoll events.

    Why: asyncio's selector loop dispatches each readiness event through a SelectorKey, a
    Handle and ``Context.run``, and ``add_reader``/``remove_reader`` build and drop a Handle
    and a key each time — a few µs of Python per event and per new connection. Here a
    transport's socket is registered with its epoll mask and its events call it directly.
    Level-triggered like asyncio: a socket left unread is reported again.

    A worker's loop runs on a :class:`ReactorSelector`, whose ``select()`` serves the
    transports from asyncio's own epoll wait. On any other loop (tests, tools) the reactor
    keeps an epoll set of its own, watched as one asyncio reader: one more ``epoll_wait``
    per wake-up.
    """

    __slots__ = ("_ep", "_fds", "_dispatching", "_after", "__weakref__")

    def __init__(self, loop: asyncio.AbstractEventLoop | None,
                 ep: select.epoll | None = None) -> None:
        self._fds: dict[int, SocketTransport] = {}
        self._dispatching = False
        self._after: list[tuple[Any, BaseException | None]] = []  # run when the batch ends
        if ep is None:
            assert loop is not None
            ep = select.epoll()
            loop.add_reader(ep.fileno(), self._dispatch)
        self._ep = ep

    def watch(self, fd: int, transport: SocketTransport, old: int, new: int) -> None:
        """Change what ``fd`` is watched for from mask ``old`` to ``new`` (0: nothing)."""
        ep = self._ep
        if not old:
            self._fds[fd] = transport
            ep.register(fd, new)
        elif new:
            ep.modify(fd, new)
        else:
            del self._fds[fd]
            try:
                ep.unregister(fd)
            except OSError:
                pass  # already closed: the kernel dropped it

    def connection_lost_soon(self, transport: SocketTransport,
                             exc: BaseException | None) -> bool:
        """Queue ``connection_lost`` for the end of the batch being dispatched; False when
        no batch is (the caller schedules it on the loop)."""
        if not self._dispatching:
            return False
        self._after.append((transport, exc))
        return True

    def _dispatch(self) -> None:
        self.serve(self._ep.poll(0))

    def serve(self, ready: list[tuple[int, int]]) -> None:
        """Call the transports of a batch of ``(fd, events)``."""
        fds = self._fds
        self._dispatching = True
        try:
            for fd, events in ready:
                transport = fds.get(fd)
                if transport is None:
                    continue  # unregistered by an earlier callback of this batch
                try:
                    transport._on_events(events)
                except Exception:  # noqa: BLE001 - one transport's bug must not stop the others
                    log.exception("event handling failed on %r", transport)
                    transport.abort()
            # connection_lost of the transports closed in this batch: after every event of
            # it, as asyncio's call_soon would run them, without a loop pass of their own
            # (a request on a new client connection ends with one).
            after = self._after
            while after:
                transport, exc = after.pop(0)
                transport._call_connection_lost(exc)
        finally:
            self._dispatching = False
            if self._after:  # only after an exception above: not lost, just later
                loop = asyncio.get_running_loop()
                for transport, exc in self._after:
                    loop.call_soon(transport._call_connection_lost, exc)
                self._after.clear()


class ReactorSelector(selectors.EpollSelector):
    """asyncio's epoll selector, whose epoll set also holds the SocketTransports' sockets.

    ``select()`` waits once for both; the transports' events are served right there and
    only asyncio's own (timers' wake-ups, the listener, handshakes, signals) are returned
    to the loop. Use :func:`new_event_loop`.
    """

    def __init__(self) -> None:
        super().__init__()
        self.reactor = _Reactor(None, self._selector)

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        # EpollSelector.select (CPython 3.11-3.13), with the transports' events split off.
        if timeout is None:
            timeout = -1
        elif timeout <= 0:
            timeout = 0
        else:
            timeout = math.ceil(timeout * 1e3) * 1e-3  # epoll waits in whole milliseconds
        reactor = self.reactor
        mine = reactor._fds
        max_ev = max(len(self._fd_to_key) + len(mine), 1)
        ready: list[tuple[selectors.SelectorKey, int]] = []
        try:
            fd_event_list = self._selector.poll(timeout, max_ev)
        except InterruptedError:
            return ready
        served: list[tuple[int, int]] = []
        keys = self._fd_to_key
        for fd, event in fd_event_list:
            if fd in mine:
                served.append((fd, event))
                continue
            key = keys.get(fd)
            if key:
                events = 0
                if event & ~select.EPOLLIN:
                    events |= selectors.EVENT_WRITE
                if event & ~select.EPOLLOUT:
                    events |= selectors.EVENT_READ
                ready.append((key, events & key.events))
        if served:
            reactor.serve(served)
        return ready


def new_event_loop() -> asyncio.AbstractEventLoop:
    """An asyncio loop whose SocketTransports are served from its own epoll wait; a plain
    selector loop (the transports then keep an epoll set of their own) where the selector
    internals ReactorSelector relies on are not there."""
    try:
        selector = ReactorSelector()
    except AttributeError:
        return asyncio.SelectorEventLoop()
    if not (isinstance(getattr(selector, "_selector", None), select.epoll)
            and isinstance(getattr(selector, "_fd_to_key", None), dict)):
        selector.close()
        return asyncio.SelectorEventLoop()
    return asyncio.SelectorEventLoop(selector)


_reactors: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Reactor] = (
    weakref.WeakKeyDictionary())


def _reactor(loop: asyncio.AbstractEventLoop) -> _Reactor:
    selector = getattr(loop, "_selector", None)
    if isinstance(selector, ReactorSelector):
        return selector.reactor
    reactor = _reactors.get(loop)
    if reactor is None:
        reactor = _reactors[loop] = _Reactor(loop)
    return reactor


class SocketTransport(asyncio.Transport):
    """An asyncio transport over a connected non-blocking ``socket.socket`` or
    ``ssl.SSLSocket`` (already handshaked, made with ``do_handshake_on_connect=False``
    and ``suppress_ragged_eofs=False``).

    Usage: ``SocketTransport(loop, sock, protocol).start()``.
    """

    __slots__ = (
        "_loop", "_sock", "_fd", "_protocol", "_tls", "_buf", "_piece", "_high", "_low",
        "_closing", "_closed", "_paused", "_eof", "_eof_pending", "_eof_written",
        "_protocol_paused", "_reader_on", "_writer_on", "_read_wants_write",
        "_write_wants_read", "_peername", "_sockname", "tls_clean_eof", "_linger",
        "_linger_timer", "_reactor", "_mask", "_lingering", "_sslobj")

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket,
                 protocol: asyncio.BaseProtocol, peername: Any = None) -> None:
        self._extra = None  # asyncio.BaseTransport's slot; extras come from get_extra_info
        self._loop = loop
        self._sock = sock
        self._fd = sock.fileno()
        self._protocol: Any = protocol
        self._tls = isinstance(sock, ssl.SSLSocket)
        # The C object under an SSLSocket: its read()/write()/pending() skip the two Python
        # frames SSLSocket.recv()/send() wrap them in (with suppress_ragged_eofs off they
        # behave the same). None for plain sockets.
        self._sslobj: Any = getattr(sock, "_sslobj", None) if self._tls else None
        self._buf = bytearray()           # bytes not yet handed to send()
        self._piece: bytes | None = None  # TLS: the piece SSL_write must be retried with
        self._high = _HIGH_WATER
        self._low = _LOW_WATER
        self._closing = False        # close() or abort() was called, or a fatal error hit
        self._closed = False         # the socket is closed and connection_lost scheduled
        self._paused = False         # pause_reading()
        self._eof = False            # the peer's EOF was read
        self._eof_pending = False    # ... but not yet delivered (reading was paused)
        self._eof_written = False    # write_eof()
        self._protocol_paused = False
        self._reader_on = False
        self._writer_on = False
        self._read_wants_write = False  # TLS: SSL_read needs the socket writable
        self._write_wants_read = False  # TLS: SSL_write needs the socket readable
        self._peername: Any = peername  # accept() already returned it: no getpeername()
        self._sockname: Any = None
        self._linger = False
        self._linger_timer: asyncio.TimerHandle | None = None
        self._reactor = _reactor(loop)
        self._mask = 0               # what the reactor watches the socket for
        self._lingering = False      # reading only to drop the bytes (close_lingering)
        # TLS only: None until EOF, then True for a close_notify, False for a bare TCP close
        # (RFC 9112 §9.8: a close-delimited body is then possibly truncated).
        self.tls_clean_eof: bool | None = None

    def __repr__(self) -> str:
        state = "closed" if self._closed else "closing" if self._closing else "open"
        return (f"<SocketTransport fd={self._fd} {'tls' if self._tls else 'tcp'} {state} "
                f"buffered={self.get_write_buffer_size()}>")

    def start(self, read_now: bool = False) -> SocketTransport:
        """Call ``connection_made`` and start reading; returns the transport.

        ``read_now`` tries one read at once (plain sockets): a client that just connected
        has usually sent its request already, which then needs no extra loop wake-up.
        """
        try:
            self._protocol.connection_made(self)
        except Exception as exc:  # noqa: BLE001 - a protocol bug must not kill the loop
            self._callback_failed("connection_made", exc)
            return self
        if not self._closing:
            self._sync()
            if read_now and not self._tls and self._reader_on:
                self._read_plain()
                return self
            if self._tls and self._sock.pending():
                # Defensive: data already decrypted inside OpenSSL would wake no epoll.
                self._loop.call_soon(self._read_again)
        return self

    # -- readiness bookkeeping ----------------------------------------------------------------
    def _sync(self) -> None:
        """Register exactly the reader/writer callbacks the current state needs.

        Registration is tracked so that the hot path (a send that completes, a read) never
        touches the epoll set: a change costs an epoll_ctl.
        """
        if self._closed:
            return
        reading = not (self._paused or self._closing or self._eof)
        want_r = (reading and not self._read_wants_write) or self._write_wants_read
        want_w = (((self._piece is not None or len(self._buf) > 0) and not self._write_wants_read)
                  or (reading and self._read_wants_write))
        if want_r is not self._reader_on or want_w is not self._writer_on:
            self._reader_on = want_r
            self._writer_on = want_w
            self._watch((_IN if want_r else 0) | (_OUT if want_w else 0))

    def _watch(self, mask: int) -> None:
        if mask != self._mask:
            self._reactor.watch(self._fd, self, self._mask, mask)
            self._mask = mask

    def _on_events(self, events: int) -> None:
        """The reactor's call: the socket is ready for what ``events`` says."""
        if events & _READ_EVENTS and self._reader_on:
            if self._lingering:
                self._linger_read()
            elif not self._tls:
                self._read_plain()
            elif self._write_wants_read:
                self._tls_readable()
            elif not (self._paused or self._closing or self._eof or self._read_wants_write):
                self._read_tls()  # the usual TLS read, one frame less on the response path
        if events & _WRITE_EVENTS and self._writer_on:
            if self._tls:
                self._tls_writable()
            else:
                self._write_plain()

    # -- reading ------------------------------------------------------------------------------
    def _read_plain(self) -> None:
        if self._closing:
            return
        try:
            data = self._sock.recv(_READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except Exception as exc:  # noqa: BLE001 - OSError: reset etc.; anything else is a bug
            self._fatal(exc)
            return
        if data:
            try:
                self._protocol.data_received(data)
            except Exception as exc:  # noqa: BLE001
                self._callback_failed("data_received", exc)
        else:
            self._on_eof(None)

    def _tls_readable(self) -> None:
        if self._write_wants_read:
            # A pending SSL_write was waiting for the peer's bytes (e.g. a key update).
            self._write_wants_read = False
            self._flush_tls()
            if self._closed:
                return
            self._sync()
        if not (self._paused or self._closing or self._eof or self._read_wants_write):
            self._read_tls()

    def _read_again(self) -> None:
        """A scheduled TLS read pass (decrypted bytes were left inside OpenSSL)."""
        if not (self._paused or self._closing or self._eof or self._read_wants_write):
            self._read_tls()

    def _read_tls(self) -> None:
        # OpenSSL returns at most one record per SSL_read, and a record it has taken off the
        # socket is invisible to epoll: keep reading until it wants more bytes from the
        # kernel, then deliver everything as one data_received.
        sslobj = self._sslobj
        if sslobj is not None:
            read, pending = sslobj.read, sslobj.pending
        else:
            read, pending = self._sock.recv, self._sock.pending
        chunks: list[bytes] = []
        total = 0
        eof: bool | None = None
        error: Exception | None = None
        try:
            while True:
                data = read(_TLS_RECORD)
                if not data:
                    eof = True  # close_notify (a ragged close raises SSLEOFError)
                    break
                chunks.append(data)
                n = len(data)
                total += n
                if n < _TLS_RECORD and not pending():
                    # A short record ends what the peer wrote in one go (a small response
                    # is one record): skip the read that would only say "want more", a
                    # syscall and an exception. A record already in the kernel buffer
                    # still wakes epoll, which is level-triggered.
                    break
                if total >= _READ_BUDGET:
                    # Yield to other connections; the rest of the stream is either in the
                    # kernel (epoll fires again) or inside OpenSSL (read again soon).
                    if pending():
                        self._loop.call_soon(self._read_again)
                    break
        except ssl.SSLWantReadError:
            pass  # drained; also what a TLS 1.3 session ticket alone looks like
        except ssl.SSLWantWriteError:
            self._read_wants_write = True
            self._sync()
        except ssl.SSLEOFError:
            eof = False
        except (BlockingIOError, InterruptedError):
            pass
        except Exception as exc:  # noqa: BLE001
            error = exc
        if chunks:
            try:
                self._protocol.data_received(chunks[0] if len(chunks) == 1 else b"".join(chunks))
            except Exception as exc:  # noqa: BLE001
                self._callback_failed("data_received", exc)
                return
            if self._closing:
                return
        if error is not None:
            self._fatal(error)
        elif eof is not None:
            self._on_eof(eof)

    def _on_eof(self, clean: bool | None) -> None:
        if self._tls:
            self.tls_clean_eof = clean
        self._eof = True
        if self._paused:
            # Only TLS can get here (EOF read in the same pass as data that paused us):
            # hold the EOF back until reading resumes, as asyncio would.
            self._eof_pending = True
            self._sync()
            return
        self._deliver_eof()

    def _deliver_eof(self) -> None:
        self._eof_pending = False
        self._sync()  # no more reading
        try:
            keep_open = self._protocol.eof_received()
        except Exception as exc:  # noqa: BLE001
            self._callback_failed("eof_received", exc)
            return
        if not keep_open:
            self.close()

    def _eof_soon(self) -> None:
        if self._eof_pending and not (self._paused or self._closing):
            self._deliver_eof()

    def pause_reading(self) -> None:
        """Stop calling ``data_received`` until :meth:`resume_reading`."""
        if self._closing or self._paused:
            return
        self._paused = True
        self._sync()

    def resume_reading(self) -> None:
        """Read again after :meth:`pause_reading`."""
        if self._closing or not self._paused:
            return
        self._paused = False
        if self._eof_pending:
            self._loop.call_soon(self._eof_soon)
        elif self._tls and not self._eof and self._sock.pending():
            self._loop.call_soon(self._read_again)
        self._sync()

    # -- writing ------------------------------------------------------------------------------
    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Send ``data`` now as far as the socket takes it; buffer the rest."""
        if self._closing or self._eof_written or not data:
            return
        if self._piece is not None or self._buf:
            self._buf.extend(data)
            self._maybe_pause()
            return
        if self._tls:
            if len(data) <= _TLS_PIECE:
                sslobj = self._sslobj
                try:
                    sslobj.write(data) if sslobj is not None else self._sock.send(data)
                    return  # partial writes are off: all of it became TLS records
                except ssl.SSLWantWriteError:
                    pass
                except ssl.SSLWantReadError:
                    self._write_wants_read = True
                except Exception as exc:  # noqa: BLE001
                    self._fatal(exc)
                    return
                # SSL_write must be retried with this very piece (same bytes, same length).
                self._piece = data if type(data) is bytes else bytes(data)
            else:
                self._buf.extend(data)
                self._flush_tls()
                self._maybe_pause()
                return
        else:
            try:
                n = self._sock.send(data)
            except (BlockingIOError, InterruptedError):
                n = 0
            except Exception as exc:  # noqa: BLE001
                self._fatal(exc)
                return
            if n == len(data):
                return
            self._buf.extend(memoryview(data)[n:])
        self._sync()
        self._maybe_pause()

    def writelines(self, list_of_data: Any) -> None:
        """Join, then one :meth:`write` (over TLS: one SSL_write, so one record)."""
        self.write(b"".join(list_of_data))

    def _write_plain(self) -> None:
        if self._closed:
            return
        buf = self._buf
        try:
            n = self._sock.send(buf)
        except (BlockingIOError, InterruptedError):
            return
        except Exception as exc:  # noqa: BLE001
            self._fatal(exc)
            return
        if n:
            del buf[:n]
        if buf:
            self._maybe_resume()
        else:
            self._write_done()

    def _tls_writable(self) -> None:
        if self._read_wants_write:
            self._read_wants_write = False
            if not (self._paused or self._closing or self._eof):
                self._read_tls()
            if self._closed:
                return
            self._sync()
        if (self._piece is not None or self._buf) and not self._write_wants_read:
            self._flush_tls()

    def _flush_tls(self) -> None:
        sock = self._sock
        buf = self._buf
        while True:
            piece = self._piece
            if piece is None:
                if not buf:
                    break
                if len(buf) <= _TLS_PIECE:
                    piece = bytes(buf)
                    buf.clear()
                else:
                    piece = bytes(buf[:_TLS_PIECE])
                    del buf[:_TLS_PIECE]
                self._piece = piece
            try:
                sock.send(piece)
            except ssl.SSLWantWriteError:
                self._sync()
                self._maybe_resume()
                return
            except ssl.SSLWantReadError:
                self._write_wants_read = True
                self._sync()
                self._maybe_resume()
                return
            except Exception as exc:  # noqa: BLE001
                self._fatal(exc)
                return
            self._piece = None
        self._write_done()

    def _write_done(self) -> None:
        """The write buffer just emptied."""
        self._sync()
        self._maybe_resume()
        if self._closing:
            self._finish_close()
        elif self._eof_written:
            self._shutdown_write()

    def _maybe_pause(self) -> None:
        if not self._protocol_paused and self.get_write_buffer_size() > self._high:
            self._protocol_paused = True
            try:
                self._protocol.pause_writing()
            except Exception:  # noqa: BLE001
                log.exception("protocol.pause_writing() failed")

    def _maybe_resume(self) -> None:
        if self._protocol_paused and self.get_write_buffer_size() <= self._low:
            self._protocol_paused = False
            try:
                self._protocol.resume_writing()
            except Exception:  # noqa: BLE001
                log.exception("protocol.resume_writing() failed")

    def get_write_buffer_size(self) -> int:
        """Bytes accepted by :meth:`write` and not yet taken by the socket."""
        piece = self._piece
        return len(self._buf) + (len(piece) if piece is not None else 0)

    def get_write_buffer_limits(self) -> tuple[int, int]:
        """``(low, high)`` water marks."""
        return self._low, self._high

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        """Set the water marks for ``pause_writing``/``resume_writing`` (asyncio's rules)."""
        if high is None:
            high = _HIGH_WATER if low is None else 4 * low
        if low is None:
            low = high // 4
        if not high >= low >= 0:
            raise ValueError(f"high ({high!r}) must be >= low ({low!r}) must be >= 0")
        self._high, self._low = high, low
        self._maybe_pause()

    def can_write_eof(self) -> bool:
        """Plain TCP can half-close; TLS cannot (close_notify closes both directions)."""
        return not self._tls

    def write_eof(self) -> None:
        """Half-close: shut the sending side down once the buffer is flushed."""
        if self._tls:
            raise NotImplementedError("TLS transports do not support half-close")
        if self._closing or self._eof_written:
            return
        self._eof_written = True
        if not self._buf:
            self._shutdown_write()

    def _shutdown_write(self) -> None:
        try:
            self._sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the connection is already gone; reading will tell the protocol

    # -- closing ------------------------------------------------------------------------------
    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        """Stop reading, flush what is buffered, then close; ``connection_lost(None)``."""
        if self._closing:
            return
        self._closing = True
        if self._piece is not None or self._buf:
            self._sync()  # reader off; the writer finishes the job
        else:
            self._finish_close()

    def close_lingering(self) -> None:
        """:meth:`close` for a peer that may still be sending (a request body left unread).

        Closing a socket with unread bytes makes the kernel answer with a reset, and a reset
        can destroy the response the peer has not read yet. So, as nginx's lingering_close
        does, after the flush only our side is shut down (FIN), and the peer's bytes are read
        and dropped until it closes or ``_LINGER_TIME`` passes; ``connection_lost`` comes
        when the socket is finally closed. TLS and a peer that already closed: plain close.
        """
        if not (self._tls or self._eof):
            self._linger = True
        self.close()

    def abort(self) -> None:
        """Close now; buffered data is dropped and no close_notify is sent."""
        if not self._closed:
            self._teardown(None)

    def input_waiting(self) -> bool:
        """True when the peer sent something not read yet, bytes or its EOF (one
        non-blocking MSG_PEEK on the socket itself, under any TLS). On an idle HTTP/1.1
        connection that is the peer closing it, even before epoll has said so."""
        if self._eof or self._closing or self._closed:
            return True
        if self._tls and self._sock.pending():
            return True
        try:
            socket.socket.recv(self._sock, 1, _PEEK_FLAGS)  # the kernel's, not OpenSSL's
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            return True  # reset by the peer: as good as closed
        return True  # a byte, or b"" for an EOF

    def reset(self) -> None:
        """Abort with a TCP RST (SO_LINGER 0) instead of a FIN: for a peer that must see an
        error, not an end of stream (a close-delimited body cut short, RFC 9112 §6.3)."""
        if self._closed:
            return
        try:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ZERO)
        except OSError:
            pass  # already reset by the peer: closing is all that is left
        self.abort()

    def _finish_close(self) -> None:
        if self._linger and not self._closed:
            self._start_linger()
            return
        if self._tls:
            # One non-blocking SSL_shutdown sends close_notify if the socket takes it; the
            # peer's reply (SSLWantReadError) is not waited for.
            sslobj = getattr(self._sock, "_sslobj", None)
            if sslobj is not None:
                try:
                    sslobj.shutdown()
                except (ssl.SSLError, OSError, ValueError):
                    pass
        self._teardown(None)

    def _start_linger(self) -> None:
        self._linger = False
        try:
            self._sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._teardown(None)
            return
        self._writer_on = False
        self._reader_on = True
        self._lingering = True  # the reader now drops what it reads
        self._watch(_IN)
        self._linger_timer = self._loop.call_later(_LINGER_TIME, self._teardown, None)

    def _linger_read(self) -> None:
        try:
            data = self._sock.recv(_READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data and not self._closed:
            self._teardown(None)  # the peer closed (or reset): done lingering

    def _fatal(self, exc: BaseException) -> None:
        if not isinstance(exc, OSError):  # resets, broken pipes and TLS alerts are routine
            log.error("fatal error on %r", self, exc_info=exc)
        if not self._closed:
            self._teardown(exc)

    def _callback_failed(self, name: str, exc: BaseException) -> None:
        log.error("protocol.%s() failed; aborting the connection", name, exc_info=exc)
        if not self._closed:
            self._teardown(exc)

    def _teardown(self, exc: BaseException | None) -> None:
        """Unregister, close the socket, schedule ``connection_lost`` (once)."""
        self._closing = True
        self._closed = True
        if self._linger_timer is not None:
            self._linger_timer.cancel()
            self._linger_timer = None
        self._reader_on = False
        self._writer_on = False
        self._watch(0)  # before close: the descriptor number may be reused at once
        self._buf.clear()
        self._piece = None
        try:
            self._sock.close()
        except OSError:
            pass
        if not self._reactor.connection_lost_soon(self, exc):
            self._loop.call_soon(self._call_connection_lost, exc)

    def _call_connection_lost(self, exc: BaseException | None) -> None:
        protocol, self._protocol = self._protocol, None  # break the protocol <-> transport cycle
        try:
            protocol.connection_lost(exc)
        except Exception:  # noqa: BLE001
            log.exception("protocol.connection_lost() failed")

    # -- information --------------------------------------------------------------------------
    def get_extra_info(self, name: str, default: Any = None) -> Any:
        """``socket``, ``peername``, ``sockname`` or ``ssl_object`` (the SSLSocket)."""
        if name == "socket":
            return self._sock
        if name == "peername":
            if self._peername is None:
                try:
                    self._peername = self._sock.getpeername()
                except OSError:
                    return default
            return self._peername
        if name == "sockname":
            if self._sockname is None:
                try:
                    self._sockname = self._sock.getsockname()
                except OSError:
                    return default
            return self._sockname
        if name == "ssl_object":
            return self._sock if self._tls else default
        return default
