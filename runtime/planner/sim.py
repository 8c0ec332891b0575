"""A discrete-event model of one deployment serving one workload: our router and scheduler, not a queueing formula.

What it models, as the code does it (runtime/cluster/router.py, runtime/engine/scheduler.py):
- a client that sends each request at its arrival time, at most `max_concurrency` in flight;
- the API server process as two FIFO threads, as it runs: the preprocess thread (`front_ms` per request:
  body, images, tokens, the pixel hand-over) and the event loop, which streams every token the engines
  emit (`stream_ms_per_token`: the router's output path and SSE); then the client, its own process, parses
  each token (`client_ms_per_token`). A token counts as received when the client has parsed it. All three
  take their CPU from the same cores as the instances;
- the router: P by least in-flight work, each image of a P without E to the E instance with the
  least outstanding encode tokens, D (after a P-only prefill) by least in-flight work;
- per instance an encoder worker (batches image jobs FIFO up to `encode_token_budget`) and an LM worker. In
  an instance that prefills its own images, an encode runs where the engine's `OverlapChooser` (the same
  rule, on the simulated clock) puts it: beside LM work (the encoder thread), or inside the step, where the
  LM waits for it and then runs the pass planned before it; with no LM work to do it always runs inside.
  Other instances' images (a router encode job) run beside. The LM worker's step is one decode batch of
  every running request plus a prefill batch of waiting, image-ready requests up to
  `prefill_token_budget` tokens (`mixed_token_budget` while any decode; chunked) and `max_running`
  requests, decode first; a decode-only step of fewer than DECODE_WAIT_ROWS rows waits for the encoder
  beside it up to `decode_wait_ms`, as the engine's;
- transfers (pixels, embeddings, KV) as delays of `transfer_ms(bytes)`;
- the SLO as `epd bench` checks it: TTFT <= target and the p90 of the request's own inter-token gaps <= target.
What it leaves out: prefix and encoder cache hits (workloads with distinct images and prompts),
KV-pool exhaustion and preemption, and the GIL the two API-server threads share.
"""
from __future__ import annotations

from collections import Counter, deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Callable, Protocol

from runtime.config import DECODE_WAIT_ROWS, ENCODE_TOKENS_ACCELERATOR, EngineConfig, OverlapMode, Slo
from runtime.engine.overlap import OverlapChooser
from runtime.planner.clock import Clock, Fifo


class Costs(Protocol):
    """Stage costs in ms at full speed on `threads` threads (or one accelerator)."""

    kv_bytes_per_token: int
    embed_bytes_per_token: int
    stream_ms_per_token: float  # the API server's event loop, per streamed token
    client_ms_per_token: float  # the benchmark client, per token it parses
    decode_context: str  # "mean": a decode step costs the batch's mean context; "max": its longest (padded)

    def encode_ms(self, image_tokens: Sequence[int], threads: int) -> float: ...
    def prefill_ms(self, tokens: int, threads: int) -> float: ...
    def decode_ms(self, batch: int, context: float, threads: int) -> float: ...
    def transfer_ms(self, nbytes: int) -> float: ...


@dataclass(frozen=True)
class SimRequest:
    arrival: float  # ms from the run start
    image_tokens: tuple[int, ...]
    prompt_len: int  # all prompt tokens, image placeholders included
    output_len: int
    pixel_bytes: tuple[int, ...] = ()  # per image; empty: none sent
    front_ms: float = 0.0


@dataclass(frozen=True)
class Budgets:
    prefill_token_budget: int = EngineConfig.prefill_token_budget
    encode_token_budget: int = ENCODE_TOKENS_ACCELERATOR  # `epd plan --cores` plans with CPU_HOST's
    max_running: int = EngineConfig.max_running
    decode_wait_ms: float = 0.0  # `epd plan --cores` plans with CPU_HOST's
    mixed_token_budget: int | None = None  # prefill tokens per step while requests decode; None: prefill's
    overlap_encode: OverlapMode = EngineConfig.overlap_encode  # `epd serve --overlap-encode`


@dataclass(eq=False)
class Flight:
    spec: SimRequest
    sent: float = 0.0
    images_left: int = 0
    computed: int = 0
    generated: int = 0  # tokens the engine has sampled
    tokens: list[float] = field(default_factory=list)  # when the client got each one
    holder: "Node | None" = None


