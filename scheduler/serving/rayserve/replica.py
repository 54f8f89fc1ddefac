"""One Ray Serve replica of the cloud: a model and its own CloudEngine (scheduler/engine.py), which batches
the steps of the sessions on this replica exactly as the ZeroMQ daemon's engine does.

Ray's ``@serve.batch`` batches whole requests, and a session is many steps, so the step loop stays the
engine's: each ``run`` call submits one session to the engine's queue and streams what the engine emits
for it back to the gateway. The engine runs on a thread of its own; its events reach the call's
coroutine through the replica's event loop. Every item of the stream is one tuple,

    (kind, frames, code, step, started, load, pid)

kind: "progress" (frames None) or one of wire.REPLIES; frames: the event encoded here, with the request's
own codecs, ready for the edge; code: an error's; step, started: where the session is; load: this
replica's (queued, running, utilisation); pid: this replica's process. A progress item comes first (the
gateway learns which replica took the session) and then whenever a heartbeat interval passes with no
event, so that the gateway's beats to the edge carry the session's step.
"""
import asyncio
import os
import threading

from ...engine import CloudEngine, Refused
from ...limits import DEFAULT_SERVING_LIMITS

FINAL = ("handoff", "error")  # the events that end a session


def _keep_serve_grpc_on_loopback():
    """On a Ray node whose address is 127.0.0.1 (a single-machine cluster, as the tests and benchmarks
    start), bind this replica's inter-deployment gRPC server to 127.0.0.1 too.

    Ray Serve 2.60 binds it to "[::]:0", every interface, hard-coded in ray/serve/_private/replica.py,
    even where every other Ray process listens on loopback; peers reach it at the node's address, here
    127.0.0.1, so nothing is lost. Called in the replica's constructor, which runs before Serve starts that
    server. tests/test_ray_serve.py checks that every socket a replica listens on is loopback; should Ray
    rename what is wrapped here, this does nothing and that test says so."""
    import ray
    from ray.serve._private import replica as serve_replica

    bind = getattr(serve_replica, "add_port_to_grpc_server", None)
    if bind is None or getattr(bind, "latentwire_loopback", False) or ray.util.get_node_ip_address() != "127.0.0.1":
        return

    def on_loopback(server, address):
        return bind(server, "127.0.0.1:0" if address == "[::]:0" else address)

    on_loopback.latentwire_loopback = True
    serve_replica.add_port_to_grpc_server = on_loopback


class CloudReplica:
    """model: what ``latentwire cloud --model`` takes (a diffusers folder, None: the embedded world model,
    'ideal'). threads: torch CPU threads (0: torch's default). The rest: the engine's."""

    def __init__(self, model=None, *, device="cpu", dtype="float32", threads=0, preview_every=0, max_batch=1,
                 max_wait_s=0.0, heartbeat_s=1.0, limits=DEFAULT_SERVING_LIMITS):
        import torch

        from latentwire.cli import _load  # the daemon's own loader, its errors included

        _keep_serve_grpc_on_loopback()
        if threads:
            torch.set_num_threads(threads)
        try:
            loaded = _load(model, "cloud", device, dtype)
        except SystemExit as e:  # the loader speaks to a command line; a replica's constructor raises
            raise RuntimeError(str(e)) from None
        self.heartbeat_s, self.pid = heartbeat_s, os.getpid()
        self.engine = CloudEngine(loaded, preview_every=preview_every, max_batch=max_batch, max_wait_s=max_wait_s,
                                  limits=limits)
        threading.Thread(target=self.engine.run_forever, name="latentwire-engine", daemon=True).start()

    async def run(self, request, client=b""):
        """Run one wire.Run (checked at the gateway already) -> the stream of items in the module doc."""
        loop, events = asyncio.get_running_loop(), asyncio.Queue()

        def emit(event):  # on the engine's thread: encode there, so a reply no codec can encode fails there
            kind = type(event).__name__.lower()
            frames = [bytes(f) for f in event.to_frames(request.codecs)]
            loop.call_soon_threadsafe(events.put_nowait, (kind, frames, getattr(event, "code", None)))

        try:
            ticket = self.engine.submit(request, emit, client)
        except Refused as e:
            yield ("error", [bytes(f) for f in e.error.to_frames()], e.error.code, 0, False, self._load(), self.pid)
            return
        try:
            yield self._item(ticket, "progress")
            while True:
                try:
                    kind, frames, code = await asyncio.wait_for(events.get(), self.heartbeat_s)
                except asyncio.TimeoutError:
                    yield self._item(ticket, "progress")
                    continue
                yield self._item(ticket, kind, frames, code)
                if kind in FINAL:
                    return
        finally:  # the gateway cancelled the call (its edge did, or the gateway stops): free the slot
            if not ticket.done:
                self.engine.cancel(ticket)

    def _item(self, ticket, kind, frames=None, code=None):
        return (kind, frames, code, ticket.step, ticket.started is not None, self._load(), self.pid)

    def _load(self):
        load = self.engine.load()
        return (load.queued, load.running, load.utilisation)
