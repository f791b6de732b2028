"""Load an AWQ checkpoint with AutoAWQ 0.2.9's own loader and save its logits: run by tests/test_autoawq.py with
AutoAWQ's overlay (transformers 4.51.3, see tests/autoawq_env.sh) first on PYTHONPATH. Never imports awqflow.

usage: autoawq_worker.py MODEL_DIR TOKENS_PT LOGITS_PT"""

import importlib.machinery
import sys
import types

import torch

# AutoAWQ imports datasets at import time for calibration only; the venv's datasets 5 needs huggingface_hub 1.x while
# transformers 4.51.3 needs < 1.0. Loading never calls it.
datasets_stub = types.ModuleType("datasets")
datasets_stub.__spec__ = importlib.machinery.ModuleSpec("datasets", None)
datasets_stub.load_dataset = None
sys.modules["datasets"] = datasets_stub
# Its Triton kernels need a GPU (Triton has no CPU backend here); without them WQLinear_GEMM runs its pure-torch path
# (awq/utils/packing_utils.py dequantize_gemm + matmul), which is AutoAWQ's own unpacking.
sys.modules["awq.modules.triton.gemm"] = None

import awq.models.base  # noqa: E402
from awq import AutoAWQForCausalLM  # noqa: E402

# from_quantized picks IPEX kernels when get_best_device() is "cpu" and IPEX is not installed here: report a GPU so it
# takes the plain GEMM path (WQLinear_GEMM); weights still load on the CPU (device_map {"": "cpu"}).
awq.models.base.get_best_device = lambda: "cuda:0"

model_dir, tokens_path, logits_path = sys.argv[1:]
model = AutoAWQForCausalLM.from_quantized(
    model_dir, fuse_layers=False, device_map={"": "cpu"}, torch_dtype=torch.float16
)
with torch.no_grad():
    logits = model(torch.load(tokens_path)).logits
torch.save(logits.float(), logits_path)