@dataclass(eq=False)
class Node:
    """One instance: its roles, threads, and the queues of its two workers."""

    name: str
    roles: frozenset[str]
    threads: int
    enc_queue: deque = field(default_factory=deque)  # (flight, tokens, destination node)
    waiting: list[Flight] = field(default_factory=list)
    running: list[Flight] = field(default_factory=list)
    adopting: deque = field(default_factory=deque)
    enc_busy: bool = False
    lm_busy: bool = False
    inflight: int = 0
    encode_tokens: int = 0
    last_decode: float = float("-inf")
    draining_to: frozenset[str] | None = None  # role switching: the roles it takes once empty
    started: dict[str, float] = field(default_factory=dict)  # worker ("enc", "lm") -> when its pass began
    stage_ms: Counter = field(default_factory=Counter)  # as the engine's /metrics: encode, prefill, mixed, decode
    stage_passes: Counter = field(default_factory=Counter)
    cpu_ms: float = 0.0  # its passes' work at full speed x threads: the CPU time the model gives the process
    overlap: OverlapChooser | None = None  # where its own encodes run (an instance with E and P), as the engine chooses
    inside: bool = False  # an encode runs inside the step: the LM worker waits for it

    def passed(self, worker: str, stage: str, now: float) -> None:
        ms = now - self.started.pop(worker)
        self.stage_ms[stage] += ms
        self.stage_passes[stage] += 1
        if self.overlap is not None:
            self.overlap.record("tower" if stage == "encode" else "lm", ms / 1000.0)

    def idle(self) -> bool:
        return not (self.enc_busy or self.lm_busy or self.enc_queue or self.waiting or self.running
                    or self.adopting or self.inflight)


@dataclass(frozen=True)
class Outcome:
    ttft_ms: tuple[float, ...]  # per finished request
    tpot_ms: tuple[float, ...]  # per finished request with >= 2 tokens
    met: int
    total: int
    finished: int
    duration_ms: float
    switches: int = 0
    stages: Mapping[str, Mapping[str, tuple[int, float]]] = field(default_factory=dict)  # node -> stage -> (passes, s)
    cpu_s: Mapping[str, float] = field(default_factory=dict)  # instance, "api" (API server), "client" -> CPU seconds

    @property
    def attainment(self) -> float:
        return self.met / self.total if self.total else 0.0

    def p90(self, values: Sequence[float]) -> float:
        return p90(values) if values else float("nan")


def p90(values: Sequence[float]) -> float:
    """numpy's default (linear) percentile, without numpy's per-call overhead: it runs once per request."""
    v = sorted(values)
    k = (len(v) - 1) * 0.9
    lo = int(k)
    return v[lo] + (v[min(lo + 1, len(v) - 1)] - v[lo]) * (k - lo)


def meets(f: Flight, slo: Slo) -> bool:
    if len(f.tokens) < f.spec.output_len or f.tokens[0] - f.sent > slo.ttft_ms:
        return False
    t = f.tokens
    return len(t) < 2 or p90([b - a for a, b in zip(t, t[1:])]) <= slo.tpot_ms


