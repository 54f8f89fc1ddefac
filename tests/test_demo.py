"""`latentwire demo` and `latentwire eval` as a user runs them: real processes, the embedded models."""
import json
import os
import re
import subprocess
from pathlib import Path

from PIL import Image

import daemons
from runcli import run_cli

REPO = Path(__file__).resolve().parents[1]
PLANS = ["cloud-only", "edge-only", "hybrid-sd", "ec-diff", "preview-refine"]


def test_the_demo_writes_a_grid_and_a_report_and_stops_its_cloud(tmp_path):
    # from the repository root, as `make demo` runs it: the demo's cloud must not import the root's kernels/
    run = subprocess.run([daemons.CLI, "demo", "--out", str(tmp_path / "out"), "--prompts", "2", "--steps", "6"],
                         capture_output=True, text=True, timeout=300, cwd=REPO)
    assert run.returncode == 0, run.stderr[-3000:]
    grid = Image.open(tmp_path / "out" / "grid.png")
    assert grid.width > len(PLANS) * 128 and grid.height > 2 * 128  # 5 columns, 2 rows of 4x images
    report = (tmp_path / "out" / "report.md").read_text()
    rows = [line for line in report.splitlines() if line.startswith("| ") and not line.startswith("| plan")]
    assert [r.split(" | ")[0].strip("| ") for r in rows] == PLANS
    cells = {r.split(" | ")[0].strip("| "): r.split(" | ") for r in rows}
    assert cells["cloud-only"][2:4] == ["12", "0"] and cells["edge-only"][2:4] == ["0", "12"]  # calls per side
    assert int(cells["edge-only"][4]) == 0 < int(cells["hybrid-sd"][4])  # bytes on the wire
    pid = int(re.search(r"cloud ready \(pid (\d+)\)", run.stdout).group(1))
    assert not os.path.exists(f"/proc/{pid}")  # it stopped the cloud it started


def test_eval_prints_the_scores_of_a_plan(tmp_path):
    run = run_cli("eval", "--plan", "hybrid-sd", "--k", "2", "--steps", "6", "--n", "8", "--json", "--threads", "1")
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout)
    for key in ("attribute_accuracy", "frechet_distance", "cloud_model_calls", "edge_model_calls", "wall_s"):
        assert key in result
    assert (result["cloud_model_calls"], result["edge_model_calls"], result["n"]) == (2, 4, 8)
    assert 0 <= result["all_attributes"] <= result["attribute_accuracy"] <= 1 and result["frechet_distance"] >= 0
