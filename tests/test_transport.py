"""The transport boundary on its own: handshake, framing, and control calls over a slot's connection.

The one underscored Pyro5 proxy setting isdgrid uses (``_pyroTimeout``, for the name
server, in ``isdgrid/nameserver.py``) is pinned by tests/test_attach.py; the last test
here checks that no other private name of a library is used.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from conftest import wait_until
from remote_objects import Recorder

from isdgrid import AuthenticationError, Grid, Host, HostLostError, codec, handshake, wire
from isdgrid.transport import ConnectionBroken, ControlChannel, address_of

SECRET = "transport-test-secret"


def _pair() -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair()
    a.settimeout(10)
    b.settimeout(10)
    return a, b


def _answer_in_thread(sock: socket.socket, secret: str, daemon_id: bytes) -> dict[str, object]:
    out: dict[str, object] = {}

    def run() -> None:
        try:
            out["channel"] = handshake.answer(sock, secret.encode(), daemon_id, time.monotonic() + 5)
        except (OSError, ValueError) as exc:
            out["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    out["thread"] = thread
    return out


def test_handshake_succeeds_both_ways_and_returns_the_daemon_id() -> None:
    client, daemon = _pair()
    with client, daemon:
        out = _answer_in_thread(daemon, SECRET, b"d-1")
        assert handshake.prove(client, SECRET, handshake.CHANNEL_CALLS, 5) == b"d-1"
        out["thread"].join(10)  # type: ignore[attr-defined]
        assert out["channel"] == handshake.CHANNEL_CALLS


@pytest.mark.parametrize("side", ["daemon", "client"])
def test_a_wrong_secret_on_either_side_fails_the_handshake(side: str) -> None:
    client, daemon = _pair()
    with client, daemon:
        out = _answer_in_thread(daemon, "other" if side == "daemon" else SECRET, b"d-1")
        with pytest.raises(AuthenticationError):
            handshake.prove(client, SECRET if side == "daemon" else "other", handshake.CHANNEL_CALLS, 5)
        client.close()
        out["thread"].join(10)  # type: ignore[attr-defined]
        if side == "daemon":  # the client gave up before proving itself: the daemon saw no proof
            assert isinstance(out.get("error"), OSError)
        else:
            assert isinstance(out.get("error"), handshake.HandshakeError)


def test_a_pinned_daemon_id_refuses_another_daemon_of_the_same_grid() -> None:
    client, daemon = _pair()
    with client, daemon:
        _answer_in_thread(daemon, SECRET, b"the-other-daemon")
        with pytest.raises(AuthenticationError, match="another daemon"):
            handshake.prove(client, SECRET, handshake.CHANNEL_CALLS, 5, expected_id=b"the-first-daemon")


def test_the_client_sends_only_its_hello_to_a_peer_that_has_not_proved_itself() -> None:
    client, fake = _pair()
    with client, fake:
        received = bytearray()

        def impostor() -> None:
            received.extend(fake.recv(1024))
            fake.sendall(os.urandom(32) + b"\x03abc" + os.urandom(32))  # a proof made without the secret
            fake.settimeout(1.0)
            try:
                while chunk := fake.recv(1024):
                    received.extend(chunk)
            except OSError:
                pass

        thread = threading.Thread(target=impostor, daemon=True)
        thread.start()
        with pytest.raises(AuthenticationError):
            handshake.prove(client, SECRET, handshake.CHANNEL_CALLS, 5)
        client.close()
        thread.join(10)
        assert len(received) == 37 and received.startswith(b"ISDG\x01")
        assert SECRET.encode() not in received


def test_frames_round_trip_with_out_of_band_buffers_and_read_ahead() -> None:
    a, b = _pair()
    with a, b:
        array = np.arange(100_000, dtype=np.float64)
        data, buffers = codec.pack(array, codec.OOB_MIN)
        assert len(buffers) == 1

        def send() -> None:
            wire.send_frame(a, wire.BATCH, ("svc", 1, [(data, 1)], 10), buffers)
            wire.send_frame(a, wire.REPLY, ("svc", 1, []))

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        reader = wire.FrameReader(b)
        kind, meta, got = reader.read(1 << 30)
        assert kind == wire.BATCH and meta[:2] == ("svc", 1)
        assert np.array_equal(codec.loads(meta[2][0][0], got), array)
        kind, meta, got = reader.read(1 << 30)
        assert kind == wire.REPLY and meta == ("svc", 1, []) and not got
        assert not reader.buffered
        sender.join(10)


def test_a_frame_over_the_limit_or_of_unknown_kind_is_refused() -> None:
    a, b = _pair()
    with a, b:
        wire.send_frame(a, wire.BATCH, ("svc", 1, [(b"x" * 1000, 0)], 10))
        with pytest.raises(wire.FrameError, match="exceeds"):
            wire.FrameReader(b).read(100)
    a, b = _pair()
    with a, b:
        a.sendall(b"Z" + bytes(12))
        with pytest.raises(wire.FrameError, match="unknown frame kind"):
            wire.FrameReader(b).read(100)


# -- control calls over the slot's connection --------------------------------------------


@pytest.fixture
def grid1_files(tmp_path: Path):  # type: ignore[no-untyped-def]
    g = Grid([Host("localhost", n_cpu=1)], heartbeat_interval=0.5, host_timeout=30)
    try:
        yield g
    finally:
        g.terminate()


def test_control_calls_carry_bytes_as_bytes(grid1_files: Grid, tmp_path: Path) -> None:
    payload = os.urandom(300_000)
    (tmp_path / "blob.bin").write_bytes(payload)
    assert grid1_files.copy_files(str(tmp_path), ["blob.bin"]) == 1
    temp = grid1_files.slots[0].control("info")["temp_path"]
    assert (Path(temp) / "blob.bin").read_bytes() == payload


def test_control_calls_from_many_threads_share_the_slot_connection(grid1_files: Grid) -> None:
    slot = grid1_files.slots[0]
    errors: list[BaseException] = []
    sid = grid1_files.publish(Recorder())
    proxy = grid1_files.acquire_service(sid)
    calls = [proxy.ident(i) for i in range(200)]  # batches on the same connection meanwhile

    def worker() -> None:
        try:
            for _ in range(20):
                assert slot.control("info")["pid"] == slot.handle.process.pid  # type: ignore[union-attr]
                assert slot.control_future("ping").result(timeout=30) > 0
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and not any(t.is_alive() for t in threads)
    assert [r.get(timeout=30) for r in calls] == list(range(200))
    grid1_files.release_service(proxy)


def test_a_done_callback_may_make_control_calls(grid1_files: Grid) -> None:
    """A callback runs in the I/O loop's thread, which lands control answers: it serves the loop meanwhile."""
    slot = grid1_files.slots[0]
    sid = grid1_files.publish(Recorder())
    proxy = grid1_files.acquire_service(sid)
    seen: list[object] = []
    done = threading.Event()

    def callback(_: object) -> None:
        try:
            seen.append(slot.control("info")["pid"])
            seen.append(grid1_files.publish(Recorder("from a callback")))
        except BaseException as exc:  # noqa: BLE001 - reported below
            seen.append(exc)
        finally:
            done.set()

    proxy.ident(1).add_done_callback(callback)
    assert done.wait(60)
    assert seen[0] == slot.handle.process.pid, seen  # type: ignore[union-attr]
    assert isinstance(seen[1], str) and seen[1].startswith("Recorder-"), seen
    grid1_files.release_service(proxy)


