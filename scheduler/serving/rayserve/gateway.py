"""The gateway's engine: what CloudServer (scheduler/serving/cloud.py) drives, its sessions run on a Ray
Serve deployment of CloudReplica (replica.py) instead of in this process.

``latentwire cloud --ray`` is a CloudServer whose engine is a RayEngine: the edges' endpoint, CURVE,
message checks, beats and health are the daemon's own; only where a session runs changes. RayEngine
admits a session under the same limits as CloudEngine (its Admission), then makes one streaming
DeploymentHandle call for it, which Serve routes to the replica with the fewest requests in flight, and
relays the replica's events to the edge as the frames the replica encoded (wire.Relayed).

A replica that dies mid-session costs no session: the call fails with a RayActorError and the gateway
makes it again, the same wire.Run, which Serve routes to a live replica; the session starts over there and
ends with the same result (the cloud draws nothing but from the request's seed). After ``retries``
deaths the edge gets `unavailable` and falls back as it does from any cloud.

The event loop of those calls runs on the engine thread (``run_forever``), so every ``emit`` happens on
that one thread, as CloudServer requires.
"""
import asyncio
import logging
import os
import time
from dataclasses import dataclass
from typing import Optional

import ray
from prometheus_client import Counter, Gauge
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError

from ... import wire
from ...engine import LOAD_WINDOW_S, Admission, Refused, new_ticket
from ...limits import DEFAULT_SERVING_LIMITS
from ...logs import fields
from ...metrics import Metrics
from .replica import FINAL, CloudReplica

APP = "latentwire"  # the Serve application's default name (--ray-app)
DEPLOYMENT = "CloudReplica"
RETRIES = 2  # replica deaths one session survives
RETRY_DELAY_S = 0.2  # before a session is sent again: the router learns of the death meanwhile
STATUS_S = 1.0  # how often the gateway asks Serve how many replicas run
IDLE_WAIT_S = 0.1
DIED = (RayActorError, ActorUnavailableError)  # the replica's process is gone (or unreachable)
log = logging.getLogger("latentwire.gateway")


@dataclass(frozen=True)
class ReplicaOptions:
    """How Serve places and scales the replicas. replicas: how many (the least, when autoscaling);
    max_replicas: autoscale between replicas and this on sessions in flight (None: a fixed count);
    target_sessions: the sessions in flight per replica autoscaling aims at (None: max_batch, a replica's
    full batch); max_ongoing: sessions Serve sends one replica at once (None: 2 x max_batch, so that a
    replica's next batch waits in its own queue while this one steps); cpus, gpus: each replica's Ray
    resources (fractions share a device)."""

    replicas: int = 1
    max_replicas: Optional[int] = None
    target_sessions: Optional[float] = None
    max_ongoing: Optional[int] = None
    cpus: float = 1.0
    gpus: float = 0.0

    def __post_init__(self):
        def positive_int(name, value):
            if type(value) is not int or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")

        positive_int("replicas", self.replicas)
        if self.max_replicas is not None:
            positive_int("max_replicas", self.max_replicas)
            if self.max_replicas < self.replicas:
                raise ValueError(f"max_replicas ({self.max_replicas}) must be at least replicas ({self.replicas})")
        if self.max_ongoing is not None:
            positive_int("max_ongoing", self.max_ongoing)
        for name in ("target_sessions", "cpus", "gpus"):
            value = getattr(self, name)
            if value is None and name == "target_sessions":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or (
                    name == "target_sessions" and value == 0):
                raise ValueError(f"{name} must be a number {'> 0' if name == 'target_sessions' else '>= 0'}, "
                                 f"got {value!r}")

    def deployment(self, max_batch):
        """-> serve.deployment options."""
        options = {"ray_actor_options": {"num_cpus": self.cpus, "num_gpus": self.gpus},
                   "max_ongoing_requests": self.max_ongoing or max(2, 2 * max_batch)}
        if self.max_replicas is None:
            options["num_replicas"] = self.replicas
        else:
            options["autoscaling_config"] = {"min_replicas": self.replicas, "max_replicas": self.max_replicas,
                                             "initial_replicas": self.replicas,
                                             "target_ongoing_requests": self.target_sessions or max_batch}
        return options


