"""Produce the golden outputs: feature table, scores and gate counts.

Run from the repository root (``python tests/golden/make_golden.py``) to refresh the
committed snapshot in ``tests/golden/expected``; ``tests/test_golden.py`` runs the same
:func:`produce` into a temporary folder and compares. The snapshot was taken before the
package was reorganised into stage subpackages (issue 10) and must not change unless a
behaviour change is intended and explained in the commit. Refreshed once since, for issue 12
(gate placement from each sample's populations, the new default; configured thresholds moved
to where placement lands on unshifted data), issue 11 (a ``warnings`` column) and issue 14
(four call states: two samples whose interval straddles the threshold became ``uncertain``;
a ``call_reason`` column).

Everything goes through the command line (the stable interface) except the single-cell
features, which use the public Python function.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SHARED = ROOT.parent / "shared" / "data"
EXPECTED = Path(__file__).resolve().parent / "expected"
# columns that depend on where things live, not on behaviour
VOLATILE = {"model_uri", "file"}


def _cli(*args: str, cwd: Path) -> str:
    exe = Path(sys.executable).parent / "blinaprofile"
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    out = subprocess.run(
        [str(exe), *args], cwd=cwd, env=env, capture_output=True, text=True, check=False
    )
    if out.returncode != 0:
        raise RuntimeError(f"blinaprofile {' '.join(args)} failed:\n{out.stderr}")
    return out.stdout


def _csv(src: Path, dst: Path) -> None:
    import pandas as pd

    df = pd.read_csv(src)
    df = df.drop(columns=[c for c in df.columns if c in VOLATILE])
    df.to_csv(dst, index=False)


def produce(out: Path, *, work: Path, shared: Path = SHARED) -> list[str]:
    """Write every golden output into ``out`` (scratch files in ``work``); return the names."""
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    names: list[str] = []
    _cli(
        "simulate", "--out", "sim", "--n-patients", "4", "--events", "5000", "--seed", "7", cwd=work
    )
    _cli(
        "featurize",
        "--manifest",
        "sim/manifest.csv",
        "--out",
        "feats.csv",
        "--jobs",
        "1",
        "--fixed-gates",
        cwd=work,
    )
    _csv(work / "feats.csv", out / "sim_features.csv")
    _cli(
        "featurize",
        "--manifest",
        "sim/manifest.csv",
        "--out",
        "feats_adaptive.csv",
        "--jobs",
        "1",
        cwd=work,
    )
    _csv(work / "feats_adaptive.csv", out / "sim_features_adaptive.csv")
    _cli(
        "score-batch",
        "--manifest",
        "sim/manifest.csv",
        "--out",
        "batch",
        "--jobs",
        "1",
        "--no-progress",
        cwd=work,
    )
    _csv(work / "batch" / "results.csv", out / "sim_scores.csv")
    names += ["sim_features.csv", "sim_features_adaptive.csv", "sim_scores.csv"]

    gates: dict[str, object] = {}
    sim_file = work / "sim" / "fcs" / "P001_D28.fcs"
    for key, args in {
        "sim_fixed": [str(sim_file), "--fixed-gates"],
        "sim_adaptive": [str(sim_file)],
        "real_100715_cd45ro": [
            str(shared / "real-fcs" / "100715.fcs"),
            "--strategy",
            str(ROOT / "configs" / "gating" / "memory_cd45ro.yaml"),
        ],
        "real_68983_wsp": [
            str(shared / "flowjo-workspace" / "68983.fcs"),
            "--wsp",
            str(shared / "flowjo-workspace" / "gating.wsp"),
        ],
    }.items():
        if key.startswith("real") and not shared.is_dir():
            continue
        res = json.loads(_cli("gate", *args, "--json", cwd=work))
        gates[key] = {"counts": res["counts"], "percent_of_parent": res["percent_of_parent"]}
    (out / "gate_counts.json").write_text(json.dumps(gates, indent=1, sort_keys=True))
    names.append("gate_counts.json")

    if shared.is_dir():
        from blinaprofile.features.singlecell import featurize_single_cell

        sc = shared / "single-cell"
        frames = []
        for path, kw in [
            (sc / "citeseq_scvi_tests" / "pbmc_5k_protein_v3.h5ad", {}),
            (sc / "wu2020_200_v0_11.h5ad", {"sample_key": "sample"}),
        ]:
            df = featurize_single_cell(path, **kw)
            df.insert(0, "source", path.name)
            frames.append(df)
        import pandas as pd

        pd.concat(frames).to_csv(out / "singlecell_features.csv", index=False)
        names.append("singlecell_features.csv")
    return names


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        print(produce(EXPECTED, work=Path(tmp)))
