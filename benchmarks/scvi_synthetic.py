"""The README's "Count data (single-cell)" numbers: scVI's three likelihoods on scvi-tools' synthetic data.

Run by hand (a few minutes on 2 cores; needs ``pip install -e '.[test]'`` for scvi-tools)::

    python benchmarks/scvi_synthetic.py > scvi_synthetic.json

Trains ``SCVI`` (default settings: observed library, one dispersion per gene, batch as a
covariate) with gene_likelihood zinb, nb and poisson on ``scvi.data.synthetic_iid()``
(400 cells, 100 genes, 2 batches) for ``EPOCHS`` epochs, converts each with
``vaeeval convert --from scvi``, and reports:

* ``vaeeval compare`` on the cells with K = ``SAMPLES`` (ranking, paired standard errors);
* vaeeval's per-cell IWAE against scvi-tools' ``get_marginal_ll`` per cell (batch size = the
  number of cells), and what ``get_marginal_ll`` reports by default (the mean of per-minibatch
  means, batch size 128);
* the seconds each took at the same K in one process (vaeeval's ``evaluate``, with every
  diagnostic, against ``get_marginal_ll`` per cell), as a ratio (state speed as ratios: the CPU
  differs between machines).
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

EPOCHS, SAMPLES, MINIBATCH = 200, 1000, 128
FAMILIES = ("zinb", "nb", "poisson")


def _vaeeval(*args: str) -> dict:
    done = subprocess.run([sys.executable, "-m", "vaeeval", *args, "--json"], capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


def main() -> None:
    import scvi

    from vaeeval.estimators.importance.evaluate import evaluate
    from vaeeval.user.sources import load

    logging.getLogger("scvi").setLevel(logging.ERROR)
    warnings.simplefilter("ignore")
    root = Path(tempfile.mkdtemp())
    adata = scvi.data.synthetic_iid()
    adata.write_h5ad(root / "cells.h5ad")
    scvi.model.SCVI.setup_anndata(adata, batch_key="batch")
    report: dict = {"epochs": EPOCHS, "samples": SAMPLES, "cells": adata.n_obs, "genes": adata.n_vars, "models": {}}
    files = []
    for name in FAMILIES:
        scvi.settings.seed = 0
        model = scvi.model.SCVI(adata, gene_likelihood=name)
        model.train(max_epochs=EPOCHS, accelerator="cpu", enable_progress_bar=False, logger=False, enable_checkpointing=False)
        model.save(str(root / name), overwrite=True)
        subprocess.run([sys.executable, "-m", "vaeeval", "convert", "--from", "scvi", str(root / name), "-o",
                        str(root / f"{name}.safetensors")], capture_output=True, check=True)
        files.append(str(root / f"{name}.safetensors"))
        ours = _vaeeval("elbo", files[-1], str(root / "cells.h5ad"), "-k", str(SAMPLES))
        iwae = np.array([point["iwae"] for point in ours["points"]])
        loaded, cells = load(files[-1], str(root / "cells.h5ad"))  # timed in-process, as scvi-tools' is
        start = time.perf_counter()
        evaluate(loaded, cells, samples=SAMPLES, seed=0)
        ours_seconds = time.perf_counter() - start
        scvi.settings.seed = 1
        start = time.perf_counter()
        per_cell = np.asarray(model.get_marginal_ll(adata, n_mc_samples=SAMPLES, batch_size=adata.n_obs, return_mean=False))
        theirs_seconds = time.perf_counter() - start
        default = float(model.get_marginal_ll(adata, n_mc_samples=SAMPLES, batch_size=MINIBATCH))
        difference = iwae - per_cell.reshape(-1)
        report["models"][name] = {
            "vaeeval_iwae": ours["summary"]["iwae"],
            "unreliable": ours["summary"]["diagnostics"],
            "scvi_per_cell_mean": float(per_cell.mean()),
            "scvi_default_minibatch_means": default,
            "difference": {"mean": float(difference.mean()), "stderr": float(difference.std(ddof=1) / np.sqrt(difference.size))},
            "seconds": {"vaeeval_evaluate": ours_seconds, "scvi_get_marginal_ll": theirs_seconds},
            "scvi_over_vaeeval_time": theirs_seconds / ours_seconds,
        }
    compared = _vaeeval("compare", *files, str(root / "cells.h5ad"), "-k", str(SAMPLES))
    report["compare"] = {"rankings": compared["rankings"], "differences": compared["differences"],
                         "models": {Path(m["model"]["path"]).stem: m["summary"] for m in compared["models"]}}
    json.dump(report, sys.stdout, indent=1, default=float)


if __name__ == "__main__":
    main()
