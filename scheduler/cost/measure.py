"""A device profile of a loaded model, measured on this machine (what `latentwire profile` writes).

Each figure is the median of REPEATS timed calls, on the model's device (CUDA work is synchronised before
the clock is read), after WARMUP untimed calls of every one of them (all warm before any is timed):

    text_encode_s      model.encode_prompt(prompt, negative)                       (cond, uncond)
    unet_step_s        model.predict(x_t, t, cond, uncond): one guided step, batch 1 (the UNet on 2 rows)
    unet_step_s_batch  the same on B latents at once, B in BATCH_SIZES (the cloud engine's stacked forward)
    fused_step_s       FusedSampler.step(x_t, i, cond=, uncond=, guidance_scale=): the sampler update
    vae_decode_s       model.decode(x_0): one latent to one PIL image, as the edge writes it

x_t is seeded Gaussian noise of the latent shape at the asked resolution; t the schedule's middle step of
an N-step schedule of the model's own scheduler. The model is anything with the runners' interface
(pipelines/models/__init__.py); loading it is the caller's (the CLI loads a folder with load_model).
"""
import datetime
import platform
import statistics
import time

import torch

WARMUP = 2
REPEATS = 5
BATCH_SIZES = (1, 2, 4)
PROMPT = "a photo of a red cat under a tree"
GUIDANCE = 7.5


