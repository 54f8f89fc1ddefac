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


class CloudReplica:
    """model: what ``latentwire cloud --model`` takes (a diffusers folder, None: the embedded world model,
    'ideal'). threads: torch CPU threads (0: torch's default). The rest: the engine's."""

    def __init__(self, model=None, *, device="cpu", dtype="float32", threads=0, preview_every=0, max_batch=1,
                 max_wait_s=0.0, heartbeat_s=1.0, limits=DEFAULT_SERVING_LIMITS):
        import torch

        from latentwire.cli import _load  # the daemon's own loader, its errors included

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
