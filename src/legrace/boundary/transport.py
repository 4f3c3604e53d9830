"""Moving boundary messages between processes: frames, authentication, and the trusted side's
transports to a worker (`legrace worker`) over TCP or to a private local one over a unix socket.

Only `legrace.boundary.messages.encode/decode` make and read the bytes of a message; this module moves them.
A frame is a u64 little-endian length and the body. Before any frame, the two sides prove to each
other that they know the shared secret (HMAC-SHA256 challenge-response, fresh nonces both ways),
so a stranger can neither use a worker nor pose as one. Frames are not encrypted: everything that
crosses is what the accelerator's operator, the adversary, is assumed to see anyway; tampering on
the way is what `verify=True` catches.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
import weakref
from typing import Optional
from urllib.parse import urlsplit

import torch

from legrace.boundary.messages import TO_TRUSTED, BoundaryError, Message, decode, encode

SECRET_ENV = "LEGRACE_SECRET"
MAX_FRAME_BYTES = 1 << 32
HANDSHAKE_TIMEOUT = 10.0
_LENGTH = struct.Struct("<Q")
_WORKER_HELLO = b"legrace-worker/1\n"
_CLIENT_HELLO = b"legrace-client/1\n"
_NONCE = 32
_ACCEPTED, _REFUSED = b"ACCEPTED", b"REFUSED!"
_SMALL = 1 << 16  # chunks below this are joined into one send
_BUFFER = 4 << 20


# ---- frames -----------------------------------------------------------------------------------


def recv_exact(sock: socket.socket, n: int, deadline: Optional[float] = None) -> bytes:
    """Exactly n bytes; EOFError if the peer closes first."""
    buf = bytearray(n)
    _recv_into(sock, memoryview(buf), deadline)
    return bytes(buf)


def _deadline(sock: socket.socket) -> Optional[float]:
    """When the socket's timeout, counted from now, runs out (None: no timeout)."""
    timeout = sock.gettimeout()
    return None if timeout is None else time.monotonic() + timeout


def _recv_into(sock: socket.socket, view: memoryview, deadline: Optional[float] = None) -> None:
    """Fill view. The socket's timeout bounds the whole read, not each recv: a peer trickling a
    byte at a time is cut off too."""
    deadline = _deadline(sock) if deadline is None else deadline
    timeout, got = sock.gettimeout(), 0
    try:
        while got < len(view):
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("timed out")
                sock.settimeout(left)
            n = sock.recv_into(view[got:])
            if n == 0:
                raise EOFError("the peer closed the connection")
            got += n
    finally:
        if deadline is not None:
            sock.settimeout(timeout)


def write_frame(sock: socket.socket, chunks: list) -> None:
    """Send one frame made of `encode`'s chunks: small ones joined, large tensors as they are."""
    size = sum(memoryview(c).nbytes for c in chunks)
    pending = [_LENGTH.pack(size)]
    for chunk in chunks:
        if memoryview(chunk).nbytes < _SMALL:
            pending.append(bytes(chunk))
            continue
        sock.sendall(b"".join(pending))
        sock.sendall(chunk)
        pending = []
    if pending:
        sock.sendall(b"".join(pending))


def tune(sock: socket.socket) -> None:
    """Large socket buffers (fewer wake-ups per big tensor) and, for TCP, no Nagle delay."""
    for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        sock.setsockopt(socket.SOL_SOCKET, option, _BUFFER)
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def read_frame(sock: socket.socket, limit: int = MAX_FRAME_BYTES) -> torch.Tensor:
    """One frame body, read into a fresh (aligned) uint8 tensor; EOFError at a clean close.
    A frame announced longer than `limit` bytes is refused before anything is allocated."""
    deadline = _deadline(sock)  # one for the whole frame
    (size,) = _LENGTH.unpack(recv_exact(sock, _LENGTH.size, deadline))
    if size > limit:
        raise BoundaryError(f"a frame of {size} bytes announced, more than the {limit} it may take")
    body = torch.empty(size, dtype=torch.uint8)
    if size:
        try:
            _recv_into(sock, memoryview(body.numpy()), deadline)
        except EOFError:
            raise EOFError("the peer closed the connection in the middle of a message") from None
    return body


# ---- authentication ---------------------------------------------------------------------------


def _proof(secret: str, role: bytes, worker_nonce: bytes, client_nonce: bytes) -> bytes:
    return hmac.new(secret.encode(), role + worker_nonce + client_nonce, hashlib.sha256).digest()


