"""The world's ideal denoiser: the minimum-MSE denoiser of a finite training set, in closed form, behind the
model interface the runtime uses (pipelines/models/sd.py). It is the limit a trained model approaches as it fits
its training set, and a stand-in cloud model when a trained one falls short.

    ideal = IdealDenoiser.from_pretrained(embedded.CLOUD_PATH)     # VAE + scheduler of a world folder
    cond, uncond = ideal.encode_prompt("a red circle at the top left")
    eps_c, eps_u = ideal.predict(x, t, cond, uncond, scheduler=sched)   # in the scheduler's prediction type

Maths. The training set is N latents y_i, each with its caption c_i. Treat the data given caption c as the
mixture of its latents, each widened to N(y_i, s^2 I) with s = FLOOR_STD (a tiny floor, so the mixture has
a density), uniform weights: pipelines/gmm.py's GaussianMixture with J = the caption's latents. Under the
VP forward process x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps (DDPM eq. 4) the posterior over i is

    r_i(x_t) = softmax_i( -||x_t - sqrt(abar_t) y_i||^2 / (2 v) ),   v = abar_t s^2 + 1 - abar_t,

(log-sum-exp, float64: in D = 256 dimensions the Gaussians themselves underflow) and Tweedie gives

    eps*(x_t, t, c) = sqrt(1 - abar_t) sum_i r_i (x_t - sqrt(abar_t) y_i) / v          (gmm.py's formula)
    x0*             = (x_t - sqrt(1 - abar_t) eps*) / sqrt(abar_t)   (-> sum_i r_i y_i as s -> 0)

The model returns what its scheduler's prediction_type asks for: eps*, x0* ("sample"), or
v* = sqrt(abar_t) eps* - sqrt(1 - abar_t) x0* ("v_prediction", the world folders' type). The
unconditional model (empty prompt) is the same over all N latents. A sampler run with it from noise lands
on (a point extremely close to) one training latent of the prompted caption: it memorizes, by definition.

Conditioning. encode_prompt maps a world caption to a (1, L, D) tensor that is one-hot at the flat index of
its scene (world.all_scenes() order) and "" to zeros (the unconditional mixture); (L, D) is the folder's
text space, so check_models finds cloud and edge compatible. Other text raises world.CaptionError.

Scope (as gmm.py): ``t`` must be an integer training timestep indexing the scheduler's alphas_cumprod, and
the model input is x_t itself: DDIM, DDPM and DPM-Solver++ (DPMSolverMultistepScheduler). Schedulers that
scale the model input or use fractional timesteps (Euler, Heun, ...) are refused.
"""
import torch

from . import embedded, world
from .gmm import GaussianMixture

FLOOR_STD = 1e-3            # s: the width given each training latent (latents have unit standard deviation)
SUPPORTED_SCHEDULERS = ("DDIMScheduler", "DDPMScheduler", "DPMSolverMultistepScheduler")
MAX_CHUNK_ELEMENTS = 1 << 22  # rows x latents x D float64 per chunk: 32 MB of temporaries


