"""The ``latentwire`` command. Subcommands are thin: each calls the package's public API."""
import argparse
import os
import sys


def _codecs(args):
    from latentwire.codec_table import codec_table

    print(codec_table(tuple(args.shape), seed=args.seed, levels=args.level))
    return 0


def _keys(args):
    from latentwire.scheduler.serving.security import write_keys

    public, secret = write_keys(args.dir, args.name)
    print(f"wrote {public} (public: give it to the other side) and {secret} (secret: keep it)")
    return 0


# `latentwire cloud` flags a pool passes on to each of its workers: (argparse dest, flag)
WORKER_FLAGS = [("model", "--model"), ("preview_every", "--preview-every"), ("threads", "--threads"),
                ("max_batch", "--max-batch"), ("max_wait_ms", "--max-wait-ms"), ("heartbeat", "--heartbeat"),
                ("max_message_bytes", "--max-message-bytes"), ("max_tensor_elements", "--max-tensor-elements"),
                ("max_sessions", "--max-sessions"), ("max_sessions_per_client", "--max-sessions-per-client"),
                ("max_steps_per_session", "--max-steps-per-session"), ("max_deadline", "--max-deadline"),
                ("device", "--device"), ("dtype", "--dtype")]
# --max-... flag dest -> ServingLimits field
LIMIT_FLAGS = {"max_message_bytes": "max_message_bytes", "max_tensor_elements": "max_tensor_elements",
               "max_sessions": "max_sessions", "max_sessions_per_client": "max_sessions_per_client",
               "max_steps_per_session": "max_steps_per_session", "max_deadline": "max_deadline_s"}
DTYPES = ("float32", "float16", "bfloat16")


def _limits(args, serving_limits):
    """ServingLimits from the --max-... flags given; the others keep their defaults."""
    return serving_limits(**{name: getattr(args, dest) for dest, name in LIMIT_FLAGS.items()
                             if getattr(args, dest) is not None})


def _device_arguments(parser):
    parser.add_argument("--device", default="cpu", help="where the model runs: cpu, cuda, cuda:1, ... (default cpu)")
    parser.add_argument("--dtype", default="float32", choices=DTYPES,
                        help="the model's weights and latents (default float32)")


def _check_device(who, device):
    """A --device torch can use here, or a clear exit."""
    import torch

    try:
        d = torch.device(device)
    except (RuntimeError, ValueError):
        raise SystemExit(f"latentwire {who}: --device {device!r} is not a torch device (cpu, cuda, cuda:1, ...)") from None
    if d.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"latentwire {who}: --device {device} asked for, but torch sees no CUDA device here")
    return d


def _cloud(args):
    from latentwire.scheduler import logs
    from latentwire.scheduler.serving.security import KeyError_, is_loopback

    if args.connect and args.workers:
        raise SystemExit("latentwire cloud: --workers starts its own broker; --connect makes this a worker of another")
    if not args.connect and not is_loopback(args.bind) and not args.curve_secret and not args.insecure:
        raise SystemExit(f"latentwire cloud: refusing to serve {args.bind} in the clear: give --curve-secret "
                         "SERVER.key_secret and --allow CLIENTS_DIR (keys from `latentwire keys`), or --insecure")
    if args.ray is not None and (args.workers or args.connect):
        raise SystemExit("latentwire cloud: --ray serves through a Ray Serve deployment; drop --workers and --connect")
    logs.configure()
    if args.workers:
        return _pool(args)
    if args.ray is not None:
        return _ray_gateway(args)
    from latentwire.scheduler.serving.cloud import CloudServer
    from latentwire.scheduler.limits import ServingLimits
    from latentwire.scheduler.metrics import Metrics

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    try:
        limits = _limits(args, ServingLimits)
    except ValueError as e:
        raise SystemExit(f"latentwire cloud: {e}") from None
    model = _load(args.model, "cloud", args.device, args.dtype)
    metrics = Metrics()
    try:
        server = CloudServer(model, None if args.connect else args.bind, connect=args.connect,
                             preview_every=args.preview_every, max_batch=args.max_batch,
                             max_wait_s=args.max_wait_ms / 1000, heartbeat_s=args.heartbeat, limits=limits,
                             metrics=metrics, curve_secret=args.curve_secret, allow=args.allow,
                             server_key=args.server_key, insecure=args.insecure)
    except (KeyError_, ValueError) as e:
        raise SystemExit(f"latentwire cloud: {e}") from None
    if args.metrics_port:
        metrics.serve(args.metrics_port)
    print(f"latentwire cloud: serving {args.model} on {server.endpoint}"
          + (f", metrics on http://127.0.0.1:{args.metrics_port}/metrics" if args.metrics_port else ""), flush=True)
    server.serve_forever()
    metrics.close()
    print("latentwire cloud: stopped", flush=True)
    return 0


def _ray_gateway(args):
    """latentwire cloud --ray: the daemon's endpoint, with the sessions run by a Ray Serve deployment."""
    from latentwire.scheduler.limits import ServingLimits
    from latentwire.scheduler.metrics import Metrics
    from latentwire.scheduler.serving.cloud import CloudServer
    from latentwire.scheduler.serving.security import KeyError_

    try:
        limits = _limits(args, ServingLimits)
    except ValueError as e:
        raise SystemExit(f"latentwire cloud: {e}") from None
    try:
        from latentwire.scheduler.serving.rayserve import gateway
    except ImportError as e:
        raise SystemExit(f"latentwire cloud: --ray needs Ray Serve ({e}): pip install 'latentwire[ray]'") from None
    try:
        options = gateway.ReplicaOptions(args.replicas, args.max_replicas, args.target_sessions, args.max_ongoing,
                                         args.replica_cpus, 1.0 if args.replica_gpus is None and
                                         args.device.startswith("cuda") else args.replica_gpus or 0.0)
    except ValueError as e:
        raise SystemExit(f"latentwire cloud: {e}") from None
    if args.retries < 0:  # checked before the deployment, which takes the replicas' start to fail
        raise SystemExit(f"latentwire cloud: --retries must be >= 0, got {args.retries}")
    gateway.connect(args.ray or None)
    try:
        gateway.deploy(args.model, app=args.ray_app, options=options, max_batch=args.max_batch, device=args.device,
                       dtype=args.dtype, threads=args.threads, preview_every=args.preview_every,
                       max_wait_s=args.max_wait_ms / 1000, heartbeat_s=args.heartbeat, limits=limits)
    except Exception as e:  # a replica that cannot load its model fails the deployment, with its reason
        raise SystemExit(f"latentwire cloud: the Ray Serve deployment failed: {type(e).__name__}: {e}") from None
    metrics = Metrics()
    try:
        engine = gateway.RayEngine(args.ray_app, max_batch=args.max_batch, limits=limits, metrics=metrics,
                                   retries=args.retries)
        server = CloudServer(None, args.bind, engine=engine, heartbeat_s=args.heartbeat, limits=limits,
                             curve_secret=args.curve_secret, allow=args.allow, insecure=args.insecure)
    except (KeyError_, ValueError) as e:
        raise SystemExit(f"latentwire cloud: {e}") from None
    if args.metrics_port:
        metrics.serve(args.metrics_port)
    print(f"latentwire cloud: serving {args.model} on {server.endpoint} through Ray Serve application "
          f"{args.ray_app!r} ({gateway.replicas_running(args.ray_app)} replicas)", flush=True)
    server.serve_forever()
    metrics.close()
    print("latentwire cloud: stopped", flush=True)
    return 0