def admit_client(sock: socket.socket, secret: str) -> Optional[str]:
    """Worker side of the handshake: None if the client proved the secret, else why not."""
    worker_nonce = secrets.token_bytes(_NONCE)
    sock.sendall(_WORKER_HELLO + worker_nonce)
    hello = recv_exact(sock, len(_CLIENT_HELLO) + 2 * _NONCE)
    if not hello.startswith(_CLIENT_HELLO):
        return "not a legrace client (or another protocol version)"
    client_nonce, proof = hello[len(_CLIENT_HELLO):][:_NONCE], hello[-_NONCE:]
    if not hmac.compare_digest(proof, _proof(secret, b"client", worker_nonce, client_nonce)):
        sock.sendall(_REFUSED)
        return "wrong secret"
    sock.sendall(_ACCEPTED + _proof(secret, b"worker", worker_nonce, client_nonce))
    return None


def authenticate(sock: socket.socket, secret: str, where: str) -> None:
    """Trusted side of the handshake; BoundaryError if either side does not know the secret."""
    hello = recv_exact(sock, len(_WORKER_HELLO) + _NONCE)
    if not hello.startswith(_WORKER_HELLO):
        raise BoundaryError(f"{where} is not a legrace worker (or runs another protocol version)")
    worker_nonce, client_nonce = hello[-_NONCE:], secrets.token_bytes(_NONCE)
    sock.sendall(_CLIENT_HELLO + client_nonce + _proof(secret, b"client", worker_nonce, client_nonce))
    answer = recv_exact(sock, len(_REFUSED))
    if answer == _REFUSED:
        raise BoundaryError(f"the worker at {where} refused this client: wrong secret "
                            f"(give both sides the same --secret or ${SECRET_ENV})")
    proof = recv_exact(sock, _NONCE) if answer == _ACCEPTED else b""
    if not hmac.compare_digest(proof, _proof(secret, b"worker", worker_nonce, client_nonce)):
        raise BoundaryError(f"the worker at {where} did not prove it knows the secret: it is not your worker")


# ---- the trusted side's transports ------------------------------------------------------------


class SocketTransport:
    """Requests over an authenticated stream socket. Every failure (the worker died, hung, or
    answered garbage) is a BoundaryError that says so; the connection is then closed for good."""

    def __init__(self, sock: socket.socket, where: str, timeout: float, worker: Optional["LocalWorker"] = None) -> None:
        self._sock: Optional[socket.socket] = sock
        self.where, self.timeout, self.worker = where, timeout, worker
        sock.settimeout(timeout)
        self._finalizer = weakref.finalize(self, _close_quietly, sock, worker)

    def request(self, message: Message, reply_bytes: Optional[int] = None) -> Message:
        return self.start(message, reply_bytes).wait()

    def start(self, message: Message, reply_bytes: Optional[int] = None) -> "_SocketReply":
        """Send a request now; its reply is read when the handle's `wait()` is called. The worker
        answers requests in order, and the boundary keeps one in flight at a time."""
        kind = type(message).__name__
        if self._sock is None:
            raise BoundaryError(f"the connection to the accelerator at {self.where} is closed")
        try:
            write_frame(self._sock, encode(message))
        except BaseException as err:  # KeyboardInterrupt too: a half-sent frame leaves the stream out of step
            self._fail(kind, err)
        return _SocketReply(self, kind, MAX_FRAME_BYTES if reply_bytes is None else reply_bytes)

    def _read_reply(self, kind: str, limit: int) -> Message:
        if self._sock is None:
            raise BoundaryError(f"the connection to the accelerator at {self.where} is closed")
        try:
            return decode(read_frame(self._sock, limit), TO_TRUSTED)
        except BaseException as err:  # KeyboardInterrupt too: an unread reply would answer the next request
            self._fail(kind, err)

    def _fail(self, kind: str, err: BaseException):
        """Close the connection for good (the stream may be out of step), then say why."""
        if not isinstance(err, Exception):  # KeyboardInterrupt, SystemExit: closed, then re-raised as is
            self.close()
            raise err
        if isinstance(err, TimeoutError):
            problem = f"did not answer {kind} within {self.timeout:g} s"
        elif isinstance(err, EOFError):
            problem = f"closed the connection during {kind}: the worker died or dropped this client"
        elif isinstance(err, OSError):
            problem = f"broke the connection during {kind} ({err.strerror or err}): the worker died?"
        elif isinstance(err, BoundaryError):
            problem = f"answered {kind} with an invalid message: {err}"
        else:  # anything else the reply made happen (an allocation that failed, ...)
            problem = f"answered {kind} with something that could not be read ({type(err).__name__}: {err})"
        self.close()
        raise BoundaryError(
            f"the accelerator at {self.where} {problem}{self.worker.exit_note if self.worker else ''}") from None

    def close(self) -> None:
        self._sock = None
        self._finalizer()


class _SocketReply:
    def __init__(self, transport: SocketTransport, kind: str, limit: int) -> None:
        self.transport, self.kind, self.limit = transport, kind, limit

    def wait(self) -> Message:
        return self.transport._read_reply(self.kind, self.limit)


def _close_quietly(sock: socket.socket, worker: Optional["LocalWorker"]) -> None:
    try:
        sock.close()
    finally:
        if worker is not None:
            worker.stop()


