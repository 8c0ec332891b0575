"""The router: one thread that owns the ROUTER socket and moves every request through E, P and D.

Its state (`flights`, encode jobs, instance views) is touched only by its own thread; other threads
`post` commands. Instance failures arrive from the launcher (`reap`): the dead instance is dropped at
once, requests that streamed nothing are dispatched again, the rest fail with a clear error.
"""
from __future__ import annotations

import logging
import time
from collections import Counter, defaultdict, deque
from concurrent.futures import Future
from typing import Any, Callable

import zmq

from epdlang import errors
from runtime.cluster import wire
from runtime.cluster.router_inbox import Inbox, refuse
from runtime.cluster.router_policy import (
    EncodeTask,
    Flight,
    InstanceView,
    Sink,
    chunk_chain,
    pick_decode,
    pick_prefill,
    plan_encodes_for,
)
from runtime.cluster.router_recovery import Recovery
from runtime.cluster.transfer import TransferBackend
from runtime.engine.radix_cache import prefix_keys
from runtime.messages import GenerateRequest, RequestOutput

log = logging.getLogger(__name__)
WAIT_FOR_INSTANCE_S = 60.0
HANDOFF_WAIT_S = 5.0
MAX_TRACKED_HANDLES = 4096


class Router(Recovery):
    def __init__(self, sock: zmq.Socket, transfer: TransferBackend, page_size: int, image_token_id: int,
                 reap: Callable[[], list[str]]) -> None:
        self.sock, self.transfer, self.reap = sock, transfer, reap
        self.page_size, self.image_token_id = page_size, image_token_id
        self.max_waiting: int | None = None  # requests without a first token yet; beyond it, Overloaded
        self.views: dict[str, InstanceView] = {}
        self.roles: dict[str, frozenset[str]] = {}
        self.flights: dict[str, Flight] = {}
        self.deferred: deque[str] = deque()
        self.encodes: dict[tuple[str, str | None], EncodeTask] = {}
        self.pending_handoffs: deque[tuple[wire.Handoff, list, float]] = deque()
        self.sessions: dict[str, tuple[str, str | None]] = {}
        self.sent_handles: dict[str, deque] = defaultdict(lambda: deque(maxlen=MAX_TRACKED_HANDLES))
        self.controls: dict[int, tuple[Future, set[str], dict]] = {}
        self.ready_event = None  # set by the deployment: called with each wire.Ready
        self.inbox = Inbox()
        self._next_call = 0
        self.stopping = False
        self.stats: Counter[str] = Counter()  # instance_deaths, retried, failed, role_switches
        self.switcher: Any = None  # a role_switch.RoleSwitcher under --role-switching

    # ---- other threads ----------------------------------------------------------------------------
    def post(self, *command: Any) -> None:
        """Queue a command for the router thread (refused with RequestAborted once it has stopped)."""
        self.inbox.post(command)

    def run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(self.inbox.wake_fd, zmq.POLLIN)
        try:
            while not self.stopping:
                events = dict(poller.poll(50))
                self._run_commands(self.inbox.wake_fd in events)
                self._receive_all()
                for name in self.reap():
                    self._on_death(name)
                if self.switcher is not None:
                    self.switcher.tick()
                self._retry_waiting()
        finally:
            self.inbox.close()
            for flight in self.flights.values():  # only left if the loop died: nobody would answer them
                flight.sink(errors.RequestAborted("the router stopped"))
            self.flights.clear()

    def _receive_all(self) -> None:
        while self.sock.poll(0):
            self._receive()

    def _run_commands(self, woken: bool) -> None:
        # Between commands, instances' outputs are taken in: a submit copies its pixels (tens of ms for
        # four 448x448 images on a loaded CPU), and tokens waiting behind a queue of them stalled streams.
        for kind, *args in self.inbox.drain(woken):
            self._receive_all()
            try:
                getattr(self, f"_cmd_{kind}")(*args)
            except Exception as exc:  # answered all the same: its caller must not wait forever
                log.exception("router command %s failed", kind)
                if kind == "submit":
                    self._cmd_abort(args[0].rid)
                refuse((kind, *args), errors.EpdError(f"the router could not handle this request: {exc!r}"))

    # ---- commands -----------------------------------------------------------------------------------
    def _cmd_submit(self, msg: GenerateRequest, sink: Sink) -> None:
        if msg.rid in self.flights:
            sink(errors.InvalidRequest(f"request id {msg.rid!r} is already in flight"))
            return
        if self.max_waiting is not None and self.num_waiting() >= self.max_waiting:
            self.stats["refused_overloaded"] += 1
            sink(errors.Overloaded(f"{self.max_waiting} requests are already waiting for their first token"))
            return
        keys = prefix_keys(msg.input_ids, msg.images, self.image_token_id)
        self.flights[msg.rid] = Flight(msg, sink, chunk_chain(keys, self.page_size))
        if self.switcher is not None:
            self.switcher.note(msg)
        self._dispatch(msg.rid)

    def num_waiting(self) -> int:
        """Requests admitted that have not streamed a token yet (queued for encode or prefill)."""
        return sum(not f.streamed for f in self.flights.values())

    def _cmd_abort(self, rid: str) -> None:
        flight = self.flights.pop(rid, None)
        if flight is None:
            return
        if flight.holder is not None:
            self._send(flight.holder, wire.Abort(rid))
            self._dec_inflight(flight.holder)
        for task in self.encodes.values():
            task.rids.discard(rid)

    def _cmd_encode_ahead(self, images: list) -> None:
        unique = list({im.content_hash: im for im in images}.values())
        for image, view in plan_encodes_for(unique, self._ready("E")):
            self._encode(image, None, None, view)

    def _cmd_control(self, op: str, future: Future) -> None:
        targets = {name for name in self.views}
        self._next_call += 1
        self.controls[self._next_call] = (future, targets, {})
        for name in targets:
            self._send(name, wire.Control(self._next_call, op))
        self._settle_control(self._next_call)

    def _cmd_switch_role(self, name: str, roles: frozenset[str]) -> None:
        self.switcher.begin(name, frozenset(roles), "requested")

    def _cmd_end_session(self, session_id: str) -> None:
        self.sessions.pop(session_id, None)

    def _cmd_stop(self) -> None:
        for name in list(self.views):
            self._send(name, wire.Shutdown())
        for flight in self.flights.values():
            flight.sink(errors.RequestAborted("the deployment is shutting down"))
        self.flights.clear()
        self.stopping = True

    # ---- dispatch -----------------------------------------------------------------------------------
    def _ready(self, role: str) -> list[InstanceView]:
        return [v for v in self.views.values() if role in v.roles and v.draining_to is None]

    def _dispatch(self, rid: str) -> None:
        flight = self.flights[rid]
        p = self._choose_prefill(flight)
        need = [] if p is None or "E" in p.roles else self._images_to_send(flight, p)
        if p is None or (need and not self._ready("E")) or not self._ready("D"):
            self.deferred.append(rid)
            return
        for image, e in plan_encodes_for(need, self._ready("E")):
            self._encode(image, p.name, rid, e)
        incoming = {im.content_hash for im in flight.msg.images if (im.content_hash, p.name) in self.encodes}
        self._submit(flight, p, tuple(sorted(incoming)))

    def _choose_prefill(self, flight: Flight) -> InstanceView | None:
        session = self.sessions.get(flight.msg.session_id or "")
        if session and session[0] in self.views:
            return self.views[session[0]]
        return pick_prefill(self._ready("P"), flight.chain)

    def _images_to_send(self, flight: Flight, p: InstanceView) -> list:
        todo = {}
        for image in flight.msg.images:
            h = image.content_hash
            if (h, p.name) in self.encodes:
                self.encodes[(h, p.name)].rids.add(flight.msg.rid)
            elif h not in p.images:
                todo[h] = image
        return list(todo.values())

    def _submit(self, flight: Flight, p: InstanceView, incoming: tuple[str, ...]) -> None:
        handles, frames = {}, []
        if "E" in p.roles:
            for image in {im.content_hash: im for im in flight.msg.images}.values():
                handle, data = self.transfer.export(image.pixel_values)
                handles[image.content_hash] = handle
                frames += data
                self._track(p.name, handle)
        self._send(p.name, wire.Submit(wire.to_wire(flight.msg, handles), incoming), frames)
        flight.p, flight.d, flight.handed_off = p.name, (p.name if "D" in p.roles else None), False
        p.inflight += 1
        for h in flight.chain:
            p.chunks.add(h)

    def _encode(self, image: Any, dest: str | None, rid: str | None, e: InstanceView) -> None:
        task = self.encodes.setdefault((image.content_hash, dest), EncodeTask(image, None))
        if rid is not None:
            task.rids.add(rid)
        if task.e is not None:
            return
        handle, frames = self.transfer.export(image.pixel_values)
        self._track(e.name, handle)
        wimage = wire.WireImage(image.content_hash, tuple(image.grid_thw), image.num_tokens, handle)
        self._send(e.name, wire.EncodeJob(wimage, dest), frames)
        task.e = e.name
        e.encode_tokens += image.num_tokens
        e.images.add(image.content_hash)  # it will have it: later jobs for this image go there too

    def _retry_waiting(self) -> None:
        for _ in range(len(self.deferred)):
            rid = self.deferred.popleft()
            flight = self.flights.get(rid)
            if flight is None:
                continue
            if time.monotonic() - flight.since > WAIT_FOR_INSTANCE_S:
                self._fail(rid, "no instance able to serve this request became available")
            else:
                self._dispatch(rid)
        for _ in range(len(self.pending_handoffs)):
            self._route_handoff(*self.pending_handoffs.popleft())
        for (_, dest), task in list(self.encodes.items()):
            if task.e is None and self._ready("E"):
                self._encode(task.image, dest, None, plan_encodes_for([task.image], self._ready("E"))[0][1])

    # ---- messages from instances --------------------------------------------------------------------
    def _receive(self) -> None:
        ident, *frames = self.sock.recv_multipart(copy=False)
        name = bytes(ident.buffer).decode()
        try:
            msg, data = wire.decode([f.buffer for f in frames])
            getattr(self, f"_on_{type(msg).__name__.lower()}")(name, msg, data)
        except Exception:
            log.exception("bad message from %s", name)

    def _on_ready(self, name: str, msg: wire.Ready, data: list) -> None:
        self.views[name] = InstanceView(name, self.roles[name])
        log.info("instance %s ready (pid %d)", name, msg.pid)
        if self.ready_event is not None:
            self.ready_event(name)

    def _on_load(self, name: str, msg: wire.Load, data: list) -> None:
        view = self.views.get(name)
        if view is not None:
            view.free_pages, view.total_pages = msg.free_pages, msg.total_pages
            view.waiting, view.running = msg.waiting, msg.running

    def _on_outputs(self, name: str, msg: wire.Outputs, data: list) -> None:
        for out in msg.outputs:
            flight = self.flights.get(out.rid)
            if flight is None or name not in (flight.p, flight.d):
                continue
            flight.streamed |= bool(out.new_token_ids)
            if out.finished:
                self._finish(out.rid, name)
            flight.sink(out)

    def _on_rejected(self, name: str, msg: wire.Rejected, data: list) -> None:
        cls = getattr(errors, msg.kind, None)
        exc_type = cls if isinstance(cls, type) and issubclass(cls, errors.EpdError) else errors.EpdError
        flight = self.flights.pop(msg.rid, None)
        if flight is not None:
            self._dec_inflight(name)
            flight.sink(exc_type(msg.message))

    def _on_handoff(self, name: str, msg: wire.Handoff, data: list) -> None:
        flight = self.flights.get(msg.req.rid)
        if flight is None or flight.p != name:
            self.transfer.release(msg.kv)
            return
        self._dec_inflight(name)
        flight.handed_off = True
        self._route_handoff(msg, data, time.monotonic())

    def _route_handoff(self, msg: wire.Handoff, data: list, since: float) -> None:
        flight = self.flights.get(msg.req.rid)
        if flight is None:
            self.transfer.release(msg.kv)
            return
        session = self.sessions.get(flight.msg.session_id or "")
        d = self.views.get(session[1]) if session and session[1] else None
        d = d or pick_decode(self._ready("D"))
        if d is None:
            if time.monotonic() - since > HANDOFF_WAIT_S:
                self.transfer.release(msg.kv)
                self._fail(msg.req.rid, "no decode instance is available")
            else:
                self.pending_handoffs.append((msg, data, since))
            return
        self._track(d.name, msg.kv)
        self._send(d.name, msg, data)
        flight.d = d.name
        d.inflight += 1

    def _on_encodedone(self, name: str, msg: wire.EncodeDone, data: list) -> None:
        task = self.encodes.pop((msg.content_hash, msg.dest), None)
        view = self.views.get(name)
        if view is not None:
            view.images.add(msg.content_hash)
            view.encode_tokens = max(0, view.encode_tokens - (task.image.num_tokens if task else 0))
        if msg.error:
            for rid in task.rids if task else ():
                self._fail(rid, f"encoding an image failed: {msg.error}")
            return
        dest = self.views.get(msg.dest or "")
        if msg.embeds is None:
            return
        if dest is None or not task or not any(rid in self.flights for rid in task.rids):
            self.transfer.release(msg.embeds)
            return
        self._track(dest.name, msg.embeds)
        self._send(dest.name, wire.Embedding(msg.content_hash, msg.embeds), data)
        dest.images.add(msg.content_hash)

    def _on_needencode(self, name: str, msg: wire.NeedEncode, data: list) -> None:
        flight = self.flights.get(msg.rid)
        if flight is None:
            return
        images = [im for im in {i.content_hash: i for i in flight.msg.images}.values() if im.content_hash in msg.hashes]
        view = self.views.get(name)
        for h in msg.hashes if view is not None else ():
            view.images.discard(h)  # our view was stale: it evicted them
        for image, e in plan_encodes_for(images, self._ready("E")):
            self._encode(image, name, msg.rid, e)
        for image in images:  # no E ready: the task waits in `encodes` for one
            self.encodes.setdefault((image.content_hash, name), EncodeTask(image, None)).rids.add(msg.rid)

    def _on_controlreply(self, name: str, msg: wire.ControlReply, data: list) -> None:
        entry = self.controls.get(msg.call_id)
        if entry is not None:
            entry[1].discard(name)
            entry[2][name] = {"error": msg.error} if msg.error else msg.result
            self._settle_control(msg.call_id)

    def _settle_control(self, call_id: int) -> None:
        future, waiting, results = self.controls[call_id]
        if not waiting & set(self.views):
            del self.controls[call_id]
            future.set_result(results)

    # ---- endings and failures -----------------------------------------------------------------------
    def _finish(self, rid: str, name: str) -> None:
        flight = self.flights.pop(rid)
        self._dec_inflight(name)
        if flight.msg.session_id:
            self.sessions[flight.msg.session_id] = (flight.p, flight.d)

    def _fail(self, rid: str, reason: str) -> None:
        flight = self.flights.pop(rid, None)
        if flight is None:
            return
        if flight.holder in self.views:
            self._send(flight.holder, wire.Abort(rid))
            self._dec_inflight(flight.holder)
        flight.sink(RequestOutput(rid=rid, finished=True, finish_reason="error", error=reason))

    def _dec_inflight(self, name: str | None) -> None:
        view = self.views.get(name or "")
        if view is not None:
            view.inflight = max(0, view.inflight - 1)

    # ---- plumbing -----------------------------------------------------------------------------------
    def _send(self, name: str, msg: Any, frames: list | None = None) -> None:
        try:
            self.sock.send_multipart([name.encode(), *wire.encode(msg), *(frames or [])], copy=False)
        except zmq.ZMQError as exc:  # the peer is gone: its death is handled by `reap`
            log.warning("could not send %s to %s: %s", type(msg).__name__, name, exc)

    def _track(self, name: str, handle: Any) -> None:
        self.sent_handles[name].append(handle)

