"""latentwire: the repository root *is* the ``latentwire`` package.

The top-level folders ``kernels/``, ``protocol/``, ``scheduler/`` and ``pipelines/`` are installed
as ``latentwire.kernels`` and so on, never under their bare names (``kernels`` is Hugging Face's
kernel-hub package on PyPI; the others are taken too). ``tests/`` and ``bench/`` are not installed.

torch is deliberately listed without a pin: ``make`` installs ``torch==2.13.0`` (a CPU build on
this project's machines) *before* this package, so pip finds the requirement satisfied and never
pulls a multi-GB CUDA build. On a GPU machine install the torch you want first, then ``pip install .``.

Requirements are ranges, for people who use latentwire as a library: a lower bound where a feature
needs it, an upper bound only where a break is known (none is today). ``make`` installs the exact
versions the suite last passed with, from ``constraints.txt``; ``make test-latest`` tries the newest.
"""
import os
import sys

from setuptools import setup

# setuptools runs this file with its folder first on sys.path, where kernels/ would be imported as Hugging
# Face's `kernels`: that package (which transformers requires) registers an egg_info writer,
# `kernels._internals.locking`, so a build in an environment that has it (pip --no-build-isolation)
# would fail on our folder. Nothing here imports from this folder: take it off, as latentwire's
# __init__.py does for a running process.
HERE = os.path.realpath(os.path.dirname(os.path.abspath(__file__)))
sys.path[:] = [p for p in sys.path if os.path.realpath(p or os.curdir) != HERE]

SUBPACKAGES = ["kernels", "protocol", "scheduler", "scheduler.serving", "scheduler.serving.rayserve", "scheduler.cost", "pipelines", "pipelines.models",
               "pipelines.ecdiff", "pipelines.diffusionx", "pipelines.hybrid_sr"]  # tests/test_package.py checks none is missing

setup(
    name="latentwire",
    version="0.1.0",
    description="Edge-cloud collaborative diffusion inference: latent handoff kernels and wire protocol",
    long_description=open(os.path.join(HERE, "README.md"), encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    # 3.11: children run with -P (keep the working directory off sys.path); 3.10 reached end of life in 2026-10
    python_requires=">=3.11",
    packages=["latentwire"] + [f"latentwire.{name}" for name in SUBPACKAGES],
    package_dir={"latentwire": "."},
    package_data={"latentwire.protocol": ["SPEC.md", "vectors.json"], "latentwire.pipelines": ["assets/*", "assets/**/*"],
                  "latentwire.scheduler.cost": ["data/devices/*.json", "data/links/*.json", "data/*.md"],
                  "latentwire.pipelines.diffusionx": ["predictor.json", "PREDICTOR_CARD.md"],
                  "latentwire.pipelines.hybrid_sr": ["assets/*", "assets/**/*", "quality.json", "MODEL_CARD.md"]},
    install_requires=[
        "torch>=2.1",
        # Triton has wheels for Linux on x86-64 and ARM64 only; elsewhere (a Mac or Windows edge) every
        # kernel takes its torch path (kernels/_triton.py).
        'triton; sys_platform == "linux" and (platform_machine == "x86_64" or platform_machine == "aarch64")',
        "diffusers",
        "transformers",
        "numpy",
        "zstandard>=0.22",  # decompress(allow_extra_data=...) arrived in 0.22
        "msgpack>=1.0",
        "pyzmq",
        "xxhash>=3.0",  # XXH3-64 payload checksum (protocol/SPEC.md)
        "prometheus-client>=0.17",  # the cloud daemon's /metrics
    ],
    extras_require={
        "dev": ["pytest", "pytest-benchmark", "pytest-xdist", "hypothesis"],
        # Anchors the benchmarks compare against; not needed to use latentwire.
        "bench": ["pytest-benchmark", "safetensors", "blosc2", "zfpy", "matplotlib"],
        # latentwire cloud --ray (scheduler/serving/rayserve): nothing else imports it. Ray's wheel needs no torch.
        "ray": ["ray[serve]>=2.60"],
    },
    entry_points={"console_scripts": ["latentwire = latentwire.cli:main"]},
)
