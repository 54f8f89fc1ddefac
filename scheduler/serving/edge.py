"""The edge side: runs its segments of a plan locally and sends the cloud's segments to the cloud.

    session = EdgeClient("tcp://127.0.0.1:5555", model)
    latent, summary = session.generate(spec)
"""
import threading
import time
import uuid
from dataclasses import asdict

import zmq

from latentwire.kernels import FusedSampler
from latentwire.protocol import ProtocolError, wire_bytes

from .. import wire
from ..executor import Summary, initial_noise, model_device, on_model, stretches
from ..fields import FieldError
from ..plan import Segment
from .security import connect_curve
from ..segments import SegmentRun, drive

DEFAULT_TIMEOUT_S = 120.0  # a whole cloud segment on a real model; tests pass their own
DEFAULT_HEARTBEAT_TIMEOUT_S = 10.0  # the cloud beats every second, during model steps too
DEFAULT_RETRIES = 2
RETRY_BACKOFF_S = 0.2  # times the attempt number: a busy worker gets a moment
POLL_MS = 100  # how often a wait looks at the cancel flag
DEADLINE_MARGIN_S = 2.0  # the cloud's deadline falls this long before the edge's own timeout
CANCEL_LINGER_MS = 200
LINGER_MS = 0


class CloudUnavailable(RuntimeError):
    """The cloud did not answer within the deadline (not running, unreachable, or died mid-request)."""


class CloudError(RuntimeError):
    """The cloud refused a request; the text is the cloud's reason."""


class CloudRefused(CloudUnavailable):
    """The cloud's CURVE handshake rejected this edge (unknown key, wrong server key, or no CURVE)."""


class _Retryable(CloudUnavailable):
    """This request is lost (the cloud died or went silent) or was turned away as busy: send it again."""


class Cancelled(RuntimeError):
    """EdgeClient.cancel() stopped the generation; the cloud was told to drop the request."""


