"""What the router does when an instance dies: drop it, release what was sent to it, and dispatch again the
requests that had not streamed yet (the rest fail with a clear error). A mixin of `Router`."""
from __future__ import annotations

import logging
import time

from runtime.cluster import wire
from runtime.cluster.router_policy import Flight

log = logging.getLogger("runtime.cluster.router")


class Recovery:
    def _on_death(self, name: str) -> None:
        log.error("instance %s died; restarting it", name)
        self.stats["instance_deaths"] += 1
        self.views.pop(name, None)
        for handle in self.sent_handles.pop(name, ()):
            self.transfer.release(handle)
        self.sessions = {s: pd for s, pd in self.sessions.items() if name not in pd}
        for key, task in list(self.encodes.items()):
            if key[1] == name:
                del self.encodes[key]
            elif task.e == name:
                task.e = None  # `_retry_waiting` sends it to another E
        for rid, flight in list(self.flights.items()):
            if flight.holder == name:
                self._retry_or_fail(rid, flight, name)
        for call_id in list(self.controls):
            self._settle_control(call_id)

    def _retry_or_fail(self, rid: str, flight: Flight, dead: str) -> None:
        if flight.streamed:
            self.stats["failed"] += 1
            self._fail(rid, f"instance {dead} failed while serving this request")
            return
        self.stats["retried"] += 1
        if flight.holder not in (None, dead):
            self._send(flight.holder, wire.Abort(rid))
            self._dec_inflight(flight.holder)
        flight.p = flight.d = None
        flight.since = time.monotonic()
        self.deferred.append(rid)
