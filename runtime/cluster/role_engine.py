"""An `Engine` restricted to a role set: the scheduler and model work of one instance process.

- With E it runs the vision tower: for its own requests (hybrids keep the stage local) and for
  `EncodeJob`s from the router, on an encoder thread beside LM work.
- With P but not E, embeddings arrive from E instances; missing ones are asked for (`NeedEncode`).
- With P but not D, a request leaves right after its first token: its prompt KV is gathered into
  transfer memory and a `Handoff` goes to a D instance, which `adopt`s it and decodes on.
"""
from __future__ import annotations

import itertools
import logging
import os
import queue
import threading
from collections import deque
from pathlib import Path
from typing import Any

import torch

from epdlang.errors import InvalidRequest
from runtime.cluster.transfer import TransferBackend
from runtime.cluster.wire import (
    EncodeDone,
    EncodeJob,
    Handoff,
    Load,
    NeedEncode,
    WireRequest,
    from_wire,
    to_wire,
)
from runtime.engine.core import Engine
from runtime.engine.request import Req, Status
from runtime.messages import ImageInput, RequestOutput

log = logging.getLogger(__name__)


class RoleEngine(Engine):
    def __init__(self, model: str | Path, roles: frozenset[str], transfer: TransferBackend, **overrides: Any) -> None:
        switchable = bool(overrides.pop("role_switching", False))  # load every tower: any role later, no reload
        lm = bool(roles & {"P", "D"}) or switchable
        if not lm:
            overrides.setdefault("num_pages", 1)  # an E instance holds no KV
        super().__init__(model, load_vision="E" in roles or switchable, load_lm=lm, **overrides)
        self.transfer = transfer
        self._vision = self.model.visual  # kept aside while the roles lack E: `model.visual` is what says E
        self._set(roles)
        self.outbox: deque = deque()  # Handoff / NeedEncode / EncodeDone messages for the router
        self._requested: dict[str, set[str]] = {}  # rid -> image hashes incoming or asked for
        self._adoptions: deque[tuple[Handoff, torch.Tensor]] = deque()
        # (priority, arrival, job, pixels): jobs whose embeddings a request waits for go before
        # encode-ahead jobs, so a long encode-ahead queue never delays a prefill that could start.
        self._jobs: queue.PriorityQueue = queue.PriorityQueue()
        self._job_seq = itertools.count()
        self._job_thread: threading.Thread | None = None
        self.encode_jobs_open = 0
        self.wake_r, self._wake_w = os.pipe()  # the encode-jobs thread wakes the instance loop through it
        self.scheduler.encoding_elsewhere = self._encoding = set()

    def set_roles(self, roles: frozenset[str]) -> None:
        """Serve `roles` from now on, with the weights already loaded; only while nothing is in flight."""
        if self.has_unfinished() or self.encode_jobs_open:
            raise InvalidRequest("the instance still has work in flight")
        if ("E" in roles and self._vision is None) or (roles & {"P", "D"} and self.model.lm is None):
            raise InvalidRequest(f"roles {''.join(sorted(roles))} need weights this instance did not load")
        self._set(roles)

    def _set(self, roles: frozenset[str]) -> None:
        self.roles = frozenset(roles)
        self.model.visual = self._vision if "E" in roles else None

    # ---- P: admission -----------------------------------------------------------------------------
    def submit_wire(self, req: WireRequest, incoming: tuple[str, ...], pixels: dict[str, torch.Tensor]) -> None:
        msg = from_wire(req, pixels)
        if "P" not in self.roles:
            raise InvalidRequest(f"this instance has roles {''.join(sorted(self.roles))}, not P")
        if self.model.visual is None and req.images:
            self._requested[msg.rid] = set(incoming)
        self.submit(msg)

    def provide_embedding(self, content_hash: str, embeds: torch.Tensor) -> None:
        self.encoder_cache.put(content_hash, embeds)
        for req in self.scheduler.waiting:
            for i, image in enumerate(req.msg.images):
                if image.content_hash == content_hash and req.image_embeds[i] is None:
                    req.image_embeds[i] = embeds
                    req._mm_embeds = None

    def _request_missing(self) -> None:
        """Ask the router for embeddings a waiting request lacks (new, preempted, or evicted here)."""
        if self.model.visual is not None:
            return
        for req in self.scheduler.waiting:
            if req.images_ready:
                continue
            asked = self._requested.setdefault(req.rid, set())
            missing = {im.content_hash for im, e in zip(req.msg.images, req.image_embeds)
                       if e is None and im.content_hash not in self.encoder_cache} - asked
            if missing:
                asked |= missing
                self.outbox.append(NeedEncode(req.rid, tuple(sorted(missing))))

    # ---- the loop ---------------------------------------------------------------------------------
    def has_unfinished(self) -> bool:
        return super().has_unfinished() or bool(self._adoptions)

    def _encoding_beside(self) -> bool:
        return super()._encoding_beside() or self.encode_jobs_open > 0

    def step(self) -> list[RequestOutput]:
        adopted = self._adopt_pending()
        outputs = super().step() if super().has_unfinished() else []
        if not outputs and not super().has_unfinished():
            self.wait_s = None  # only adoptions that wait for pages: nothing to do until input comes
        if adopted:
            self.wait_s = 0.0
        if "D" not in self.roles:
            for req in [r for r in self.scheduler.running if r.output_ids and not r.finish_reason]:
                self._hand_off(req)
        self._request_missing()
        for rid in [rid for rid in self._requested if rid not in self.reqs]:
            del self._requested[rid]
        return outputs

    def abort(self, rid: str) -> bool:
        before = len(self._adoptions)
        self._adoptions = deque(a for a in self._adoptions if a[0].req.rid != rid)
        return super().abort(rid) or len(self._adoptions) != before

    # ---- P -> D -----------------------------------------------------------------------------------
    def _slots(self, req: Req, n: int) -> torch.Tensor:
        ps = self.config.page_size
        pages = torch.tensor(req.pages, dtype=torch.long)
        return (pages[:, None] * ps + torch.arange(ps)).flatten()[:n]

    def kv_shape(self, n: int) -> tuple[int, ...]:
        pool = self.kv_pool
        return (2, pool.num_layers, n, pool.k.shape[2], pool.k.shape[3])

    def _hand_off(self, req: Req) -> None:
        n = req.num_computed
        handle, buf = self.transfer.allocate(self.kv_pool.k.dtype, self.kv_shape(n))
        slots = self._slots(req, n)
        torch.index_select(self.kv_pool.k, 1, slots, out=buf[0])
        torch.index_select(self.kv_pool.v, 1, slots, out=buf[1])
        del buf
        self.transfer.seal(handle)
        gen = req.sampling_state._generator
        rng = bytes(gen.get_state().numpy().tobytes()) if gen is not None else None
        self.outbox.append(Handoff(to_wire(req.msg), tuple(req.output_ids), handle, req.cached_tokens,
                                   tuple(req.prompt_logprobs), rng))
        self.scheduler.remove(req, cache=True)
        del self.reqs[req.rid]
        self.stats["handoffs_sent"] += 1

    def adopt(self, handoff: Handoff, kv: torch.Tensor) -> None:
        """Take over a prefilled request: its KV goes into this pool and decoding carries on here."""
        if "D" not in self.roles:
            raise InvalidRequest("this instance has no D role")
        msg = from_wire(handoff.req)
        if msg.rid in self.reqs:
            raise InvalidRequest(f"request id {msg.rid!r} is already in flight")
        self._check_fits(msg)
        self._adoptions.append((handoff, kv))

    def _adopt_pending(self) -> bool:
        adopted = False
        while self._adoptions:
            handoff, kv = self._adoptions[0]
            req = self._make_req(from_wire(handoff.req))
            if not self.kv.reserve(req, req.prompt_len + len(handoff.output_ids)):
                break  # the pool is full: wait for running requests to finish
            self._adoptions.popleft()
            self._install(req, handoff, kv)
            adopted = True
        return adopted

    def _install(self, req: Req, handoff: Handoff, kv: torch.Tensor) -> None:
        n = kv.shape[2]
        slots = self._slots(req, n)
        self.kv_pool.k[:, slots] = kv[0]
        self.kv_pool.v[:, slots] = kv[1]
        req.num_computed, req.cached_tokens = n, handoff.cached_tokens
        req.prompt_logprobs = list(handoff.prompt_logprobs)
        req.prompt_logprobs_sent = bool(handoff.output_ids)  # P sent them with the first token
        if handoff.rng_state is not None:
            gen = req.sampling_state.generator(self.kv_pool.k.device)
            gen.set_state(torch.frombuffer(bytearray(handoff.rng_state), dtype=torch.uint8))
        for token in handoff.output_ids:  # replay what P sampled, without emitting its text again
            req.sampling_state.record(token)
            req.detok.append(token, req.sampling_state.grammar_terminated)
            req.output_ids.append(token)
        req.status = Status.RUNNING
        self.scheduler.running.append(req)
        self.reqs[req.rid] = req
        self.kv.cache_computed(req)
        self.stats["handoffs_adopted"] += 1

    # ---- E: jobs from the router ------------------------------------------------------------------
    def queue_encode(self, job: EncodeJob, pixels: torch.Tensor | None) -> None:
        if self.model.visual is None:
            raise InvalidRequest("this instance has no E role")
        if self._job_thread is None:
            self._job_thread = threading.Thread(target=self._encode_loop, name="encode-jobs", daemon=True)
            self._job_thread.start()
        self.encode_jobs_open += 1
        if pixels is not None:
            self._encoding.add(job.image.content_hash)
        self._jobs.put((0 if job.dest else 1, next(self._job_seq), job, pixels))

    def _encode_loop(self) -> None:
        while True:
            batch = [self._jobs.get()[2:]]
            tokens = batch[0][0].image.num_tokens
            while not self._jobs.empty() and tokens < self.scheduler.encode_budget:
                batch.append(self._jobs.get_nowait()[2:])
                tokens += batch[-1][0].image.num_tokens
            try:
                self._run_jobs(batch)
            except Exception as exc:  # one bad job must not stop the thread
                log.exception("encode jobs failed")
                self._encoding.difference_update(j.image.content_hash for j, _ in batch)
                self.outbox.extend(EncodeDone(j.image.content_hash, j.dest, error=str(exc)) for j, _ in batch)
            self.encode_jobs_open -= len(batch)
            os.write(self._wake_w, b"x")

    def _run_jobs(self, batch: list[tuple[EncodeJob, torch.Tensor | None]]) -> None:
        todo = {j.image.content_hash: (j.image, px) for j, px in batch
                if j.image.content_hash not in self.encoder_cache and px is not None}
        fresh: dict[str, torch.Tensor] = {}
        if todo:
            embeds = self._timed_encode([ImageInput(h, px, tuple(im.grid_thw), im.num_tokens)
                                         for h, (im, px) in todo.items()])
            for h, emb in zip(todo, embeds):
                self.encoder_cache.put(h, emb)
                self._encoding.discard(h)
                fresh[h] = emb
            self.stats["images_encoded"] += len(todo)
        for job, _ in batch:  # ship from `fresh`: a small (or disabled) cache may not hold the batch
            self.outbox.append(self._ship(job, fresh.get(job.image.content_hash)))

    def _ship(self, job: EncodeJob, emb: torch.Tensor | None = None) -> EncodeDone:
        h = job.image.content_hash
        emb = emb if emb is not None else self.encoder_cache.get(h)
        if emb is None:
            return EncodeDone(h, job.dest, error="image not cached and no pixels sent")
        if job.dest is None:
            return EncodeDone(h, None)
        handle, buf = self.transfer.allocate(emb.dtype, tuple(emb.shape))
        buf.copy_(emb)
        del buf
        self.transfer.seal(handle)
        return EncodeDone(h, job.dest, handle)

    def load(self) -> Load:
        return Load(waiting=len(self.scheduler.waiting) + len(self._adoptions), running=len(self.scheduler.running),
                    encode_queue=self.encode_jobs_open, free_pages=self.kv.available_pages(),
                    total_pages=self.kv.total_pages, encoder_cache_items=len(self.encoder_cache))
