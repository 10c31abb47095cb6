"""Peer driver: time from spawning QEMU to the first query-status answer through qemu.qmp.

Usage: python qemu_start.py RUNS. Prints {"label": ..., "wall_ns": [...]} like the Rust drivers.
"""
import asyncio
import json
import subprocess
import sys
import tempfile
import time

from qemu.qmp import QMPClient


def qemu_args(sock):
    return ["qemu-system-x86_64", "-machine", "q35,accel=kvm", "-m", "128", "-nodefaults",
            "-no-user-config", "-display", "none", "-qmp", f"unix:{sock},server=on,wait=off"]


async def once():
    with tempfile.TemporaryDirectory() as d:
        sock = f"{d}/qmp.sock"
        t0 = time.perf_counter_ns()
        p = subprocess.Popen(qemu_args(sock), stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            while True:
                c = QMPClient("bench")
                try:
                    await c.connect(sock)
                    break
                except Exception:
                    if time.perf_counter_ns() - t0 > 30e9:
                        raise
                    await asyncio.sleep(0.001)
            await c.execute("query-status")
            dt = time.perf_counter_ns() - t0
            await c.disconnect()
            return dt
        finally:
            p.kill()
            p.wait()


async def main():
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 10
    wall = [await once() for _ in range(runs)]
    print(json.dumps({"label": "qemu.qmp: spawn QEMU -> query-status answered", "wall_ns": wall}))


asyncio.run(main())
