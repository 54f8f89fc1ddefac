"""Hybrid SR of one image: foreground patches to the diffusion upscaler, background patches to the
lightweight model, at the same time, then the stitch.

    sr = HybridSR(upscaler, light, cloud=None)            # cloud: a connect address, or None: all here
    result = sr.upscale(image, prompt, seed=0)            # image (3, h, w) in [-1, 1]
    result.image                                          # (3, h S, w S) in [-1, 1]
    result.report()                                       # time per stage, patches_cloud/_edge, bytes

The diffusion patches run as sessions of the upscaler's `cloud-only` plan, one per patch, each a wire.Run
whose ``image`` is the patch: in the cloud daemon (``cloud``: ZeroMQ, one request per patch, up to
max_inflight of them in flight at once on connections of their own, so that the daemon's engine batches
their steps up to its --max-batch; the patches share no request, since a request is one session), or, with no cloud, in a CloudEngine on this machine (the
same engine, stepping the same batches). Either way the cloud returns each patch's final latent, and this
side decodes it with the upscaler's own VAE, which it holds: a latent is 12 times smaller than the pixels
it decodes to (4 channels at the low resolution, against 3 at S^2 times as many pixels). Patch i's noise
comes from seed + i, so an image's patches differ and the same (image, prompt, seed) gives the same result.

The lightweight patches are upscaled here while the cloud works (its requests are in flight on threads):
the lightweight model runs over the whole image once and the background tiles are cut from its output, so
that a tile's border sees its neighbours (the cost is the same to within the foreground's share).
mode "diffusion" sends every patch to the upscaler and "light" none: the two baselines of the table.
"""
import dataclasses
import threading
import time
from dataclasses import dataclass, field

import torch

from latentwire.scheduler import wire
from latentwire.scheduler.session import SessionSpec

from . import regions

MODES = ("hybrid", "diffusion", "light")


@dataclass
class Result:
    image: torch.Tensor
    mask: torch.Tensor  # (h, w) bool: the foreground rule's low-resolution mask
    grid: list
    cloud_patches: list  # indices into grid
    edge_patches: list
    seconds: dict = field(default_factory=dict)
    bytes_up: int = 0
    bytes_down: int = 0
    cloud_calls: int = 0

    def report(self):
        """The JSON report's fields: seconds per stage, patches each side took, bytes."""
        return {"patches_cloud": len(self.cloud_patches), "patches_edge": len(self.edge_patches),
                "patches": len(self.grid), "seconds": {k: round(v, 4) for k, v in self.seconds.items()},
                "bytes_up": self.bytes_up, "bytes_down": self.bytes_down, "cloud_model_calls": self.cloud_calls,
                "size": list(self.image.shape[-2:])}


class HybridSR:
    """upscaler: a StableDiffusionUpscaleModel (the cloud's model when ``cloud`` is None; else the same folder,
    whose VAE decodes the cloud's latents here); light: a lightweight SR of the same scale. cloud: the cloud
    daemon's address, with client_options passed to each EdgeClient (codecs, curve keys, timeouts)."""

    def __init__(self, upscaler, light, *, cloud=None, patch=8, overlap=2, steps=20, guidance_scale=1.0,
                 scheduler=None, max_batch=16, max_inflight=16, level=regions.FOREGROUND_LEVEL,
                 dilate=regions.DILATE, client_options=None):
        if light.scale != upscaler.scale_factor:
            raise ValueError(f"the lightweight model upscales x{light.scale} and the upscaler x{upscaler.scale_factor}: "
                             "give both of one scale")
        self.upscaler, self.light, self.cloud = upscaler, light, cloud
        self.scale = light.scale
        self.patch, self.overlap, self.steps, self.guidance_scale = patch, overlap, steps, guidance_scale
        self.scheduler, self.max_batch, self.level, self.dilate = scheduler, max_batch, level, dilate
        self.max_inflight = max_inflight
        self.client_options = client_options or {}

    def upscale(self, image, prompt, seed=0, mode="hybrid", negative_prompt=""):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"image must be (3, h, w) in [-1, 1], got {tuple(image.shape)}")
        t0 = time.perf_counter()
        seconds = {}
        h, w = image.shape[-2:]
        grid = regions.patch_grid(h, w, self.patch, self.overlap)
        mask = regions.foreground(image, self.level, self.dilate)
        fg, bg = regions.split(mask, grid, self.patch)
        if mode == "diffusion":
            fg, bg = list(range(len(grid))), []
        elif mode == "light":
            fg, bg = [], list(range(len(grid)))
        tiles = regions.crops(image, grid, self.patch)
        seconds["regions"] = time.perf_counter() - t0
        out = torch.empty((len(grid), 3, self.patch * self.scale, self.patch * self.scale))
        cloud = _CloudWork(self, [tiles[i:i + 1] for i in fg], prompt, negative_prompt, seed, fg)
        cloud.start()
        t1 = time.perf_counter()
        if bg:  # the whole image at once, then its tiles: a tile's border then has its neighbours' context
            whole = self.light.upscale(image[None])[0].float().cpu()
            out[bg] = regions.crops(whole, [(y * self.scale, x * self.scale) for y, x in (grid[i] for i in bg)],
                                    self.patch * self.scale)
        seconds["edge_sr"] = time.perf_counter() - t1
        latents = cloud.join()
        seconds["cloud_sr"] = cloud.seconds
        t2 = time.perf_counter()
        if fg:
            decoded = torch.cat([self.upscaler.decode(latents[i:i + 16], output_type="pt")
                                 for i in range(0, len(latents), 16)])
            out[fg] = decoded.float().cpu() * 2 - 1
        seconds["decode"] = time.perf_counter() - t2
        t3 = time.perf_counter()
        result = regions.stitch(out, grid, self.patch, self.scale, (h, w), self.overlap)
        seconds["stitch"] = time.perf_counter() - t3
        seconds["total"] = time.perf_counter() - t0
        return Result(result, mask, grid, fg, bg, seconds, cloud.bytes_up, cloud.bytes_down, cloud.calls)

    def spec(self, prompt, negative_prompt, seed):
        return SessionSpec.for_model(self.upscaler, prompt, plan="cloud-only", steps=self.steps, scheduler=self.scheduler,
                                     seed=seed, guidance_scale=self.guidance_scale, negative_prompt=negative_prompt)


