"""Step-level batching: many sessions' steps share one model forward and one per-row fused step.

Each running request is a ``Job`` at some step of its segments. Every turn of the cloud's loop takes
up to ``max_batch`` jobs that can share a forward (the same scheduler, configuration and schedule
length, no forecaster in their current segment, and, for a multistep solver, a history or step 0),
stacks their latents, timesteps, text embeddings, guidance scales, step indices and solver states
row by row, runs the model once on the stack and the fused step once with per-row parameters, and
hands each row back to its job. A job joins or leaves the batch at any step boundary. Jobs whose
segment forecasts run that segment on their own.
"""
import json
from dataclasses import dataclass, field

import torch

from latentwire.kernels import SolverState

from .executor import initial_noise, run_segment
from .session import renoise_noise, step_noise


@dataclass
class Job:
    """One `run` request in progress."""

    reply: object  # reply(message) sends to the requesting edge
    preview: object  # preview(step, latent)
    spec: object
    sampler: object
    segments: list  # the plan's segments this request runs, in order
    conditioning: tuple
    x: torch.Tensor
    state: SolverState = None
    seg: int = 0  # index into segments
    step: int = 0
    calls: int = 0
    forecasts: int = 0
    key: tuple = field(default=None)
    ticket: object = None  # the server's bookkeeping: who asked, when, until when

    @property
    def segment(self):
        return self.segments[self.seg]


def batch_key(spec):
    """Jobs batch together only with the same schedule: scheduler class, configuration and length."""
    return spec.scheduler, json.dumps(spec.scheduler_config, sort_keys=True, default=str), spec.plan.num_steps


def enter_segment(job):
    """Set the job at the start of its current segment (re-noising a preview if the segment says so)."""
    seg = job.segment
    job.step = seg.start
    if seg.renoise:
        t = job.sampler.timesteps[seg.start:seg.start + 1]
        noise = renoise_noise(job.spec.seed, job.x.shape, job.x.dtype)
        job.x = job.sampler.scheduler.add_noise(job.x, noise, t)
        job.state = None


def batchable(job):
    if job.segment.forecast:
        return False
    table = job.sampler.table
    return not (table.multistep and job.state is None and job.step > 0)  # a restarted solver steps alone


def run_alone(job, model, callback=None):
    """The rest of the job's current segment, on its own (forecasting segments, restarted solvers).
    callback(i, t, x_t, m, real) after each step, as run_segment's."""
    seg, start = job.segment, job.step
    rest = type(seg)(seg.side, start, seg.stop, seg.forecast, renoise=False)
    job.x, job.state, n = run_segment(job.spec, rest, job.sampler, model, job.conditioning, job.x, job.state, callback)
    job.calls += n
    job.forecasts += (seg.stop - start) - n
    job.step = seg.stop


def step_batch(jobs, model, every):
    """One step for every job in ``jobs`` (batchable, same batch_key), with one model forward."""
    sampler = jobs[0].sampler
    timesteps = sampler.timesteps
    x = torch.cat([j.x for j in jobs])
    steps = torch.tensor([j.step for j in jobs])
    t = timesteps[steps]
    cond = torch.cat([j.conditioning[0] for j in jobs])
    uncond = torch.cat([j.conditioning[1] for j in jobs])
    g = torch.tensor([float(j.spec.guidance_scale) for j in jobs])
    eps_c, eps_u = model.eps(x, t, cond, uncond, scheduler=sampler.scheduler)
    state = None
    if sampler.table.multistep:  # rows at step 0 have no history; their coefficients ignore it
        state = SolverState(torch.cat([j.state.x0_prev if j.state is not None else torch.zeros_like(j.x)
                                       for j in jobs]))
    noise = None
    if sampler.stochastic:
        noise = torch.cat([step_noise(j.spec.seed, j.x.shape, j.step) for j in jobs])
    x_next, new_state = sampler.step(x, steps, cond=eps_c, uncond=eps_u, guidance_scale=g, state=state, noise=noise)
    for r, job in enumerate(jobs):
        if every and (job.step + 1) % every == 0:
            job.preview(job.step, job.x)
        job.x = x_next[r:r + 1]
        if new_state.x0_prev is not None:
            job.state = SolverState(new_state.x0_prev[r:r + 1])
        job.calls += 1
        job.step += 1


def start_job(job, model, scheduler):
    if job.x is None:
        job.x = initial_noise(model, job.spec.seed, scheduler)
    job.key = batch_key(job.spec)
    enter_segment(job)
