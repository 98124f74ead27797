"""The core (models, geometry, I/O, posing, alignment) must import and run without nerfstudio."""

import subprocess
import sys

CODE = """
import sys
sys.modules["nerfstudio"] = None  # any 'import nerfstudio...' now raises ImportError
import torch
import ns_extreme.models, ns_extreme.geometry, ns_extreme.io.images, ns_extreme.io.dataset
import ns_extreme.posing, ns_extreme.align.pairs, ns_extreme.align.metrics
from ns_extreme.models import load_model
from ns_extreme.models.vggt import VGGTConfig
model = load_model("vggt", weights="random", alignment="pretrained", config=VGGTConfig.tiny())
with torch.no_grad():
    out = model(torch.rand(2, 3, 28, 28))
print(tuple(out["pose_enc"].shape), [m for m in sys.modules if m.startswith("nerfstudio")])
"""


def test_core_imports_and_runs_without_nerfstudio():
    result = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("(1, 2, 9) ['nerfstudio']")
