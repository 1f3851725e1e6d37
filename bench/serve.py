"""Load benchmark: open-loop Poisson load over HTTP, one run per server setting of a sweep.

For each value of the swept setting (the step token budget `--max-num-batched-tokens`, or
`--max-num-seqs`) a `lorafleet engine` subprocess starts on a free 127.0.0.1 port and serves
random rank-16 adapters from a local S3 server (`weed mini`, loopback), or the benchmark drives
an already running server (`--url`, one setting). Requests arrive as a seeded Poisson process of
rate R for S seconds, whatever happens to earlier ones (open loop), with at most C in flight;
each names an adapter drawn with Zipf popularity and streams a greedy chat completion. Latencies
count from the scheduled arrival, so time spent waiting for one of the C connections is latency
too. Before timing, one untimed request per adapter of the schedule loads it into the server's
memory. Every run is bounded: arrivals stop after S seconds and each request after its timeout.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from matplotlib.figure import Figure

from .lora_adapters import adapter_id, zipf_choices
from .report import write_json
from .stats import percentile
from .workload import Messages, default_prompts_path, load_messages

log = logging.getLogger(__name__)

SWEEPS = {"max-num-batched-tokens": (64, 128, 256, 512), "max-num-seqs": (4, 16, 64, 128)}
PROMPT_POOL = 512  # requests cycle through the first prompts of the workload, at most this many
START_TIMEOUT_S = 300.0  # model load and adapter registry; the built-in model takes ~10 s
RESULT_KEYS = ("tok_s", "ttft_p50_s", "ttft_p99_s", "tpot_p50_s", "tpot_p99_s", "errors", "requests")


@dataclass(frozen=True)
class ServeBenchConfig:
    concurrency: int = 64  # requests in flight at most (client connections)
    duration_s: float = 60.0  # arrivals stop after this
    adapters: int = 8  # Zipf over this many adapters; 0: base model only
    rate: float = 4.0  # mean arrivals per second
    max_tokens: int = 128
    sweep: str = "max-num-batched-tokens"
    values: tuple[int, ...] = SWEEPS["max-num-batched-tokens"]
    url: str | None = None  # drive this server instead of starting one per setting
    model: Path | None = None  # for started servers; None: the built-in model
    rank: int = 16
    max_loras: int = 8
    zipf_exponent: float = 1.0
    request_timeout_s: float = 120.0
    prompts_path: Path | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.concurrency < 1 or self.duration_s <= 0 or self.rate <= 0 or self.max_tokens < 1:
            raise ValueError("--concurrency, --duration, --rate and --max-tokens must be positive")
        if self.adapters < 0:
            raise ValueError("--adapters must be 0 (base model only) or more")
        if self.sweep not in SWEEPS:
            raise ValueError(f"--sweep must be one of {', '.join(SWEEPS)}, got {self.sweep!r}")
        if not self.values or min(self.values) < 1:
            raise ValueError("--values must be positive integers")
        if self.url is not None and not self.url.startswith(
            ("http://127.0.0.1", "http://localhost", "http://[::1]")
        ):
            raise ValueError(f"--url must be a loopback address (http://127.0.0.1:PORT), got {self.url!r}")


@dataclass(frozen=True)
class Arrival:
    at_s: float  # scheduled send time, seconds after the run starts
    messages: Messages
    adapter: int | None  # index into the served adapters; None: the base model


@dataclass(frozen=True)
class Outcome:
    at_s: float
    first_token_s: float | None  # since the run started
    end_s: float
    tokens: int  # completion tokens reported by the server's usage
    error: str | None = None  # "http-429", "timeout", "stream-error", ...


def poisson_schedule(config: ServeBenchConfig, conversations: Sequence[Messages]) -> list[Arrival]:
    rng = random.Random(config.seed)
    times: list[float] = []
    t = rng.expovariate(config.rate)
    while t < config.duration_s:
        times.append(t)
        t += rng.expovariate(config.rate)
    choices: list[int | None] = [None] * len(times)
    if config.adapters:
        choices = list(zipf_choices(len(times), config.adapters, config.zipf_exponent, config.seed))
    return [
        Arrival(t, conversations[i % len(conversations)], a) for i, (t, a) in enumerate(zip(times, choices))
    ]


# -- the client -----------------------------------------------------------------------------------


async def _send(
    session: aiohttp.ClientSession, url: str, model: str, messages: Messages, max_tokens: int
) -> tuple[float | None, int, str | None]:
    """One streamed chat completion: (monotonic time of the first token, completion tokens, error)."""
    body = {
        "model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0.0,
        "stream": True, "stream_options": {"include_usage": True},
    }  # fmt: skip
    first: float | None = None
    tokens = 0
    async with session.post(f"{url}/v1/chat/completions", json=body) as resp:
        if resp.status != 200:
            detail = await resp.text()
            log.warning("HTTP %d for %s: %s", resp.status, model, detail[:300])
            return None, 0, f"http-{resp.status}"
        async for line in resp.content:
            if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                continue
            event = json.loads(line[len(b"data: ") :])
            if "error" in event:
                log.warning("stream error for %s: %s", model, event["error"])
                return first, tokens, "stream-error"
            if event.get("choices") and first is None:
                first = time.monotonic()  # the server sends its first chunk with the first token
            if event.get("usage"):
                tokens = int(event["usage"]["completion_tokens"])
    return first, tokens, None if tokens else "no-usage"


async def drive(
    url: str, schedule: Sequence[Arrival], models: Sequence[str], base: str, config: ServeBenchConfig
) -> tuple[list[Outcome], float]:
    """Send the schedule open loop; return the outcomes and the seconds from start to the last answer."""
    slots = asyncio.Semaphore(config.concurrency)
    timeout = aiohttp.ClientTimeout(total=config.request_timeout_s)
    connector = aiohttp.TCPConnector(limit=config.concurrency)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        start = time.monotonic()

        async def one(a: Arrival) -> Outcome:
            model = base if a.adapter is None else models[a.adapter]
            async with slots:
                try:
                    first, tokens, error = await _send(session, url, model, a.messages, config.max_tokens)
                except TimeoutError:
                    first, tokens, error = None, 0, "timeout"
                except aiohttp.ClientError as e:
                    first, tokens, error = None, 0, type(e).__name__
            end = time.monotonic() - start
            return Outcome(a.at_s, None if first is None else first - start, end, tokens, error)

        tasks = []
        for a in schedule:
            await asyncio.sleep(max(0.0, start + a.at_s - time.monotonic()))
            tasks.append(asyncio.create_task(one(a)))
        outcomes = list(await asyncio.gather(*tasks))
    return outcomes, max((o.end_s for o in outcomes), default=0.0)


def summarize_outcomes(outcomes: Sequence[Outcome], seconds: float) -> dict[str, Any]:
    ok = [o for o in outcomes if o.error is None and o.first_token_s is not None]
    ttft = [o.first_token_s - o.at_s for o in ok if o.first_token_s is not None]
    tpot = [
        (o.end_s - o.first_token_s) / (o.tokens - 1)
        for o in ok
        if o.first_token_s is not None and o.tokens > 1
    ]

    def p(values: list[float], q: float) -> float | None:
        return percentile(values, q) if values else None

    return {
        "tok_s": sum(o.tokens for o in ok) / seconds if seconds > 0 else 0.0,
        "ttft_p50_s": p(ttft, 50),
        "ttft_p99_s": p(ttft, 99),
        "tpot_p50_s": p(tpot, 50),
        "tpot_p99_s": p(tpot, 99),
        "errors": len(outcomes) - len(ok),
        "requests": len(outcomes),
    }


async def _models(url: str) -> tuple[str, list[str]]:
    """The base model's name and the adapter ids (sorted) that the server lists."""
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(timeout=timeout) as session, session.get(f"{url}/v1/models") as resp:
        resp.raise_for_status()
        data = (await resp.json())["data"]
    base = next(m["id"] for m in data if m.get("parent") is None)
    return base, sorted(m["id"] for m in data if m.get("parent") is not None)


