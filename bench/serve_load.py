"""Bounded load test of ``cxrvit serve`` on loopback: N requests, C at a time, real DICOMs.

Starts ``cxrvit serve --model RUN`` on a free 127.0.0.1 port (or uses --url), waits for /healthz,
sends exactly ``--requests`` uploads from ``--concurrency`` client threads (cycling through the
files given), then stops the server. Prints p50/p95/max latency, throughput and every non-200
answer; exit code 1 if any request failed or was lost, so it can gate a change.

    python bench/serve_load.py --model runs/sample/run ../shared/data/dicom/*.dcm
"""
from __future__ import annotations

import argparse
import os
import platform
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, port: int, max_pending: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "cxrvit", "serve", "--model", model, "--port", str(port),
           "--max-pending", str(max_pending)]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def wait_healthy(url: str, timeout: float = 120.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise SystemExit(f"server at {url} not healthy after {timeout:.0f} s")


def run_load(url: str, files: list[Path], n: int, concurrency: int, timeout: float) -> dict:
    payloads = [(f.name, f.read_bytes()) for f in files]
    lock = threading.Lock()
    next_index = [0]
    latencies: list[float] = []
    statuses: Counter = Counter()
    errors: list[str] = []

    def worker():
        with httpx.Client(timeout=timeout) as client:
            while True:
                with lock:
                    i = next_index[0]
                    if i >= n:
                        return
                    next_index[0] += 1
                name, data = payloads[i % len(payloads)]
                t0 = time.perf_counter()
                try:
                    r = client.post(url + "/api/predict", files={"file": (name, data)})
                    ok = r.status_code == 200 and "findings" in r.json()
                    status = r.status_code
                except (httpx.HTTPError, ValueError) as exc:
                    ok, status = False, type(exc).__name__
                dt = time.perf_counter() - t0
                with lock:
                    statuses[status] += 1
                    if ok:
                        latencies.append(dt)
                    else:
                        errors.append(f"request {i} ({name}): {status}")

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat = np.array(latencies) if latencies else np.zeros(1)
    return {"requests": n, "ok": len(latencies), "errors": errors, "statuses": dict(statuses), "wall_s": wall,
            "p50_s": float(np.percentile(lat, 50)), "p95_s": float(np.percentile(lat, 95)),
            "max_s": float(lat.max()), "throughput": len(latencies) / wall}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+", type=Path, help="files to upload, cycled")
    ap.add_argument("--model", help="bundle to serve (starts a server); or give --url")
    ap.add_argument("--url", help="an already running server, e.g. http://127.0.0.1:8000")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--timeout", type=float, default=300.0, help="per-request client timeout (s)")
    args = ap.parse_args()
    if not (args.model or args.url):
        ap.error("--model or --url")
    proc = None
    url = args.url
    if not url:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        # admit every client's request: the test measures queueing, not 503s
        proc = start_server(args.model, port, max_pending=max(16, args.concurrency))
    try:
        wait_healthy(url)
        res = run_load(url, args.files, args.requests, args.concurrency, args.timeout)
        served = httpx.get(url + "/healthz", timeout=5).json()
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(30)
    lost = res["requests"] - sum(res["statuses"].values())
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    print(f"files: {', '.join(f.name for f in args.files)}")
    print("| requests | concurrency | ok | errors | lost | p50 (s) | p95 (s) | max (s) | throughput (req/s) | wall (s) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    print(f"| {res['requests']} | {args.concurrency} | {res['ok']} | {len(res['errors'])} | {lost} | {res['p50_s']:.2f} "
          f"| {res['p95_s']:.2f} | {res['max_s']:.2f} | {res['throughput']:.2f} | {res['wall_s']:.1f} |")
    print(f"server counted {served['served']} served, {served['refused_busy']} refused busy")
    for e in res["errors"][:20]:
        print("  error:", e)
    return 0 if not res["errors"] and not lost else 1


if __name__ == "__main__":
    raise SystemExit(main())
