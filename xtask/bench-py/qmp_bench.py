"""Peer driver for `cargo xtask bench qmp`: query-status round trips through qemu.qmp.

Usage: python qmp_bench.py QMP_SOCKET SEQ STREAM BLOCKS

Connects to a running QEMU (a QMP monitor of its own; xtask starts the QEMU) and prints
JSON lines like the Rust driver:
- qmp-py-seq: SEQ sequential round trips (wall per command), cpu_ns = [user+sys CPU per
  command over the batch, from resource.getrusage(RUSAGE_SELF)];
- qmp-py-8: BLOCKS blocks of STREAM commands from 8 coroutines sharing the client (8 in
  flight): wall and CPU per command, one sample per block.
"""
import asyncio
import json
import resource
import sys
import time

from qemu.qmp import QMPClient

IN_FLIGHT = 8


def cpu_ns():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return int((r.ru_utime + r.ru_stime) * 1e9)


async def main():
    sock, seq, stream, blocks = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    qmp = QMPClient("bench")
    await qmp.connect(sock)
    for _ in range(50):
        await qmp.execute("query-status")

    wall = []
    c0 = cpu_ns()
    for _ in range(seq):
        t0 = time.perf_counter_ns()
        st = await qmp.execute("query-status")
        wall.append(time.perf_counter_ns() - t0)
        assert "running" in st
    cpu = (cpu_ns() - c0) // seq
    print(json.dumps({"label": "qmp-py-seq", "wall_ns": wall, "cpu_ns": [cpu]}))

    async def worker(k):
        for _ in range(k):
            await qmp.execute("query-status")

    walls, cpus = [], []
    for _ in range(blocks):
        c0 = cpu_ns()
        t0 = time.perf_counter_ns()
        await asyncio.gather(*(worker(stream // IN_FLIGHT + (1 if i < stream % IN_FLIGHT else 0))
                               for i in range(IN_FLIGHT)))
        walls.append((time.perf_counter_ns() - t0) // stream)
        cpus.append((cpu_ns() - c0) // stream)
    print(json.dumps({"label": "qmp-py-8", "wall_ns": walls, "cpu_ns": cpus}))
    await qmp.disconnect()


asyncio.run(main())
