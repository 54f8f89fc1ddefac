"""A generation split mid-schedule: the latent and the solver state cross the wire as a handoff message
and the other side continues. With lossless codecs the result equals the uninterrupted run."""
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler

from latentwire.kernels import ECDiff, FusedSampler, History, SolverState
from latentwire.protocol import Handoff, decode_handoff, encode_handoff

SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


def _model(x, i, t):
    return torch.tanh(x) * (1 + t / 1000)


def _run(sampler, x, steps, state=None):
    for i in steps:
        x, state = sampler.step(x, i, model_output=_model(x, i, int(sampler.timesteps[i])), state=state)
    return x, state


# int8 puts the latent within half a step (1/510 of each channel's range) and the 12 remaining steps
# carry that error to the end (measured: 3.7e-3 of the final latent's range); fp16 state adds 2e-5.
@pytest.mark.parametrize("codecs, rtol", [((("fp32", 0), ("fp32", 0)), 0.0), ((("int8", 3), ("fp16", 0)), 5e-3)])
def test_dpm_solver_state_travels_in_a_handoff(codecs, rtol):
    s = DPMSolverMultistepScheduler(**SD)
    s.set_timesteps(20)
    sampler = FusedSampler(s)
    x_T = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    whole, _ = _run(sampler, x_T, range(20))
    x, state = _run(sampler, x_T, range(8))  # the cloud's segment
    frames = encode_handoff(Handoff(latent=x, step_index=8, timestep=float(s.timesteps[8]), seed=0,
                                    solver_state={"x0_prev": state.x0_prev}),
                            latent_codec=codecs[0], state_codec=codecs[1])
    h = decode_handoff(frames)
    assert h.step_index == 8
    split, _ = _run(sampler, h.latent, range(h.step_index, 20), SolverState(h.solver_state["x0_prev"]))
    err = ((split - whole).abs().max() / whole.abs().max()).item()
    assert err <= rtol if rtol else torch.equal(split, whole)


def test_extrapolation_history_travels_in_a_handoff():
    """EC-Diff's cache (last output and slope) rides in the handoff's history tensors."""
    ec = ECDiff(p=2, k=1)
    history = ec.update(1, ec.update(0, History(), torch.ones(1, 4, 3, 3), 999.0), torch.zeros(1, 4, 3, 3), 979.0)
    frames = encode_handoff(Handoff(latent=torch.zeros(1, 4, 3, 3), step_index=2, timestep=959.0,
                                    history=history.outputs + [history.grad]), state_codec=("fp32", 0))
    h = decode_handoff(frames)
    restored = History(outputs=h.history[:-1], times=history.times, grad=h.history[-1])
    models, weights = ec.forecast(restored, 959.0)
    assert torch.equal(sum(w * m for w, m in zip(weights, models)), -torch.ones(1, 4, 3, 3))
