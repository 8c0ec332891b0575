"""The router thread's loop: instances' outputs are not left waiting behind a queue of commands."""
from __future__ import annotations

import zmq

from runtime.cluster import wire
from runtime.cluster.router import Router
from runtime.cluster.transfer import ShmTransfer


def test_messages_arriving_during_a_command_are_taken_in_before_the_next_command():
    ctx = zmq.Context()
    sock, peer = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
    try:
        port = sock.bind_to_random_port("tcp://127.0.0.1")
        peer.setsockopt(zmq.IDENTITY, b"D0")
        peer.connect(f"tcp://127.0.0.1:{port}")
        router = Router(sock, ShmTransfer("epdtest-router-loop"), page_size=16, image_token_id=0, reap=list)
        order: list[str] = []

        def submit(tag: str) -> None:  # a slow submit: an instance reports while it runs
            order.append(tag)
            if tag == "first":
                peer.send_multipart(wire.encode(wire.Load(running=3)))
                assert sock.poll(5000), "the instance's message never arrived"

        router._cmd_submit = submit
        router._on_load = lambda name, msg, data: order.append(f"{name} load running={msg.running}")
        router.post("submit", "first")
        router.post("submit", "second")
        router._run_commands(woken=True)
        assert order == ["first", "D0 load running=3", "second"]
    finally:
        sock.close(0)
        peer.close(0)
        ctx.term()
