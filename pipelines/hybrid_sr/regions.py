"""Patches, the foreground rule, and the stitch: hybrid SR's geometry, in low-resolution pixels throughout.

    grid = patch_grid(h, w, patch=8, overlap=2)        -> [(y, x)] top-left corners, covering the image
    mask = foreground(image)                           -> (h, w) bool: the rule below
    fg, bg = split(mask, grid, patch)                  -> indices into grid: patches for the cloud, for the edge
    out = stitch(patches_hr, grid, patch, scale, (h, w), overlap)   -> the high-resolution image
    mask_scores(predicted, exact)                      -> precision, recall, IoU
    seam_error(out, truth, grid, patch, scale, band)   -> error along patch borders and in their interiors

The foreground rule, from what exists at run time: the low-resolution image alone. A pixel is foreground
when its brightest channel is above FOREGROUND_LEVEL of the way from black to full ((x + 1) / 2 >
FOREGROUND_LEVEL), dilated by DILATE pixels so that the anti-aliased rim of a shape, and the detail an SR
model draws at its edge, fall inside. This suits images whose background is plain and dark (the world's);
the generator's cross-attention maps would be the rule for busy backgrounds, and are not used here.

The stitch blends overlaps so that no seam shows: each patch's weight ramps linearly from its border to
1 at ``overlap`` pixels in (not at the image's own border), and the canvas takes each patch in turn by
``canvas + a (patch - canvas)`` with a = w_patch / (w_canvas + w_patch): a running weighted mean. Where
every patch agrees (identity SR) each lerp is exact, so an image split and stitched comes back bit for bit.
"""
import torch
import torch.nn.functional as F

FOREGROUND_LEVEL = 0.1
DILATE = 1


def patch_grid(h, w, patch, overlap=0):
    """Top-left corners (y, x) of patch x patch tiles, stride patch - overlap, the last row and column moved
    in to end at the image's edge; every pixel is in at least one tile."""
    for name, v in (("patch", patch), ("overlap", overlap), ("h", h), ("w", w)):
        if type(v) is not int or v < 0:
            raise ValueError(f"{name} must be an int >= 0, got {v!r}")
    if not 0 < patch <= min(h, w):
        raise ValueError(f"patch must be in [1, {min(h, w)}] (the image is {h}x{w}), got {patch}")
    if not overlap < patch:
        raise ValueError(f"overlap must be < patch ({patch}), got {overlap}")

    def starts(n):
        s = list(range(0, n - patch + 1, patch - overlap))
        return s if s[-1] == n - patch else s + [n - patch]

    return [(y, x) for y in starts(h) for x in starts(w)]


def foreground(image, level=FOREGROUND_LEVEL, dilate=DILATE):
    """(h, w) bool foreground of one (3, h, w) image in [-1, 1], by the rule in the module docstring."""
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"image must be (3, h, w), got {tuple(image.shape)}")
    bright = (image.amax(0) + 1) / 2 > level
    if dilate:
        bright = F.max_pool2d(bright[None, None].float(), 2 * dilate + 1, stride=1, padding=dilate)[0, 0] > 0
    return bright


def split(mask, grid, patch):
    """(foreground patch indices, background patch indices) of ``grid``: a patch with any foreground pixel
    goes to the diffusion SR model."""
    fg = [i for i, (y, x) in enumerate(grid) if bool(mask[y:y + patch, x:x + patch].any())]
    chosen = set(fg)
    return fg, [i for i in range(len(grid)) if i not in chosen]


def crops(image, grid, patch):
    """(len(grid), C, patch, patch) tiles of one (C, h, w) image."""
    return torch.stack([image[:, y:y + patch, x:x + patch] for y, x in grid])