async def servable_adapters(
    url: str, base: str, listed: list[str], needed: int, messages: Messages, config: ServeBenchConfig
) -> tuple[list[str], list[str]]:
    """The first `needed` listed adapters that answer a one-token request, and those that did not
    (a registry may list adapters that cannot be served). Untimed; it also loads them."""
    servable: list[str] = []
    skipped: list[str] = []
    one_token = dataclasses.replace(config, max_tokens=1)
    position = 0
    while len(servable) < needed and position < len(listed):
        batch = listed[position : position + max(needed - len(servable), 1)]
        position += len(batch)
        probes = [Arrival(0.0, messages, k) for k in range(len(batch))]
        outcomes, _ = await drive(url, probes, batch, base, one_token)
        for adapter, o in zip(batch, outcomes):
            (skipped if o.error else servable).append(adapter)
    if len(servable) < needed:
        raise ValueError(
            f"the server at {url} serves {len(servable)} adapters ({len(skipped)} more listed but "
            f"failing), fewer than --adapters {config.adapters}"
        )
    return servable, skipped


async def run_setting(
    url: str, schedule: list[Arrival], config: ServeBenchConfig
) -> tuple[dict[str, Any], dict[str, Any]]:
    base, listed = await _models(url)
    used = sorted({a.adapter for a in schedule if a.adapter is not None})
    messages = schedule[0].messages
    # Untimed warm-up: the base model and every adapter of the schedule answer once (and load).
    adapters, skipped = await servable_adapters(
        url, base, listed, used[-1] + 1 if used else 0, messages, config
    )
    one_token = dataclasses.replace(config, max_tokens=1)
    outcomes, _ = await drive(url, [Arrival(0.0, messages, None)], adapters, base, one_token)
    if outcomes[0].error:
        raise RuntimeError(f"the base model {base!r} does not answer: {outcomes[0].error}")
    outcomes, seconds = await drive(url, schedule, adapters, base, config)
    kinds: dict[str, int] = {}
    for o in outcomes:
        if o.error:
            kinds[o.error] = kinds.get(o.error, 0) + 1
    details = {"seconds": seconds, "tokens": sum(o.tokens for o in outcomes), "error_kinds": kinds,
               "distinct_adapters": len(used), "skipped_adapters": skipped}  # fmt: skip
    return summarize_outcomes(outcomes, seconds), details