class _CloudWork:
    """The diffusion patches, on a thread: every patch's session sent at once, their latents in patch order."""

    def __init__(self, sr, images, prompt, negative_prompt, seed, indices):
        self.sr, self.images, self.indices = sr, images, indices
        # one session checked and built (its scheduler validated), then one per patch by seed alone
        base = sr.spec(prompt, negative_prompt, seed) if indices else None
        self.specs = [dataclasses.replace(base, seed=seed + i) for i in indices]
        self.latents, self.errors = [None] * len(images), []
        self.seconds, self.bytes_up, self.bytes_down, self.calls = 0.0, 0, 0, 0
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self):
        self._thread.start()

    def join(self):
        self._thread.join()
        if self.errors:
            raise self.errors[0]
        return torch.cat(self.latents) if self.latents else torch.empty(0)

    def _run(self):
        t0 = time.perf_counter()
        try:
            if self.images:
                (self._remote if self.sr.cloud else self._here)()
        except Exception as e:  # re-raised on the caller's thread by join()
            self.errors.append(e)
        self.seconds = time.perf_counter() - t0

    def _here(self):
        """In a CloudEngine on this machine: the cloud's own batching, with no sockets."""
        from latentwire.scheduler.engine import CloudEngine
        from latentwire.scheduler.limits import ServingLimits

        engine = CloudEngine(self.sr.upscaler, max_batch=self.sr.max_batch,
                             limits=ServingLimits(max_sessions=max(256, len(self.images)),
                                                  max_sessions_per_client=max(16, len(self.images))))
        events = [[] for _ in self.images]
        for k, (spec, image) in enumerate(zip(self.specs, self.images)):
            engine.submit(wire.Run(session=spec, segments=(0, 1), image=image), emit=events[k].append)
        while engine.turn():
            pass
        for k, got in enumerate(events):
            last = got[-1]
            if isinstance(last, wire.Error):
                raise RuntimeError(f"patch {self.indices[k]}: {last.message}")
            self.latents[k] = last.latent
            self.calls += last.model_calls

    def _remote(self):
        """One EdgeClient per patch, all in flight at once: the daemon batches their steps."""
        from latentwire.scheduler.serving.edge import EdgeClient

        def one(k):
            client = EdgeClient(self.sr.cloud, self.sr.upscaler, **self.sr.client_options)
            try:
                with inflight:
                    x, _, calls, _ = client.run_remote(self.specs[k], 0, 1, image=self.images[k])
            except Exception as e:
                self.errors.append(e)
                return
            self.latents[k] = x.float().cpu()
            with lock:
                self.calls += calls
                self.bytes_up += client.bytes_up
                self.bytes_down += client.bytes_down

        lock = threading.Lock()
        # at most max_inflight at once: the daemon admits max_sessions_per_client (16) from one CURVE key
        inflight = threading.BoundedSemaphore(self.sr.max_inflight)
        threads = [threading.Thread(target=one, args=(k,), daemon=True) for k in range(len(self.images))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
