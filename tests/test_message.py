"""Multi-tensor messages, the handoff message and residual coding."""
import numpy as np
import pytest
import torch
import zmq

from latentwire.protocol import (DEFAULT_LIMITS, Handoff, ProtocolError, decode, decode_handoff, decode_message,
                                 encode, encode_handoff, encode_message, fingerprint, wire_bytes)
from latentwire.protocol.header import unpack_header
from latentwire.protocol.samples import STEPS, mixture, noise


def test_message_carries_tensors_each_with_its_codec_and_meta():
    g = torch.Generator().manual_seed(3)
    tensors = {"latent": torch.randn(2, 4, 9, 11, generator=g), "eps.0": torch.randn(2, 4, 9, 11, generator=g),
               "mask": torch.rand(5, generator=g).to(torch.bfloat16)}
    meta = {"step": 17, "t": 541.5, "ok": True, "none": None, "blob": b"\x00\xff", "nested": {"a": [1, 2.5, "x"]}}
    frames = encode_message(tensors, meta, codecs={"eps.0": ("fp16", 0), "mask": "bf16"})
    assert len(frames) == 4
    entries, _ = unpack_header(frames[0], DEFAULT_LIMITS)
    assert [(e.name, e.codec, e.zstd) for e in entries] == [("latent", "int8", True), ("eps.0", "fp16", False),
                                                            ("mask", "bf16", True)]
    msg = decode_message(frames)
    assert msg.meta == meta
    assert torch.equal(msg.tensors["eps.0"], tensors["eps.0"].half().float())
    assert torch.equal(msg.tensors["mask"], tensors["mask"])
    assert (msg.tensors["latent"] - tensors["latent"]).abs().max() < 0.05


def test_handoff_round_trip_with_solver_state_history_and_rng_state():
    g = torch.Generator().manual_seed(11)
    rng = torch.Generator().manual_seed(1234)
    h = Handoff(latent=torch.randn(1, 4, 16, 16, generator=g), step_index=12, timestep=521.0, seed=1234,
                rng_state=bytes(rng.get_state().numpy()),
                solver_state={"model_output.0": torch.randn(1, 4, 16, 16, generator=g)},
                history=[torch.randn(1, 4, 16, 16, generator=g) for _ in range(3)], extra={"plan": "ec-diff"})
    out = decode_handoff(encode_handoff(h))
    assert (out.step_index, out.timestep, out.seed, out.extra) == (12, 521.0, 1234, {"plan": "ec-diff"})
    restored = torch.Generator()
    restored.set_state(torch.frombuffer(bytearray(out.rng_state), dtype=torch.uint8))
    assert torch.equal(torch.randn(8, generator=restored), torch.randn(8, generator=rng))
    assert torch.equal(out.solver_state["model_output.0"], h.solver_state["model_output.0"].half().float())
    assert len(out.history) == 3 and all(torch.equal(a, b.half().float()) for a, b in zip(out.history, h.history))
    assert (out.latent - h.latent).abs().max() < 0.05


def test_handoff_refuses_other_messages():
    with pytest.raises(ProtocolError, match="kind"):
        decode_handoff(encode_message({"latent": torch.zeros(3)}, {"kind": "preview"}))


@pytest.mark.parametrize("step", list(STEPS))
@pytest.mark.parametrize("codec", ["int8", "int4"])
def test_residual_against_the_initial_noise_keeps_the_error_bound(step, codec):
    shape, seed = (1, 4, 32, 32), 5
    x_T = noise(shape, seed)
    x_t = mixture(shape, STEPS[step], seed)
    plain, resid = encode(x_t, codec), encode(x_t, codec, reference=x_T)
    h_plain, h_resid = unpack_header(plain[0], DEFAULT_LIMITS)[0][0], unpack_header(resid[0], DEFAULT_LIMITS)[0][0]
    assert h_resid.reference == fingerprint(x_T)
    np.testing.assert_array_equal(h_resid.lo_step()[1], h_plain.lo_step()[1])  # the same step: equal error
    y = decode(resid, reference=x_T)
    bound = torch.tensor(h_plain.lo_step()[1]).reshape(1, 4, 1, 1) / 2 + 1e-5
    assert ((y - x_t).abs() <= bound).all()
    if step == "early":
        assert wire_bytes(resid) < wire_bytes(plain) / 2


def test_residual_needs_the_same_reference():
    shape = (1, 4, 16, 16)
    x_T, other = noise(shape, 1), noise(shape, 2)
    frames = encode(mixture(shape, 900, 1), reference=x_T)
    with pytest.raises(ProtocolError, match="pass that same reference"):
        decode(frames)
    with pytest.raises(ProtocolError, match="does not match"):
        decode(frames, reference=other)


def test_residual_falls_back_to_plain_coding_when_it_does_not_fit():
    x = torch.tensor([0.0, 1.0, 1.0, 1.0]).reshape(1, 1, 4)
    # beta = 1/2, residual [-0.5, 0.5, 1, 1]: a range of 1.5 needs more levels than x's own range of 1
    frames = encode(x, "int8", reference=torch.tensor([1.0, 1.0, 0.0, 0.0]).reshape(1, 1, 4))
    assert unpack_header(frames[0], DEFAULT_LIMITS)[0][0].reference is None
    assert (decode(frames) - x).abs().max() <= 1 / 255 + 1e-6


def test_residual_against_a_previously_decoded_tensor():
    """The sender's reference must be what the receiver holds: the decoded (lossy) previous tensor."""
    shape = (1, 4, 24, 24)
    prev = decode(encode(mixture(shape, 500, 0)))
    frames = encode(mixture(shape, 480, 0), reference=prev)
    assert (decode(frames, reference=prev) - mixture(shape, 480, 0)).abs().max() < 0.05


def test_residual_is_refused_for_float_codecs():
    with pytest.raises(ProtocolError, match="int codec"):
        encode(torch.zeros(4), "fp16", reference=torch.zeros(4))
    with pytest.raises(ProtocolError, match="shape"):
        encode(torch.zeros(1, 4, 3, 3), "int8", reference=torch.zeros(1, 4, 3, 4))


def test_frames_cross_a_real_zmq_socket_zero_copy():
    ctx = zmq.Context()
    push, pull = ctx.socket(zmq.PUSH), ctx.socket(zmq.PULL)
    try:
        for s in (push, pull):
            s.linger = 0
        port = pull.bind_to_random_port("tcp://127.0.0.1")
        push.connect(f"tcp://127.0.0.1:{port}")
        x = torch.randn(1, 4, 32, 32)
        push.send_multipart(encode_message({"latent": x, "eps": x * 2}, {"step": 3},
                                           codecs={"eps": ("fp32", 0)}), copy=False)
        assert pull.poll(5000), "no message within 5 s"
        frames = pull.recv_multipart(copy=False)
        msg = decode_message(frames)
        assert torch.equal(msg.tensors["eps"], x * 2) and msg.meta == {"step": 3}
    finally:
        push.close()
        pull.close()
        ctx.term()