# -- servers started per setting ------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def engine_server(args: list[str], env: dict[str, str], log_path: Path) -> Iterator[str]:
    """`lorafleet engine ARGS` on a free loopback port until the block ends; yields its URL."""
    port = free_port()
    cmd = [sys.executable, "-c", "import sys; from lorafleet.engine.cli import main; sys.exit(main())",
           "--log-level", "WARNING", "engine", "--host", "127.0.0.1", "--port", str(port), *args]  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    with open(log_path, "ab") as out:
        process = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env
        )
    try:
        asyncio.run(_wait_ready(url, process))
        yield url
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


async def _wait_ready(url: str, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"the engine server exited with code {process.returncode} while starting")
            try:
                async with session.get(f"{url}/ready") as resp:
                    if resp.status == 200:
                        return
            except (aiohttp.ClientError, TimeoutError):
                pass
            await asyncio.sleep(0.2)
    raise RuntimeError(f"the engine server at {url} was not ready within {START_TIMEOUT_S:g} s")


def _pool_size(path: Path) -> int:
    """How many workload prompts requests cycle through: the file's, at most PROMPT_POOL."""
    if not path.is_file():
        return 1  # load_messages says the file is missing
    with path.open(encoding="utf-8") as lines:
        return max(1, min(PROMPT_POOL, sum(1 for line in lines if line.strip())))


def run_serve(config: ServeBenchConfig) -> dict[str, Any]:
    """Run the benchmark and return its JSON payload."""
    prompts_path = config.prompts_path or default_prompts_path()
    schedule = poisson_schedule(config, load_messages(_pool_size(prompts_path), prompts_path))
    if not schedule:
        raise ValueError("no request arrives in --duration at --rate; raise either")
    results: dict[str, dict[str, Any]] = {}
    details: dict[str, dict[str, Any]] = {}
    if config.url is not None:
        results["target"], details["target"] = asyncio.run(
            run_setting(config.url.rstrip("/"), schedule, config)
        )
    else:
        with tempfile.TemporaryDirectory(prefix="lorafleet-bench-serve-") as tmp:
            for name, (result, detail) in _sweep(config, schedule, Path(tmp)):
                results[name], details[name] = result, detail
                log.info("%s: %s", name, result)
    return {
        "results": results,
        "details": details,
        "config": {
            "benchmark": "serve", "concurrency": config.concurrency, "duration_s": config.duration_s,
            "rate": config.rate, "adapters": config.adapters, "max_tokens": config.max_tokens,
            "sweep": None if config.url else config.sweep, "values": None if config.url else list(config.values),
            "url": config.url, "model": str(config.model) if config.model else "builtin", "rank": config.rank,
            "max_loras": config.max_loras, "zipf_exponent": config.zipf_exponent, "seed": config.seed,
            "request_timeout_s": config.request_timeout_s, "prompts": str(prompts_path),
            "arrivals": len(schedule), "cpu_count": os.cpu_count(), "load_avg_1m_before": os.getloadavg()[0],
            "latency_origin": "scheduled arrival (open loop): waiting for one of the C connections counts",
        },
    }  # fmt: skip


