"""Stage-level batching inside one instance: encode, prefill (chunked) and decode batches each step."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

from runtime.config import EngineConfig
from runtime.engine.encoder_cache import EncoderCache
from runtime.engine.kv_manager import KVManager
from runtime.engine.model_runner import Chunk
from runtime.engine.request import Req, Status

log = logging.getLogger(__name__)


@dataclass
class StepPlan:
    encode: list[tuple[Req, int]] = field(default_factory=list)  # (request, image index) to run the vision tower on
    prefill: list[Chunk] = field(default_factory=list)
    decode: list[Chunk] = field(default_factory=list)
    preempted: list[Req] = field(default_factory=list)


class Scheduler:
    def __init__(self, config: EngineConfig, kv: KVManager, encoder_cache: EncoderCache) -> None:
        self.config, self.kv, self.encoder_cache = config, kv, encoder_cache
        self.prefill_budget = config.prefill_token_budget
        self.mixed_budget = config.mixed_token_budget
        self.encode_budget = config.encode_tokens
        self.max_running = config.max_running
        self.waiting: list[Req] = []
        self.running: list[Req] = []
        self.num_preemptions = 0
        self.encoding_elsewhere: set[str] = set()  # image hashes another thread is encoding right now

    def add(self, req: Req) -> None:
        self.waiting.append(req)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def requests(self) -> list[Req]:
        return self.waiting + self.running

    def remove(self, req: Req, cache: bool) -> None:
        """Take a request out of the queues and give its pages back."""
        for queue in (self.waiting, self.running):
            if req in queue:
                queue.remove(req)
        self.kv.release(req, cache=cache)
        req.status = Status.FINISHED

    def schedule(self, allow_encode: bool = True, decode_alone: bool = True) -> StepPlan:
        """This step's batches. With `decode_alone` off, decode rows run only beside a prefill chunk."""
        plan = StepPlan()
        self.waiting.sort(key=lambda r: r.priority_key)
        self.running.sort(key=lambda r: r.priority_key)
        plan.encode = self._schedule_encode(allow_encode)
        if self.config.schedule_policy == "decode-first":
            plan.decode = self._schedule_decode(plan)
            plan.prefill = self._schedule_prefill(plan)
        else:
            plan.prefill = self._schedule_prefill(plan)
            plan.decode = self._schedule_decode(plan)
        if not (decode_alone or plan.prefill):
            plan.decode = []  # their pages stay reserved for the next step
        return plan

    def _schedule_encode(self, allow: bool) -> list[tuple[Req, int]]:
        picked, tokens = [], 0
        for req in self.waiting:
            for i, image in enumerate(req.msg.images):
                if req.image_embeds[i] is not None:
                    continue
                if image.content_hash in self.encoder_cache:  # `in` first: waiting must not count as misses
                    req.image_embeds[i] = self.encoder_cache.get(image.content_hash)
                    continue
                if image.content_hash in self.encoding_elsewhere:
                    continue  # it lands in the encoder cache soon
                if not allow or (picked and tokens + image.num_tokens > self.encode_budget):
                    allow = False
                    continue
                picked.append((req, i))
                tokens += image.num_tokens
        return picked

    def _schedule_decode(self, plan: StepPlan) -> list[Chunk]:
        chunks = []
        for req in list(self.running):
            if req.status is not Status.RUNNING:
                continue
            if not self._reserve_or_preempt(req, req.seq_len, plan):
                continue
            chunks.append(Chunk(req, req.seq_len - 1, req.seq_len))
        return chunks

    def _schedule_prefill(self, plan: StepPlan) -> list[Chunk]:
        chunks, budget = [], self._prefill_tokens()
        for req in list(self.waiting):
            if budget <= 0 or len(self.running) + len(chunks) >= self.max_running:
                break
            if not req.images_ready or req in plan.preempted:
                continue
            if req.num_computed == 0 and not req.pages:
                self.kv.match_prefix(req, self._cacheable_prefix(req))
            end = min(req.seq_len, req.num_computed + budget)
            if not self._reserve_or_preempt(req, end, plan):
                break
            chunks.append(Chunk(req, req.num_computed, end))
            budget -= end - req.num_computed
        return chunks

    def _prefill_tokens(self) -> int:
        """A prefill chunk stalls every decoding request for its length: while any decode, the mixed budget."""
        if self.mixed_budget is None or not self.running:
            return self.prefill_budget
        return min(self.prefill_budget, self.mixed_budget)

    @staticmethod
    def _cacheable_prefix(req: Req) -> int:
        """At least one token must be computed to sample; prompt logprobs need their rows computed."""
        limit = req.seq_len - 1
        covered = req.prompt_logprobs_covered
        return limit if covered is None else min(limit, max(covered - 1, 0))

    def _reserve_or_preempt(self, req: Req, num_tokens: int, plan: StepPlan) -> bool:
        while not self.kv.reserve(req, num_tokens):
            victim = self._pick_victim(req, plan)
            if victim is None:
                return False
            self._preempt(victim, plan)
            if victim is req:
                return False
        return True

    def _pick_victim(self, req: Req, plan: StepPlan) -> Req | None:
        """The lowest-priority running request that ranks below `req` (or `req` itself if running)."""
        scheduled = {id(c.req) for c in plan.decode + plan.prefill}
        holders = self.running + [r for r in self.waiting if r.pages]
        candidates = [r for r in holders if r is req or id(r) not in scheduled]
        candidates = [r for r in candidates if r.priority_key >= req.priority_key]
        return max(candidates, key=lambda r: r.priority_key, default=None)

    def _preempt(self, victim: Req, plan: StepPlan) -> None:
        log.info("preempting %s (%d tokens) to free KV pages", victim.rid, victim.seq_len)
        if victim in self.running:
            self.running.remove(victim)
            self.waiting.append(victim)
        self.kv.release(victim, cache=True)  # its KV stays reusable until evicted, so recompute is cheap
        victim.status = Status.WAITING
        plan.preempted.append(victim)
        self.num_preemptions += 1
