"""HTTP load from a separate process: `wrk` with `lua/ingest.lua`, else an httpx fallback.

Both send the same requests (see `scenarios.py`) over `connections` keep-alive
connections for `duration` seconds and report requests, latency percentiles and errors
in the same shape. The fallback runs as `python -m bench.loadgen …` in its own process.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from bench.scenarios import Scenario, request_number
from bench.stats import percentile

LUA = Path(__file__).resolve().parent / "lua" / "ingest.lua"
TAG = "BENCH_JSON "


@dataclass
class LoadResult:
    requests: int
    seconds: float
    p50_ms: float | None
    p99_ms: float | None
    errors: dict[str, int]
    tool: str

    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    @property
    def failed(self) -> int:
        return sum(self.errors.values())


def write_request_file(scenario: Scenario, path: Path) -> Path:
    """The length-prefixed file `ingest.lua` reads: path, headers, body parts."""

    def block(text: str) -> bytes:
        data = text.encode()
        return str(len(data)).encode() + b"\n" + data

    out = [block(scenario.path), f"{len(scenario.headers)}\n".encode()]
    for name, value in scenario.headers.items():
        out += [block(name), block(value)]
    out.append(f"{len(scenario.parts)}\n".encode())
    out += [block(p) for p in scenario.parts]
    path.write_bytes(b"".join(out))
    return path


def _parse(output: str, tool: str) -> LoadResult:
    for line in output.splitlines():
        if line.startswith(TAG):
            raw = orjson.loads(line[len(TAG) :])
            return LoadResult(
                requests=int(raw["requests"]),
                seconds=raw["duration_us"] / 1e6,
                p50_ms=raw["p50_us"] / 1000 if raw.get("p50_us") is not None else None,
                p99_ms=raw["p99_us"] / 1000 if raw.get("p99_us") is not None else None,
                errors={k: int(v) for k, v in raw["errors"].items()},
                tool=tool,
            )
    raise RuntimeError(f"{tool} printed no result:\n{output[-2000:]}")


def run(
    wrk: str | None,
    base_url: str,
    scenario: Scenario,
    workdir: Path,
    *,
    salt: int,
    duration: float,
    connections: int,
    path: str | None = None,
) -> LoadResult:
    """One load run against `base_url` (+ `path`, default the scenario's)."""
    if path is not None:
        scenario = Scenario.from_json({**scenario.to_json(), "path": path})
    if wrk is not None:
        request_file = write_request_file(scenario, workdir / f"{scenario.name}.wrkreq")
        threads = 2
        args = [
            wrk,
            "-t",
            str(threads),
            "-c",
            str(max(connections, threads)),
            "-d",
            f"{max(1, round(duration))}s",
            "--timeout",
            "30s",
            "-s",
            str(LUA),
            base_url,
            "--",
            str(request_file),
            str(salt),
            scenario.secret or "-",
        ]
        done = subprocess.run(args, capture_output=True, text=True, timeout=duration + 120)
        return _parse(done.stdout + done.stderr, "wrk")
    scenario_file = scenario.save(workdir / f"{scenario.name}.scenario.json")
    args = [
        sys.executable,
        "-m",
        "bench.loadgen",
        "--url",
        base_url,
        "--scenario",
        str(scenario_file),
        "--salt",
        str(salt),
        "--duration",
        str(duration),
        "--connections",
        str(connections),
    ]
    done = subprocess.run(args, capture_output=True, text=True, timeout=duration + 120)
    return _parse(done.stdout + done.stderr, "httpx")


async def _httpx_load(
    url: str, scenario: Scenario, salt: int, duration: float, connections: int
) -> dict[str, Any]:
    import httpx

    latencies: list[float] = []
    errors = {"connect": 0, "read": 0, "write": 0, "status": 0, "timeout": 0}
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    deadline = time.perf_counter() + duration

    async def worker(thread: int, client: httpx.AsyncClient) -> None:
        counter = 0
        while time.perf_counter() < deadline:
            counter += 1
            n = request_number(salt, thread, counter)
            body = scenario.body(n)
            started = time.perf_counter()
            try:
                r = await client.post(
                    url + scenario.path, content=body, headers=scenario.request_headers(body, n)
                )
            except httpx.TimeoutException:
                errors["timeout"] += 1
                continue
            except httpx.ConnectError:
                errors["connect"] += 1
                continue
            except httpx.TransportError:
                errors["read"] += 1
                continue
            latencies.append(time.perf_counter() - started)
            if r.status_code >= 400:
                errors["status"] += 1

    started = time.perf_counter()
    async with httpx.AsyncClient(limits=limits, timeout=30) as client:
        await asyncio.gather(*(worker(i, client) for i in range(connections)))
    elapsed = time.perf_counter() - started
    return {
        "requests": len(latencies),
        "duration_us": int(elapsed * 1e6),
        "bytes": 0,
        "p50_us": int((percentile(latencies, 50) or 0) * 1e6),
        "p90_us": int((percentile(latencies, 90) or 0) * 1e6),
        "p99_us": int((percentile(latencies, 99) or 0) * 1e6),
        "max_us": int(max(latencies, default=0) * 1e6),
        "errors": errors,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description="httpx load generator (wrk's stand-in)")
    parser.add_argument("--url", required=True)
    parser.add_argument("--scenario", required=True, type=Path)
    parser.add_argument("--salt", type=int, required=True)
    parser.add_argument("--duration", type=float, required=True)
    parser.add_argument("--connections", type=int, default=64)
    args = parser.parse_args()
    scenario = Scenario.load(args.scenario)
    result = asyncio.run(
        _httpx_load(args.url, scenario, args.salt, args.duration, args.connections)
    )
    sys.stdout.write(TAG + orjson.dumps(result).decode() + "\n")


if __name__ == "__main__":
    main()
