"""Benchmark: what latentwire's protocol and ZeroMQ transport add to a request-reply, over a plain TCP
socket carrying the same bytes, on loopback.

Both servers run in a thread of this process and echo a payload back. The plain one reads a 4-byte
length and the bytes; latentwire's decodes the request as a handoff message (fp32, no zstd: the codec
is the protocol bench's business) and encodes the reply the same way, as the cloud does. The target:
the added fixed cost is at most 100 us per message. Round trips include both directions, so the
per-message cost is half the difference.
"""
import socket
import struct
import threading

import pytest
import torch
import zmq

from latentwire.protocol import decode_message, encode_message

SIZES = {"64 B": (16,), "64 KiB": (1, 4, 64, 64), "SDXL latent 256 KiB": (1, 4, 128, 128)}


def _plain_server(listener, stop):
    conn, _ = listener.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    with conn:
        while not stop.is_set():
            head = _read(conn, 4)
            if not head:
                return
            conn.sendall(head + _read(conn, struct.unpack("<I", head)[0]))


def _read(conn, n):
    buf = bytearray()
    while len(buf) < n:
        chunk = conn.recv(n - len(buf))
        if not chunk:
            return b""
        buf += chunk
    return bytes(buf)


def _zmq_server(endpoint, stop, ctx):
    sock = ctx.socket(zmq.ROUTER)
    sock.linger = 0
    sock.bind(endpoint)
    try:
        while not stop.is_set():
            if sock.poll(50):
                peer, rid, *frames = sock.recv_multipart(copy=False)
                msg = decode_message(frames)
                reply = encode_message(msg.tensors, msg.meta, codec="fp32", level=0)
                sock.send_multipart([peer, rid] + reply, copy=False)
    finally:
        sock.close()


@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("transport", ["plain tcp", "latentwire zmq"])
def test_round_trip(transport, size, benchmark, record):
    x = torch.randn(SIZES[size])
    stop = threading.Event()
    benchmark.group = f"round trip {size}"
    if transport == "plain tcp":
        listener = socket.create_server(("127.0.0.1", 0))
        server = threading.Thread(target=_plain_server, args=(listener, stop), daemon=True)
        server.start()
        client = socket.create_connection(listener.getsockname())
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        payload = x.numpy().tobytes()

        def round_trip():
            client.sendall(struct.pack("<I", len(payload)) + payload)
            head = _read(client, 4)
            return _read(client, struct.unpack("<I", head)[0])

        try:
            echoed = benchmark(round_trip)
            assert echoed == payload
        finally:
            stop.set()
            client.close()
            listener.close()
    else:
        ctx = zmq.Context()
        port_sock = socket.create_server(("127.0.0.1", 0))
        endpoint = f"tcp://127.0.0.1:{port_sock.getsockname()[1]}"
        port_sock.close()
        server = threading.Thread(target=_zmq_server, args=(endpoint, stop, ctx), daemon=True)
        server.start()
        dealer = ctx.socket(zmq.DEALER)
        dealer.linger = 0
        dealer.connect(endpoint)

        def round_trip():
            dealer.send_multipart([b"r"] + encode_message({"latent": x}, {"kind": "handoff", "step": 3},
                                                          codec="fp32", level=0), copy=False)
            if not dealer.poll(5000):
                raise TimeoutError("no reply within 5 s")
            return decode_message(dealer.recv_multipart(copy=False)[1:])

        try:
            echoed = benchmark(round_trip)
            assert torch.equal(echoed.tensors["latent"], x)
        finally:
            stop.set()
            server.join(timeout=5)
            dealer.close()
            ctx.term()
    record(x, baseline=transport == "plain tcp")
    benchmark.extra_info["median_us"] = round(benchmark.stats.stats.median * 1e6, 1)
