"""Cold start of the service: seconds from ``python -m service`` to the first 200 of ``/readyz``.

Question: how long does a new process (a new container, a scaled-out replica) take before it can
serve, and what does a fresh ``import service`` load? Target (issue 14): within 10 s on this 2-core
machine; before the kernels were built at install it took 108 s (compiling them at first use).

Each run starts a fresh interpreter with an empty ``TORCH_EXTENSIONS_DIR`` (so nothing built at run
time could be reused) and is stopped after it answers; the median and the spread are printed, with
the import time and module count of ``import service.app`` alone.

Example::

    python -m bench.service_cold_start --model exports/tt --runs 5
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
IMPORT_REPORT = (
    "import sys, time; t = time.perf_counter(); import service.app, service.__main__; "
    "import json; print(json.dumps({'seconds': time.perf_counter() - t, 'modules': sorted(sys.modules)}))"
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def time_to_ready(model: Path, timeout: float = 300) -> float:
    """One cold start: process start -> ``/readyz`` answers 200 (seconds)."""
    port = _free_port()
    with tempfile.TemporaryDirectory() as extensions:
        env = {**os.environ, "PYTHONPATH": str(REPO), "TORCH_EXTENSIONS_DIR": extensions}
        cmd = [sys.executable, "-m", "service", "--model", str(model), "--port", str(port), "--log-level", "warning"]
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            while time.perf_counter() - start < timeout:
                if proc.poll() is not None:
                    raise RuntimeError(f"the service exited with {proc.returncode}")
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as answer:
                        if answer.status == 200:
                            return time.perf_counter() - start
                except OSError:
                    time.sleep(0.05)
            raise TimeoutError(f"not ready in {timeout} s")
        finally:
            proc.terminate()
            proc.wait(timeout=30)
            if any(Path(extensions).iterdir()):
                raise RuntimeError(f"something was compiled at run time into {extensions}")


def import_report() -> dict:
    out = subprocess.run(
        [sys.executable, "-c", IMPORT_REPORT], cwd=REPO, capture_output=True, text=True, check=True, timeout=120
    )
    return json.loads(out.stdout)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, required=True, help="export directory (pipelines.export)")
    p.add_argument("--runs", type=int, default=5, help="cold starts to time (the median is reported)")
    args = p.parse_args(argv)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {sys.version.split()[0]}")
    report = import_report()
    ours = [m for m in report["modules"] if m.split(".")[0] in ("service", "recsys", "kernels", "pipelines")]
    print(f"import service.app + service.__main__: {report['seconds']:.2f} s, {len(report['modules'])} modules")
    print(f"project modules loaded ({len(ours)}): {', '.join(ours)}")
    times = [time_to_ready(args.model) for _ in range(args.runs)]
    print(
        f"python -m service -> /readyz 200: median {statistics.median(times):.2f} s "
        f"(min {min(times):.2f}, max {max(times):.2f}, {args.runs} cold starts; target 10 s)"
    )


if __name__ == "__main__":
    main()