def _sweep(
    config: ServeBenchConfig, schedule: list[Arrival], work_dir: Path
) -> Iterator[tuple[str, tuple[dict[str, Any], dict[str, Any]]]]:
    from lorafleet.engine.adapters import base_spec
    from lorafleet.engine.model_source import default_cache_dir, resolve_model
    from lorafleet.engine.weed import REGION, WeedS3

    from .lora_adapters import publish_adapters

    model_dir = config.model or resolve_model(None, default_cache_dir())
    args = ["--model", str(model_dir), "--max-queue", str(config.concurrency),
            "--request-timeout-s", str(config.request_timeout_s), "--drain-grace-s", "5"]  # fmt: skip
    with WeedS3(work_dir / "s3") as s3:
        env = dict(os.environ)
        if config.adapters:
            used = sorted({a.adapter for a in schedule if a.adapter is not None})
            base = base_spec(model_dir, config.rank)
            published = publish_adapters(
                [adapter_id(i) for i in used], base, config.rank, s3.client(), work_dir, "base"
            )
            env |= {
                "AWS_ACCESS_KEY_ID": s3.access_key,
                "AWS_SECRET_ACCESS_KEY": s3.secret_key,
                "AWS_DEFAULT_REGION": REGION,
            }
            args += ["--adapter-s3-prefix", published.s3_prefix, "--s3-endpoint-url", s3.endpoint_url,
                     "--max-loras", str(config.max_loras), "--max-lora-rank", str(config.rank)]  # fmt: skip
            # Only the schedule's adapters are published, so the server lists them sorted by index
            # and the schedule's indices must be renumbered into that order.
            renumber = {index: position for position, index in enumerate(used)}
            schedule = [
                Arrival(a.at_s, a.messages, None if a.adapter is None else renumber[a.adapter])
                for a in schedule
            ]
        flag = "--" + config.sweep
        for value in config.values:
            name = f"{config.sweep.replace('-', '_')}={value}"
            log.info("%s: starting a server", name)
            with engine_server([*args, flag, str(value)], env, work_dir / "engine.log") as url:
                yield name, asyncio.run(run_setting(url, schedule, config))


def save_serve(payload: dict[str, Any], json_path: Path, plot_path: Path | None) -> None:
    write_json(json_path, payload)
    if plot_path is not None:
        plot_tradeoff(plot_path, payload)


def plot_tradeoff(path: Path, payload: dict[str, Any]) -> None:
    """Throughput against TTFT and against TPOT (p50 and p99), one labelled point per setting."""
    results, c = payload["results"], payload["config"]
    fig = Figure(figsize=(10, 4.2), layout="constrained")
    fig.suptitle(
        f"Throughput vs latency: Poisson {c['rate']:g} req/s for {c['duration_s']:g} s, C={c['concurrency']}, "
        f"{c['adapters']} adapters, {c['max_tokens']} max tokens"
    )
    for ax, metric, label in zip(
        fig.subplots(1, 2), ("ttft", "tpot"), ("time to first token (s)", "time per output token (s)")
    ):
        for q, marker in (("p50", "o-"), ("p99", "s--")):
            points = [
                (r["tok_s"], r[f"{metric}_{q}_s"], name)
                for name, r in results.items()
                if r[f"{metric}_{q}_s"] is not None
            ]
            if points:
                ax.plot([x for x, _, _ in points], [y for _, y, _ in points], marker, label=q)
            for x, y, name in points if q == "p50" else []:
                ax.annotate(
                    name.split("=")[-1], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8
                )
        ax.set_xlabel("throughput (generated tok/s)")
        ax.set_ylabel(label)
        ax.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