def _pool(args):
    from latentwire.scheduler.serving.broker import Pool
    from latentwire.scheduler.serving.security import KeyError_

    if not args.threads:  # N workers with every core's worth of threads each would spin against each other
        import os

        args.threads = max(1, (os.cpu_count() or 1) // args.workers)
    worker_args = []
    for dest, flag in WORKER_FLAGS:
        if getattr(args, dest) is not None:
            worker_args += [flag, str(getattr(args, dest))]
    try:
        pool = Pool(args.bind, args.workers, worker_args, metrics_port=args.metrics_port,
                    curve_secret=args.curve_secret, allow=args.allow, insecure=args.insecure)
    except (KeyError_, ValueError) as e:
        raise SystemExit(f"latentwire cloud: {e}") from None
    ready = lambda: print(f"latentwire cloud: serving {args.model} on {pool.endpoint} with {args.workers} "  # noqa: E731
                          f"workers", flush=True)
    pool.serve_forever(on_ready=ready)
    print("latentwire cloud: stopped", flush=True)
    return 0


def _broker(args):
    from latentwire.scheduler import logs
    from latentwire.scheduler.serving.broker import Broker
    from latentwire.scheduler.serving.security import KeyError_

    logs.configure()
    try:
        broker = Broker(args.bind, args.backend, curve_secret=args.curve_secret, allow=args.allow,
                        insecure=args.insecure)
    except KeyError_ as e:
        raise SystemExit(f"latentwire broker: {e}") from None
    import signal
    import threading

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    broker.start()
    print(f"latentwire broker: edges on {broker.frontend}, workers on {broker.backend}", flush=True)
    while not stop.wait(0.5):
        pass
    broker.stop()
    print("latentwire broker: stopped", flush=True)
    return 0


def _health(args):
    import json

    from latentwire.scheduler.serving.edge import CloudUnavailable, EdgeClient

    client = EdgeClient(args.connect, None, timeout_s=args.timeout, curve_secret=args.curve_secret,
                        server_key=args.server_key)
    try:
        print(json.dumps(client.health()))
    except CloudUnavailable as e:
        print(f"latentwire health: {e}", file=sys.stderr)
        return 2
    return 0


def _load(path, who, device="cpu", dtype="float32"):
    """A model for the daemons on ``device`` in ``dtype``: a diffusers SD folder; no path: the embedded world
    model of that side; "ideal" (the cloud): the world's exact denoiser (CPU, float64 inside)."""
    import torch

    from latentwire.pipelines import embedded
    from latentwire.pipelines.models import FAMILIES, UnsupportedModel, load_model

    device = _check_device(who, device)
    if path == "ideal":
        if who != "cloud":
            raise SystemExit("latentwire edge: the exact denoiser ('ideal') is a cloud model; give the edge a folder")
        if device.type != "cpu" or dtype != "float32":
            raise SystemExit("latentwire cloud: the exact denoiser ('ideal') runs on the CPU in float32 (float64 "
                             "inside); drop --device and --dtype")
        from latentwire.pipelines.ideal import IdealDenoiser

        return IdealDenoiser.from_pretrained(embedded.CLOUD_PATH)
    path = path or str(embedded.CLOUD_PATH if who == "cloud" else embedded.EDGE_PATH)
    try:
        return load_model(path, device=device, dtype=getattr(torch, dtype))
    except UnsupportedModel as e:
        raise SystemExit(f"latentwire {who}: {e}") from None
    except Exception as e:  # diffusers and transformers raise OSError, ValueError, EnvironmentError...
        raise SystemExit(f"latentwire {who}: cannot load a diffusers model folder from {path!r} "
                         f"({type(e).__name__}: {e}); give a folder the save_pretrained of one of "
                         f"{', '.join(FAMILIES)} wrote") from None


IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".gif")


def _check_image_path(path):
    """Before any work: the image must be writable where --out says, in a format PIL knows by its name."""
    import os

    if not path.lower().endswith(IMAGE_EXTENSIONS):
        raise SystemExit(f"latentwire edge: --out {path!r} must end in one of {', '.join(IMAGE_EXTENSIONS)} (the "
                         "image format is taken from it)")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise SystemExit(f"latentwire edge: --out {path!r}: the folder {folder} does not exist")


def _plan_params(args):
    return {k: v for k, v in (("k", args.k), ("p", args.p), ("a", args.a), ("s", args.s),
                              ("strength", args.strength), ("preset", args.preset)) if v is not None}


def _plan(args):
    """The plan the flags describe: --plan-file FILE (what `latentwire search --out` writes), else --plan NAME
    with --steps and the plan's own parameters."""
    from latentwire.scheduler import PlanError, make

    if args.plan_file:
        return _plan_file(args.plan_file)
    try:
        return make(args.plan, args.steps, **_plan_params(args))
    except PlanError as e:
        raise SystemExit(f"latentwire: {e}") from None


def _plan_file(path):
    """A plan from a JSON file of Plan.to_plain(), checked field by field as the wire checks it."""
    import json

    from latentwire.scheduler import Plan
    from latentwire.scheduler.fields import FieldError

    try:
        with open(path) as f:
            d = json.load(f)
        return Plan.from_plain(d, field="plan_file")
    except OSError as e:
        raise SystemExit(f"latentwire: --plan-file {path}: {e.strerror}") from None
    except (ValueError, FieldError) as e:  # json.JSONDecodeError is a ValueError
        raise SystemExit(f"latentwire: --plan-file {path}: not a plan ({e}); write one with `latentwire search "
                         "--out FILE`, or json.dump(plan.to_plain())") from None


def _session(args, model):
    """The edge's SessionSpec from its flags (SessionSpec.for_model); anything the fused step cannot run is a
    clear exit, before the cloud is asked."""
    from latentwire.scheduler import SessionSpec

    plan = _plan_file(args.plan_file) if args.plan_file else args.plan
    try:
        return SessionSpec.for_model(model, args.prompt, plan=plan, steps=args.steps, scheduler=args.scheduler,
                                     plan_params=_plan_params(args), negative_prompt=args.negative_prompt,
                                     guidance_scale=args.guidance, seed=args.seed)
    except ValueError as e:  # PlanError, UnsupportedScheduler, an unknown scheduler class
        raise SystemExit(f"latentwire edge: {e}") from None


def _eval(args):
    import json

    import torch

    from latentwire.pipelines.evaluate import EVAL_GUIDANCE, EVAL_SEED, evaluate_plan, load_models

    args.seed = EVAL_SEED if args.seed is None else args.seed
    args.guidance = EVAL_GUIDANCE if args.guidance is None else args.guidance
    torch.set_num_threads(args.threads or torch.get_num_threads())
    plan = _plan(args)
    models = load_models(args.cloud)
    progress = None if args.json else (lambda k, n: print(f"\r  {k}/{n}", end="", file=sys.stderr, flush=True))
    result = evaluate_plan(plan, models, n=args.n, seed=args.seed, guidance=args.guidance, progress=progress)
    if args.json:
        print(json.dumps(result))
    else:
        print(file=sys.stderr)
        for key, value in result.items():
            print(f"{key:>20}  {value}")
    return 0


def _search(args):
    """`latentwire search`: the plan with the least predicted latency within a quality bound (EC-Diff's search)."""
    import json

    import torch

    from latentwire.pipelines.ecdiff import SearchError, search, share
    from latentwire.pipelines.ecdiff.cache import Cache, quality
    from latentwire.pipelines.evaluate import EVAL_GUIDANCE, EVAL_SEED, generate, latent_distance, load_models
    from latentwire.scheduler import make
    from latentwire.scheduler.cost.model import CostError, predict
    from latentwire.scheduler.cost.profiles import ProfileError, load_device, load_link

    try:
        cloud, edge, link = load_device(args.cloud_device), load_device(args.edge_device), load_link(args.link)
        cloud, edge, assumed = _assumed(args.assume, cloud, edge)
    except ProfileError as e:
        raise SystemExit(f"latentwire search: {e}") from None
    seed = EVAL_SEED if args.seed is None else args.seed
    held_out_seed = seed + 1 if args.held_out_seed is None else args.held_out_seed
    if held_out_seed == seed:
        raise SystemExit("latentwire search: --held-out-seed must differ from --seed (the check is on prompts the "
                         "search never saw)")
    torch.set_num_threads(args.threads or torch.get_num_threads())
    models = load_models(args.cloud)
    log = (lambda text: None) if args.json else (lambda text: print(text, file=sys.stderr, flush=True))

    def cost(plan):
        return predict(plan, cloud, edge, link, load=args.load)

    try:
        cache = Cache(args.cache)
    except ValueError as e:
        raise SystemExit(f"latentwire search: --cache {e}") from None
    key = {"cloud": args.cloud, "guidance": EVAL_GUIDANCE, "threads": torch.get_num_threads()}

    def judge(plan, n=args.n, seed=seed):
        q = quality(cache, plan, models, args.cloud, n, seed, key["threads"])
        log(f"  measured {plan} on {n} prompts: accuracy {q['attribute_accuracy']:.4f}, "
            f"Frechet {q['frechet_distance']:.1f}")
        return q

    reference_latents = []

    def distance(plan):
        if not reference_latents:
            reference_latents.append(generate(make("cloud-only", args.steps), models, args.rank_n, seed)[0])
        return latent_distance(generate(plan, models, args.rank_n, seed)[0], reference_latents[0])

    def rank(plan):  # the proxy that orders equal-latency candidates: distance from cloud-only's latents
        return cache.measure("distance", plan, lambda: distance(plan), n=args.rank_n, seed=seed, **key)

    confirm_n = 4 * args.n if args.confirm_n is None else args.confirm_n
    held_out_n = args.held_out_n or confirm_n or args.n
    if (confirm_n < 0 or args.n < 1 or (args.held_out_n is not None and args.held_out_n < 1) or args.rank_n < 0
            or not args.screen_margin >= 0):
        raise SystemExit("latentwire search: --n and --held-out-n must be >= 1, and --confirm-n, --rank-n and "
                         "--screen-margin >= 0 (0: no confirmation, no proxy, no screen)")
    try:
        cost(make("cloud-only", args.steps))  # the profiles cover the plan's sides before any measurement
        result = search(args.steps, cost, judge, min_quality=args.min_quality, budget=args.budget,
                        preset=args.preset or "sd", forecasters=tuple(args.forecasters.split(",")),
                        confirm=(lambda plan: judge(plan, confirm_n)) if confirm_n else None,
                        spacing=args.spacing, rank=rank if args.rank_n else None,
                        handoff_optional=args.no_handoff, screen_margin=args.screen_margin)
    except (SearchError, CostError, ProfileError, ValueError) as e:
        raise SystemExit(f"latentwire search: {e}") from None
    out = {"system": args.system, "cloud_device": cloud.name, "edge_device": edge.name, "link": link.name,
           "load": args.load, "assumed": assumed, "min_quality": args.min_quality, "budget": args.budget,
           "steps": args.steps, "n": args.n, "confirm_n": confirm_n, "rank_n": args.rank_n, "seed": seed,
           "cloud": args.cloud, "forecasters": args.forecasters, "spacing": args.spacing,
           "no_handoff": args.no_handoff, "screen_margin": args.screen_margin, "cache": args.cache, "cache_hits": None,
           **result.to_plain()}
    if result.plan is not None:
        ref = judge(make("cloud-only", args.steps), held_out_n, held_out_seed)
        found = judge(result.plan, held_out_n, held_out_seed)
        out["held_out"] = {"seed": held_out_seed, "n": held_out_n, "quality": found, "reference": ref,
                           "share": share(found, ref), "meets_bound": share(found, ref) >= args.min_quality}
        if args.out:
            with open(args.out, "w") as f:
                json.dump(result.plan.to_plain(), f, indent=1)
    out["cache_hits"] = cache.hits
    if args.json:
        print(json.dumps(out))
    else:
        print(f"{'found' if result.plan else 'no plan met the bound'}: {out['plan_text']}")
        if result.plan is not None:
            print(f"  predicted latency {out['latency_s']:.3f} s, cloud GPU {out['cloud_gpu_s']:.3f} s; quality share "
                  f"{out['share']:.3f} (search prompts), {out['held_out']['share']:.3f} (held out); "
                  f"{out['evaluations']} evaluations" + (f"; written to {args.out}" if args.out else ""))
    return 0 if result.plan is not None else 3


