"""Single-cell CV with the annotator fitted per outer fold vs one whole-cohort annotator.

For a single-cell cohort object, featurizes it once with an annotator fitted on every
sample (what the final model is trained on), then validates the same training
configuration twice with :func:`blinaprofile.models.validation.evaluate`:

- ``whole-cohort``: every CV split uses those features (the former, leaky procedure: each
  split's test patients informed the thresholds);
- ``per-fold``: :class:`blinaprofile.features.singlecell.FoldAnnotatorFeatures` refits the
  annotator inside each outer training split (the procedure ``train --h5ad`` runs).

Prints the wall time and the CV AUC of each, the annotator fits and how far the per-fold
features move from the whole-cohort ones (test rows vs training rows).

Usage::

    python benchmarks/fold_annotator.py COHORT.h5ad --sample-key sample_id \\
        --patient-key patient_id --label-key response --config train.yaml [--qc qc.yaml]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pandas as pd

from blinaprofile.features.singlecell import (
    FoldAnnotatorFeatures,
    featurize_cells,
    load_qc_file,
    sample_responses,
)
from blinaprofile.io.singlecell import read_single_cell
from blinaprofile.models.validation import (
    evaluate,
    fold_feature_matrices,
    load_train_config,
    outer_training_sets,
    prepare_training_data,
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("h5ad")
    ap.add_argument("--sample-key", required=True)
    ap.add_argument("--patient-key", default=None)
    ap.add_argument("--label-key", required=True)
    ap.add_argument("--config", required=True)
    ap.add_argument("--qc", default=None)
    ap.add_argument("--jobs", type=int, default=None)
    a = ap.parse_args()

    sample_qc = load_qc_file(a.qc)[1] if a.qc else None
    adata = read_single_cell(a.h5ad, sample_key=a.sample_key)
    t0 = time.perf_counter()
    feats = featurize_cells(
        adata, sample_key=a.sample_key, patient_key=a.patient_key, sample_qc=sample_qc
    )
    t_feat = time.perf_counter() - t0
    table = feats.table
    codes = sample_responses(
        adata, label_key=a.label_key, sample_key=a.sample_key, default_sample="sample"
    )
    table["response"] = [codes[str(s)] for s in table["sample_id"]]
    config = load_train_config(a.config)
    per_fold = FoldAnnotatorFeatures(
        adata,
        annotator=feats.annotator,
        sample_key=a.sample_key,
        patient_key=a.patient_key,
        x_kind=table.attrs["blinaprofile"]["x_kind"],
        sample_qc=sample_qc,
    )
    print(f"{a.h5ad}: {len(table)} samples; whole-cohort fit + featurize {t_feat:.1f} s")
    rows = []
    for name, fz in (("whole-cohort", None), ("per-fold", per_fold)):
        t0 = time.perf_counter()
        ev = evaluate(table, config=config, n_jobs=a.jobs, featurizer=fz)
        wall = time.perf_counter() - t0
        fam = ev.families[ev.chosen]
        rows.append(
            {
                "cv": name,
                "evaluate_s": round(wall, 1),
                "annotator_fits": ev.fold_fits_cv + ev.fold_fits_permutations,
                "family": ev.chosen,
                "roc_auc": round(fam.metrics["roc_auc"], 4),
                "ci": f"[{fam.metrics['roc_auc_ci_low']:.3f}, "
                f"{fam.metrics['roc_auc_ci_high']:.3f}]",
                "perm_p": round(ev.selection_pvalue, 4),
                "brier": round(fam.metrics["brier"], 4),
            }
        )
    print(pd.DataFrame(rows).to_string(index=False))
    # how far per-fold features move from the whole-cohort ones, test vs training rows
    X, y, groups, usable, _ = prepare_training_data(table, ev.features)
    ids = usable["sample_id"].astype(str).to_numpy()
    train_sets = outer_training_sets([y], groups, config)
    mats = fold_feature_matrices(per_fold, ids, ev.features, train_sets)
    whole = X.to_numpy(dtype=float)
    for tr, m in zip(train_sets, mats.values(), strict=True):
        te = np.setdiff1d(np.arange(len(ids)), tr)
        d = np.abs(m - whole)
        print(
            f"split: train {len(tr)} / test {len(te)} samples; |per-fold - whole| (points) "
            f"train rows median {np.nanmedian(d[tr]):.3f} max {np.nanmax(d[tr]):.2f}, "
            f"test rows median {np.nanmedian(d[te]):.3f} max {np.nanmax(d[te]):.2f}"
        )


if __name__ == "__main__":
    main()