def _ramp(patch, overlap, lo_at_border, hi_at_border):
    """(patch,) feathering weights along one axis: (i + 1) / (overlap + 1) over the first and last ``overlap``
    pixels, except on a side that is the image's border (no other tile blends there)."""
    w = torch.ones(patch)
    if overlap:
        r = torch.arange(1, overlap + 1, dtype=torch.float32) / (overlap + 1)
        if not lo_at_border:
            w[:overlap] = torch.minimum(w[:overlap], r)
        if not hi_at_border:
            w[-overlap:] = torch.minimum(w[-overlap:], r.flip(0))
    return w


def stitch(patches, grid, patch, scale, size, overlap=0):
    """The (C, h scale, w scale) image of high-resolution ``patches`` (N, C, patch scale, patch scale), one per
    corner of ``grid`` (low-resolution units), blended over their overlaps as the module docstring says."""
    h, w = size
    if len(patches) != len(grid):
        raise ValueError(f"{len(grid)} patches expected (one per grid corner), got {len(patches)}")
    p = patch * scale
    canvas = torch.zeros((patches.shape[1], h * scale, w * scale), dtype=patches.dtype, device=patches.device)
    weight = torch.zeros((h * scale, w * scale), dtype=torch.float32, device=patches.device)
    for tile, (y, x) in zip(patches, grid):
        wt = _ramp(patch, overlap, y == 0, y + patch == h)[:, None] * _ramp(patch, overlap, x == 0, x + patch == w)
        wt = wt.repeat_interleave(scale, 0).repeat_interleave(scale, 1).to(patches.device)  # constant per low pixel
        ys, xs = slice(y * scale, y * scale + p), slice(x * scale, x * scale + p)
        acc = weight[ys, xs]
        alpha = (wt / (acc + wt)).to(patches.dtype)
        canvas[:, ys, xs] = torch.lerp(canvas[:, ys, xs], tile, alpha)
        weight[ys, xs] = acc + wt
    return canvas


def mask_scores(predicted, exact):
    """{"precision", "recall", "iou"} of a predicted bool mask against the exact one (any shape, equal)."""
    predicted, exact = predicted.bool(), exact.bool()
    tp = float((predicted & exact).sum())
    fp, fn = float((predicted & ~exact).sum()), float((~predicted & exact).sum())
    return {"precision": tp / (tp + fp) if tp + fp else 1.0, "recall": tp / (tp + fn) if tp + fn else 1.0,
            "iou": tp / (tp + fp + fn) if tp + fp + fn else 1.0}


def border_band(grid, patch, scale, size, band=1):
    """(h scale, w scale) bool: the pixels within ``band`` high-resolution pixels of a patch's inner edge
    (a tile's side that is not the image's border): where a seam would show."""
    h, w = size
    out = torch.zeros((h * scale, w * scale), dtype=torch.bool)
    for y, x in grid:
        for edge, at_border in ((y * scale, y == 0), ((y + patch) * scale, y + patch == h)):
            if not at_border:
                out[max(edge - band, 0):edge + band, x * scale:(x + patch) * scale] = True
        for edge, at_border in ((x * scale, x == 0), ((x + patch) * scale, x + patch == w)):
            if not at_border:
                out[y * scale:(y + patch) * scale, max(edge - band, 0):edge + band] = True
    return out


def seam_error(out, truth, grid, patch, scale, band=1, within=None):
    """{"border", "interior"}: mean absolute error of ``out`` against ``truth`` (C, H, W) on the pixels along
    patch borders and on the rest; ``within`` (H, W) bool limits both (e.g. to the foreground). A seam shows
    as a border error above the interior's."""
    h, w = out.shape[-2] // scale, out.shape[-1] // scale
    edge = border_band(grid, patch, scale, (h, w), band)
    keep = torch.ones_like(edge) if within is None else within.bool()
    err = (out - truth).abs().mean(0)
    b, i = err[edge & keep], err[~edge & keep]
    return {"border": float(b.mean()) if len(b) else 0.0, "interior": float(i.mean()) if len(i) else 0.0}