def parse_tcp(spec: str) -> tuple[str, int]:
    """(host, port) of 'tcp://HOST:PORT'."""
    try:
        url = urlsplit(spec)
        host, port = url.hostname, url.port
    except ValueError:  # e.g. a port that is not a number
        url = host = port = None
    if url is None or url.scheme != "tcp" or not host or port is None or url.path not in ("", "/"):
        raise ValueError(f"a worker address looks like tcp://HOST:PORT, not {spec!r}")
    return host, port


def is_worker(accelerator) -> bool:
    """Whether `accelerator` names a worker process ('process', 'process:DEVICE', 'tcp://HOST:PORT')."""
    return isinstance(accelerator, str) and (accelerator == "process" or accelerator.startswith(("process:", "tcp://")))


def open_transport(accelerator: str, secret: Optional[str] = None, timeout: float = 120.0) -> SocketTransport:
    """Connect to the worker `accelerator` names ('tcp://HOST:PORT'), or start a private one
    ('process' or 'process:DEVICE'). `secret` defaults to $LEGRACE_SECRET (tcp only)."""
    if accelerator.startswith("tcp://"):
        host, port = parse_tcp(accelerator)
        secret = secret or os.environ.get(SECRET_ENV)
        if not secret:
            raise ValueError(f"accelerator {accelerator} needs the worker's shared secret: "
                             f"pass secret= (--secret) or set {SECRET_ENV}")
        try:
            sock = socket.create_connection((host, port), timeout=HANDSHAKE_TIMEOUT)
        except OSError as err:
            raise BoundaryError(f"cannot reach the accelerator at {accelerator}: {err.strerror or err}") from None
        return _handshake(sock, secret, accelerator, timeout)
    worker = LocalWorker(accelerator.partition(":")[2] or "cpu")
    return _handshake(worker.connect(), worker.secret, f"the local worker process ({worker.device})", timeout, worker)


def _handshake(sock: socket.socket, secret: str, where: str, timeout: float,
               worker: Optional["LocalWorker"] = None) -> SocketTransport:
    try:
        tune(sock)
        sock.settimeout(HANDSHAKE_TIMEOUT)
        authenticate(sock, secret, where)
    except (OSError, EOFError) as err:
        sock.close()
        raise BoundaryError(f"the handshake with {where} failed ({err}): is it a legrace worker?") from None
    except BoundaryError:
        sock.close()
        raise
    return SocketTransport(sock, where, timeout, worker)


class LocalWorker:
    """A private `legrace worker` child process on a unix socket in a fresh 0700 directory, with a
    fresh random secret. It serves this one client and exits when the connection closes."""

    def __init__(self, device: str, startup_timeout: float = 60.0) -> None:
        self.device, self.startup_timeout = device, startup_timeout
        self.secret = secrets.token_hex(32)
        self.exit_note = ""  # how it ended, once stopped
        self.dir = tempfile.mkdtemp(prefix="legrace-worker-")
        self.path = os.path.join(self.dir, "worker.sock")
        self.log_path = os.path.join(self.dir, "worker.log")
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "legrace.accelerator.worker", "--device", device, "--listen", f"unix:{self.path}", "--once"],
                env=dict(os.environ, **{SECRET_ENV: self.secret}), stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT,
            )

    def connect(self) -> socket.socket:
        deadline = time.monotonic() + self.startup_timeout
        while True:
            if self.proc.poll() is not None:
                self.stop()
                raise BoundaryError(f"the local worker process could not start{self.exit_note}")
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(self.path)
                return sock
            except OSError:
                sock.close()
            if time.monotonic() > deadline:
                self.stop()
                raise BoundaryError(f"the local worker process did not listen within {self.startup_timeout:g} s")
            time.sleep(0.05)

    def stop(self) -> None:
        """Wait briefly for the worker to exit (it does once its client hangs up), else kill it;
        note how it ended in `exit_note` and remove its directory."""
        if self.proc.poll() is None:
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        try:
            with open(self.log_path) as f:
                log = f.read()[-800:].strip()
        except OSError:
            log = ""
        if self.proc.returncode != 0:
            self.exit_note = f" (the worker process exited with code {self.proc.returncode}" + (
                f"; its log: {log})" if log else ")")
        shutil.rmtree(self.dir, ignore_errors=True)


def listen(address: str) -> tuple[socket.socket, str]:
    """A listening socket for 'HOST:PORT', 'tcp://HOST:PORT' or 'unix:PATH', and its address as a
    client names it ('tcp://HOST:PORT' with the port picked when PORT is 0, or 'unix:PATH')."""
    if address.startswith("unix:"):
        path = address[len("unix:"):]
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(path)
        sock.listen()
        return sock, address
    host, port = parse_tcp(address if address.startswith("tcp://") else f"tcp://{address}")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen()
    bound = sock.getsockname()[1]
    return sock, f"tcp://{f'[{host}]' if family == socket.AF_INET6 else host}:{bound}"

