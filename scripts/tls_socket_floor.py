"""What averaging over TLS costs without gRPC: a floor for the peer-to-peer path on this host.

Each of N processes holds a float32 tensor of ``--size`` bytes and averages it with the others
twice per repeat, timed the same way: with plain ``torch.distributed`` gloo ``all_reduce``, and
with the reduce-scatter and all-gather that the peer-to-peer path runs, over one TLS 1.3
connection per pair of processes (Python's ``ssl``, AES-GCM; blocking sockets, a thread per
direction, every byte read straight into its place). No gRPC, no framing, no deadlines, no
failure handling: what any TLS transport would still pay on these cores (encryption both
ways, the kernel's copies). Prints each repeat's times, the slowest process's, and their ratio.

    .venv/bin/python scripts/tls_socket_floor.py --peers 4 --size 100MB --repeats 5
"""

from __future__ import annotations

import argparse
import os
import socket
import ssl
import tempfile
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gossamer.net.tls import TLS_SERVER_NAME, TlsCertificate


def _write_certificate(folder: Path) -> None:
    """The peers' own kind of certificate (a fresh ECDSA P-256 key, self-signed)."""
    certificate = TlsCertificate.generate(valid_days=1)
    (folder / "key.pem").write_bytes(certificate.key_pem)
    (folder / "cert.pem").write_bytes(certificate.cert_pem)


def _receive_into(connection: ssl.SSLSocket, view: memoryview) -> None:
    got = 0
    while got < len(view):
        n = connection.recv_into(view[got:])
        if n == 0:
            raise ConnectionError("the other process closed its connection mid-transfer")
        got += n


def _bytes_of(tensor: torch.Tensor) -> memoryview:
    return tensor.numpy().data.cast("B")


def _connect(rank: int, world: int, folder: Path) -> dict[int, ssl.SSLSocket]:
    """One TLS connection to every other process: each dials those after it (the ports are
    exchanged through gloo), and says who it is in its first 4 bytes."""
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(folder / "cert.pem", folder / "key.pem")
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.load_verify_locations(folder / "cert.pem")
    listener = socket.create_server(("127.0.0.1", 0))
    ports = torch.zeros(world, dtype=torch.int64)
    ports[rank] = listener.getsockname()[1]
    dist.all_reduce(ports)
    connections: dict[int, ssl.SSLSocket] = {}

    def accept() -> None:
        for _ in range(rank):
            raw, _ = listener.accept()
            connection = server.wrap_socket(raw, server_side=True)
            connections[int.from_bytes(connection.recv(4), "big")] = connection

    accepting = threading.Thread(target=accept)
    accepting.start()
    for other in range(rank + 1, world):
        raw = socket.create_connection(("127.0.0.1", int(ports[other])))
        connection = client.wrap_socket(raw, server_hostname=TLS_SERVER_NAME)
        connection.sendall(rank.to_bytes(4, "big"))
        connections[other] = connection
    accepting.join()
    listener.close()
    for connection in connections.values():
        connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return connections


def _exchange(
    connections: dict[int, ssl.SSLSocket],
    sends: dict[int, memoryview],
    receives: dict[int, memoryview],
) -> None:
    """Every send and every receive at once, a thread each."""
    threads = [
        threading.Thread(target=connections[o].sendall, args=(view,)) for o, view in sends.items()
    ]
    threads += [
        threading.Thread(target=_receive_into, args=(connections[o], view))
        for o, view in receives.items()
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def _worker(
    rank: int,
    world: int,
    numel: int,
    repeats: int,
    folder: str,
    out: mp.Queue[tuple[int, list[tuple[float, float, float]]]],
) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{folder}/store", rank=rank, world_size=world
    )
    connections = _connect(rank, world, Path(folder))
    values = torch.randn(numel, generator=torch.Generator().manual_seed(rank))
    bounds = [numel * i // world for i in range(world + 1)]
    lo, hi = bounds[rank], bounds[rank + 1]
    result = torch.empty(numel)
    contributions = {o: torch.empty(hi - lo) for o in connections}
    rows = []
    for _ in range(repeats):
        reference = values.clone()
        dist.barrier()
        started = time.perf_counter()
        dist.all_reduce(reference)
        reference /= world
        gloo_s = time.perf_counter() - started
        dist.barrier()
        started = time.perf_counter()
        # reduce-scatter: each part's values to its owner; then the owner's average to all
        _exchange(
            connections,
            {o: _bytes_of(values[bounds[o] : bounds[o + 1]]) for o in connections},
            {o: _bytes_of(contributions[o]) for o in connections},
        )
        mine = result[lo:hi]
        mine.copy_(values[lo:hi])
        for contribution in contributions.values():
            mine += contribution
        mine /= world
        _exchange(
            connections,
            {o: _bytes_of(mine) for o in connections},
            {o: _bytes_of(result[bounds[o] : bounds[o + 1]]) for o in connections},
        )
        tls_s = time.perf_counter() - started
        rows.append((gloo_s, tls_s, float((result - reference).abs().max())))
    out.put((rank, rows))
    dist.barrier()
    for connection in connections.values():
        connection.close()
    dist.destroy_process_group()


def _size_bytes(text: str) -> int:
    units = {"GB": 10**9, "MB": 10**6, "KB": 10**3, "B": 1}
    for unit, scale in units.items():
        if text.upper().endswith(unit):
            return int(float(text[: -len(unit)]) * scale)
    return int(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers", type=int, default=4)
    parser.add_argument("--size", default="100MB", help="tensor bytes (float32), e.g. 100MB")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    numel = _size_bytes(args.size) // 4
    with tempfile.TemporaryDirectory() as folder:
        _write_certificate(Path(folder))
        context = mp.get_context("spawn")
        out: mp.Queue[tuple[int, list[tuple[float, float, float]]]] = context.Queue()
        workers = [
            context.Process(target=_worker, args=(r, args.peers, numel, args.repeats, folder, out))
            for r in range(args.peers)
        ]
        for worker in workers:
            worker.start()
        rows = dict(out.get(timeout=600) for _ in workers)
        for worker in workers:
            worker.join(timeout=60)
    print(f"{args.peers} processes, {numel * 4 / 1e6:.0f} MB float32, on {os.cpu_count()} cores")
    for repeat in range(args.repeats):
        gloo_s = max(rows[r][repeat][0] for r in rows)
        tls_s = max(rows[r][repeat][1] for r in rows)
        error = max(rows[r][repeat][2] for r in rows)
        print(
            f"repeat {repeat}: gloo {gloo_s:.3f} s, TLS sockets {tls_s:.3f} s "
            f"({tls_s / gloo_s:.2f}x gloo's time), max |difference| {error:.1e}"
        )


if __name__ == "__main__":
    main()