def measure(model, *, name, model_name, resolution=None, steps=25, repeats=REPEATS, warmup=WARMUP,
            batch_sizes=BATCH_SIZES, scheduler=None, side="any"):
    """A profile (the format's plain dict, ready for json.dump) of ``model`` on this machine.

    resolution: the image side in pixels (default: the model's own, latent_shape * VAE scale factor);
    steps: the schedule the timestep comes from; scheduler: a diffusers class name to use instead of the
    model's own (the fused step must support it); side: "cloud" (timed as a cloud daemon runs, which never
    decodes), "edge" or "any" (as a process that also decodes), the profile's ``kind``."""
    from latentwire.kernels import FusedSampler

    if type(repeats) is not int or repeats < 1 or type(warmup) is not int or warmup < 0:
        raise ValueError(f"repeats {repeats!r} must be an int >= 1 and warmup {warmup!r} an int >= 0")
    if side not in ("cloud", "edge", "any"):
        raise ValueError(f"side {side!r}: 'cloud', 'edge' or 'any'")
    if type(steps) is not int or steps < 1:
        raise ValueError(f"steps {steps!r}: an int >= 1")
    factor = model.latent_space.scale_factor if hasattr(model, "latent_space") else 8
    shape = tuple(model.latent_shape)
    if resolution is not None:
        if type(resolution) is not int or resolution < factor or resolution % factor:
            raise ValueError(f"resolution {resolution!r}: a multiple of the VAE's scale factor {factor} in pixels")
        shape = (*shape[:-2], resolution // factor, resolution // factor)
    resolution = shape[-1] * factor
    device = torch.device(getattr(model, "device", "cpu"))
    dtype = getattr(model, "dtype", torch.float32)
    sched = model.make_scheduler(scheduler)
    sched.set_timesteps(steps)
    sampler = FusedSampler(sched, device=device)
    i = len(sampler.timesteps) // 2
    t = sampler.timesteps[i]
    g = torch.Generator().manual_seed(0)
    x = {b: torch.randn((b, *shape), generator=g).to(device=device, dtype=dtype) for b in batch_sizes}
    cond, uncond = model.encode_prompt(PROMPT, "")
    pc, pu = model.predict(x[1], t, cond, uncond, scheduler=sched, guidance=GUIDANCE)
    calls = {"text": lambda: model.encode_prompt(PROMPT, "")}
    for b in batch_sizes:
        calls[b] = (lambda c, u, b: lambda: model.predict(x[b], t, c, u, scheduler=sched, guidance=GUIDANCE))(
            _rows(cond, b), _rows(uncond, b), b)
    calls["fused"] = lambda: sampler.step(x[1], i, cond=pc, uncond=pu, guidance_scale=GUIDANCE)
    calls["decode"] = lambda: model.decode(x[1])
    clock = _Clock(device, repeats, warmup)
    # Timed in the state the serving process is in. On a CPU, what a process ran before changes the UNet's
    # speed: after the VAE decoder's first run (its large buffers) the same UNet call ran 4-15% faster here
    # (bench/decode_warmup.py, a 4x64x64 tiny UNet). An edge decodes every generation, so its steps run
    # in the after-decode state: every call warms before any is timed. A cloud daemon never decodes: its
    # calls warm and are timed before the decoder runs at all, and the decoder (for completeness) last.
    first = [k for k in calls if k != "decode"] if side == "cloud" else list(calls)
    clock.warm(calls[k] for k in first)
    times = {key: clock(calls[key]) for key in first}
    if side == "cloud":
        clock.warm([calls["decode"]])
        times["decode"] = clock(calls["decode"])
    text, fused, decode = times["text"], times["fused"], times["decode"]
    batch = {b: times[b] for b in batch_sizes}

    where = (f"{torch.cuda.get_device_name(device)} (CUDA)" if device.type == "cuda"
             else (platform.processor() or platform.machine()))
    measured = (f"measured here by latentwire profile, {datetime.date.today().isoformat()}, {_cpu()}, torch threads "
                f"{torch.get_num_threads()}" + (f", on {where}" if device.type == "cuda" else ""))
    how = f"median of {repeats} calls (after {warmup} warm-up calls of each figure's call)"
    return {
        "name": name, "model": model_name, "hardware": "here", "kind": side, "resolution": resolution,
        "dtype": str(dtype).replace("torch.", ""), "latent_shape": list(shape),
        "unet_step_s": batch[1] if 1 in batch else None,
        "unet_step_s_batch": {str(b): s for b, s in batch.items()},
        "text_encode_s": text, "vae_decode_s": decode, "fused_step_s": fused,
        "sources": {k: measured for k in ("unet_step_s", "unet_step_s_batch", "text_encode_s", "vae_decode_s",
                                          "fused_step_s")},
        "derived": {"unet_step_s": f"{how} of model.predict(x_t, t={float(t):g}, cond, uncond) on a "
                                   f"{(1, *shape)} latent, step {i} of a {len(sampler.timesteps)}-step "
                                   f"{type(sched).__name__} schedule",
                    "unet_step_s_batch": f"{how} of the same on B latents per forward, B in {list(batch_sizes)}",
                    "text_encode_s": f"{how} of encode_prompt(prompt, negative prompt '')",
                    "vae_decode_s": f"{how} of decode(latent) to a PIL image",
                    "fused_step_s": f"{how} of FusedSampler.step with guidance {GUIDANCE}"},
        "missing": [] if 1 in batch else ["unet_step_s"],
    }


class _Clock:
    """Median seconds of ``repeats`` calls of fn after ``warmup`` untimed ones."""

    def __init__(self, device, repeats, warmup):
        self.device, self.repeats, self.warmup = device, repeats, warmup

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def warm(self, fns):
        """``warmup`` untimed calls of each of fns, in turn."""
        with torch.no_grad():
            for fn in fns:
                for _ in range(self.warmup):
                    fn()

    def __call__(self, fn):
        with torch.no_grad():
            times = []
            for _ in range(self.repeats):
                self._sync()
                start = time.perf_counter()
                fn()
                self._sync()
                times.append(time.perf_counter() - start)
        return max(statistics.median(times), 1e-9)  # a profile's times are positive


def _rows(c, b):
    """Conditioning for b rows: a tensor (1, ...) repeated, or each tensor of a tuple (SDXL's pooled too)."""
    if isinstance(c, torch.Tensor):
        return c.expand(b, *c.shape[1:]).contiguous() if c.shape[0] == 1 else c
    return type(c)(_rows(part, b) for part in c)


def _cpu():
    """This machine's CPU model as /proc/cpuinfo names it (else platform's guess)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"
