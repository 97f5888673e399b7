"""A backend that is not refimpl, for ``refimpl conform --command`` (the file exchange).

The mean pool ``y[b, h] = mean_t x[b, h, t]`` and its VJP in plain NumPy, reading the cases
file refimpl writes (golden layout: ``inputs/``, ``cotangents/``) with h5py and writing the
candidate file (golden/SCHEMA.md, "Candidate layout"). ``--bug`` plants the VJP without the
``1 / L`` (wrong for L > 1).

Usage: python conform_command_backend.py CASES CANDIDATE [--bug]
"""
import sys

import h5py
import numpy as np


def main(argv):
    cases, candidate, bug = argv[0], argv[1], "--bug" in argv[2:]
    with h5py.File(cases, "r") as f, h5py.File(candidate, "w") as out:
        out.attrs.update(schema="refimpl-golden-candidate", schema_version=1,
                         suite=f.attrs["suite"], backend="numpy meanpool")
        for cid, case in f["cases"].items():
            g = out.create_group(f"cases/{cid}")
            x = case["inputs/x"][()]
            if x.ndim != 3 or x.shape[2] == 0:
                g.attrs["error"] = f"x must be (B, H, L) with L >= 1, got {x.shape}"
                continue
            g["outputs/y"] = x.mean(axis=2)
            if "cotangents/y" in case:
                dy = case["cotangents/y"][()]
                scale = 1.0 if bug else 1.0 / x.shape[2]
                g["grads/x"] = np.broadcast_to((dy * scale)[:, :, None], x.shape).copy()


if __name__ == "__main__":
    main(sys.argv[1:])