def _read_rounds(path):
    """A --rounds file, every line checked -> [round dict] (before any model loads: a bad file costs nothing)."""
    import json

    try:
        with open(path) as f:
            lines = [(n, line) for n, line in enumerate(f, 1) if line.strip()]
    except OSError as e:
        raise SystemExit(f"latentwire session: --rounds {path}: {e.strerror}") from None
    rounds = []
    for n, line in lines:
        try:
            r = json.loads(line)
        except ValueError as e:
            raise SystemExit(f"latentwire session: --rounds {path} line {n}: not JSON ({e})") from None
        if type(r) is not dict or not set(r) <= {"prompt", "final", "strength"} or (
                "prompt" not in r and not r.get("final")) or type(r.get("prompt", "")) is not str or \
                type(r.get("final", False)) is not bool or not (
                "strength" not in r or (type(r["strength"]) in (int, float) and 0 < r["strength"] <= 1)):
            raise SystemExit(f"latentwire session: --rounds {path} line {n}: a round is "
                             '{"prompt": "..."} or {"final": true} (with "prompt" a string and "strength" in (0, 1] '
                             'optional)')
        rounds.append(r)
    return rounds


def _session_rounds(args):
    """The rounds to run: from --rounds FILE (JSON lines), else typed at the terminal, one at a time ->
    iterator of dicts {"prompt": str} or {"final": True, "prompt": str (optional), "strength": float (optional)}."""
    if args.rounds:
        yield from _read_rounds(args.rounds)
        return
    print("type a prompt for a preview, /final [PROMPT] for the cloud's refine, /quit to stop", file=sys.stderr)
    while True:
        print("prompt> ", end="", file=sys.stderr, flush=True)  # stdout is the rounds' output (--json)
        line = sys.stdin.readline()
        if not line:
            return
        line = line.strip()
        if line == "/quit":
            return
        if line == "/final" or line.startswith("/final "):
            rest = line[len("/final"):].strip()
            yield {"final": True, **({"prompt": rest} if rest else {})}
        elif line:
            yield {"prompt": line}


def _show_inline(path):
    """The image in the terminal, where it speaks an inline-image protocol (iTerm2, WezTerm, kitty)."""
    import base64
    import os

    if not sys.stdout.isatty():
        return
    data = base64.b64encode(open(path, "rb").read()).decode()
    if os.environ.get("TERM_PROGRAM") in ("iTerm.app", "WezTerm"):
        sys.stdout.write(f"\033]1337;File=inline=1;width=12:{data}\a\n")
    elif os.environ.get("TERM") == "xterm-kitty":
        chunks = [data[i:i + 4096] for i in range(0, len(data), 4096)]
        for k, chunk in enumerate(chunks):
            head = "f=100,a=T," if k == 0 else ""
            sys.stdout.write(f"\033_G{head}m={int(k < len(chunks) - 1)};{chunk}\033\\")
        sys.stdout.write("\n")
    sys.stdout.flush()


def _prompt_session(args):
    """`latentwire session`: rounds of edge previews, then the cloud's refine of the last one (DiffusionX)."""
    import json
    import os

    if args.rounds:
        _read_rounds(args.rounds)  # checked before torch is imported

    from latentwire.pipelines.diffusionx import PromptSession, SessionError
    from latentwire.scheduler.serving.edge import CloudError, CloudUnavailable, EdgeClient
    from latentwire.scheduler.wire import Codecs

    if (args.curve_secret is None) != (args.server_key is None):
        raise SystemExit("latentwire session: CURVE needs both --curve-secret CLIENT.key_secret and --server-key "
                         "SERVER.key")
    model = _load(args.model, "edge", args.device, args.dtype)
    client = EdgeClient(args.connect, model, codecs=Codecs(latent=(args.latent_codec, args.latent_level)),
                        timeout_s=args.timeout, curve_secret=args.curve_secret, server_key=args.server_key)
    predictor, strength = None, None
    try:
        if args.strength == "auto":
            predictor = _predictor(args, "session")
        else:
            strength = float(args.strength)
        session = PromptSession(model, client, steps=args.steps, preview_steps=args.preview_steps, seed=args.seed,
                                guidance_scale=args.guidance, scheduler=args.scheduler,
                                from_previous=args.from_previous, preview_strength=args.preview_strength,
                                predictor=predictor)
    except (SessionError, ValueError) as e:
        raise SystemExit(f"latentwire session: {e} (--strength: auto, or a share in (0, 1])") from None
    os.makedirs(args.out_dir, exist_ok=True)
    for k, r in enumerate(_session_rounds(args)):
        try:
            if r.get("final"):
                done = session.finalize(r.get("prompt"), strength=r.get("strength", strength))
            else:
                done = session.preview(r["prompt"])
        except SessionError as e:
            print(f"latentwire session: {e}", file=sys.stderr)
            if args.rounds:
                return 2
            continue
        except (CloudUnavailable, CloudError) as e:
            print(f"latentwire session: {e}", file=sys.stderr)
            return 2
        path = os.path.join(args.out_dir, "final.png" if done.kind == "final" else f"round-{k + 1}.png")
        model.decode(done.latent)[0].save(path)
        if args.json:
            print(json.dumps({"round": k + 1, **done.to_plain(), "image": path}), flush=True)
        else:
            print(f"{done.kind} {k + 1}: {path} in {done.wall_s:.2f} s (edge calls {done.edge_calls}, cloud calls "
                  f"{done.cloud_calls}" + (f", strength {done.strength}" if done.kind == "final" else "") +
                  (f", cloud load {done.load}" if done.load else "") + ")", file=sys.stderr)
            _show_inline(path)
        if done.kind == "final":
            return 0
    return 0


def _predictor(args, command):
    """The shipped noise-level predictor, its costs from the --cloud-device/--edge-device/--link profiles."""
    from latentwire.pipelines.diffusionx.predictor import WEIGHTS_PATH, PredictorError, from_profiles
    from latentwire.scheduler.cost.model import CostError
    from latentwire.scheduler.cost.profiles import ProfileError

    try:
        predictor = from_profiles(args.steps, args.cloud_device, args.edge_device, args.link_profile,
                                  args.assume or ["cloud.text_encode_s=0"], args.weights or WEIGHTS_PATH, args.miss_s)
        predictor.cost(1.0, 0.0)  # the profiles cover the final's sides before any round runs
        return predictor
    except (PredictorError, ProfileError, CostError) as e:
        raise SystemExit(f"latentwire {command}: {e}") from None


