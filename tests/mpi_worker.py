"""Run under mpiexec by tests/test_distributed.py (not a test module itself).

    mpiexec -n 2 python tests/mpi_worker.py equivalence OUT_DIR [bn [device]]   # N ranks vs one process, float64
    mpiexec -n 2 python tests/mpi_worker.py fail OUT_DIR                # rank 1 raises at its 3rd step
"""
import json
import os
import sys

import numpy as np

from minicnn.distributed import DistributedTrainer, init
from minicnn.training import Recipe, Trainer


def small_data(seed=0):
    rng = np.random.default_rng(seed)

    def split(n):
        return rng.integers(0, 256, (n, 48, 48), dtype=np.uint8), rng.integers(0, 7, n)
    return {"train": split(26), "val": split(7), "test": split(5)}


def main(mode, out, bn="sync", device="cpu"):
    comm = init(device)
    data = small_data()
    recipe = Recipe(epochs=2, batch_size=13, dropout=0.0, augment=None, lr=0.05)   # 13 = 7 + 6 on 2 ranks
    trainer = DistributedTrainer(data, recipe, comm=comm, bn=bn, out_dir=os.path.join(out, "dp"), progress=False,
                                 dtype="float64", device=device)
    if mode == "fail":
        step = trainer._step_function()

        def failing(x, y, calls=[0]):
            calls[0] += 1
            if comm.rank == 1 and calls[0] == 3:
                raise RuntimeError("rank 1 fails on purpose")
            return step(x, y)
        trainer._step_function = lambda: failing
    trainer.fit()
    if comm.rank == 0:
        one = Trainer(data, recipe, out_dir=os.path.join(out, "one"), progress=False, dtype="float64",
                      log=lambda m: None, device=device)
        one.fit()
        worst = {}
        mine = trainer.model.state_dict()
        for k, v in one.model.state_dict().items():
            if v.dtype.kind == "f":
                floor = 1e-12 * float(np.max(np.abs(v)))       # (for the few elements that are nearly zero)
                worst[k] = int((~np.isclose(mine[k], v, rtol=1e-10, atol=floor)).sum())
        with open(os.path.join(out, "result.json"), "w") as f:
            json.dump({"ranks": comm.size, "outside_rtol": worst, "history_dp": trainer.history,
                       "history_one": one.history}, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
