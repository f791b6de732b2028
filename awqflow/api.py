"""Python API in AutoAWQ's three lines, on the same pipeline as the CLI and the flow:

model = awqflow.AWQModel.load("fixture/model")
model.quantize(calib="fixture/data/calib.txt", w_bit=4, q_group_size=128)
model.save("out/my-awq")
"""

import os
import shutil
import tempfile

from awqflow import pipeline
from awqflow.options import Options
from awqflow.stages.model import open_model


class AWQModel:
    def __init__(self, model_dir: str):
        self.model_dir = model_dir
        self.quantized: str | None = None
        self.stats: dict = {}
        open_model(model_dir)  # unsupported or missing model: fail here, not later

    @classmethod
    def load(cls, model_dir: str) -> "AWQModel":
        return cls(model_dir)

    def quantize(
        self,
        calib: str = "pileval",
        w_bit: int = 4,
        q_group_size: int = 128,
        zero_point: bool = True,
        work_dir: str | None = None,
        **options,
    ) -> "AWQModel":
        """Every block quantized (method="awq" by default; any field of awqflow.options.Options); the
        checkpoint waits in the work dir until save()."""
        work = work_dir or tempfile.mkdtemp(prefix="awqflow-")
        opts = Options(
            calib=calib, w_bit=w_bit, group_size=q_group_size, zero_point=zero_point, work_dir=work, **options
        )
        self.quantized = os.path.join(work, "checkpoint")
        self.stats = pipeline.run(self.model_dir, self.quantized, opts)["stats"]
        return self

    def save(self, out_dir: str) -> list[str]:
        if self.quantized is None:
            raise RuntimeError("call quantize() before save()")
        shutil.copytree(self.quantized, out_dir, dirs_exist_ok=True)
        return sorted(os.path.join(out_dir, n) for n in os.listdir(out_dir) if n.endswith(".safetensors"))