def _predict_noise(args):
    """`latentwire predict-noise`: the refine strength the predictor picks for a prompt change, and why."""
    import json

    if not 0 <= args.load <= 1:  # before torch is imported: a typo costs no model load
        raise SystemExit(f"latentwire predict-noise: --load {args.load:g}: the cloud's utilisation in [0, 1]")
    from latentwire.pipelines.diffusionx.predictor import PredictorError

    predictor = _predictor(args, "predict-noise")
    model = _load(args.model, "edge")
    try:
        choice = predictor.choose_for(model, getattr(args, "from"), args.to, args.load)
    except PredictorError as e:
        raise SystemExit(f"latentwire predict-noise: {e}") from None
    out = {"from": getattr(args, "from"), "to": args.to, **choice.to_plain()}
    if args.json:
        print(json.dumps(out))
        return 0
    print(f"strength {choice.strength} (embedding distance {choice.embed_distance:.4f}, {choice.word_edits} word "
          f"edits, cloud load {choice.load:g}):")
    print("  strength  P(all attributes)  latency s  cloud GPU s  load term s  objective s")
    for r in choice.table:
        mark = " <" if r["strength"] == choice.strength else ""
        print(f"  {r['strength']:>8}  {r['p_success']:>17.3f}  {r['latency_s']:>9.3f}  {r['cloud_gpu_s']:>11.3f}  "
              f"{r['load_term_s']:>11.3f}  {r['objective_s']:>11.3f}{mark}")
    return 0


def _edge_arguments(parser):
    """What an edge process needs to reach a cloud: `latentwire edge` and `latentwire session`."""
    parser.add_argument("--connect", default="tcp://127.0.0.1:5555")
    parser.add_argument("--model", help="the edge's diffusers pipeline folder (default: the embedded world-sd-edge)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the cloud")
    parser.add_argument("--curve-secret", help="this edge's NAME.key_secret (with --server-key)")
    parser.add_argument("--server-key", help="the cloud's NAME.key (public)")


def _predictor_arguments(parser):
    parser.add_argument("--cloud-device", default="sd-v1-5@a100", help="the cloud's device profile (the predictor's costs)")
    parser.add_argument("--edge-device", default="bk-sdm-tiny@galaxy-s24", help="the edge's device profile")
    parser.add_argument("--link-profile", default="lte", help="the link profile: NAME or PATH")
    parser.add_argument("--assume", action="append", default=[], metavar="SIDE.FIGURE=SECONDS",
                        help="fill a device figure the profiles lack (default: cloud.text_encode_s=0, which the "
                             "A100 profile has no figure for)")
    parser.add_argument("--weights", help="the predictor's weights (default: the shipped predictor.json)")
    parser.add_argument("--miss-s", type=float, default=10.0,
                        help="the objective's price, in seconds, of a final that misses an attribute (an assumption: "
                             "the exchange rate between quality and time)")


def _demo(args):
    from latentwire.demo import run

    run(args.out, cloud=args.cloud, prompts=args.prompts, steps=args.steps)
    return 0


def _edge(args):
    import json
    import time

    from latentwire.scheduler.serving.edge import CloudError, CloudUnavailable, EdgeClient, summary_dict
    from latentwire.scheduler.wire import Codecs

    if (args.curve_secret is None) != (args.server_key is None):
        raise SystemExit("latentwire edge: CURVE needs both --curve-secret CLIENT.key_secret and --server-key SERVER.key")
    _check_image_path(args.out)
    model = _load(args.model, "edge", args.device, args.dtype)
    spec = _session(args, model)
    plan = spec.plan
    sr = _hybrid_sr(args, args.upscale, args.sr_connect, "edge") if args.upscale is not None else None
    from latentwire.scheduler.serving.link import parse_link

    link = parse_link(args.link) if args.link else None
    if args.latent_codec == "auto" and link is None:
        raise SystemExit("latentwire edge: --latent-codec auto chooses for a link: give --link too")
    codecs = None if args.latent_codec == "auto" else Codecs(latent=(args.latent_codec, args.latent_level),
                                                            state=(args.state_codec, 0))
    labels = dict(plan.labels())
    if not args.json:
        print(plan, file=sys.stderr)
    def progress(step, where):  # one line a step on stderr: which step, and where it ran
        if not args.json:
            print(f"  step {step + 1:>3}/{plan.num_steps} {where}", file=sys.stderr, flush=True)

    def slow(step, seconds):
        print(f"latentwire edge: the cloud is alive but slow: at step {step} for {seconds:.1f} s", file=sys.stderr,
              flush=True)

    client = EdgeClient(args.connect, model, codecs=codecs, timeout_s=args.timeout, link=link, fallback=args.fallback,
                        on_slow=slow,
                        heartbeat_timeout_s=args.heartbeat_timeout, retries=args.retries,
                        curve_secret=args.curve_secret, server_key=args.server_key,
                        error_budget=args.error_budget if codecs is None else None,
                        on_preview=lambda step, x: progress(step, f"{labels.get(step)} (preview from the cloud)"),
                        on_step=lambda step, real: progress(step, "edge" if real else "forecast (edge)"))
    start = time.perf_counter()
    try:
        latent, summary = client.generate(spec)
    except (CloudUnavailable, CloudError) as e:
        print(f"latentwire edge: {e}", file=sys.stderr)
        return 2
    upscaled = None
    if sr is not None:  # hybrid SR of the generated image: its detail caption (--sr-prompt) names the texture
        low = model.decode(latent, output_type="pt")[0] * 2 - 1
        try:
            upscaled = sr.upscale(low, args.prompt if args.sr_prompt is None else args.sr_prompt, seed=args.seed,
                                  mode=args.mode)
        except Exception as e:
            print(f"latentwire edge: hybrid SR failed: {type(e).__name__}: {e}", file=sys.stderr)
            return 2
        _write_image(upscaled.image, args.out)
        image = None
    else:
        image = model.decode(latent)[0]  # one PIL image per latent in the batch (a video: a list of frames)
    if image is None:
        pass
    elif isinstance(image, list):  # an animated .gif or .webp holds every frame; other formats the first
        image[0].save(args.out, save_all=args.out.lower().endswith((".gif", ".webp")), append_images=image[1:])
    else:
        image.save(args.out)
    wall = time.perf_counter() - start
    if args.json:
        print(json.dumps(summary_dict(summary, bytes_up=client.bytes_up, bytes_down=client.bytes_down,
                                      wall_s=round(wall, 3), output=args.out,
                                      latent_codec=list(client.codecs.latent), link=args.link,
                                      session_id=client.session_id, requests_sent=client.attempts,
                                      cloud_load=None if client.load is None else client.load.to_plain(),
                                      upscale=None if upscaled is None else {**upscaled.report(),
                                                                             "scale": args.upscale,
                                                                             "cloud": args.sr_connect})))
    else:
        print(f"wrote {args.out} in {wall:.2f} s: cloud calls {summary.cloud_model_calls}, edge calls "
              f"{summary.edge_model_calls}, forecast steps {summary.forecast_steps}, "
              f"{client.bytes_up} B up, {client.bytes_down} B down", file=sys.stderr)
    return 0


def _read_image(path):
    """(3, h, w) float32 in [-1, 1] of an image file (RGB)."""
    import numpy as np
    import torch
    from PIL import Image

    try:
        with Image.open(path) as im:
            pixels = np.asarray(im.convert("RGB"), dtype=np.float32)
    except (OSError, ValueError) as e:
        raise SystemExit(f"latentwire upscale: cannot read --in {path!r}: {e}") from None
    return torch.from_numpy(pixels).permute(2, 0, 1) / 127.5 - 1


