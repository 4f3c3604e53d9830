"""The trust boundary across processes: a worker over TCP, a private worker process, hostile
workers, a worker killed mid-epoch, and the audit of a training run over a real worker."""

import copy
import json
import math
import os
import selectors
import signal
import struct
import subprocess
import sys
import threading
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from legrace import LegRace
from legrace.accelerator.compute import Accelerator
from legrace.privacy.accountant import epsilon
from legrace.boundary.messages import TO_ACCELERATOR, Ack, BoundaryError, ConvForward, ConvForwardReply, decode, encode
from legrace.cli import main
from legrace.models import SmallCNN
from legrace.boundary.transport import admit_client, listen, read_frame, write_frame
from legrace.accelerator.worker import WorkerServer
from legrace.accelerator.worker import main as worker_main

SECRET = "test-secret-0123456789"


@pytest.fixture
def worker():
    """A real WorkerServer on 127.0.0.1, in a thread of this process; its log in `worker.lines`."""
    lines = []
    server = WorkerServer("127.0.0.1:0", SECRET, log=lines.append)
    server.lines = lines
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.close()
    thread.join(timeout=5)
    assert not thread.is_alive()


def start_worker_process() -> tuple[subprocess.Popen, str]:
    """`python -m legrace.accelerator.worker` on a free loopback port; returns the process and its address."""
    proc = subprocess.Popen([sys.executable, "-m", "legrace.accelerator.worker", "--listen", "127.0.0.1:0"],
                            env=dict(os.environ, LEGRACE_SECRET=SECRET), stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        ready = sel.select(timeout=60)
    line = proc.stdout.readline() if ready else ""
    if "listening on" not in line:
        proc.kill()
        pytest.fail(f"the worker did not start: {line!r}")
    return proc, line.split()[4]


class TwoConvs(nn.Module):
    """Stride, padding, dilation and bias, for exactness across backends."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.b = nn.Conv2d(8, 6, 3, padding=2, dilation=2, bias=False)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        return self.fc(F.adaptive_avg_pool2d(torch.relu(self.b(torch.relu(self.a(x)))), 1).flatten(1))


def forward_backward(engine, module, x, y):
    model = engine.convert(copy.deepcopy(module))
    out = model(x)
    F.cross_entropy(out, y).backward()
    return out.detach(), [p.grad for p in model.parameters()], model


def eventually(condition, timeout=5.0) -> bool:
    """For what another thread does right after answering: wait a little for it."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def assert_close(a, b, tol=1e-6):
    assert float((a - b).norm()) <= tol * max(float(b.norm()), 1e-12)


# ---- the same results as in-process -------------------------------------------------------------


def test_tcp_worker_matches_in_process_and_serves_each_client_apart(worker):
    torch.manual_seed(0)
    module, x, y = TwoConvs(), torch.randn(5, 3, 12, 12), torch.randint(0, 4, (5,))
    ref_out, ref_grads, _ = forward_backward(LegRace(rank=2, clip=None, noise_multiplier=0), module, x, y)
    engines = [LegRace(rank=2, clip=None, noise_multiplier=0, accelerator=worker.address, secret=SECRET)
               for _ in range(2)]
    for engine in engines:  # two clients at once, each with its own accelerator state
        out, grads, _ = forward_backward(engine, module, x, y)
        assert_close(out, ref_out)
        for g, ref in zip(grads, ref_grads):
            assert_close(g, ref)
    for engine in engines:
        engine.close()
    assert eventually(lambda: sum("serving" in line for line in worker.lines) == 2)


def test_process_backend_matches_in_process_then_reports_its_death():
    torch.manual_seed(1)
    module, x, y = SmallCNN(3, 4), torch.randn(6, 3, 8, 8), torch.randint(0, 4, (6,))
    ref_out, ref_grads, _ = forward_backward(LegRace(rank=2, clip=None, noise_multiplier=0), module, x, y)
    engine = LegRace(rank=2, clip=None, noise_multiplier=0, accelerator="process")
    out, grads, model = forward_backward(engine, module, x, y)
    assert_close(out, ref_out)
    for g, ref in zip(grads, ref_grads):
        assert_close(g, ref)
    engine.boundary.transport.worker.proc.send_signal(signal.SIGKILL)
    t0 = time.monotonic()
    with pytest.raises(BoundaryError, match=r"local worker process.*exited with code -9"):
        model(x)
    assert time.monotonic() - t0 < 10
    engine.close()


def test_fixed_noise_seed_gives_the_same_training_run_on_every_backend(worker, tmp_path):
    common = ["train", "--noise-multiplier", "4", "--noise-seed", "7", "--epochs", "1", "--max-samples", "300",
              "--no-progress", "--batch-size", "32"]
    assert main(common + ["--out", str(tmp_path / "local")]) == 0
    assert main(common + ["--out", str(tmp_path / "tcp"), "--accelerator", worker.address, "--secret", SECRET]) == 0
    assert main(common + ["--out", str(tmp_path / "process"), "--accelerator", "process"]) == 0
    local, *others = [json.loads((tmp_path / run / "metrics.jsonl").read_text()) for run in ("local", "tcp", "process")]
    for row in others:
        for key in ("train_loss", "val_loss", "train_acc", "val_acc", "epsilon"):
            assert row[key] == pytest.approx(local[key], rel=1e-6, abs=1e-9), key


# ---- authentication ---------------------------------------------------------------------------


def test_a_wrong_secret_is_refused_on_both_sides(worker, tmp_path, capsys):
    with pytest.raises(BoundaryError, match="refused this client: wrong secret"):
        LegRace(rank=2, noise_multiplier=1.0, clip=1.0, accelerator=worker.address, secret="guess").convert(SmallCNN(1, 3))
    assert eventually(lambda: any("refused" in line and "wrong secret" in line for line in worker.lines))
    assert main(["train", "--epochs", "1", "--accelerator", worker.address, "--secret", "guess",
                 "--out", str(tmp_path / "r"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "wrong secret" in err and "Traceback" not in err


def test_a_secret_is_required(worker, monkeypatch, capsys):
    monkeypatch.delenv("LEGRACE_SECRET", raising=False)
    with pytest.raises(ValueError, match="needs the worker's shared secret"):
        LegRace(noise_multiplier=1.0, accelerator=worker.address).convert(SmallCNN(1, 3))
    assert worker_main(["--listen", "127.0.0.1:0"]) == 2
    assert "needs a shared secret" in capsys.readouterr().err


def test_unreachable_worker_and_bad_addresses():
    with pytest.raises(BoundaryError, match="cannot reach the accelerator at tcp://127.0.0.1:1"):
        LegRace(noise_multiplier=1.0, accelerator="tcp://127.0.0.1:1", secret=SECRET).convert(SmallCNN(1, 3))
    with pytest.raises(ValueError, match="tcp://HOST:PORT"):
        LegRace(noise_multiplier=1.0, accelerator="tcp://127.0.0.1")
    with pytest.raises(ValueError, match="gpu_only"):
        LegRace(mode="gpu_only", accelerator="process")


def test_a_bad_request_is_refused_and_the_worker_serves_on(worker):
    engine = LegRace(rank=1, noise_multiplier=1.0, clip=1.0, accelerator=worker.address, secret=SECRET)
    model = engine.convert(SmallCNN(1, 3))
    x = torch.randn(2, 1, 8, 8)
    model(x)
    with pytest.raises(BoundaryError, match="refused SetWeight of layer 7: layer 7 was never registered"):
        engine.boundary.set_weight(7, torch.ones(1))
    with pytest.raises(BoundaryError, match="refused ConvForward of layer 1: RuntimeError"):  # 5 channels, not 16
        engine.boundary.conv_forward(1, engine.mechanism.release(torch.randn(2, 5, 4, 4)), False, (2, 32, 4, 4))
    assert model(x).shape == (2, 3)  # same connection, still served
    engine.close()


# ---- hostile workers --------------------------------------------------------------------------


class HostileWorker:
    """Knows the secret and speaks the protocol, but answers the first ConvForward as `lie` says:
    `lie(reply)` returns encode() chunks, raw bytes to write, or None to hang up."""

    def __init__(self, lie):
        self.lie, self.stop = lie, threading.Event()
        self.listener, self.address = listen("127.0.0.1:0")
        self.listener.settimeout(0.1)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self.stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:
                continue
            with conn:
                conn.settimeout(10)
                if admit_client(conn, SECRET) is None:
                    self._serve(conn)

    def _serve(self, conn):
        accelerator, lied = Accelerator(), False
        try:
            while True:
                request = decode(read_frame(conn), TO_ACCELERATOR)
                reply = accelerator.handle(request)
                if isinstance(request, ConvForward) and not lied:
                    lied, answer = True, self.lie(reply)
                    if answer is None:
                        return
                    if isinstance(answer, bytes):
                        conn.sendall(answer)
                        return
                    write_frame(conn, answer)
                else:
                    write_frame(conn, encode(reply))
        except (EOFError, OSError):
            pass

    def close(self):
        self.stop.set()
        self.thread.join(timeout=15)
        self.listener.close()
        assert not self.thread.is_alive()


def _poked(reply, value):
    y = reply.y_res.clone()
    y.view(-1)[3] = value
    return encode(ConvForwardReply(y, reply.stored))


LIES = {
    "wrong shape": (lambda r: encode(ConvForwardReply(r.y_res[:, :-1], r.stored)), "with shape"),
    "wrong dtype": (lambda r: encode(ConvForwardReply(r.y_res.double(), r.stored)), "as torch.float64"),
    "NaN": (lambda r: _poked(r, math.nan), "NaN or inf"),
    "inf": (lambda r: _poked(r, -math.inf), "NaN or inf"),
    "wrong kind": (lambda r: encode(Ack()), "answered ConvForward of layer 1 with Ack"),
    "no stored residual": (lambda r: encode(ConvForwardReply(r.y_res, None)), "did not keep the residual"),
    "garbage frame": (lambda r: [os.urandom(256)], "answered ConvForward with an invalid message"),
    "garbage bytes": (lambda r: os.urandom(64), "invalid message|closed the connection"),
    "huge frame": (lambda r: struct.pack("<Q", 1 << 40), "a frame of 1099511627776 bytes"),
    # far below the 4 GiB any frame may take, far above what this answer can take: refused unread
    "oversized answer": (lambda r: struct.pack("<Q", 1 << 24), r"a frame of 16777216 bytes announced, more than the \d+ it may take"),
    "cut short": (lambda r: struct.pack("<Q", 1000) + b"x" * 10, "closed the connection during ConvForward"),
    "dies": (lambda r: None, "closed the connection during ConvForward"),
}


@pytest.mark.parametrize("lie,message", LIES.values(), ids=LIES.keys())
def test_a_hostile_worker_is_stopped_with_a_clear_error(lie, message):
    hostile = HostileWorker(lie)
    try:
        engine = LegRace(rank=1, noise_multiplier=1.0, clip=1.0, accelerator=hostile.address, secret=SECRET,
                         accelerator_timeout=5)
        model = engine.convert(SmallCNN(1, 3))
        t0 = time.monotonic()
        with pytest.raises(BoundaryError, match=message):
            model(torch.randn(2, 1, 8, 8))
        assert time.monotonic() - t0 < 4
        engine.close()
    finally:
        hostile.close()


def test_a_worker_that_hangs_times_out(tmp_path, capsys):
    hostile = HostileWorker(lambda reply: hostile.stop.wait(10) and None)
    try:
        t0 = time.monotonic()
        code = main(["train", "--epochs", "1", "--accelerator", hostile.address, "--secret", SECRET,
                     "--accelerator-timeout", "0.5", "--out", str(tmp_path / "r"), "--no-progress"])
        assert code == 2 and time.monotonic() - t0 < 8
        err = capsys.readouterr().err
        assert "did not answer ConvForward within 0.5 s" in err and "Traceback" not in err
    finally:
        hostile.close()


def test_cli_stops_on_a_lying_worker_with_exit_code_2(tmp_path, capsys):
    hostile = HostileWorker(LIES["NaN"][0])
    try:
        code = main(["train", "--epochs", "1", "--accelerator", hostile.address, "--secret", SECRET,
                     "--out", str(tmp_path / "r"), "--no-progress"])
        err = capsys.readouterr().err
        assert code == 2 and "NaN or inf" in err and "Traceback" not in err
    finally:
        hostile.close()


# ---- a worker killed mid-epoch ------------------------------------------------------------------


def test_worker_killed_mid_epoch_then_resume_spends_no_privacy_twice(worker, tmp_path, capsys):
    out = tmp_path / "run"
    ledger = out / "privacy_ledger.json"
    proc, address = start_worker_process()

    def kill_when_epoch_2_starts():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if json.loads(ledger.read_text())["uses"].get("train") == 2:
                    break
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(0.001)
        proc.kill()

    killer = threading.Thread(target=kill_when_epoch_2_starts)
    killer.start()
    common = ["train", "--noise-multiplier", "20", "--epochs", "2", "--max-samples", "900", "--out", str(out),
              "--no-progress", "--secret", SECRET]
    try:
        assert main(common + ["--accelerator", address]) == 2
    finally:
        killer.join(timeout=130)
        proc.kill()
        proc.wait(timeout=10)
    err = capsys.readouterr().err
    assert "the worker died" in err and "Traceback" not in err
    assert json.loads(ledger.read_text())["uses"]["train"] == 2  # the crashed pass is accounted
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1  # only epoch 1 finished

    assert main(common + ["--resume", "--accelerator", worker.address]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["epochs"] == 2 and s["uses_per_sample"] == 3  # epoch 1, the crashed pass, epoch 2
    assert sum(c["count"] for c in s["compositions"]) == 3 * s["releases_per_sample"]
    releases = [(c["sensitivity"] / s["clip"], c["count"]) for c in s["compositions"]]
    assert s["epsilon"] == pytest.approx(epsilon(s["noise_multiplier"], releases, s["delta"]))


# ---- the audit of a training run over a worker ------------------------------------------------


def test_audit_of_a_run_over_a_worker_shows_only_noised_residuals_crossed(worker, tmp_path):
    out, audit = tmp_path / "run", tmp_path / "audit.jsonl"
    assert main(["train", "--epochs", "1", "--max-samples", "320", "--batch-size", "32", "--accelerator",
                 worker.address, "--secret", SECRET, "--audit", str(audit), "--out", str(out), "--no-progress"]) == 0
    s = json.loads((out / "summary.json").read_text())
    lines = [json.loads(line) for line in audit.read_text().splitlines()]
    allowed = {"to_accelerator": {"RegisterConv", "SetWeight", "ConvForward", "ConvBackward", "ResendOutput", "Free"},
               "to_trusted": {"Ack", "ConvForwardReply", "ConvBackwardReply"}}
    assert all(line["kind"] in allowed[line["direction"]] for line in lines)
    sent = [line for line in lines if line["direction"] == "to_accelerator" and "field" in line]
    assert {line["field"] for line in sent} == {"weight", "residual.tensor", "grad_y"}
    assert all(line["dtype"] == "float32" for line in lines if "dtype" in line)

    # The model's conv weights and the conv inputs: what each field may look like.
    model = SmallCNN(1, 10)
    weights = [tuple(m.weight.shape) for m in model.modules() if isinstance(m, nn.Conv2d)]
    in_shapes = [(1, 8, 8), (16, 4, 4), (32, 2, 2)]
    assert all(tuple(line["shape"]) == weights[line["layer"]] for line in sent if line["field"] == "weight")

    released = [line for line in sent if line["field"] == "residual.tensor"]
    batches = 288 // 32  # the training batches: validation ran wholly on the trusted side (--val-inference)
    # R = 8 covers layer 0's one channel, and layer 2's 2x2 maps: those convs run wholly on the trusted
    # side, nothing of them crosses (layer 2's stride and padding were registered: architecture,
    # public), and they are not accounted
    assert {line["layer"] for line in lines if line["kind"] not in ("Free", "RegisterConv")
            and line["direction"] == "to_accelerator"} == {1}
    assert len(released) == 1 * batches == s["releases_per_sample"] * batches
    clip, sigma = s["clip"], s["sigma"]
    for line in released:
        assert line["clip"] == pytest.approx(clip) and line["sigma"] == pytest.approx(sigma) and sigma > 0
        batch, *shape = line["shape"]
        assert tuple(shape) == in_shapes[line["layer"]]  # never A (B x N x R) or V (B x R x hw)
        # clip(X_res) + noise: at most C per sample, plus Gaussian noise of norm about sigma sqrt(n)
        n = batch * math.prod(shape)
        assert abs(line["norm"] - sigma * math.sqrt(n)) <= clip * math.sqrt(batch) + 5 * sigma
    assert not any(line["kind"] == "ConvForward" and line["field"] != "residual.tensor" for line in sent)


def test_every_crossing_goes_through_the_audit_when_the_worker_refuses(worker, tmp_path):
    audit = tmp_path / "audit.jsonl"
    engine = LegRace(rank=1, noise_multiplier=1.0, clip=1.0, accelerator=worker.address, secret=SECRET, audit=audit)
    engine.convert(SmallCNN(1, 3))
    with pytest.raises(BoundaryError):
        engine.boundary.set_weight(5, torch.ones(1))
    engine.close()
    last = json.loads(audit.read_text().splitlines()[-1])
    assert last == {"direction": "to_trusted", "kind": "Refused", "layer": None}


def test_bfloat16_wire_over_a_worker_halves_the_bytes_and_stays_close(worker):
    # Residuals cross (and Y_res comes back) in bfloat16: half the bytes; with noise off, what
    # the rounding costs shows directly, and it stays at bfloat16's own precision.
    torch.manual_seed(0)
    module, x, y = TwoConvs(), torch.randn(5, 3, 12, 12), torch.randint(0, 4, (5,))
    ref_engine = LegRace(rank=2, clip=None, noise_multiplier=0, accelerator=worker.address, secret=SECRET)
    ref_out, ref_grads, _ = forward_backward(ref_engine, module, x, y)
    engine = LegRace(rank=2, clip=None, noise_multiplier=0, accelerator=worker.address, secret=SECRET,
                     wire_dtype="bfloat16")
    out, grads, _ = forward_backward(engine, module, x, y)
    assert_close(out, ref_out, tol=2e-2)
    for g, ref in zip(grads, ref_grads):
        assert_close(g, ref, tol=2e-2)
    sent = lambda e: e.boundary.bytes_out + e.boundary.bytes_in  # noqa: E731
    assert sent(engine) < 0.85 * sent(ref_engine)
    for e in (engine, ref_engine):
        e.close()


def test_an_interrupted_request_closes_the_connection_so_no_stale_reply_answers_the_next(monkeypatch):
    import socket

    import legrace.boundary.transport as transport

    mine, theirs = socket.socketpair()
    link = transport.SocketTransport(mine, "a test peer", timeout=5.0)

    def interrupted(sock, limit):
        raise KeyboardInterrupt  # Ctrl-C in a notebook while the reply is on its way

    monkeypatch.setattr(transport, "read_frame", interrupted)
    with pytest.raises(KeyboardInterrupt):
        link.request(Ack())
    with pytest.raises(BoundaryError, match="is closed"):
        link.request(Ack())
    theirs.close()


@pytest.mark.parametrize("timeout", [0, -1, math.inf, math.nan, True])
def test_a_bad_accelerator_timeout_is_refused_up_front(timeout):
    with pytest.raises(ValueError, match="accelerator_timeout must be"):
        LegRace(rank=2, noise_multiplier=1.0, accelerator_timeout=timeout)


def test_a_peer_trickling_its_reply_is_cut_off_at_the_timeout():
    import socket

    from legrace.boundary.transport import read_frame

    mine, theirs = socket.socketpair()
    mine.settimeout(0.5)

    def trickle():  # a frame announcing 100 bytes, one byte every 0.1 s: each recv is quick, the whole is not
        try:
            theirs.sendall(struct.pack("<Q", 100))
            for _ in range(100):
                theirs.sendall(b"x")
                time.sleep(0.1)
        except OSError:
            pass

    thread = threading.Thread(target=trickle, daemon=True)
    thread.start()
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        read_frame(mine)
    assert time.monotonic() - t0 < 2.0 and mine.gettimeout() == 0.5
    mine.close()
    theirs.close()


def test_a_single_client_worker_is_not_spent_on_a_stranger():
    import socket

    lines = []
    server = WorkerServer("127.0.0.1:0", SECRET, once=True, log=lines.append)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    host, port = server.address[len("tcp://"):].rsplit(":", 1)
    with socket.create_connection((host, int(port))) as stranger:  # a port scanner
        stranger.sendall(b"GET / HTTP/1.0\r\n\r\n" + b" " * 80)
        stranger.recv(1024)
    engine = LegRace(rank=2, clip=None, noise_multiplier=0, accelerator=server.address, secret=SECRET)
    model = engine.convert(SmallCNN(3, 3))
    with torch.no_grad(), engine.unaccounted():
        model(torch.randn(2, 3, 8, 8))  # served: the stranger did not count as the one client
    engine.close()
    thread.join(timeout=10)
    assert not thread.is_alive() and any("refused" in line for line in lines)
    server.close()


def test_a_worker_serves_each_client_with_the_threads_it_was_given(monkeypatch):
    import legrace.accelerator.worker as worker_module

    want = 1 if torch.get_num_threads() > 1 else 2  # not what a new thread would start with
    seen, real = [], worker_module.answer
    monkeypatch.setattr(worker_module, "answer",
                        lambda acc, body: seen.append(torch.get_num_threads()) or real(acc, body))
    server = WorkerServer("127.0.0.1:0", SECRET, log=lambda line: None, threads=want)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        engine = LegRace(rank=2, clip=None, noise_multiplier=0, accelerator=server.address, secret=SECRET)
        model = engine.convert(SmallCNN(3, 3))
        with torch.no_grad(), engine.unaccounted():
            model(torch.randn(2, 3, 8, 8))
        engine.close()
    finally:
        server.close()
        thread.join(timeout=5)
    assert seen and set(seen) == {want}
