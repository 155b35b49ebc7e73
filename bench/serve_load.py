"""Load test on loopback: our service vs LitServe serving the same export, in the same run.

Question: how many requests/s, and what p50 / p99 latency, does ``python -m service`` give at
concurrency 1, 8 and 32 for ``/v1/score`` (batch 1 and 64) and ``/v1/rank`` (100 candidates),
next to LitServe (``litserve.LitServer``, its own batching) serving the same exported model
with the same preprocessing? Target: p99 < 10 ms for a 100-candidate rank at concurrency 8.

The client is a few lines of asyncio over raw HTTP/1.1 keep-alive connections with the request
bytes built in advance, so it takes as little of the machine's CPU as a Python client can.

Example::

    python -m bench.serve_load --model exports/dlrm --duration 5
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import litserve as ls
import numpy as np
import uvloop

REPO = Path(__file__).resolve().parents[1]
SCENARIOS = {"score1": ("/v1/score", 1), "score64": ("/v1/score", 64), "rank100": ("/v1/rank", 100)}


# -- payloads ---------------------------------------------------------------------------------
def _row(rng: np.random.Generator) -> dict:
    dense = [None if rng.random() < 0.15 else int(rng.integers(0, 5000)) for _ in range(13)]
    sparse = [None if rng.random() < 0.1 else f"{int(rng.integers(0, 5000)):x}" for _ in range(26)]
    return {"dense": dense, "sparse": sparse}


def payload(scenario: str, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    path, n = SCENARIOS[scenario]
    if path == "/v1/score":
        return json.dumps({"rows": [_row(rng) for _ in range(n)]}).encode()
    candidates = [
        {"id": f"item-{i}", "sparse": {c: f"{int(rng.integers(0, 5000)):x}" for c in ("C3", "C4", "C12", "C16")}}
        for i in range(n)
    ]
    return json.dumps({"context": _row(rng), "candidates": candidates, "top_k": 10}).encode()


# -- client -----------------------------------------------------------------------------------
async def _connection(host: str, port: int, request: bytes, until: float, warm_until: float, out: list, errors: list):
    reader, writer = await asyncio.open_connection(host, port)
    try:
        while True:
            start = time.perf_counter()
            if start >= until:
                return
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head.split(b" ", 2)[1])
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            await reader.readexactly(length)
            end = time.perf_counter()
            if status != 200:
                errors.append(status)
            elif start >= warm_until:
                out.append(end - start)
    finally:
        writer.close()


def run_client(coroutine):
    """Run the load client on uvloop: on the two cores the servers use, a cheaper client loop takes less from them
    and is late less often (with asyncio's own loop, the slowest 1% of the overload's requests were due over
    100 ms before the client got to send them). The same client for every server measured."""
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coroutine)


async def load(host: str, port: int, path: str, body: bytes, concurrency: int, seconds: float, warmup: float):
    request = (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    now = time.perf_counter()
    latencies: list[float] = []
    errors: list[int] = []
    await asyncio.gather(
        *(
            _connection(host, port, request, now + warmup + seconds, now + warmup, latencies, errors)
            for _ in range(concurrency)
        )
    )
    lat = np.array(latencies) * 1000
    return {
        "rps": len(lat) / seconds,
        "p50": float(np.percentile(lat, 50)) if len(lat) else float("nan"),
        "p99": float(np.percentile(lat, 99)) if len(lat) else float("nan"),
        "errors": len(errors),
    }


async def open_loop(
    host: str,
    port: int,
    path: str,
    body: bytes,
    rate: float,
    seconds: float,
    warmup: float = 0.0,
    max_connections: int = 512,
) -> dict:
    """Offer ``rate`` requests/s for ``warmup + seconds`` whatever the answers take (an open loop, as real traffic).

    Each request is due at a fixed time and takes an idle keep-alive connection or opens one (at most
    ``max_connections``); its latency counts from when it was due, so time spent waiting for a connection
    is charged to the server (no coordinated omission). Only requests due after ``warmup`` count, as in
    the closed loop: the first ones all find no open connection, and the burst of a few hundred TCP
    handshakes (40-60 ms each here) is a cold start, not the overload. Returns the accepted (200)
    requests' p50 / p99, the share answered 503, and every other outcome (other statuses, resets, timeouts).
    """
    request = (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    idle: list = []
    slots = asyncio.Semaphore(max_connections)
    accepted: list[float] = []
    refused, counted_requests, other = 0, 0, []

    async def one(due: float) -> None:
        nonlocal refused, counted_requests
        counted = due >= measured_from
        counted_requests += counted
        await asyncio.sleep(max(0.0, due - time.perf_counter()))
        async with slots:
            connection = idle.pop() if idle else await asyncio.open_connection(host, port)
            reader, writer = connection
            try:
                writer.write(request)
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
                length = next(
                    int(line.split(b":", 1)[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                )
                await reader.readexactly(length)
            except (OSError, asyncio.IncompleteReadError, TimeoutError) as exc:
                if counted:
                    other.append(type(exc).__name__)
                writer.close()
                return
            status = int(head.split(b" ", 2)[1])
            idle.append(connection)
        if not counted:
            return
        if status == 200:
            accepted.append(time.perf_counter() - due)
        elif status == 503:
            refused += 1
        else:
            other.append(status)

    start = time.perf_counter() + 0.05
    measured_from = start + warmup
    await asyncio.gather(*(one(start + k / rate) for k in range(int(rate * (warmup + seconds)))))
    for _, writer in idle:
        writer.close()
    lat = np.array(accepted) * 1000
    return {
        "offered_rps": rate,
        "accepted_rps": len(lat) / seconds,
        "p50": float(np.percentile(lat, 50)) if len(lat) else float("nan"),
        "p99": float(np.percentile(lat, 99)) if len(lat) else float("nan"),
        "refused_share": refused / counted_requests if counted_requests else 0.0,
        "other": len(other),
        "other_kinds": sorted({str(o) for o in other}),
    }


# -- LitServe serving the same export ------------------------------------------------------------
class _LitBase(ls.LitAPI):
    """The same validation (service.schemas), encoding and model as our service; LitServe batches."""

    def __init__(self, model_dir: Path, **kwargs) -> None:
        super().__init__(**kwargs)
        self.model_dir = model_dir

    def setup(self, device) -> None:
        import torch

        from recsys.serving import load_exported

        torch.set_num_threads(1)
        self.model = load_exported(self.model_dir)

    def batch(self, inputs):
        return inputs

    def unbatch(self, output):
        return output

    def predict(self, batch):
        dense = np.concatenate([b[0] for b in batch])
        ids = np.concatenate([b[1] for b in batch])
        scores = self.model.predict(dense, ids)
        out, start = [], 0
        for b in batch:
            out.append((scores[start : start + len(b[0])], b[2]))
            start += len(b[0])
        return out


class LitScoreAPI(_LitBase):
    def decode_request(self, request):
        from service.schemas import ScoreRequest

        body = ScoreRequest.model_validate(request)
        dense, ids = self.model.encoder.encode([r.dense for r in body.rows], [r.sparse for r in body.rows])
        return dense, ids, None

    def encode_response(self, output):
        return {"scores": output[0].tolist(), "model": self.model.version}


class LitRankAPI(_LitBase):
    def decode_request(self, request):
        from service.schemas import RankRequest

        body = RankRequest.model_validate(request)
        dense = [{int(k[1:]) - 1: v for k, v in c.dense.items()} for c in body.candidates]
        sparse = [{int(k[1:]) - 1: v for k, v in c.sparse.items()} for c in body.candidates]
        encoded = self.model.encoder.encode_variants(body.context.dense, body.context.sparse, dense, sparse)
        return encoded[0], encoded[1], (body.candidates, body.top_k)

    def encode_response(self, output):
        scores, (candidates, top_k) = output
        order = np.argsort(-scores, kind="stable")[: top_k or len(scores)]
        return {
            "items": [{"id": candidates[i].id, "score": float(scores[i]), "index": int(i)} for i in order],
            "model": self.model.version,
        }


def run_litserve(model_dir: Path, port: int, max_batch: int, batch_timeout: float, workers: int = 1) -> None:
    """LitServe with two APIs (/v1/score, /v1/rank) over the same export; ``workers`` inference workers."""
    apis = [
        LitScoreAPI(model_dir, api_path="/v1/score", max_batch_size=max_batch, batch_timeout=batch_timeout),
        LitRankAPI(model_dir, api_path="/v1/rank", max_batch_size=max_batch, batch_timeout=batch_timeout),
    ]
    server = ls.LitServer(apis, accelerator="cpu", workers_per_device=workers, timeout=30)
    server.run(host="127.0.0.1", port=port, num_api_servers=1, generate_client_file=False, log_level="warning")


# -- orchestration ------------------------------------------------------------------------------
def _wait_ready(url: str, proc: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"{url} not ready")


def parse_server(kind: str) -> tuple[str, int]:
    """``ours`` / ``litserve``, optionally ``-wN`` (N processes / inference workers): (name, N)."""
    name, _, workers = kind.partition("-w")
    if name not in ("ours", "litserve") or (workers and not workers.isdigit()):
        raise ValueError(f"--servers: {kind!r} is not ours, litserve, ours-wN or litserve-wN")
    return name, int(workers or 1)


def start_server(kind: str, model: Path, port: int, args: argparse.Namespace) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    name, workers = parse_server(kind)
    if name == "ours":
        cmd = [sys.executable, "-m", "service", "--model", str(model), "--port", str(port)]
        cmd += ["--max-wait-ms", str(args.max_wait_ms), "--log-level", "warning", "--workers", str(workers)]
        ready = f"http://127.0.0.1:{port}/readyz"
    else:
        cmd = [sys.executable, "-m", "bench.serve_load", "--litserve-server", "--model", str(model)]
        cmd += ["--port", str(port), "--litserve-max-batch", str(args.litserve_max_batch)]
        cmd += ["--litserve-batch-timeout", str(args.litserve_batch_timeout), "--litserve-workers", str(workers)]
        ready = f"http://127.0.0.1:{port}/health"
    # its own session: LitServe's API server and inference workers are children that must end with it
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        _wait_ready(ready, proc)
    except BaseException:
        stop_server(proc)
        raise
    return proc


def stop_server(proc: subprocess.Popen) -> None:
    """End the server and every process it started (its process group), so none keeps a core busy."""
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=wait)
            time.sleep(0.5)  # the children get the signal too; let them go before the next server
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            return
        except subprocess.TimeoutExpired:
            continue


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.serve_load",
        description="Loopback load test of `python -m service` next to LitServe serving the same export: "
        "requests/s, p50 and p99 latency per endpoint and concurrency.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", type=Path, required=True, help="export directory (pipelines.export)")
    p.add_argument("--duration", type=float, default=5.0, help="measured seconds per point")
    p.add_argument(
        "--warmup",
        type=float,
        default=1.0,
        help="unmeasured seconds before each point (the open loop of --overload too)",
    )
    p.add_argument("--concurrency", default="1,8,32", help="comma-separated numbers of concurrent connections")
    p.add_argument("--scenarios", default=",".join(SCENARIOS), help=f"comma-separated, of {list(SCENARIOS)}")
    p.add_argument(
        "--servers",
        default="ours,litserve,ours-w2,litserve-w2",
        help="comma-separated: ours, litserve; -wN: N server processes (ours) / inference workers (LitServe)",
    )
    p.add_argument("--port", type=int, default=18100, help="first port used (ours; LitServe gets port+1)")
    p.add_argument("--max-wait-ms", type=float, default=0.0, help="our service's --max-wait-ms")
    p.add_argument("--litserve-max-batch", type=int, default=32, help="LitServe max_batch_size")
    p.add_argument("--litserve-batch-timeout", type=float, default=0.001, help="LitServe batch_timeout (seconds)")
    p.add_argument("--litserve-workers", type=int, default=1, help="(internal) LitServe inference workers")
    p.add_argument(
        "--overload",
        action="store_true",
        help="also offer our servers twice their sustainable rank100 load (open loop) and report p50/p99 of the "
        "accepted requests and the share answered 503",
    )
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument("--litserve-server", action="store_true", help="(internal) run the LitServe server and block")
    return p


def main(argv: list[str] | None = None) -> list[dict]:
    args = build_parser().parse_args(argv)
    if args.litserve_server:
        run_litserve(args.model, args.port, args.litserve_max_batch, args.litserve_batch_timeout, args.litserve_workers)
        return []
    results = []
    servers = args.servers.split(",")
    for kind in servers:
        parse_server(kind)
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())} on {os.cpu_count()} cores", flush=True)
    for offset, kind in enumerate(servers):
        port = args.port + offset
        proc = start_server(kind, args.model, port, args)
        try:
            for scenario in args.scenarios.split(","):
                path, _ = SCENARIOS[scenario]
                body = payload(scenario)
                for c in (int(x) for x in args.concurrency.split(",")):
                    r = run_client(load("127.0.0.1", port, path, body, c, args.duration, args.warmup))
                    r["load1"] = os.getloadavg()[0]
                    results.append({"server": kind, "scenario": scenario, "concurrency": c, **r})
                    print(
                        f"{kind:12s} {scenario:8s} c={c:<3d} {r['rps']:8.1f} req/s  p50 {r['p50']:7.2f} ms  "
                        f"p99 {r['p99']:7.2f} ms  errors {r['errors']}  load {r['load1']:.2f}",
                        flush=True,
                    )
            if args.overload and kind.startswith("ours"):
                results.append(_overload(kind, port, args))
        finally:
            stop_server(proc)
    _report(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return results


def _overload(kind: str, port: int, args: argparse.Namespace) -> dict:
    """Twice the sustainable rank100 load: the closed-loop throughput at concurrency 8, then 2x offered open-loop."""
    path, _ = SCENARIOS["rank100"]
    body = payload("rank100")
    sustainable = run_client(load("127.0.0.1", port, path, body, 8, args.duration, args.warmup))["rps"]
    r = run_client(open_loop("127.0.0.1", port, path, body, 2 * sustainable, args.duration, args.warmup))
    r |= {"server": kind, "scenario": "rank100-overload", "sustainable_rps": sustainable, "load1": os.getloadavg()[0]}
    print(
        f"{kind:12s} rank100 at 2x ({r['offered_rps']:.0f} req/s offered, sustainable {sustainable:.0f}): accepted "
        f"{r['accepted_rps']:.0f} req/s, p50 {r['p50']:.2f} ms, p99 {r['p99']:.2f} ms, 503 {r['refused_share']:.1%}, "
        f"other {r['other']} {r['other_kinds']}",
        flush=True,
    )
    return r


def _report(results: list[dict]) -> None:
    """One table per worker count: ours-wN next to litserve-wN (ratio = our requests/s over LitServe's)."""
    overload = [r for r in results if r["scenario"] == "rank100-overload"]
    results = [r for r in results if r["scenario"] != "rank100-overload"]
    by = {(r["server"], r["scenario"], r["concurrency"]): r for r in results}
    print(
        "\n| endpoint | conc. | procs | ours req/s | ours p50 / p99 ms | LitServe req/s | LitServe p50 / p99 ms "
        "| ratio | load avg |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for (server, scenario, c), r in by.items():
        name, workers = parse_server(server)
        if name != "ours":
            continue
        other = by.get(("litserve" if workers == 1 else f"litserve-w{workers}", scenario, c))
        lit = f"{other['rps']:.0f} | {other['p50']:.2f} / {other['p99']:.2f}" if other else "- | -"
        ratio = f"{r['rps'] / other['rps']:.2f}x" if other and other["rps"] else "-"
        load = f"{r['load1']:.1f}" + (f" / {other['load1']:.1f}" if other else "")
        print(
            f"| {scenario} | {c} | {workers} | {r['rps']:.0f} | {r['p50']:.2f} / {r['p99']:.2f} | {lit} | {ratio} "
            f"| {load} |"
        )
    if overload:
        print(
            "\n| server | sustainable req/s | offered req/s | accepted req/s | p50 / p99 ms (accepted) | 503 | other |"
        )
        print("|---|---|---|---|---|---|---|")
        for r in overload:
            print(
                f"| {r['server']} | {r['sustainable_rps']:.0f} | {r['offered_rps']:.0f} | {r['accepted_rps']:.0f} "
                f"| {r['p50']:.2f} / {r['p99']:.2f} | {r['refused_share']:.1%} | {r['other']} |"
            )
    for server in dict.fromkeys(r["server"] for r in results):
        rank8 = by.get((server, "rank100", 8))
        if rank8:
            verdict = "met" if rank8["p99"] < 10 else "NOT met"
            print(f"{server}: rank of 100 candidates at concurrency 8: p99 {rank8['p99']:.2f} ms (< 10 ms: {verdict})")


if __name__ == "__main__":
    main()
