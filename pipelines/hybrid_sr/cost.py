"""What hybrid SR of one image costs: latency with its parts, cloud GPU-seconds, edge seconds and bytes,
from device profiles and a link, with every message's size from the protocol's real encoder.

    predict_sr(layout, upscaler, light, decoder, link, steps=20, max_batch=16) -> Cost

``layout`` says what one image is cut into, at the real resolution the profiles describe: the low-resolution
image's side, the patch side, the scale, and how many patches go each way (measured on the world and
scaled: bench/hybrid_sr_table.py). The walk, in the order HybridSR.upscale runs:

    cloud path   n_fg Runs up (each its patch image, the session)  + RTT
                 + S = ceil(n_fg / B) groups x steps x t_step(B)      (the engine batches B = min(n_fg, max_batch))
                 + W_q (M/D/1 at ``load``, as scheduler/cost/model.py)
                 + n_fg Handoffs down (each a patch's latent)
                 + n_fg x t_decode,patch on the edge (the upscaler's VAE: the edge decodes the latents)
    edge path    t_light(whole image)                              (the lightweight model runs meanwhile)
    latency      max(cloud path, edge path) + the stitch (taken as 0: a weighted add per pixel)

    t_step(B)    the upscaler profile's unet_step_s_batch[B] if it has B, else B x unet_step_s: no gain
                 from batching is assumed where none is published; times the patch latent's area over the
                 profile's latent_shape area (a UNet's time grows with the latent's cells: an assumption)
    t_light      the light profile's forward_s x (image pixels / its resolution^2) (the same assumption)
    t_decode     the decoder profile's vae_decode_s x (patch latent area / its latent_shape area)

cloud_gpu_s = S (+ nothing for the queue); edge_s = t_light + the decodes. Every scaling is an assumption
named in the Cost's notes.
"""
import math
from dataclasses import dataclass

import torch

from latentwire.protocol import wire_bytes
from latentwire.scheduler import wire
from latentwire.scheduler.cost.model import Cost, CostError, default_session, md1_wait
from latentwire.scheduler.plan import make

LATENT_CHANNELS = 4


@dataclass(frozen=True)
class Layout:
    """One image's SR work at the profiles' resolution: low-resolution side (px), patch side (low-res px),
    scale, patches to the upscaler and to the lightweight model."""

    image_px: int
    patch_px: int
    scale: int
    cloud_patches: int
    edge_patches: int


def predict_sr(layout, upscaler, light, decoder, link, *, steps=20, max_batch=16, load=0.0, codecs=None):
    """The cost of one image's hybrid SR -> scheduler.cost.model.Cost (parts sum to latency_s)."""
    if type(max_batch) is not int or max_batch < 1:
        raise CostError(f"max_batch {max_batch!r}: an int >= 1")
    codecs = codecs or wire.Codecs(latent=("fp16", 0))
    notes = []
    up_bps, down_bps = link.need("up_mbit_s") * 1e6, link.need("down_mbit_s") * 1e6
    rtt = link.need("rtt_ms") / 1e3
    n, p = layout.cloud_patches, layout.patch_px
    parts = dict.fromkeys(("transfer_up", "rtt", "queue", "cloud_steps", "transfer_down", "decode", "edge_sr"), 0.0)

    # the lightweight model over the whole image, on the edge, while the cloud works
    area = (layout.image_px / light.resolution) ** 2
    t_light = light.need("forward_s") * area
    notes.append(f"{light.name}: forward_s x {area:.3g} (image pixels over its {light.resolution}^2 px input)")
    cloud_path = gpu = edge_s = 0.0
    bytes_up = bytes_down = 0
    if n:
        latent_area = p * p / (upscaler.latent_shape[-1] * upscaler.latent_shape[-2])
        b = min(n, max_batch)
        table = upscaler.unet_step_s_batch or {}
        if b in table:
            t_step = table[b] * latent_area
        else:
            t_step = b * upscaler.need("unet_step_s") * latent_area
            if b > 1:
                notes.append(f"{upscaler.name}: no batch-{b} figure; B x the batch-1 step (no batching gain)")
        notes.append(f"{upscaler.name}: step x {latent_area:.3g} (a {p}x{p} patch latent over its "
                     f"{upscaler.latent_shape[-2]}x{upscaler.latent_shape[-1]})")
        s = math.ceil(n / b) * steps * t_step
        run, handoff = _messages(p, layout.scale, steps, codecs)
        bytes_up, bytes_down = n * run, n * handoff
        parts["transfer_up"] = 8 * bytes_up / up_bps
        parts["rtt"] = rtt
        parts["queue"] = md1_wait(load, s)
        parts["cloud_steps"] = s
        parts["transfer_down"] = 8 * bytes_down / down_bps
        decode_area = p * p / (decoder.latent_shape[-1] * decoder.latent_shape[-2])
        parts["decode"] = n * decoder.need("vae_decode_s") * decode_area
        notes.append(f"{decoder.name}: vae_decode_s x {decode_area:.3g} per patch latent")
        cloud_path = sum(parts.values())
        gpu = s
        edge_s = parts["decode"]
    edge_s += t_light
    latency = max(cloud_path, t_light)
    # the edge path overlaps the cloud's: only what it adds past the cloud path counts in the parts
    parts["edge_sr"] = latency - cloud_path
    return Cost(latency_s=latency, cloud_gpu_s=gpu, edge_s=edge_s, bytes_up=bytes_up, bytes_down=bytes_down,
                parts=parts, requests=n, notes=tuple(notes))


def _messages(patch_px, scale, steps, codecs):
    """Bytes of one patch's Run (its image, the upscaler's session) and of its Handoff (the patch latent),
    encoded for real; the image and the latent filled with Gaussian noise (an upper bound under zstd)."""
    g = torch.Generator().manual_seed(0)
    session = default_session(make("cloud-only", steps), prompt="a red striped circle at the top left")
    image = torch.rand((1, 3, patch_px, patch_px), generator=g) * 2 - 1
    latent = torch.randn((1, LATENT_CHANNELS, patch_px, patch_px), generator=g)
    run = wire.Run(session=session, segments=(0, 1), session_id="0" * 32, deadline_s=60.0, codecs=codecs, image=image)
    handoff = wire.Handoff(latent, steps, -1.0, 0, None, steps, 0, 12345, wire.Load(0, 1, 0.0))
    return wire_bytes(run.to_frames()), wire_bytes(handoff.to_frames(codecs))
