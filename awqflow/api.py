"""Python API in AutoAWQ's three lines, on the same stage functions:

    model = awqflow.AWQModel.load("fixture/model")
    model.quantize(calib="fixture/data/calib.txt", w_bit=4, q_group_size=128)
    model.save("out/my-awq")
"""

import tempfile

from awqflow import pipeline


class AWQModel:
    def __init__(self, model_dir: str):
        self.model_dir = model_dir
        self.plan: pipeline.Plan | None = None
        self.stats: dict = {}
        pipeline.load_config(model_dir)  # unsupported or missing model: fail here, not later

    @classmethod
    def load(cls, model_dir: str) -> "AWQModel":
        return cls(model_dir)

    def quantize(self, calib: str = "pileval", w_bit: int = 4, q_group_size: int = 128, zero_point: bool = True,
                 work_dir: str | None = None, device: str | None = None, **options) -> "AWQModel":
        """AWQ (or method="rtn") search for every block; results wait in work_dir's cache until save()."""
        opts = pipeline.Options(calib=calib, w_bit=w_bit, group_size=q_group_size, zero_point=zero_point, **options)
        work = work_dir or tempfile.mkdtemp(prefix="awqflow-")
        self.plan, self.stats = pipeline.run_blocks(self.model_dir, opts, work, device)
        self._cache = pipeline.BlockCache(f"{work}/cache")
        return self

    def save(self, out_dir: str) -> list[str]:
        if self.plan is None:
            raise RuntimeError("call quantize() before save()")
        return pipeline.save(self.plan, out_dir, self._cache)