def deploy(model=None, *, app=APP, options=ReplicaOptions(), max_batch=1, **engine):
    """Start Serve here if it is not running (no HTTP proxy: the gateway is the way in) and deploy
    ``options.replicas`` CloudReplicas of ``model`` as application ``app`` -> once they all serve.
    engine: CloudReplica's other arguments (device, dtype, threads, preview_every, max_wait_s,
    heartbeat_s, limits). Deploying again with other arguments updates the replicas in place."""
    serve.start(proxy_location="Disabled")
    replica = serve.deployment(CloudReplica, name=DEPLOYMENT).options(**options.deployment(max_batch))
    serve.run(replica.bind(model, max_batch=max_batch, **engine), name=app, route_prefix=None)


def replicas_running(app=APP):
    """How many of app's replicas are RUNNING (0 if there is no such application)."""
    status = serve.status().applications.get(app)
    if status is None or DEPLOYMENT not in status.deployments:
        return 0
    return status.deployments[DEPLOYMENT].replica_states.get("RUNNING", 0)


class RayEngine:
    """The engine interface CloudServer drives (submit, cancel, load, health, stop, run_forever) over the
    replicas of Serve application ``app``. max_batch: the replicas' (health reports it); limits: what the
    gateway admits (a ServingLimits; each replica also checks its own); retries: replica deaths a session
    survives."""

    def __init__(self, app=APP, *, max_batch=1, limits=DEFAULT_SERVING_LIMITS, metrics=None, retries=RETRIES):
        if type(retries) is not int or retries < 0:
            raise ValueError(f"retries must be an int >= 0, got {retries!r}")
        self.app, self.max_batch, self.limits, self.retries = app, max_batch, limits, retries
        self.metrics = metrics or Metrics()
        self.admission = Admission(limits, self.metrics)
        self._handle = serve.get_deployment_handle(DEPLOYMENT, app).options(stream=True)
        self._loop = asyncio.new_event_loop()
        self._tasks = {}  # id(ticket) -> its session's task (on the loop)
        self._tickets = {}  # id(ticket) -> ticket, while in flight
        self._heard = {}  # replica pid -> (time, (queued, running, utilisation)) of its latest report
        self._replicas = replicas_running(app)
        self._stopping = False
        self._started = time.monotonic()
        self.worker = os.getpid()  # health's pid: the gateway's (each handoff names its replica's)
        r = self.metrics.registry
        Gauge("latentwire_replicas", "replicas of the Ray Serve deployment running", registry=r).set_function(
            lambda: self._replicas)
        self._retried = Counter("latentwire_replica_retries", "sessions sent again after their replica died",
                                registry=r)
        self.metrics.queued.set_function(lambda: self.load().queued)
        self.metrics.utilisation.set_function(lambda: self.load().utilisation)

    # -- any thread ---------------------------------------------------------------------------------------

    def submit(self, request, emit, client=b""):
        ticket = new_ticket(request, emit, client, self.limits)
        if self._stopping:
            raise Refused(wire.Error("unavailable", "this cloud gateway is stopping; try again"))
        queued = self.admission.admit(client)
        self._tickets[id(ticket)] = ticket
        self._loop.call_soon_threadsafe(self._open, ticket, request)
        log.info("admitted", extra=fields(session=ticket.session_id, plan=request.session.plan.name,
                                          segments=list(request.segments), queued=queued))
        return ticket

    def cancel(self, ticket):
        ticket.cancelled = True
        self._loop.call_soon_threadsafe(self._cancel, ticket)

    def stop(self):
        self._stopping = True

    @property
    def stopping(self):
        return self._stopping

    def load(self):
        """-> wire.Load: the gateway's sessions waiting for a replica's first step (queued) and stepping
        (running); utilisation: the mean over running replicas of what each last reported (a replica unheard
        from for LOAD_WINDOW_S counts as idle)."""
        tickets = list(self._tickets.values())
        running = sum(1 for t in tickets if t.started is not None)
        now = time.monotonic()
        heard = [load[2] for when, load in list(self._heard.values()) if now - when < LOAD_WINDOW_S]
        replicas = max(self._replicas, len(heard))
        utilisation = round(min(1.0, sum(heard) / replicas), 4) if replicas else 0.0
        return wire.Load(len(tickets) - running, running, utilisation)

    def health(self):
        load = self.load()
        return wire.Health("stopping" if self._stopping else "ok", load.queued + load.running, load.running,
                           self.worker, self.max_batch, round(time.monotonic() - self._started, 3), load.queued,
                           load.utilisation, replicas=self._replicas)

    # -- the engine thread --------------------------------------------------------------------------------

    def run_forever(self):
        """Relay sessions until stop() and every admitted one is done."""
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._serve())
        finally:
            self._loop.close()

    async def _serve(self):
        status = asyncio.ensure_future(self._watch_replicas())
        try:
            while not (self._stopping and not self._tickets):
                await asyncio.sleep(IDLE_WAIT_S)
        finally:
            status.cancel()

    async def _watch_replicas(self):
        loop = asyncio.get_running_loop()
        while True:
            try:  # serve.status() asks the controller and waits: not on this loop's thread
                self._replicas = await loop.run_in_executor(None, replicas_running, self.app)
            except Exception as e:  # a controller that is restarting: keep the last count
                log.warning("could not read the deployment's status", extra=fields(error=repr(e)))
            now = time.monotonic()  # replicas gone (or idle) for a window: forget them
            for pid in [p for p, (when, _) in self._heard.items() if now - when > LOAD_WINDOW_S]:
                del self._heard[pid]
            await asyncio.sleep(STATUS_S)

    def _open(self, ticket, request):
        if ticket.cancelled:
            return self._end(ticket, "cancelled", None)
        self._tasks[id(ticket)] = asyncio.ensure_future(self._session(ticket, request))

    def _cancel(self, ticket):
        task = self._tasks.get(id(ticket))
        if task is not None:
            task.cancel()

    async def _session(self, ticket, request):
        try:
            async with asyncio.timeout(max(0.0, ticket.deadline - time.monotonic())):
                outcome, event = await self._relay(ticket, request)
        except TimeoutError:
            outcome, event = "deadline", wire.Error("deadline", f"the session's deadline passed at step {ticket.step} "
                                                                f"of {request.session.plan.num_steps}")
        except asyncio.CancelledError:
            outcome, event = "cancelled", None
        except Exception as e:  # a bug here must end this session only
            log.exception("a session's relay failed", extra=fields(session=ticket.session_id))
            outcome, event = "error", wire.Error("model", f"the gateway failed: {type(e).__name__}: {e}")
        self._end(ticket, outcome, event)

    async def _relay(self, ticket, request):
        """One streaming call per attempt -> (outcome, the session's last event)."""
        start = ticket.step
        for attempt in range(self.retries + 1):
            stream = self._handle.run.remote(request, ticket.client)
            try:
                async for kind, frames, code, step, started, load, pid in stream:
                    self._heard[pid] = (time.monotonic(), load)
                    ticket.step = step
                    if started and ticket.started is None:
                        ticket.started = time.monotonic()
                        self.metrics.queue_wait.observe(ticket.started - ticket.admitted)
                    if kind == "progress":
                        continue
                    event = wire.Relayed(kind, frames, code)
                    if kind in FINAL:
                        return ("finished" if kind == "handoff" else code or "error"), event
                    ticket.emit(event)
                return "error", wire.Error("model", "the replica's stream ended without a handoff")
            except asyncio.CancelledError:
                stream.cancel()
                raise
            except DIED as e:
                if attempt == self.retries:
                    return "error", wire.Error("unavailable", f"the replicas running this session died "
                                                              f"{attempt + 1} times; try again ({type(e).__name__})")
                log.warning("a replica died mid-session; sending the session again", extra=fields(
                    session=ticket.session_id, step=ticket.step, attempt=attempt + 1, error=type(e).__name__))
                self._retried.inc()
                ticket.step, ticket.started = start, None
                await asyncio.sleep(RETRY_DELAY_S)
            except BackPressureError:
                return "refused", wire.Error("busy", "every replica has its most sessions queued; try again later")
            except RayTaskError as e:  # the replica raised: a bug there, which another replica would meet too
                return "error", wire.Error("model", f"the replica failed: {_cause(e)}")

    def _end(self, ticket, outcome, event):
        ticket.done = True
        self._tasks.pop(id(ticket), None)
        self._tickets.pop(id(ticket), None)
        self.admission.release(ticket.client)
        seconds = time.monotonic() - ticket.admitted
        self.metrics.sessions.labels(outcome).inc()
        if outcome == "finished":
            self.metrics.latency.observe(seconds)
        log.info(outcome, extra=fields(session=ticket.session_id, step=ticket.step, seconds=round(seconds, 4)))
        if event is not None:
            try:
                ticket.emit(event)
            except Exception:
                log.exception("a session's last event could not be sent", extra=fields(session=ticket.session_id))


def _cause(error):
    cause = getattr(error, "cause", None)
    return f"{type(cause).__name__}: {cause}" if cause is not None else str(error).splitlines()[0]


def connect(address=None, **kwargs):
    """ray.init for a gateway: join the cluster at ``address`` (None: the one RAY_ADDRESS names, else start
    one on this machine), once per process."""
    if not ray.is_initialized():
        ray.init(address=address, **kwargs)
