"""`legrace worker`: the untrusted accelerator as a server (a GPU host the adversary controls).

It holds no data set, no labels, no X_main, A or V: it serves `legrace.accelerator.compute.Accelerator`
to authenticated trusted sides and keeps only what they sent (weights, noised residuals until
their backward pass). Each connection gets its own Accelerator, so a client's state dies with its
connection. Requests it cannot serve are answered with `Refused`, never with a crash.

    LEGRACE_SECRET=... legrace worker --device cuda --listen 0.0.0.0:7373
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import threading
import time
from typing import Callable, Optional, Sequence

import torch

from legrace.accelerator.compute import Accelerator, AcceleratorError, local_device
from legrace.boundary.messages import MAX_TEXT, TO_ACCELERATOR, BoundaryError, Message, Refused, decode, encode
from legrace.boundary.transport import HANDSHAKE_TIMEOUT, SECRET_ENV, admit_client, listen, read_frame, tune, write_frame
from legrace.options import DefaultsHelpFormatter, add_threads, use_threads

MAX_CONNECTIONS = 64  # open at once, clients and strangers in their handshake together

DEFAULT_LISTEN = "127.0.0.1:7373"


def _stderr(line: str) -> None:
    print(f"legrace worker: {line}", file=sys.stderr, flush=True)


class WorkerServer:
    """Listens on `address` and serves each admitted client with its own Accelerator on `device`.

    once: serve a single client, then return from serve_forever (a private worker process);
    it also gives up if no client comes within `accept_timeout` seconds. threads: torch CPU threads
    of each client's thread (None: torch's default).
    """

    def __init__(self, address: str, secret: Optional[str], device: str = "cpu", *, once: bool = False,
                 accept_timeout: float = 120.0, log: Callable[[str], None] = _stderr,
                 threads: Optional[int] = None) -> None:
        if not secret:
            raise ValueError(f"the worker needs a shared secret: pass --secret or set {SECRET_ENV}")
        self.secret, self.device, self.once, self.log = secret, local_device(device), once, log
        self.threads = threads
        self.accept_timeout = accept_timeout
        self._listener, self.address = listen(address)
        self._listener.settimeout(0.2)  # so close() from another thread is noticed
        self._closed = False
        self._connections: set[socket.socket] = set()

    def serve_forever(self) -> None:
        deadline = time.monotonic() + self.accept_timeout
        while not self._closed:
            try:
                conn, peer = self._listener.accept()
            except TimeoutError:
                if self.once and time.monotonic() > deadline:
                    self.log(f"no client within {self.accept_timeout:g} s; exiting")
                    return
                continue
            except OSError:
                if self._closed:
                    return
                raise
            if self.once:
                if self._serve(conn, peer):  # a stranger that fails the handshake is not the one client
                    return
                continue
            if len(self._connections) >= MAX_CONNECTIONS:  # strangers holding handshakes open
                self.log(f"refused a connection: {MAX_CONNECTIONS} already open")
                conn.close()
                continue
            threading.Thread(target=self._serve, args=(conn, peer), daemon=True).start()

    def close(self) -> None:
        """Stop accepting and drop every client."""
        self._closed = True
        self._listener.close()
        for conn in list(self._connections):
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self.address.startswith("unix:"):
            try:
                os.unlink(self.address[len("unix:"):])
            except OSError:
                pass

    def _serve(self, conn: socket.socket, peer) -> bool:
        """Serve one client until it leaves; False if it did not pass the handshake."""
        name = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "a local client"
        self._connections.add(conn)
        try:
            tune(conn)
            conn.settimeout(HANDSHAKE_TIMEOUT)
            try:
                refusal = admit_client(conn, self.secret)
            except (EOFError, OSError) as err:
                refusal = f"the handshake failed ({type(err).__name__})"
            if refusal:
                self.log(f"refused {name}: {refusal}")
                return False
            self.log(f"serving {name} on {self.device}")
            conn.settimeout(None)
            if self.threads is not None:  # a new thread starts with OpenMP's default team, not the main thread's
                torch.set_num_threads(self.threads)
            accelerator = Accelerator(self.device)
            while True:
                try:
                    body = read_frame(conn)
                except BoundaryError as err:  # an oversized frame: the stream cannot be trusted further
                    write_frame(conn, encode(Refused(str(err))))
                    raise
                write_frame(conn, encode(answer(accelerator, body)))
        except EOFError:
            self.log(f"{name} disconnected")
        except (OSError, BoundaryError) as err:
            self.log(f"dropped {name}: {err}")
        finally:
            self._connections.discard(conn)
            conn.close()
        return True


def answer(accelerator: Accelerator, body: torch.Tensor) -> Message:
    """The reply to one frame body: the accelerator's answer, or Refused with the reason."""
    try:
        return accelerator.handle(decode(body, TO_ACCELERATOR))
    except (BoundaryError, AcceleratorError) as err:
        reason = str(err)
    except (RuntimeError, ValueError, TypeError, IndexError) as err:  # torch refusing malformed work
        reason = f"{type(err).__name__}: {err}"
    return Refused(reason[:MAX_TEXT])


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", help="cpu or a torch device such as cuda")
    p.add_argument("--listen", default=DEFAULT_LISTEN,
                   help="HOST:PORT (port 0 picks one; 0.0.0.0:PORT for other hosts) or unix:PATH")
    p.add_argument("--secret", default=None, help=f"shared secret (default: ${SECRET_ENV}, which keeps it out of ps)")
    p.add_argument("--once", action="store_true", help="serve one client, then exit")
    add_threads(p)


def add_parser(subparsers) -> None:
    w = subparsers.add_parser(
        "worker", help="serve the untrusted accelerator (holds no data, labels, X_main, A or V)",
        description=__doc__, formatter_class=DefaultsHelpFormatter,
    )
    _arguments(w)
    w.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        server = WorkerServer(args.listen, args.secret or os.environ.get(SECRET_ENV), args.device, once=args.once,
                              threads=args.threads)
    except OSError as err:
        raise ValueError(f"cannot listen on {args.listen}: {err.strerror or err}") from None
    print(f"legrace worker listening on {server.address} (device {server.device})", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`python -m legrace.accelerator.worker ...`: the worker alone, without the trusted side's imports."""
    parser = argparse.ArgumentParser(prog="legrace worker", description=__doc__, formatter_class=DefaultsHelpFormatter)
    _arguments(parser)
    try:
        args = parser.parse_args(argv)
        use_threads(args)
        return run(args)
    except ValueError as err:
        print(f"legrace worker: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