def test_a_host_side_error_of_a_control_call_is_its_own_type(grid1_files: Grid) -> None:
    slot = grid1_files.slots[0]
    with pytest.raises(AttributeError, match="no control method 'nope'"):
        slot.control("nope")
    with pytest.raises(TypeError):
        slot.control("identify", 1, 2, 3)  # host must be a str
    with pytest.raises(TypeError, match="control call info"):
        slot.control("info", object())  # marshal cannot carry it: refused before anything is sent
    assert slot.control("ping") > 0  # the connection is still good


def test_a_control_call_broken_off_is_tried_again_on_the_new_connection(grid1_files: Grid) -> None:
    slot = grid1_files.slots[0]
    for _ in range(5):
        slot.cut_connections()
        assert slot.control("info")["pid"] == slot.handle.process.pid  # type: ignore[union-attr]
        slot.cut_connections()
        assert slot.control_future("info").result(timeout=30)["pid"] == slot.handle.process.pid  # type: ignore[union-attr]
    assert not slot.lost.is_set()


def test_control_call_timeout_is_honoured(grid1_files: Grid) -> None:
    """A control call on a stopped daemon ends within its timeout, on the slot and on a channel of its own."""
    slot = grid1_files.slots[0]
    channel = ControlChannel(address_of(slot.uri), slot.secret, 5.0, slot.daemon_id)
    pid = slot.handle.process.pid  # type: ignore[union-attr]
    os.kill(pid, signal.SIGSTOP)
    try:
        assert wait_until(lambda: psutil.Process(pid).status() == psutil.STATUS_STOPPED, 10)
        t0 = time.monotonic()
        with pytest.raises(ConnectionBroken):
            channel.call("ping", timeout=1.0)
        with pytest.raises(HostLostError, match="no answer within 1 s"):
            slot.control("ping", timeout=1.0)
        assert time.monotonic() - t0 < 10
    finally:
        os.kill(pid, signal.SIGCONT)
        channel.close()
    assert slot.control("ping") > 0


def test_private_library_names_appear_only_in_their_fence() -> None:
    """Underscored Pyro5 names live only in nameserver.py's helper; concurrent.futures' privates nowhere."""
    import re

    import isdgrid

    private = re.compile(r"\b_pyro\w*|\bconcurrent\.futures\._\w+|\brecv_stub\b|\b_header_size\b")
    root = Path(isdgrid.__file__).parent
    found = {}
    for path in sorted(root.rglob("*.py")):
        names = set(private.findall(path.read_text()))
        if names:
            found[str(path.relative_to(root))] = sorted(names)
    assert found == {"nameserver.py": ["_pyroTimeout"]}, found
