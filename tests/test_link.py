"""Link emulation and the per-link choice of a latent codec."""
import threading

import pytest
import torch

from latentwire.protocol.samples import mixture
from latentwire.scheduler import SessionSpec, make
from latentwire.scheduler.serving.cloud import CloudServer
from latentwire.scheduler.serving.edge import EdgeClient
from latentwire.scheduler.serving.link import PROFILES, CodecCost, Link, choose_codec, measure_codecs, parse_link


def test_transfer_time_is_latency_plus_bytes_over_bandwidth():
    assert Link("x", 10, 50).transfer_s(125_000) == pytest.approx(0.05 + 0.1)
    assert parse_link("100mbit-20ms") == PROFILES["100mbit-20ms"]
    assert parse_link("50,30") == Link("50,30", 50.0, 30.0)
    with pytest.raises(ValueError, match="MBIT_PER_S"):
        parse_link("fast")
    with pytest.raises(ValueError, match="bandwidth must be > 0"):
        Link("x", 0, 1)


COSTS = [CodecCost("fp32", 0, 65_600, 20e-6, 30e-6, 0.0), CodecCost("int8", 3, 15_000, 300e-6, 200e-6, 0.004),
         CodecCost("int4", 1, 6_600, 400e-6, 250e-6, 0.07)]


def test_choice_follows_the_link_and_the_budget():
    assert choose_codec(COSTS, Link("lan", 10_000, 0.1), 0.01) == ("fp32", 0)  # bytes are nearly free
    assert choose_codec(COSTS, Link("slow", 10, 50), 0.01) == ("int8", 3)  # bytes dominate, int4 is over budget
    assert choose_codec(COSTS, Link("slow", 10, 50), 0.1) == ("int4", 1)
    with pytest.raises(ValueError, match="no codec meets the error budget"):
        choose_codec(COSTS[1:], Link("x", 10, 1), 0.001)


def test_measured_costs_order_by_error():
    costs = {(c.codec, c.level): c for c in measure_codecs(mixture((1, 4, 16, 16), 500), repeats=1)}
    assert costs["fp32", 0].rel_rmse == 0 and costs["int8", 3].rel_rmse < 0.01 < costs["int4", 1].rel_rmse
    assert costs["int8", 3].nbytes < costs["fp16", 0].nbytes < costs["fp32", 0].nbytes


class _Model:
    """Just enough of a model for the edge client: the latent size and the spaces."""

    latent_space, text_space = (4, 8, 0.18215), (32, 16, 184)

    def initial_noise(self, seed, batch=1, scheduler=None, generator_device=None):
        return torch.randn(batch, 4, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_the_edge_delays_each_message_by_the_links_transfer_time_and_picks_its_codec(tmp_path):
    from diffusers import DDIMScheduler

    class Cloud(_Model):
        def encode_prompt(self, prompt, negative=""):
            return torch.zeros(1, 16, 32), torch.zeros(1, 16, 32)

        def predict(self, x, t, cond, uncond, scheduler=None, guidance=None):
            return torch.tanh(x), torch.tanh(x) * 0.5

    server = CloudServer(Cloud(), f"ipc://{tmp_path}/c.sock")
    thread = threading.Thread(target=server.serve_forever, kwargs={"install_signals": False})
    thread.start()
    try:
        delays = []
        link = PROFILES["10mbit-50ms"]
        client = EdgeClient(f"ipc://{tmp_path}/c.sock", _Model(), link=link, error_budget=0.01, sleep=delays.append,
                            timeout_s=60)
        assert client.codecs.latent in {("int8", 0), ("int8", 1), ("int8", 3)}  # 10 Mbit/s: bytes dominate
        s = DDIMScheduler()
        spec = SessionSpec(prompt="a", plan=make("cloud-only", 3), scheduler="DDIMScheduler",
                           scheduler_config=dict(s.config))
        client.generate(spec)
        # up: the request; down: the cloud's receipt (a heartbeat) and the handoff, each its own message
        assert delays[0] == link.transfer_s(client.bytes_up) and len(delays) == 3
        assert sum(delays[1:]) == pytest.approx(link.transfer_s(client.bytes_down) + link.latency_ms / 1e3)
    finally:
        server.stop()
        thread.join(timeout=10)