def _write_image(image, path):
    from PIL import Image

    pixels = ((image.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    Image.fromarray(pixels).save(path)


def _sr_arguments(parser, prefix=""):
    """The hybrid SR options `latentwire upscale` and `latentwire edge --upscale` share."""
    p = prefix
    parser.add_argument(f"--{p}model", dest="sr_model",
                        help="the diffusion upscaler's StableDiffusionUpscalePipeline folder (default: the embedded "
                             "world-sr-xS); with --connect the cloud serves it and this side decodes with its VAE")
    parser.add_argument(f"--{p}light", dest="sr_light",
                        help="the lightweight SR: an ESPCN folder, a Real-ESRGAN-class .pth, or 'bicubic' (default: "
                             "the embedded world-light-xS)")
    parser.add_argument("--patch", type=int, default=8, help="patch side in low-resolution pixels")
    parser.add_argument("--overlap", type=int, default=2, help="pixels two neighbouring patches share (blended)")
    parser.add_argument(f"--{p}steps", dest="sr_steps", type=int, default=20, help="the upscaler's denoising steps")
    parser.add_argument(f"--{p}guidance", dest="sr_guidance", type=float, default=1.0,
                        help="the upscaler's classifier-free guidance (1: none)")
    parser.add_argument("--mode", choices=("hybrid", "diffusion", "light"), default="hybrid",
                        help="hybrid: foreground patches to the upscaler, the rest to the lightweight model; "
                             "diffusion / light: every patch to one")
    parser.add_argument("--max-batch", type=int, default=16, help="without a cloud: patches per batched step here")


def _light_model(path, scale):
    from latentwire.pipelines import hybrid_sr
    from latentwire.pipelines.hybrid_sr.light import Bicubic, LightSR

    if path == "bicubic":
        return Bicubic(scale)
    if path and path.endswith((".pth", ".pt", ".safetensors")):
        from latentwire.pipelines.hybrid_sr.plugins import RealESRGANFile, SpandrelSR

        try:
            return SpandrelSR.from_file(path)
        except ImportError:  # spandrel does not import beside a CPU torch here: read the Real-ESRGAN layouts
            try:
                return RealESRGANFile.from_file(path)
            except (OSError, ValueError) as e:
                raise SystemExit(f"latentwire: --light {path!r}: {e}") from None
        except (OSError, ValueError) as e:
            raise SystemExit(f"latentwire: --light {path!r}: {e}") from None
    try:
        return LightSR.from_pretrained(path or str(hybrid_sr.light_path(scale)))
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise SystemExit(f"latentwire: --light {path!r}: {type(e).__name__}: {e}; give an ESPCN folder, a "
                         "Real-ESRGAN-class .pth, or 'bicubic'") from None


def _hybrid_sr(args, scale, connect, command):
    from latentwire.pipelines import hybrid_sr
    from latentwire.pipelines.hybrid_sr.pipeline import HybridSR
    from latentwire.protocol import CODECS

    # every SR option checked before any model loads (or, for `edge --upscale`, before the generation)
    if scale < 1:
        raise SystemExit(f"latentwire {command}: the scale must be an int >= 1, got {scale}")
    if args.patch < 1 or not 0 <= args.overlap < args.patch:
        raise SystemExit(f"latentwire {command}: --patch must be >= 1 and --overlap in [0, --patch), got --patch "
                         f"{args.patch} --overlap {args.overlap}")
    if args.sr_steps < 1 or args.max_batch < 1:
        raise SystemExit(f"latentwire {command}: the upscaler's steps and --max-batch must be >= 1")
    if not 0 <= args.sr_guidance <= 100:
        raise SystemExit(f"latentwire {command}: the upscaler's guidance must be in [0, 100], got {args.sr_guidance}")
    if args.sr_codec not in CODECS:
        raise SystemExit(f"latentwire {command}: --sr-codec {args.sr_codec!r}: one of {', '.join(CODECS)}")

    if scale not in hybrid_sr.SCALES and not args.sr_model:
        raise SystemExit(f"latentwire {command}: the embedded world SR models upscale x2 or x4, not x{scale}; give "
                         "--model (and --light) for another scale")
    upscaler = _load(args.sr_model or str(hybrid_sr.upscaler_path(scale)), command)
    if getattr(upscaler, "family", None) != "sd-upscale":
        raise SystemExit(f"latentwire {command}: {args.sr_model!r} is not a StableDiffusionUpscalePipeline folder")
    if upscaler.scale_factor != scale:
        raise SystemExit(f"latentwire {command}: the upscaler upscales x{upscaler.scale_factor}, not x{scale}")
    light = _light_model(args.sr_light, scale)
    if light.scale != scale:
        raise SystemExit(f"latentwire {command}: the lightweight SR upscales x{light.scale}, not x{scale}")
    options = {"timeout_s": args.timeout}
    if getattr(args, "curve_secret", None):
        options.update(curve_secret=args.curve_secret, server_key=args.server_key)
    from latentwire.scheduler.wire import Codecs

    options["codecs"] = Codecs(latent=(args.sr_codec, 3 if args.sr_codec == "int8" else 0))
    try:
        return HybridSR(upscaler, light, cloud=connect, patch=args.patch, overlap=args.overlap, steps=args.sr_steps,
                        guidance_scale=args.sr_guidance, max_batch=args.max_batch, client_options=options)
    except ValueError as e:
        raise SystemExit(f"latentwire {command}: {e}") from None


def _upscale(args):
    import json
    import time

    from latentwire.pipelines.hybrid_sr import regions

    _check_image_path(args.out)
    image = _read_image(args.input)
    try:
        regions.patch_grid(image.shape[1], image.shape[2], args.patch, args.overlap)
    except ValueError as e:
        raise SystemExit(f"latentwire upscale: {e}") from None
    sr = _hybrid_sr(args, args.scale, args.connect, "upscale")
    start = time.perf_counter()
    try:
        result = sr.upscale(image, args.prompt, seed=args.seed, mode=args.mode)
    except Exception as e:  # the cloud refused or failed: say what, not a traceback
        raise SystemExit(f"latentwire upscale: {type(e).__name__}: {e}") from None
    _write_image(result.image, args.out)
    report = {**result.report(), "wall_s": round(time.perf_counter() - start, 3), "output": args.out,
              "scale": args.scale, "mode": args.mode, "cloud": args.connect}
    if args.json:
        print(json.dumps(report))
    else:
        print(f"wrote {args.out} ({report['size'][1]}x{report['size'][0]}) in {report['wall_s']:.2f} s: "
              f"{report['patches_cloud']} patches to the upscaler, {report['patches_edge']} to the lightweight "
              "model", file=sys.stderr)
    return 0


def _profile(args):
    """`latentwire profile`: measure a device profile of a model folder here and write it as JSON."""
    import json
    import os

    import torch

    from latentwire.scheduler.cost.measure import measure
    from latentwire.scheduler.cost.profiles import NAME_PATTERN, ProfileError, device_from_plain

    if not os.path.isdir(args.model):
        raise SystemExit(f"latentwire profile: --model {args.model!r} is not a folder: give a diffusers model folder")
    folder = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(folder):
        raise SystemExit(f"latentwire profile: --out {args.out!r}: the folder {folder} does not exist")
    model_name = os.path.basename(os.path.normpath(args.model))
    name = args.name or f"{model_name}@here"
    if not NAME_PATTERN.fullmatch(name):
        raise SystemExit(f"latentwire profile: --name {name!r}: 1-64 letters, digits and . _ @ + - (MODEL@HARDWARE)")
    for flag, value in (("--steps", args.steps), ("--repeats", args.repeats)):
        if value < 1:
            raise SystemExit(f"latentwire profile: {flag} {value}: give a positive int")
    if args.threads:
        torch.set_num_threads(args.threads)
    model = _load(args.model, "profile", args.device, args.dtype)
    try:
        profile = measure(model, name=name, model_name=model_name[:64] or "model", resolution=args.resolution,
                          steps=args.steps, repeats=args.repeats, side=args.side)
        device_from_plain(profile, args.out)  # what we write, loadable as written
    except (ValueError, ProfileError) as e:
        raise SystemExit(f"latentwire profile: {e}") from None
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(profile, f, indent=2)
        f.write("\n")
    print(f"wrote {args.out}: unet step {profile['unet_step_s'] * 1e3:.2f} ms, text "
          f"{profile['text_encode_s'] * 1e3:.2f} ms, decode {profile['vae_decode_s'] * 1e3:.2f} ms, fused step {profile['fused_step_s'] * 1e3:.3f} ms",
          file=sys.stderr)
    return 0


def _cost_list(args):
    import json

    from latentwire.scheduler.cost.profiles import ProfileError, list_profiles, load_device, load_link

    names = list_profiles()
    if args.json:
        print(json.dumps(names))
        return 0
    for kind, load in (("devices", load_device), ("links", load_link)):
        print(f"{kind}:")
        for name in names[kind]:
            try:
                p = load(name)
            except ProfileError as e:
                print(f"  {name:<34} INVALID: {e}")
                continue
            if kind == "devices":
                figures = "  ".join(f"{k[:-2]} {'-' if getattr(p, k) is None else f'{getattr(p, k) * 1e3:.1f} ms'}"
                                    for k in ("unet_step_s", "text_encode_s", "vae_decode_s"))
                print(f"  {name:<34} {p.resolution}px {p.dtype:<9} {figures}"
                      + (f"  missing: {', '.join(p.missing)}" if p.missing else ""))
            else:
                fig = lambda v, unit: "-" if v is None else f"{v:g} {unit}"  # noqa: E731
                print(f"  {name:<34} up {fig(p.up_mbit_s, 'Mbit/s')}  down {fig(p.down_mbit_s, 'Mbit/s')}  "
                      f"rtt {fig(p.rtt_ms, 'ms')}")
        if not names[kind]:
            print("  (none)")
    return 0


def _cost(args):
    """`latentwire cost`: the cost model's prediction for a plan on a device pair and a link."""
    import json

    if args.list:
        return _cost_list(args)
    missing = [flag for flag, value in (("--cloud-device", args.cloud_device), ("--edge-device", args.edge_device),
                                        ("--link", args.link)) if value is None]
    if missing:
        raise SystemExit(f"latentwire cost: give {', '.join(missing)} (names from `latentwire cost --list`, or "
                         "paths to profile .json files)")
    from latentwire.scheduler.cost.profiles import ProfileError, load_device, load_link

    try:
        cloud, edge, link = load_device(args.cloud_device), load_device(args.edge_device), load_link(args.link)
        cloud, edge, assumed = _assumed(args.assume, cloud, edge)
    except ProfileError as e:
        raise SystemExit(f"latentwire cost: {e}") from None
    from latentwire.protocol import CODECS
    from latentwire.scheduler.cost.model import CostError, default_session, predict
    from latentwire.scheduler.wire import MAX_ZSTD_LEVEL, Codecs

    for flag, codec, level in (("--latent-codec", args.latent_codec, args.latent_level),
                               ("--state-codec", args.state_codec, 0)):
        if codec not in CODECS:
            raise SystemExit(f"latentwire cost: {flag} {codec!r}: one of {', '.join(CODECS)}")
    if not 0 <= args.latent_level <= MAX_ZSTD_LEVEL:
        raise SystemExit(f"latentwire cost: --latent-level {args.latent_level}: a zstd level in 0..{MAX_ZSTD_LEVEL}")
    if args.steps < 1:
        raise SystemExit(f"latentwire cost: --steps {args.steps}: give a positive int")
    plan = _plan(args)
    codecs = Codecs(latent=(args.latent_codec, args.latent_level), state=(args.state_codec, 0))
    try:
        session = default_session(plan, args.scheduler)
        cost = predict(plan, cloud, edge, link, load=args.load, codecs=codecs, preview_every=args.preview_every,
                       cloud_batch=args.cloud_batch, session=session, latent_shape=args.latent_shape)
    except (CostError, ProfileError) as e:
        raise SystemExit(f"latentwire cost: {e}") from None
    except ValueError as e:  # PlanError from a scheduler that takes another number of steps, and the like
        raise SystemExit(f"latentwire cost: {e}") from None
    out = {"plan": str(plan), "cloud_device": cloud.name, "edge_device": edge.name, "link": link.name,
           "load": args.load, "cloud_batch": args.cloud_batch, "scheduler": args.scheduler, "assumed": assumed,
           **cost.to_plain()}
    if args.json:
        print(json.dumps(out))
        return 0
    print(f"{plan}\n  cloud {cloud.name}, edge {edge.name}, link {link.name}, load {args.load:g}, "
          f"cloud batch {args.cloud_batch}, {args.scheduler}")
    print(f"  {'latency':<16}{cost.latency_s:>12.4f} s")
    for part, seconds in cost.parts.items():
        print(f"    {part:<14}{seconds:>12.4f} s")
    print(f"  {'cloud GPU':<16}{cost.cloud_gpu_s:>12.4f} s\n  {'edge':<16}{cost.edge_s:>12.4f} s")
    print(f"  {'bytes up':<16}{cost.bytes_up:>12d} B in {cost.requests} request(s)\n"
          f"  {'bytes down':<16}{cost.bytes_down:>12d} B ({cost.previews} preview(s))")
    for note in cost.notes:
        print(f"  note: {note}")
    for what, seconds in assumed.items():
        print(f"  ASSUMED: {what} = {seconds:g} s (not from the profile)")
    return 0


def _assumed(items, cloud, edge):
    """--assume SIDE.FIGURE=SECONDS (profiles.apply_assumptions) -> (cloud, edge, {SIDE.FIGURE: seconds})."""
    from latentwire.scheduler.cost.profiles import apply_assumptions

    return apply_assumptions(items, cloud, edge)


def _plan_arguments(parser, steps):
    parser.add_argument("--plan", default="hybrid-sd", help="cloud-only, edge-only, hybrid-sd, ec-diff, preview-refine")
    parser.add_argument("--k", type=int, help="hybrid-sd: cloud steps; ec-diff: skipped steps between real calls")
    parser.add_argument("--p", type=int, help="ec-diff: real steps at the start")
    parser.add_argument("--a", type=float, help="ec-diff: slope scale")
    parser.add_argument("--s", type=int, help="ec-diff: switch step")
    parser.add_argument("--strength", type=float, help="preview-refine: share of the schedule the cloud redoes")
    parser.add_argument("--preset", help="ec-diff: EC-Diff's published setting to scale, sd (p=7 k=2 a=0.3 s=37 of "
                                         "50, the default), sdxl or cogvideox; --p/--k/--a/--s override it")
    parser.add_argument("--steps", type=int, default=steps, help="inference steps (diffusers' num_inference_steps)")
    parser.add_argument("--plan-file", help="a plan as JSON (what `latentwire search --out` writes) instead of --plan")


def build_parser():
    p = argparse.ArgumentParser(
        prog="latentwire",
        description="Edge-cloud collaborative diffusion inference: ship a diffusion latent between an edge "
                    "and a cloud process.",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    c = sub.add_parser("codecs", help="bytes on wire and error of every codec for a real-shaped latent",
                       description="Encode a latent-shaped tensor (noise, a smooth clean-latent stand-in, and "
                                   "their mixtures at early/middle/late steps) with every codec; print bytes "
                                   "on wire, bits per value and error.")
    c.add_argument("--shape", type=int, nargs="+", default=[1, 4, 64, 64], help="latent shape (default SD1.5)")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--level", type=int, nargs="+", default=[0, 3], help="zstd levels to show (0 = off)")
    c.set_defaults(func=_codecs)

    c = sub.add_parser("cloud", help="serve a diffusers model (SD 1.x/2.x, SDXL, SD3, Flux, CogVideoX) to edges",
                       description="Load a diffusers pipeline folder and serve edge sessions until SIGTERM, "
                                   "which finishes the requests in flight. --workers N runs N worker processes "
                                   "behind one endpoint; --connect makes this process a worker of a "
                                   "`latentwire broker`. Logs are JSON lines on stderr.")
    c.add_argument("--bind", default="tcp://127.0.0.1:5555", help="tcp://127.0.0.1:PORT or ipc://PATH")
    c.add_argument("--connect", help="serve as a worker of the broker whose backend is here (instead of --bind)")
    c.add_argument("--workers", type=int, default=0, help="run a broker on --bind and N worker processes")
    c.add_argument("--model", help="a folder StableDiffusionPipeline.from_pretrained loads (default: the embedded "
                                   "world-sd-cloud), or 'ideal': the world's exact denoiser")
    c.add_argument("--preview-every", type=int, default=0, help="stream a preview latent every N steps (0: off)")
    c.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (0: torch's default; with --workers N, cores / N each); results "
                        "are bitwise reproducible only between processes with the same count")
    c.add_argument("--max-batch", type=int, default=1,
                   help="sessions whose steps share one model forward (1: one request at a time)")
    c.add_argument("--max-wait-ms", type=float, default=0.0,
                   help="with --max-batch: how long new sessions wait for company before their first step")
    c.add_argument("--heartbeat", type=float, default=1.0, help="seconds between heartbeats to waiting edges")
    c.add_argument("--metrics-port", type=int, default=0,
                   help="serve Prometheus metrics on http://127.0.0.1:PORT/metrics (workers: PORT + i)")
    # defaults: ServingLimits' own (scheduler/limits.py), filled in when the daemon starts, so that
    # building this parser imports no torch
    c.add_argument("--max-message-bytes", type=int, help="default 64 MiB")
    c.add_argument("--max-tensor-elements", type=int, help="default 2**24")
    c.add_argument("--max-sessions", type=int, help="queued or running, per worker (default 256)")
    c.add_argument("--max-sessions-per-client", type=int, help="default 16")
    c.add_argument("--max-steps-per-session", type=int, help="default 1000")
    c.add_argument("--max-deadline", type=float, help="seconds: the longest deadline a request may ask for "
                                                      "(default 3600)")
    _device_arguments(c)
    c.add_argument("--curve-secret", help="this server's NAME.key_secret: encrypt and authenticate with CURVE "
                                          "(a worker: its own, with --server-key)")
    c.add_argument("--allow", help="with --curve-secret: folder of the NAME.key files of admitted edges")
    c.add_argument("--server-key", help="a worker with --curve-secret: the broker's NAME.key")
    c.add_argument("--insecure", action="store_true", help="allow a non-loopback --bind without CURVE")
    r = c.add_argument_group("Ray Serve (pip install 'latentwire[ray]')",
                             "--ray: this process is a gateway on --bind (CURVE and every limit as above) and the "
                             "sessions run on a Ray Serve deployment of --replicas replicas, each with its own "
                             "model and step-level batching (--max-batch, --max-wait-ms, --preview-every, "
                             "--device, --dtype, --threads are each replica's)")
    r.add_argument("--ray", nargs="?", const="", metavar="ADDRESS",
                   help="the Ray cluster to join (no ADDRESS: the one RAY_ADDRESS names, else a new one here)")
    r.add_argument("--ray-app", default="latentwire", help="the Serve application's name (default latentwire)")
    r.add_argument("--replicas", type=int, default=1, help="replicas (with --max-replicas: the least; default 1)")
    r.add_argument("--max-replicas", type=int,
                   help="autoscale between --replicas and this many on sessions in flight (default: a fixed count)")
    r.add_argument("--target-sessions", type=float,
                   help="autoscaling: sessions in flight per replica to aim at (default --max-batch)")
    r.add_argument("--max-ongoing", type=int,
                   help="sessions Serve sends one replica at once (default 2 x --max-batch, at least 2)")
    r.add_argument("--replica-cpus", type=float, default=1.0, help="each replica's Ray CPUs (default 1)")
    r.add_argument("--replica-gpus", type=float,
                   help="each replica's Ray GPUs, fractions allowed (default 1 with --device cuda, else 0)")
    r.add_argument("--retries", type=int, default=2, help="replica deaths one session survives (default 2)")
    c.set_defaults(func=_cloud)

    b = sub.add_parser("broker", help="one endpoint for edges in front of cloud workers on other machines",
                       description="Bind --bind for edges and --backend for `latentwire cloud --connect` workers "
                                   "and pass messages between them (ZeroMQ's proxy, round robin).")
    b.add_argument("--bind", default="tcp://127.0.0.1:5555")
    b.add_argument("--backend", default="tcp://127.0.0.1:5556")
    b.add_argument("--curve-secret", help="the broker's NAME.key_secret (both sides)")
    b.add_argument("--allow", help="folder of admitted edges' and workers' NAME.key files")
    b.add_argument("--insecure", action="store_true", help="allow non-loopback endpoints without CURVE")
    b.set_defaults(func=_broker)

    h = sub.add_parser("health", help="ask a cloud (or one worker behind a broker) how it is",
                       description="Print the cloud's health reply as JSON; exit 2 if it does not answer.")
    h.add_argument("--connect", default="tcp://127.0.0.1:5555")
    h.add_argument("--timeout", type=float, default=5.0)
    h.add_argument("--curve-secret")
    h.add_argument("--server-key")
    h.set_defaults(func=_health)

    k = sub.add_parser("keys", help="write a CURVE key pair in pyzmq's certificate format",
                       description="Write DIR/NAME.key (public) and DIR/NAME.key_secret (secret).")
    k.add_argument("dir")
    k.add_argument("name")
    k.set_defaults(func=_keys)

    e = sub.add_parser("edge", help="generate one image, running the plan's edge steps here",
                       description="Run a split plan against a cloud: the edge's steps here, the cloud's there.")
    _edge_arguments(e)
    e.add_argument("--prompt", required=True)
    e.add_argument("--negative-prompt", default="")
    _plan_arguments(e, steps=25)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--guidance", type=float, default=7.5)
    e.add_argument("--scheduler", help="a diffusers scheduler class to use instead of the folder's (e.g. "
                                       "DDIMScheduler), built from the folder's config as diffusers swaps one")
    e.add_argument("--latent-codec", default="int8", help="fp32, fp16, bf16, int8, int4, or auto (with --link)")
    e.add_argument("--latent-level", type=int, default=3)
    e.add_argument("--state-codec", default="fp16")
    e.add_argument("--link", help="emulate a link: 10mbit-50ms, 100mbit-20ms, 1gbit-1ms, a link profile (a NAME "
                                  "from `latentwire cost --list`, or PATH.json), or MBIT_PER_S,LATENCY_MS")
    e.add_argument("--error-budget", type=float, default=0.01,
                   help="with --latent-codec auto: the latent's allowed RMSE, as a share of its std")
    e.add_argument("--heartbeat-timeout", type=float, default=10.0,
                   help="seconds of silence after which the cloud is presumed dead (it beats during its steps too)")
    e.add_argument("--retries", type=int, default=2, help="times a lost request is sent again (to another worker)")
    e.add_argument("--fallback", action="store_true",
                   help="if the cloud does not answer in time, finish its steps here and mark the result degraded")
    e.add_argument("--out", default="out.png", help="the image: a path ending in .png, .jpg, .jpeg or .webp")
    _device_arguments(e)
    e.add_argument("--upscale", type=int, help="then hybrid SR by this scale (2 or 4 with the embedded world models)")
    e.add_argument("--sr-prompt", help="the upscaler's prompt (default --prompt); the world's names the texture: "
                                       "'a red striped circle at the top left'")
    e.add_argument("--sr-connect", help="the cloud daemon serving the upscaler (default: hybrid SR on this machine)")
    e.add_argument("--sr-codec", default="fp16", help="the codec of the SR patches and latents on the wire")
    _sr_arguments(e, prefix="sr-")
    e.add_argument("--json", action="store_true", help="print one JSON object with the run's summary")
    e.set_defaults(func=_edge)

    u = sub.add_parser("upscale", help="hybrid super-resolution: foreground patches to a diffusion upscaler, the "
                                       "rest to a lightweight model, stitched",
                       description="Upscale --in by --scale: patches whose low-resolution pixels are bright (the "
                                   "foreground rule, pipelines/hybrid_sr/regions.py) go to the diffusion upscaler "
                                   "(in the cloud at --connect, else here), the others to the lightweight model "
                                   "here, at the same time; the stitch blends their overlaps.")
    u.add_argument("--in", dest="input", required=True, help="the low-resolution image")
    u.add_argument("--out", required=True, help="the upscaled image: a path ending in .png, .jpg, .jpeg or .webp")
    u.add_argument("--scale", type=int, required=True, help="2 or 4 with the embedded world models")
    u.add_argument("--prompt", default="", help="what the image shows: the upscaler draws the detail it names")
    u.add_argument("--seed", type=int, default=0)
    u.add_argument("--connect", help="the cloud daemon serving the upscaler (default: everything on this machine)")
    u.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the cloud")
    u.add_argument("--curve-secret", help="this edge's NAME.key_secret (with --server-key)")
    u.add_argument("--server-key", help="the cloud's NAME.key (public)")
    u.add_argument("--sr-codec", default="fp16", help="the codec of the patches and latents on the wire")
    _sr_arguments(u)
    u.add_argument("--json", action="store_true", help="print one JSON object: seconds per stage, patches, bytes")
    u.set_defaults(func=_upscale)

    r = sub.add_parser("session", help="iterate on a prompt: edge previews, then the cloud refines the last",
                       description="DiffusionX's prompt session: each prompt typed (or read from --rounds) gets a "
                                   "preview from the edge model at once; /final (or a {\"final\": true} round) "
                                   "sends the last preview's clean x_0 and the seed to the cloud, which re-noises "
                                   "it to --strength and finishes with the final prompt. Images go to --out-dir.")
    _edge_arguments(r)
    r.add_argument("--rounds", help="a JSON lines file of rounds: {\"prompt\": ...} a preview, {\"final\": true, "
                                    "\"prompt\": ..., \"strength\": ...} the end (prompt and strength optional)")
    r.add_argument("--steps", type=int, default=20, help="the final image's schedule")
    r.add_argument("--preview-steps", type=int, default=8, help="a preview's schedule")
    r.add_argument("--strength", default="auto",
                   help="the share of the final schedule the cloud redoes, or auto: the noise-level predictor's "
                        "choice for the prompt's change, the cloud's load (its health) and the profiles below")
    r.add_argument("--from-previous", action="store_true",
                   help="a round's preview starts from the previous preview re-noised (image-to-image on the edge), "
                        "not from fresh noise")
    r.add_argument("--preview-strength", type=float, default=0.6, help="with --from-previous: the share redone")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--guidance", type=float, default=7.5)
    r.add_argument("--scheduler", default="DDIMScheduler", help="a diffusers scheduler class")
    r.add_argument("--latent-codec", default="fp16", help="the preview's codec on its way up (fp32, fp16, int8, ...)")
    r.add_argument("--latent-level", type=int, default=3)
    r.add_argument("--out-dir", default="session-out", help="round-K.png per preview, final.png")
    _device_arguments(r)
    r.add_argument("--json", action="store_true", help="one JSON object per round")
    _predictor_arguments(r)
    r.set_defaults(func=_prompt_session)

    n = sub.add_parser("predict-noise", help="the refine strength the noise-level predictor picks, and why",
                       description="For a preview made with --from and a final prompt --to, at cloud utilisation "
                                   "--load: each candidate strength's predicted chance that the final shows every "
                                   "attribute, its latency and cloud GPU-seconds (the cost model), the load term and "
                                   "the objective (pipelines/diffusionx/predictor.py); the least wins.")
    n.add_argument("--from", required=True, help="the preview's prompt")
    n.add_argument("--to", required=True, help="the final prompt")
    n.add_argument("--load", type=float, default=0.0, help="the cloud's utilisation in [0, 1] (its health says it)")
    n.add_argument("--steps", type=int, default=20, help="the final's schedule")
    n.add_argument("--model", help="the edge's diffusers folder, whose text encoder measures the change (default: "
                                   "the embedded world-sd-edge)")
    _predictor_arguments(n)
    n.add_argument("--json", action="store_true", help="print one JSON object")
    n.set_defaults(func=_predict_noise)

    v = sub.add_parser("eval", help="a plan's quality on the procedural world, measured exactly",
                       description="Generate N world prompts with the embedded models under a plan (one process, "
                                   "the reference a split run equals) and score them with the attribute judge.")
    _plan_arguments(v, steps=20)
    v.add_argument("--n", type=int, default=256, help="prompts")
    v.add_argument("--seed", type=int, help="prompts and noise seeds (default: pipelines/evaluate.py's EVAL_SEED)")
    v.add_argument("--guidance", type=float, help="default: pipelines/evaluate.py's EVAL_GUIDANCE")
    v.add_argument("--cloud", choices=["trained", "ideal"], default="trained",
                   help="the cloud's model: world-sd-cloud, or the world's exact denoiser")
    v.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    v.add_argument("--json", action="store_true", help="print one JSON object")
    v.set_defaults(func=_eval)

    d = sub.add_parser("demo", help="the edge-cloud trade-off, across real processes, in a grid and a report",
                       description="Start a cloud daemon with the embedded cloud model, run a few prompts under "
                                   "every plan from an edge, and write DIR/grid.png and DIR/report.md.")
    d.add_argument("--out", default="demo-out")
    d.add_argument("--cloud", choices=["trained", "ideal"], default="trained")
    d.add_argument("--prompts", type=int, default=6)
    d.add_argument("--steps", type=int, default=20)
    d.set_defaults(func=_demo)

    c = sub.add_parser("profile", help="measure a device profile of a model folder on this machine",
                       description="Time text encoding, one guided UNet step (batch 1, 2, 4), the fused sampler "
                                   "step and VAE decoding of a diffusers model folder here, and write them as a "
                                   "device profile (scheduler/cost/data/README.md's format) that `latentwire cost` "
                                   "takes wherever a device is named.")
    c.add_argument("--model", required=True, help="a diffusers model folder")
    c.add_argument("--out", required=True, help="the profile .json to write")
    c.add_argument("--name", help="the profile's name (default: FOLDER@here)")
    c.add_argument("--resolution", type=int, help="image side in pixels (default: the model's own)")
    c.add_argument("--steps", type=int, default=25, help="the schedule the timed step's timestep comes from")
    c.add_argument("--repeats", type=int, default=5, help="timed calls per figure (the median is kept)")
    c.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    c.add_argument("--side", choices=("cloud", "edge", "any"), default="any",
                   help="time the calls as this side's process runs them (a cloud daemon never decodes; on a CPU "
                        "that changes the UNet's speed); the profile's kind")
    _device_arguments(c)
    c.set_defaults(func=_profile)

    c = sub.add_parser("search", help="search a plan: the least predicted latency within a quality bound",
                       description="EC-Diff's two-stage greedy search (stage 1 the switch step s, stage 2 p, k and a; "
                                   "with --spacing a stage 3 on where the cloud's calls fall): "
                                   "candidates in order of predicted latency (the cost model, for the named "
                                   "profiles), each measured on the world (latentwire eval) until one keeps "
                                   "--min-quality of cloud-only's attribute accuracy and Frechet distance; the "
                                   "result is measured again on held-out prompts.")
    c.add_argument("--system", choices=("ec-diff",), default="ec-diff")
    c.add_argument("--cloud-device", required=True, help="the cloud's device profile: NAME or PATH")
    c.add_argument("--edge-device", required=True, help="the edge's device profile: NAME or PATH")
    c.add_argument("--link", required=True, help="the link profile: NAME or PATH")
    c.add_argument("--load", type=float, default=0.0, help="the cloud's utilisation in [0, 1)")
    c.add_argument("--assume", action="append", default=[], metavar="SIDE.FIGURE=SECONDS",
                   help="fill a device figure the profile lacks (as latentwire cost --assume)")
    c.add_argument("--min-quality", type=float, default=0.95, help="the share of cloud-only's quality to keep")
    c.add_argument("--budget", type=int, default=12, help="quality measurements at most (cloud-only's included)")
    c.add_argument("--steps", type=int, default=20)
    c.add_argument("--preset", help="the EC-Diff setting stage 1 starts from: sd (default), sdxl, cogvideox")
    c.add_argument("--forecasters", default="ecdiff",
                   help="what stage 2 searches over: ecdiff (EC-Diff's rule), and/or taylor (latentwire's Taylor "
                        "forecasters, orders 1-3 in t or sigma), comma-separated")
    c.add_argument("--spacing", action="store_true",
                   help="stage 3, beyond EC-Diff: where the cloud's calls fall (more forecast steps than stage 2's "
                        "best, placed evenly, early or late instead of EC-Diff's fixed cycle)")
    c.add_argument("--no-handoff", action="store_true",
                   help="stage 1 also tries keeping every step on the cloud, forecasting (no edge steps): beyond "
                        "EC-Diff, for an edge slower than the cloud")
    c.add_argument("--cache", help="a JSON file of measurements: read before, written after each one (a search "
                                   "resumes; a second search over the same candidates measures only what is new)")
    c.add_argument("--rank-n", type=int, default=8,
                   help="prompts of the cheap proxy that orders candidates of equal predicted latency (the final "
                        "latent's distance from cloud-only's; not counted in --budget; 0: none)")
    c.add_argument("--screen-margin", type=float, default=2.0,
                   help="skip, unmeasured, a candidate whose proxy is this many times that of a failure at its switch "
                        "step (0: no screen; the proxy then only orders candidates of equal latency)")
    c.add_argument("--n", type=int, default=32, help="search prompts per measurement")
    c.add_argument("--seed", type=int, help="search prompts' seed (default: pipelines/evaluate.py's EVAL_SEED)")
    c.add_argument("--held-out-seed", type=int, help="the held-out prompts' seed (default: --seed + 1)")
    c.add_argument("--confirm-n", type=int,
                   help="a candidate that meets the bound on --n prompts must meet it on this many too (default 4 x "
                        "--n; 0: no confirmation): a few dozen prompts' Frechet distance is too noisy for a 95%% bound")
    c.add_argument("--held-out-n", type=int, help="held-out prompts (default: --confirm-n, else --n)")
    c.add_argument("--cloud", choices=("trained", "ideal"), default="trained",
                   help="the world's cloud model: world-sd-cloud, or the exact denoiser")
    c.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    c.add_argument("--out", help="write the plan found here (JSON: --plan-file of edge, eval and cost)")
    c.add_argument("--json", action="store_true", help="print one JSON object")
    c.set_defaults(func=_search)

    c = sub.add_parser("cost", help="predict a plan's latency, cloud GPU-seconds and bytes on devices and a link",
                       description="Walk the plan with device and link profiles (names from --list, or paths to "
                                   "profile .json files) and the protocol's real message sizes; print the "
                                   "predicted latency with its parts, cloud GPU-seconds, edge seconds and bytes.")
    c.add_argument("--list", action="store_true", help="list the shipped device and link profiles")
    _plan_arguments(c, steps=50)
    c.add_argument("--cloud-device", help="the cloud's device profile: NAME (MODEL@HARDWARE) or PATH")
    c.add_argument("--edge-device", help="the edge's device profile: NAME or PATH")
    c.add_argument("--link", help="the link profile: NAME or PATH")
    c.add_argument("--load", type=float, default=0.0, help="the cloud's utilisation in [0, 1) (M/D/1 queue)")
    c.add_argument("--cloud-batch", type=int, default=1, help="sessions sharing each cloud forward")
    c.add_argument("--preview-every", type=int, default=0, help="the cloud streams a preview every N steps")
    c.add_argument("--scheduler", default="DDIMScheduler",
                   help="the diffusers scheduler the session uses (decides the solver state that travels)")
    c.add_argument("--latent-shape", type=int, nargs="+",
                   help="C H W (or F C H W) of the latent that travels (default: the profiles' latent_shape)")
    c.add_argument("--latent-codec", default="int8")
    c.add_argument("--latent-level", type=int, default=3)
    c.add_argument("--state-codec", default="fp16")
    c.add_argument("--assume", action="append", default=[], metavar="SIDE.FIGURE=SECONDS",
                   help="fill or vary one device figure for this prediction, e.g. cloud.text_encode_s=0.005 "
                        "(repeatable; the output lists what was assumed)")
    c.add_argument("--json", action="store_true", help="print one JSON object")
    c.set_defaults(func=_cost)
    return p


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except BrokenPipeError:  # the reader went away (`latentwire cost --list | head`): not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes
        return 0


if __name__ == "__main__":
    sys.exit(main())