class EdgeClient:
    """Runs generations against one cloud endpoint; one request at a time per client."""

    def __init__(self, connect, model, *, codecs=None, timeout_s=DEFAULT_TIMEOUT_S, on_preview=None, on_step=None,
                 link=None, error_budget=None, sleep=time.sleep, fallback=False, curve_secret=None, server_key=None,
                 heartbeat_timeout_s=DEFAULT_HEARTBEAT_TIMEOUT_S, retries=DEFAULT_RETRIES, deadline_s=None,
                 on_slow=None, context=None):
        """codecs: a wire.Codecs; or None with ``link`` and ``error_budget`` given: the latent codec is
        chosen for that link (least encode + transfer + decode time within the budget), measured once
        on a latent of the model's size. link: an emulated scheduler.link.Link, delaying every message
        sent and received by its transfer time (``sleep`` is how; tests pass a recorder).
        timeout_s bounds each request's wait here; deadline_s (default: timeout_s less a margin, so that the
        cloud's `deadline` error arrives before this edge stops waiting) is the time the cloud gives the
        request before it ends it with a `deadline` error; heartbeat_timeout_s: a
        cloud silent that long (no heartbeat, preview or reply) is presumed dead (None: wait for
        timeout_s); the cloud beats during its model steps too, so a slow step is not silence: a cloud
        that beats without progress for that long is reported to on_slow(step, seconds). retries: how many more times a
        request goes out (through a broker, to another worker) after the cloud died, went silent, or
        said it is busy or stopping; then the fallback, if on, finishes here."""
        self.connect, self.model = connect, model
        if codecs is None and link is not None and error_budget is not None:
            from .link import choose_codec, measure_codecs, sample_latent

            self.codec_costs = measure_codecs(sample_latent(model))
            codecs = wire.Codecs(latent=choose_codec(self.codec_costs, link, error_budget))
        self.codecs = codecs or wire.Codecs()
        self.link, self._sleep = link, sleep
        # fallback: when the cloud does not answer, finish its steps here from the last latent held (its
        # last preview, else the latent sent to it) and mark the result degraded, rather than raise
        self.fallback = fallback
        self._last_preview = None
        self.timeout_s, self.heartbeat_timeout_s, self.retries = timeout_s, heartbeat_timeout_s, retries
        self.deadline_s = max(timeout_s - DEADLINE_MARGIN_S, timeout_s / 2) if deadline_s is None else deadline_s
        self.session_id = None  # the id of the last generation, as the cloud's logs name it
        self.worker = None  # the pid of the cloud worker that sent the last preview or handoff
        self.load = None  # the wire.Load of the last beat or handoff: the cloud's queue and utilisation
        self.attempts = 0  # requests sent, retries included, over this client's life
        self._cancel = threading.Event()
        self._monitors = {}  # socket -> its handshake-event monitor
        self.on_preview = on_preview  # on_preview(step, latent) for each preview the cloud streams
        self.on_step = on_step  # on_step(step, real) after each step run here
        self.on_slow = on_slow  # on_slow(step, seconds): the cloud beats but has been at this step that long
        self.stalls = 0  # times the cloud was seen alive but stalled, over this client's life
        self._ctx = context or zmq.Context.instance()
        self.bytes_up = self.bytes_down = 0
        if (curve_secret is None) != (server_key is None):
            raise ValueError("CURVE needs both this edge's secret key and the cloud's public key")
        self.curve = (curve_secret, server_key) if curve_secret else None

    def generate(self, spec):
        """Run ``spec`` (a SessionSpec) -> (latent, Summary). The edge's own segments run here, on the
        model's device. Raises Cancelled if cancel() is called meanwhile (from another thread)."""
        plan = spec.plan
        self._cancel.clear()
        self.session_id = uuid.uuid4().hex
        scheduler = spec.make_scheduler()
        sampler = FusedSampler(scheduler, device=model_device(self.model))
        summary = Summary(plan=plan.name, steps=plan.num_steps, labels=plan.labels())
        x, state, conditioning = None, None, None
        self._sock = self._socket()
        try:
            for a, b in stretches(plan):
                if a:
                    summary.handoffs += 1
                    if spec.restart_solver:
                        state = None
                if plan.segments[a].side == "cloud":
                    try:
                        x, state, calls, forecasts = self._remote(spec, a, b, x, state)
                    except CloudUnavailable as e:
                        if not self.fallback or isinstance(e, CloudRefused):  # a key mistake is no outage
                            raise
                        if conditioning is None:
                            conditioning = self.model.encode_prompt(spec.prompt, spec.negative_prompt)
                        x, state = self._finish_here(spec, sampler, conditioning, a, b, x, summary)
                        continue
                    summary.cloud_model_calls += calls
                    summary.forecast_steps += forecasts
                    continue
                x = initial_noise(self.model, spec.seed, scheduler) if x is None else x
                if conditioning is None:
                    conditioning = self.model.encode_prompt(spec.prompt, spec.negative_prompt)
                run = drive(SegmentRun(spec, plan.segments[a:b], sampler, conditioning, x, state,
                                       self._after_step), self.model)
                x, state = run.x, run.state
                summary.edge_model_calls += run.calls
                summary.forecast_steps += run.forecasts
        finally:
            self._close(self._sock)
        return x, summary

    def run_remote(self, spec, a, b, x=None, state=None, image=None):
        """Have the cloud run segments [a, b) of spec's plan from latent x (None: the cloud draws x_T from
        the seed) and solver state -> (x, state, model calls, forecast steps). This is what generate()
        does for each stretch of cloud segments; a serving stack that drives its own loop calls it.
        image: an upscaler's low-resolution input (1, 3, h, w) in [-1, 1] (the cloud's model must be one)."""
        self._cancel.clear()
        self.session_id = uuid.uuid4().hex
        self._sock = self._socket()
        try:
            return self._remote(spec, a, b, x, state, image)
        finally:
            self._close(self._sock)

    def cancel(self):
        """Stop the generation in progress (thread-safe): the edge stops at its next step or poll, tells the
        cloud to drop its request at its next step boundary, and generate() raises Cancelled."""
        self._cancel.set()

    def health(self):
        """Ask the cloud (through a broker: one of its workers) how it is -> dict (status, jobs, pid, ...).
        An unanswered request goes again, like a run request, up to ``retries`` times."""
        for attempt in range(self.retries + 1):
            sock = self._socket()
            try:
                request = uuid.uuid4().bytes
                self._put(sock, [request] + wire.HealthRequest().to_frames())
                health = asdict(self._await(sock, request, kind=wire.Health))
                return {k: v for k, v in health.items() if not (k == "replicas" and v is None)}  # a gateway's only
            except _Retryable as e:
                if attempt == self.retries:
                    raise CloudUnavailable(f"{e} ({attempt + 1} requests sent)") from None
            finally:
                self._close(sock)

    def _after_step(self, i, t, x_t, m, real):
        if self._cancel.is_set():
            raise Cancelled("the generation was cancelled")
        if self.on_step is not None:
            self.on_step(i, real)

    def _close(self, sock, linger_ms=LINGER_MS):
        sock.disable_monitor()
        self._monitors.pop(sock).close()
        sock.linger = linger_ms
        sock.close()

    def _socket(self):
        sock = self._ctx.socket(zmq.DEALER)
        sock.linger = LINGER_MS
        if self.curve is not None:
            connect_curve(sock, *self.curve)
        # handshake events tell a refused edge at once, rather than at its deadline
        self._monitors[sock] = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                                                | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
        sock.connect(self.connect)
        return sock

    def _refused(self, monitor):
        """The reason the cloud rejected our handshake, if a monitor event says it did."""
        from zmq.utils.monitor import recv_monitor_message

        while monitor.poll(0):
            event = recv_monitor_message(monitor)["event"]
            if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                return "it does not admit this edge's key (is NAME.key in the cloud's --allow folder?)"
            return ("the connection's security handshake failed (does one side use CURVE and the other not, "
                    "or is --server-key the cloud's public key?)")
        return None

    def _finish_here(self, spec, sampler, conditioning, a, b, x, summary):
        """Degraded mode: run the cloud's segments [a, b) with the edge's model, from the last preview the
        cloud streamed inside them (the latent at that step), else from the latent sent (x_T if none),
        with the solver restarted at first order. -> (x, state)."""
        plan = spec.plan
        start = plan.segments[a].start
        if self._last_preview is not None and plan.segments[a].start <= self._last_preview[0] < plan.segments[b - 1].stop:
            start, x = self._last_preview
        elif x is None:
            x = initial_noise(self.model, spec.seed, sampler.scheduler)
        summary.degraded = True
        local = [Segment("edge", max(seg.start, start), seg.stop, renoise=seg.renoise and start <= seg.start)
                 for seg in plan.segments[a:b] if seg.stop > start]
        run = drive(SegmentRun(spec, local, sampler, conditioning, on_model(self.model, x), None, self._after_step),
                    self.model)
        summary.edge_model_calls += run.calls
        summary.forecast_steps += run.forecasts
        return run.x, run.state

    def _remote(self, spec, a, b, x, state, image=None):
        """Have the cloud run segments [a, b) -> (x, state, model calls, forecast steps). A request lost
        with a dead or silent cloud, or turned away as busy, goes out again on a fresh connection (a
        broker hands it to another worker): the same inputs, so the same result."""
        for attempt in range(self.retries + 1):
            if attempt:
                self._sleep(RETRY_BACKOFF_S * attempt)
            request = self._send(self._sock, spec, a, b, x, state, image)
            try:
                reply = self._await(self._sock, request)
            except (_Retryable, Cancelled) as e:
                self._abandon(request)
                if isinstance(e, Cancelled):
                    raise
                if attempt == self.retries:
                    raise CloudUnavailable(f"{e} ({attempt + 1} requests sent)") from None
            except CloudUnavailable:
                self._abandon(request)
                raise
            else:
                self._check_handoff(reply, spec, b, image)
                state = None if reply.state is None else reply.state.map(lambda t: on_model(self.model, t))
                return on_model(self.model, reply.latent), state, reply.model_calls, reply.forecast_steps

    def _check_handoff(self, reply, spec, b, image=None):
        """The cloud's handoff must continue this generation where the plan says it does."""
        stop = spec.plan.segments[b - 1].stop
        if reply.seed != spec.seed:
            raise CloudError(f"the cloud's handoff is of seed {reply.seed}, this session's is {spec.seed}")
        if reply.step_index != stop:
            raise CloudError(f"the cloud handed off at step {reply.step_index}; segments ending at step {stop} "
                             "were asked for (a cloud of another version?)")
        expected = getattr(self.model, "latent_shape", None)
        if expected is not None and image is not None:  # an upscaler's latent is its image's size
            expected = (expected[0], *image.shape[-2:])
        if expected is not None and tuple(reply.latent.shape) != (1, *expected):
            raise CloudError(f"the cloud's latent has shape {tuple(reply.latent.shape)}; this edge's model works on "
                             f"{(1, *expected)}")

    def _abandon(self, request):
        """Tell the cloud to drop a request (if it is alive to hear it), and never read its late replies."""
        try:
            self._sock.send_multipart([request] + wire.Cancel().to_frames(), flags=zmq.NOBLOCK, copy=False)
        except zmq.ZMQError:
            pass
        self._close(self._sock, linger_ms=CANCEL_LINGER_MS)  # long enough for the cancel to leave
        self._sock = self._socket()

    def _send(self, sock, spec, a, b, x, state, image=None):
        """Send a run request for segments [a, b) from latent x (None: the cloud draws x_T) -> its id."""
        self._last_preview = None
        request_id = uuid.uuid4().bytes
        self.attempts += 1
        run = wire.Run(session=spec, segments=(a, b), session_id=self.session_id, deadline_s=float(self.deadline_s),
                       codecs=self.codecs,
                       # the cloud checks its model against these before it runs anything
                       latent_space=wire.plain(self.model.latent_space), text_space=wire.plain(self.model.text_space),
                       latent=x, state=state if state and not spec.restart_solver else None, image=image)
        frames = run.to_frames()
        self.bytes_up += wire_bytes(frames)
        if self.link is not None:
            self._sleep(self.link.transfer_s(wire_bytes(frames)))  # the request's way up
        self._put(sock, [request_id] + frames)
        return request_id

    def _put(self, sock, frames):
        """Send ``frames``, waiting at most timeout_s for a connection to take them. A plain send can block
        for good: a DEALER whose connection the cloud refused at the CURVE handshake has no pipe left to
        queue on, and the refusal itself is only in the monitor, which the wait here reads."""
        deadline = time.monotonic() + self.timeout_s
        monitor = self._monitors[sock]
        while True:
            try:
                return sock.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                pass
            if self._cancel.is_set():
                raise Cancelled("the generation was cancelled")
            reason = self._refused(monitor)
            if reason:
                raise CloudRefused(f"the cloud at {self.connect} refused this edge: {reason}")
            if time.monotonic() >= deadline:
                raise CloudUnavailable(f"could not send to the cloud at {self.connect} within {self.timeout_s:g} s: "
                                       "is `latentwire cloud` running there, and reachable?")
            monitor.poll(POLL_MS)  # a refusal wakes this at once

    def _await(self, sock, request_id, kind=wire.Handoff):
        """The reply to request_id (a wire.Handoff, or ``kind``), previews passed to on_preview on the way.
        A cloud that beats but makes no progress for heartbeat_timeout_s is slow, not dead: on_slow(step,
        seconds) hears of it (once per stall), and the wait goes on to timeout_s."""
        start = heard = progress = time.monotonic()
        deadline = start + self.timeout_s
        last_step, stalled = None, False
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        monitor = self._monitors[sock]
        poller.register(monitor, zmq.POLLIN)
        while True:
            if self._cancel.is_set():
                raise Cancelled("the generation was cancelled")
            now = time.monotonic()
            ready = dict(poller.poll(0 if now >= deadline else min(POLL_MS, int((deadline - now) * 1000) + 1)))
            if now >= deadline and sock not in ready:  # what waited in the socket is read before giving up
                if last_step is None and heard == start:
                    raise CloudUnavailable(f"no answer from the cloud at {self.connect} within {self.timeout_s:g} s: "
                                           "is `latentwire cloud` running there, and reachable?")
                raise CloudUnavailable(f"the cloud at {self.connect} is alive but did not finish within "
                                       f"{self.timeout_s:g} s (last at step {last_step})")
            reason = self._refused(monitor) if monitor in ready else None
            if reason:
                raise CloudRefused(f"the cloud at {self.connect} refused this edge: {reason}")
            if sock not in ready:
                # silence is judged only on an empty socket: replies that waited while this edge was busy
                # (a slow callback, a starved thread) are read first
                if self.heartbeat_timeout_s is not None and time.monotonic() - heard > self.heartbeat_timeout_s:
                    raise _Retryable(f"the cloud at {self.connect} went silent for {self.heartbeat_timeout_s:g} s "
                                     "(no heartbeat): it died, or is not running")
                continue
            reply = sock.recv_multipart(copy=False)
            if bytes(reply[0]) != request_id:
                continue  # a late reply to an earlier, abandoned request
            heard = time.monotonic()
            self.bytes_down += wire_bytes(reply[1:])
            if self.link is not None:
                self._sleep(self.link.transfer_s(wire_bytes(reply[1:]), down=True))  # the reply's way down
            try:
                m = wire.parse_reply(reply[1:])
            except (ProtocolError, FieldError) as e:
                raise CloudError(f"the cloud at {self.connect} sent a malformed reply: {e}") from None
            if isinstance(m, wire.Beat):
                self.load = m.load
                if not m.running:  # queued behind other sessions: waiting, not slow
                    last_step, progress = None, heard
                elif m.step != last_step:
                    last_step, progress, stalled = m.step, heard, False
                elif (not stalled and self.heartbeat_timeout_s is not None
                      and heard - progress > self.heartbeat_timeout_s):
                    stalled = True
                    self.stalls += 1
                    if self.on_slow is not None:
                        self.on_slow(m.step, heard - progress)
                continue
            if isinstance(m, wire.Preview):
                self.worker = m.worker
                last_step, progress = m.step + 1, heard
                self._last_preview = (m.step, m.latent)
                if self.on_preview is not None:
                    self.on_preview(m.step, m.latent)
                continue
            if isinstance(m, wire.Error):
                if m.code in wire.RETRYABLE:
                    raise _Retryable(f"the cloud at {self.connect} turned the request away: {m.message}")
                if m.code == "deadline":
                    raise CloudUnavailable(f"the cloud at {self.connect} did not finish in time: {m.message}")
                raise CloudError(m.message)
            if not isinstance(m, kind):
                raise CloudError(f"the cloud answered a {kind.__name__} request with a {type(m).__name__} message")
            if isinstance(m, wire.Handoff):
                self.worker, self.load = m.worker, m.load
            return m


def summary_dict(summary, **extra):
    d = asdict(summary)
    d.pop("labels")
    d.update(extra)
    return d