class Simulation:
    def __init__(self, nodes: Sequence[tuple[str, frozenset[str], int]], costs: Costs, budgets: Budgets,
                 cores: int | None, max_concurrency: int | None = None) -> None:
        self.clock = Clock(cores)
        self.costs, self.budgets, self.cap = costs, budgets, max_concurrency
        self.nodes = [Node(name, frozenset(roles), threads) for name, roles, threads in nodes]
        for n in self.nodes:  # only an instance with E and P encodes its own images, and so chooses
            if {"E", "P"} <= n.roles:
                n.overlap = OverlapChooser(budgets.overlap_encode, now=lambda: self.clock.now / 1000.0)
        self.flights: list[Flight] = []
        self.backlog: deque[Flight] = deque()  # sent by nobody yet: the client's concurrency cap
        self.prep, self.loop, self.client = Fifo(self.clock), Fifo(self.clock), Fifo(self.clock)
        self.stream_ms = costs.stream_ms_per_token
        self.client_ms = costs.client_ms_per_token
        self.padded = costs.decode_context == "max"
        self.in_client = 0
        self.switches = 0
        self.on_switch: Callable[[Node, frozenset[str]], None] | None = None

    # ---- the client and the API server --------------------------------------------------------------
    def run(self, requests: Sequence[SimRequest], slo: Slo, horizon_ms: float = float("inf")) -> Outcome:
        for spec in requests:
            flight = Flight(spec)
            self.flights.append(flight)
            self.clock.at(spec.arrival, lambda f=flight: self._arrive(f))
        self.clock.run(horizon_ms)
        return self._outcome(slo)

    def _arrive(self, f: Flight) -> None:
        if self.cap is not None and self.in_client >= self.cap:
            self.backlog.append(f)
            return
        self.in_client += 1
        f.sent = self.clock.now
        self.prep.put(f.spec.front_ms, lambda: self._dispatch(f))

    def _emit(self, flights: list[Flight]) -> None:
        """Tokens sampled now reach the client once the API server has streamed them and the client parsed them."""
        for f in flights:
            f.generated += 1
        n = len(flights)

        def received() -> None:
            for f in flights:
                f.tokens.append(self.clock.now)

        def streamed() -> None:
            self.client.put(self.client_ms * n, received) if self.client_ms else received()

        self.loop.put(self.stream_ms * n, streamed) if self.stream_ms else streamed()

    def _finish(self, f: Flight, node: Node) -> None:
        node.running.remove(f) if f in node.running else None
        node.inflight -= 1
        self.in_client -= 1
        if self.backlog:
            self._arrive(self.backlog.popleft())
        self._maybe_switch(node)

    # ---- the router ---------------------------------------------------------------------------------
    def serving(self, role: str) -> list[Node]:
        return [n for n in self.nodes if role in n.roles and n.draining_to is None]

    def _dispatch(self, f: Flight) -> None:
        p = min(self.serving("P"), key=lambda n: (n.inflight, len(n.waiting)))
        p.inflight += 1
        f.holder = p
        f.images_left = len(f.spec.image_tokens)
        pixels = f.spec.pixel_bytes or (0,) * len(f.spec.image_tokens)
        extra: dict[str, int] = {}
        for tokens, nbytes in zip(f.spec.image_tokens, pixels):
            e = p if "E" in p.roles else self._pick_encoder(extra)
            extra[e.name] = extra.get(e.name, 0) + tokens
            e.encode_tokens += tokens
            self.clock.after(self.costs.transfer_ms(nbytes), lambda e=e, t=tokens: self._queue_encode(e, f, t, p))
        p.waiting.append(f)
        self._poll_lm(p)

    def _pick_encoder(self, extra: dict[str, int]) -> Node:
        return min(self.serving("E"), key=lambda n: (n.encode_tokens + extra.get(n.name, 0), n.inflight))

    def _pick_decode(self) -> Node:
        return min(self.serving("D"), key=lambda n: (n.inflight, len(n.running)))

    # ---- the encoder worker -------------------------------------------------------------------------
    def _queue_encode(self, e: Node, f: Flight, tokens: int, dest: Node) -> None:
        e.enc_queue.append((f, tokens, dest))
        self._poll_encoder(e)

    def _poll_encoder(self, e: Node) -> None:
        if e.enc_busy or not e.enc_queue:
            return
        own = e.enc_queue[0][2] is e
        if own and e.lm_busy:
            return  # the engine schedules its own encodes at the start of a step: when this LM pass ends
        batch = [e.enc_queue.popleft()]
        tokens = batch[0][1]
        while e.enc_queue and tokens < self.budgets.encode_token_budget and (e.enc_queue[0][2] is e) == own:
            batch.append(e.enc_queue.popleft())
            tokens += batch[-1][1]
        e.inside = own and not (self._lm_has_work(e) and e.overlap.beside())
        e.lm_busy = e.lm_busy or e.inside
        e.enc_busy, e.started["enc"] = True, self.clock.now
        work = self.costs.encode_ms([t for _, t, _ in batch], e.threads)
        e.cpu_ms += work * e.threads
        self.clock.start(work, e.threads, lambda: self._encoded(e, batch), e)

    def _lm_has_work(self, n: Node) -> bool:
        return bool(n.running or n.adopting or ("P" in n.roles and self._prefill_chunks(n)))

    def _encoded(self, e: Node, batch: list) -> None:
        e.enc_busy = False
        e.passed("enc", "encode", self.clock.now)
        if e.inside:
            e.inside = e.lm_busy = False
            self._poll_lm(e)  # the rest of the step: the pass planned before this encode's images were ready
        for f, tokens, dest in batch:
            e.encode_tokens -= tokens
            if dest is e:
                f.images_left -= 1
            else:
                nbytes = tokens * self.costs.embed_bytes_per_token
                self.clock.after(self.costs.transfer_ms(nbytes), lambda f=f, d=dest: self._image_ready(f, d))
        self._poll_encoder(e)  # an idle LM (rows held for this encode, or none): the next step starts now
        self._poll_lm(e)
        self._maybe_switch(e)

    def _image_ready(self, f: Flight, p: Node) -> None:
        f.images_left -= 1
        self._poll_lm(p)

    # ---- the LM worker: one scheduler step ----------------------------------------------------------
    def _poll_lm(self, n: Node) -> None:
        if n.lm_busy:
            return
        while n.adopting:
            n.running.append(n.adopting.popleft())
        decode = list(n.running)
        chunks = self._prefill_chunks(n) if "P" in n.roles else []
        if not chunks and (not decode or self._decode_waits(n, len(decode))):
            return
        ctx = self._context(decode)
        work = self.costs.decode_ms(len(decode), ctx, n.threads) if decode else 0.0
        if chunks:
            work += self.costs.prefill_ms(sum(k for _, k in chunks), n.threads)
        n.lm_busy, n.started["lm"] = True, self.clock.now
        n.cpu_ms += work * n.threads
        self.clock.start(work, n.threads, lambda: self._stepped(n, decode, chunks), n)

    def _decode_waits(self, n: Node, rows: int) -> bool:
        left = n.last_decode + self.budgets.decode_wait_ms - self.clock.now
        if not (n.enc_busy and rows < DECODE_WAIT_ROWS and left > 0):
            return False
        self.clock.after(left, lambda: self._poll_lm(n))
        return True

    def _context(self, decode: list[Flight]) -> int:
        """The context a decode step's cost is read at: the batch's mean, or its longest where attention pads."""
        if not decode:
            return 0
        lens = [f.spec.prompt_len + f.generated for f in decode]
        return max(lens) if self.padded else sum(lens) // len(lens)

    def _prefill_chunks(self, n: Node) -> list[tuple[Flight, int]]:
        chunks: list[tuple[Flight, int]] = []
        budget, mixed = self.budgets.prefill_token_budget, self.budgets.mixed_token_budget
        if mixed is not None and n.running:
            budget = min(budget, mixed)
        for f in n.waiting:
            if budget <= 0 or len(n.running) + len(chunks) >= self.budgets.max_running:
                break
            if f.images_left:
                continue
            k = min(f.spec.prompt_len - f.computed, budget)
            chunks.append((f, k))
            budget -= k
        return chunks

    def _stepped(self, n: Node, decode: list[Flight], chunks: list[tuple[Flight, int]]) -> None:
        n.lm_busy = False
        n.passed("lm", "mixed" if decode and chunks else "decode" if decode else "prefill", self.clock.now)
        if decode:
            n.last_decode = self.clock.now
        firsts = [f for f, k in chunks if f.computed + k == f.spec.prompt_len]
        self._emit(decode + firsts)
        for f in decode:
            if f.generated >= f.spec.output_len:
                self._finish(f, n)
        for f, k in chunks:
            f.computed += k
            if f.computed == f.spec.prompt_len:
                n.waiting.remove(f)
                self._prefilled(f, n)
        self._poll_encoder(n)  # the next step starts with its encodes
        self._poll_lm(n)
        self._maybe_switch(n)

    def _prefilled(self, f: Flight, p: Node) -> None:
        if f.generated >= f.spec.output_len:
            self._finish(f, p)
        elif "D" in p.roles:
            p.running.append(f)
        else:
            p.inflight -= 1
            d = self._pick_decode()
            d.inflight += 1
            f.holder = d
            delay = self.costs.transfer_ms(f.spec.prompt_len * self.costs.kv_bytes_per_token)
            self.clock.after(delay, lambda: self._adopt(d, f))
            self._maybe_switch(p)

    def _adopt(self, d: Node, f: Flight) -> None:
        d.adopting.append(f)
        self._poll_lm(d)

    # ---- role switching (driven from outside; see switching.py) -------------------------------------
    def request_switch(self, node: Node, roles: frozenset[str]) -> None:
        """Stop routing new work to `node`; once its in-flight work is done it serves `roles`."""
        node.draining_to = frozenset(roles)
        self._maybe_switch(node)

    def _maybe_switch(self, node: Node) -> None:
        if node.draining_to is None or not node.idle():
            return
        roles, node.roles, node.draining_to = node.roles, node.draining_to, None
        self.switches += 1
        if self.on_switch is not None:
            self.on_switch(node, roles)

    # ---- the result ---------------------------------------------------------------------------------
    def _outcome(self, slo: Slo) -> Outcome:
        done = [f for f in self.flights if f.tokens and len(f.tokens) >= f.spec.output_len]
        ttft = tuple(f.tokens[0] - f.sent for f in done)
        tpot = tuple((f.tokens[-1] - f.tokens[0]) / (len(f.tokens) - 1) for f in done if len(f.tokens) > 1)
        stages = {n.name: {k: (n.stage_passes[k], n.stage_ms[k] / 1000.0) for k in n.stage_passes}
                  for n in self.nodes}
        cpu = {n.name: n.cpu_ms / 1000.0 for n in self.nodes}
        cpu |= {"api": (self.prep.cpu_ms + self.loop.cpu_ms) / 1000.0, "client": self.client.cpu_ms / 1000.0}
        return Outcome(ttft, tpot, sum(meets(f, slo) for f in done), len(self.flights), len(done),
                       self.clock.now, self.switches, stages, cpu)