class IdealDenoiser:
    """The exact posterior-mean denoiser of ``latents`` grouped by ``scene_ids``, over ``base``'s VAE and
    scheduler.

    latents: (N, C, H, W) training latents (scaled as ``base``'s UNet sees them); scene_ids: (N,) int64
    indices into world.all_scenes(); base: a StableDiffusionModel whose VAE made the latents (decode,
    initial_noise, make_scheduler, latent_space and text_space are its).
    """

    def __init__(self, latents, scene_ids, base, floor_std=FLOOR_STD):
        n_scenes = len(world.all_scenes())
        if latents.dim() != 4 or tuple(latents.shape[1:]) != tuple(base.latent_shape):
            raise ValueError(f"latents must be (N, {', '.join(map(str, base.latent_shape))}), got "
                             f"{tuple(latents.shape)}")
        if scene_ids.shape != (len(latents),):
            raise ValueError(f"scene_ids must be ({len(latents)},), one per latent, got {tuple(scene_ids.shape)}")
        missing = sorted(set(range(n_scenes)) - set(scene_ids.tolist()))
        if missing:
            raise ValueError(f"every scene needs at least one training latent; scene ids {missing} have none")
        self.base = base
        self.latent_shape, self.latent_space, self.text_space = base.latent_shape, base.latent_space, base.text_space
        length, width = self.text_space.max_length, self.text_space.hidden_size
        if length * width < n_scenes:
            raise ValueError(f"a ({length}, {width}) text space cannot hold a one-hot over {n_scenes} scenes")
        self.scheduler_config = base.scheduler_config
        self.scheduler = base.scheduler
        y = latents.double()
        floor = torch.tensor(float(floor_std), dtype=torch.float64)

        def mixture(rows):
            j = len(rows)
            return GaussianMixture(rows, floor.expand(j).clone(), torch.full((j,), 1.0 / j, dtype=torch.float64))

        # one mixture per scene, and the unconditional one (index n_scenes) over all N
        self.mixtures = [mixture(y[scene_ids == k]) for k in range(n_scenes)] + [mixture(y)]

    @classmethod
    def from_pretrained(cls, path, per_scene=embedded.POOL_PER_SCENE, seed=embedded.POOL_SEED, floor_std=FLOOR_STD):
        """The ideal denoiser of embedded.scene_pool(per_scene, seed) (default: the UNets' training set),
        encoded by the VAE of the world folder ``path``."""
        from .models.sd import StableDiffusionModel

        base = StableDiffusionModel.from_pretrained(path)
        images, ids = embedded.scene_pool(per_scene, seed)
        return cls(embedded.encode_images(base.vae, images), ids, base, floor_std)

    def make_scheduler(self, name=None):
        return self.base.make_scheduler(name)

    def initial_noise(self, seed, batch=1, *, scheduler=None, generator_device=None):
        return self.base.initial_noise(seed, batch, scheduler=scheduler, generator_device=generator_device)

    def decode(self, latent, output_type="pil"):
        return self.base.decode(latent, output_type=output_type)

    def encode_prompt(self, prompt, negative_prompt=""):
        """(cond, uncond), each (1, L, D) float32: one-hot at the scene index of a world caption, zeros for ""."""
        for arg, value in (("prompt", prompt), ("negative_prompt", negative_prompt)):
            if not isinstance(value, str):
                raise TypeError(f"{arg} must be a str, got {type(value).__name__}")
        return self._embed(prompt), self._embed(negative_prompt)

    def _embed(self, text):
        e = torch.zeros(self.text_space.max_length * self.text_space.hidden_size, dtype=self.base.dtype)
        if text != "":
            e[world.all_scenes().index(world.parse_caption(text))] = 1  # parse_caption raises CaptionError
        return e.reshape(1, self.text_space.max_length, self.text_space.hidden_size)

    def _scenes(self, embeds, b):
        """(B,) mixture index per row of (1 or B, L, D) one-hot embeddings; zeros -> the unconditional one."""
        length, width = self.text_space.max_length, self.text_space.hidden_size
        if embeds.dim() != 3 or embeds.shape[0] not in (1, b) or tuple(embeds.shape[1:]) != (length, width):
            raise ValueError(f"text embeddings must be (1 or {b}, {length}, {width}), got {tuple(embeds.shape)}")
        flat = embeds.expand(b, -1, -1).reshape(b, -1)
        hot = flat.argmax(1)
        conditional = flat.amax(1) > 0
        if bool((flat[torch.arange(b), hot] != flat.sum(1)).any()) or bool((hot[conditional] >= len(self.mixtures) - 1).any()):
            raise ValueError("text embeddings must come from IdealDenoiser.encode_prompt (one-hot over scenes or zeros)")
        return torch.where(conditional, hot, len(self.mixtures) - 1)

    family = "sd"

    def timestep_kwargs(self, steps=None):
        """set_timesteps takes nothing more for this family."""
        return {}

    @torch.no_grad()
    def predict(self, x, t, cond, uncond=None, *, scheduler=None, guidance=None):
        """(out(x_t, t, cond), out(x_t, t, uncond)), out the exact model output in the scheduler's
        prediction_type (see the module docstring); the second is None if uncond is None.

        x: (B, C, H, W) x_t; t: an integer timestep of ``scheduler`` (0-d tensor or number) or a (B,) tensor of
        them; cond, uncond: (1 or B, L, D) from encode_prompt. Computed in float64, returned in x's dtype.
        """
        sched = self.scheduler if scheduler is None else scheduler
        name = type(sched).__name__
        if name not in SUPPORTED_SCHEDULERS:
            raise ValueError(f"scheduler {name} is not supported by the ideal denoiser, which takes x_t unscaled at "
                             f"integer timesteps; use one of {', '.join(SUPPORTED_SCHEDULERS)}")
        b = x.shape[0]
        if x.dim() != 4 or tuple(x.shape[1:]) != tuple(self.latent_shape):
            raise ValueError(f"x must be (B, {', '.join(map(str, self.latent_shape))}), got {tuple(x.shape)}")
        ts = t.reshape(-1) if isinstance(t, torch.Tensor) and t.dim() == 1 else None
        if ts is not None and ts.shape != (b,):
            raise ValueError(f"a per-row t must have shape ({b},), got {tuple(ts.shape)}")
        ts = ts.tolist() if ts is not None else [t.item() if isinstance(t, torch.Tensor) else t] * b
        alphas_cumprod = sched.alphas_cumprod
        prediction = sched.config.prediction_type
        outs = []
        for embeds in (cond, uncond):
            if embeds is None:
                outs.append(None)
                continue
            which = self._scenes(embeds, b)
            out = torch.empty(x.shape, dtype=torch.float64)
            for key in sorted(set(zip(which.tolist(), ts))):
                rows = torch.tensor([(w, s) == key for w, s in zip(which.tolist(), ts)])
                out[rows] = self._output(x[rows].double(), key[1], self.mixtures[key[0]], alphas_cumprod, prediction)
            outs.append(out.to(x.dtype))
        return outs[0], outs[1]

    @staticmethod
    def _output(x, t, mixture, alphas_cumprod, prediction):
        """The model output for rows x (R, C, H, W) float64 at timestep t under one mixture."""
        j, d = mixture.means.shape[0], x[0].numel()
        chunk = max(1, MAX_CHUNK_ELEMENTS // (j * d))
        eps = torch.cat([mixture.eps(x[i:i + chunk], t, alphas_cumprod) for i in range(0, len(x), chunk)])
        if prediction == "epsilon":
            return eps
        abar = GaussianMixture._abar(t, alphas_cumprod)
        x0 = (x - (1 - abar) ** 0.5 * eps) / abar ** 0.5
        if prediction == "sample":
            return x0
        if prediction == "v_prediction":
            return abar ** 0.5 * eps - (1 - abar) ** 0.5 * x0  # v = sqrt(abar) eps - sqrt(1 - abar) x0
        raise ValueError(f"prediction_type {prediction!r} is not supported; use epsilon, sample or v_prediction")
