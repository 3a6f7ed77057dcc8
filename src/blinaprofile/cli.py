"""Command-line interface: a thin layer over the public functions scripts use.

Only the standard library is imported at start-up, so ``blinaprofile --help`` is
instant; each command imports what it needs.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

COMMANDS: dict[str, str] = {
    "demo": "simulate a cohort, gate, featurize, train (MLflow) and score a new sample",
    "simulate": "write a simulated FCS cohort with per-event truth and a manifest",
    "gate": "gate one FCS file and print population counts (optionally save .h5ad)",
    "featurize": "build the per-sample feature table from FCS files or a manifest",
    "train": "cross-validate models, log to MLflow, register and export the best",
    "score": "score one sample: HTML report, JSON, probability with interval, call or no call",
    "score-batch": "score many samples (manifest or folder) in parallel; resumable Parquet/CSV",
    "promote": "point a registry alias (e.g. champion) at a model version",
    "compare": "leaderboard of training runs (metrics with 95 percent CIs, p-values) from MLflow",
    "schema": "print the versioned feature schema",
    "export-gating": "write the gating strategy bound to a sample as GatingML 2.0",
}


def _probability(text: str) -> float:
    """argparse type: a finite number in [0, 1]."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 <= v <= 1.0:  # also rejects nan
        raise argparse.ArgumentTypeError(f"{text!r} is not a probability in [0, 1]")
    return v


def _seconds(text: str) -> float:
    """argparse type: a finite number of seconds > 0."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0.0 < v < float("inf"):  # also rejects nan
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of seconds")
    return v


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--debug", action="store_true", help="show tracebacks on errors")


def _add_fcs_options(p: argparse.ArgumentParser) -> None:
    """The documented relaxations of the FCS reader's integrity checks (off by default)."""
    g = p.add_argument_group("FCS integrity overrides (each use is reported as a warning)")
    g.add_argument(
        "--accept-tot-mismatch",
        action="store_true",
        help="read only the first $TOT events when the DATA segment holds more "
        "(refused by default: events would be silently lost)",
    )
    g.add_argument(
        "--data-offsets",
        choices=("header", "text"),
        default=None,
        help="which DATA offsets to trust when the HEADER and $BEGINDATA/$ENDDATA disagree "
        "(refused by default)",
    )


def _fcs_options(a: argparse.Namespace) -> Any:
    """The :class:`blinaprofile.io.read.FCSReadOptions` the command line asks for."""
    from blinaprofile.io.read import FCSReadOptions

    return FCSReadOptions(
        allow_tot_mismatch=bool(getattr(a, "accept_tot_mismatch", False)),
        data_offsets=getattr(a, "data_offsets", None) or "strict",
    )


def _print_warnings(file: str, warnings: Sequence[str]) -> None:
    """One ``warning: FILE: ...`` line on stderr per reader warning."""
    from blinaprofile.errors import one_line

    for w in warnings:
        print(f"warning: {one_line(f'{file}: {w}')}", file=sys.stderr)


def _add_privacy_options(p: argparse.ArgumentParser, *, keep_column: bool = False) -> None:
    """Opt-ins to carrying identifying names into outputs (all off by default)."""
    p.add_argument(
        "--keep-file-names",
        action="store_true",
        help="name samples and errors by their input file names in outputs "
        "(default: sample_id or the pseudonym S-<sha12>; file names often name the patient)",
    )
    if keep_column:
        p.add_argument(
            "--keep-column",
            action="append",
            default=[],
            metavar="NAME",
            help="also copy this manifest column into the feature table (repeatable); only "
            "sample_id, patient_id, response, timepoint and batch are copied otherwise",
        )


def _add_placement(p: argparse.ArgumentParser) -> None:
    """Gate placement: per sample (default) or the configured thresholds as they are."""
    p.set_defaults(adaptive=True)
    p.add_argument(
        "--fixed-gates",
        dest="adaptive",
        action="store_false",
        help="use the strategy's configured thresholds as they are (default: place each "
        "threshold from the sample's own populations; a sample far from the configured "
        "positions is flagged either way)",
    )
    # the per-sample default used to need this flag; still accepted
    p.add_argument("--adaptive", dest="adaptive", action="store_true", help=argparse.SUPPRESS)


def _add_gating_source(p: argparse.ArgumentParser) -> None:
    """Where the gating strategy comes from (gate / export-gating)."""
    src = p.add_mutually_exclusive_group()
    src.add_argument(
        "--strategy",
        default=None,
        help="gating YAML, GatingML .xml or FlowJo .wsp (default: configs/gating/default_tcell.yaml)",
    )
    src.add_argument("--gatingml", default=None, metavar="XML", help="GatingML 2.0 file")
    src.add_argument("--wsp", default=None, metavar="WSP", help="FlowJo 10 workspace")
    p.add_argument(
        "--wsp-sample", default=None, help="which workspace sample's gates (default: the first)"
    )
    p.add_argument(
        "--rename",
        action="append",
        default=[],
        metavar="OLD=NEW",
        help="rename an imported gate (repeatable), e.g. 'CD8 T cells=cd8'",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="blinaprofile",
        description="Immune-profiling responder classifier for blinatumomab maintenance.",
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("demo", help=COMMANDS["demo"])
    p.add_argument("--out", default="demo-output", help="output folder (default: demo-output)")
    p.add_argument("--n-patients", type=int, default=None)
    p.add_argument("--events", type=int, default=None, help="events per sample")
    _add_common(p)

    p = sub.add_parser("simulate", help=COMMANDS["simulate"])
    p.add_argument(
        "--scenario", default="default", help="name in configs/simulation or a YAML path"
    )
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--n-patients", type=int, default=None)
    p.add_argument("--events", type=int, default=None, help="events per sample")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--brightness-shift", type=float, default=None)
    p.add_argument("--panel", default=None, help="panel YAML (default: the shipped T-cell panel)")
    _add_common(p)

    p = sub.add_parser("gate", help=COMMANDS["gate"])
    p.add_argument("file")
    _add_gating_source(p)
    _add_placement(p)
    p.add_argument("--h5ad", default=None, help="write the gated events as AnnData")
    p.add_argument(
        "--plot", default=None, metavar="PNG", help="draw every gate on its parent's events"
    )
    p.add_argument("--json", action="store_true")
    _add_fcs_options(p)
    _add_privacy_options(p)
    _add_common(p)

    p = sub.add_parser("featurize", help=COMMANDS["featurize"])
    p.add_argument("files", nargs="*")
    p.add_argument("--manifest", default=None)
    p.add_argument("--out", required=True, help="CSV to write")
    p.add_argument("--strategy", default=None)
    _add_placement(p)
    p.add_argument("--jobs", type=int, default=None)
    _add_fcs_options(p)
    _add_privacy_options(p, keep_column=True)
    _add_common(p)

    p = sub.add_parser("train", help=COMMANDS["train"])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--manifest", help="manifest CSV with response labels (files are featurized)")
    src.add_argument("--features", help="feature table CSV (from 'featurize') with response")
    p.add_argument(
        "--config", default=None, help="training YAML (default: configs/train/default.yaml)"
    )
    p.add_argument("--export", default=None, help="also save the final model to this folder")
    p.add_argument("--strategy", default=None)
    _add_placement(p)
    p.add_argument("--trained-on", default=None, help="free text stored with the model")
    p.add_argument(
        "--cohort",
        default=None,
        help="cohort name for run names, tags and 'compare --cohort' (default: from the file)",
    )
    p.add_argument(
        "--timepoint", default=None, help="train on the samples of this timepoint only (e.g. D28)"
    )
    p.add_argument("--run-name", default=None, help="MLflow run name")
    p.add_argument(
        "--no-register",
        action="store_true",
        help="log the model to the run but do not register it (no alias moves)",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="let a model that meets the promotion rule replace an alias set by 'promote'",
    )
    p.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow tracking URI (default: MLFLOW_TRACKING_URI or sqlite:///mlflow.db)",
    )
    _add_common(p)

    p = sub.add_parser("score", help=COMMANDS["score"])
    p.add_argument("file", help="FCS file, .h5ad, 10x .h5 or 10x folder")
    p.add_argument("--model", default=None, help="models:/NAME@ALIAS, runs:/..., or a model folder")
    p.add_argument("--strategy", default=None)
    _add_placement(p)
    p.add_argument(
        "--threshold", type=_probability, default=None, help="decision threshold in [0, 1]"
    )
    p.add_argument(
        "--sample-id", default=None, help="default: S-<first 12 hex of the file's sha256>"
    )
    p.add_argument("--sample-key", default=None, help="single-cell: obs column naming the sample")
    p.add_argument("--json", action="store_true", help="print JSON instead of a summary")
    p.add_argument(
        "--out-dir",
        default=".",
        help="where <sample_id>.report.html and .score.json go (default: .)",
    )
    p.add_argument(
        "--report", default=None, help="HTML report path (default: OUT_DIR/<sample_id>.report.html)"
    )
    p.add_argument("--no-report", action="store_true", help="write no HTML report or JSON file")
    _add_fcs_options(p)
    _add_privacy_options(p)
    _add_common(p)

    p = sub.add_parser("score-batch", help=COMMANDS["score-batch"])
    p.add_argument("inputs", nargs="*", help="FCS/single-cell files or a folder of them")
    p.add_argument("--manifest", default=None, help="manifest CSV (sample_id, file)")
    p.add_argument(
        "--out", required=True, help="output folder (results.parquet, results.csv, parts/)"
    )
    p.add_argument("--model", default=None, help="models:/NAME@ALIAS, runs:/..., or a model folder")
    p.add_argument("--jobs", type=int, default=None, help="local worker processes (default 2)")
    p.add_argument("--scheduler", default=None, help="Dask scheduler address tcp://HOST:PORT")
    p.add_argument("--strategy", default=None)
    _add_placement(p)
    p.add_argument(
        "--threshold", type=_probability, default=None, help="decision threshold in [0, 1]"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar even on a terminal")
    p.add_argument(
        "--sample-timeout",
        type=_seconds,
        default=None,
        metavar="SECONDS",
        help="a sample still running after this long becomes an error row and its worker is "
        "restarted (default 600; local workers only)",
    )
    _add_fcs_options(p)
    _add_privacy_options(p)
    _add_common(p)

    p = sub.add_parser("promote", help=COMMANDS["promote"])
    p.add_argument("name")
    # dest differs from the top-level --version flag, which would otherwise swallow it
    p.add_argument(
        "model_version", metavar="VERSION", help="a version number, or @ALIAS (e.g. @candidate)"
    )
    p.add_argument("--alias", default="champion")
    p.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow tracking URI (default: MLFLOW_TRACKING_URI or sqlite:///mlflow.db)",
    )
    _add_common(p)

    p = sub.add_parser("compare", help=COMMANDS["compare"])
    p.add_argument(
        "--experiment",
        action="append",
        default=None,
        help="experiment name (repeatable; default: every experiment)",
    )
    p.add_argument(
        "--out",
        default="leaderboard",
        help="folder for leaderboard.csv/.md/.html (default: leaderboard)",
    )
    p.add_argument("--sort-by", default="roc_auc", help="column to rank by (default: roc_auc)")
    p.add_argument("--cohort", default=None, help="only runs on this cohort")
    p.add_argument(
        "--max-runs", type=int, default=1000, help="read at most this many candidate runs"
    )
    p.add_argument("--top", type=int, default=None, help="print only the best N rows")
    p.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow tracking URI (default: MLFLOW_TRACKING_URI or sqlite:///mlflow.db)",
    )
    _add_common(p)

    p = sub.add_parser("schema", help=COMMANDS["schema"])
    p.add_argument("--json", action="store_true")
    _add_common(p)

    p = sub.add_parser("export-gating", help=COMMANDS["export-gating"])
    p.add_argument("file", help="an FCS file whose channels the strategy is bound to")
    _add_gating_source(p)
    p.add_argument("--out", required=True)
    _add_common(p)
    return parser


# --------------------------------------------------------------------------- commands
def _scenario_path(name: str) -> Path:
    from blinaprofile.settings import settings

    p = Path(name)
    if p.suffix in (".yaml", ".yml"):
        return p
    return settings.config_dir / "simulation" / f"{name}.yaml"


def cmd_simulate(a: argparse.Namespace) -> int:
    from blinaprofile.config import PanelConfig, SimulationConfig, load_config
    from blinaprofile.settings import settings
    from blinaprofile.simulate.flow import simulate_cohort

    cfg = load_config(SimulationConfig, _scenario_path(a.scenario))
    panel = load_config(PanelConfig, a.panel or settings.default_panel)
    res = simulate_cohort(
        cfg,
        a.out,
        panel=panel,
        n_patients=a.n_patients,
        events_per_sample=a.events,
        seed=a.seed,
        brightness_shift=a.brightness_shift,
    )
    print(f"wrote {res.n_samples} samples to {res.out_dir}")
    print(f"manifest      {res.manifest}")
    print(f"cohort truth  {res.cohort_json}")
    print(f"Bayes-optimal AUC of the generative model: {res.bayes_auc:.3f}")
    return 0


def _gating_source(a: argparse.Namespace) -> Any:
    """The strategy named by --strategy / --gatingml / --wsp, with --rename applied."""
    from blinaprofile.gating.interop import load_gatingml, load_wsp, rename_gates
    from blinaprofile.gating.strategy import load_strategy

    if a.wsp:
        tree = load_wsp(a.wsp, sample_id=a.wsp_sample)
    elif a.gatingml:
        tree = load_gatingml(a.gatingml)
    else:
        tree = load_strategy(a.strategy)
    if a.rename:
        pairs = [r.split("=", 1) for r in a.rename]
        bad = [
            r for r, p in zip(a.rename, pairs, strict=True) if len(p) != 2 or not p[0] or not p[1]
        ]
        if bad:
            raise _usage(f"--rename takes OLD=NEW, got {bad}")
        tree = rename_gates(tree, {old: new for old, new in pairs})
    return tree


def cmd_gate(a: argparse.Namespace) -> int:
    from blinaprofile.gating.sample import gate_sample
    from blinaprofile.io.read import read_flow

    tree = _gating_source(a)
    # the strategy's marker names are declared: $PnS labels it reads stay verbatim
    data = read_flow(a.file, fcs_options=_fcs_options(a), declared_markers=tree.needed_names())
    adata = gate_sample(data, tree, adaptive=a.adaptive, keep_file_names=a.keep_file_names)
    g = adata.uns["gating"]
    label = str(adata.uns["sample_id"])  # the pseudonym unless --keep-file-names
    _print_warnings(label, data.warnings)
    if a.plot:
        from blinaprofile.gating.plot import plot_sample, save_gating_png

        title = f"{label}: {tree.name}"
        save_gating_png(plot_sample(data, tree, adaptive=a.adaptive, title=title), a.plot)
    if a.h5ad:
        from blinaprofile.io.atomic import atomic_path

        with atomic_path(a.h5ad) as tmp:
            adata.write_h5ad(tmp)
    if a.json:
        keys = ("strategy", "counts", "percent_of_parent", "thresholds", "flags")
        out = {k: g[k] for k in keys} | {"warnings": list(data.warnings)}
        print(json.dumps(out, indent=2, default=float))
        return 0
    print(f"{label}: {adata.n_obs} events, strategy {g['strategy']}")
    print(f"{'gate':<14}{'count':>9}{'% parent':>10}")
    for gid, n in g["counts"].items():
        print(f"{gid:<14}{n:>9}{g['percent_of_parent'][gid]:>10.2f}")
    for f in g["flags"]:
        print(f"QC flag: {f}")
    if a.h5ad:
        print(f"wrote {a.h5ad}")
    if a.plot:
        print(f"wrote {a.plot}")
    return 0


def _write_csv_atomic(df: Any, path: str | os.PathLike[str]) -> None:
    from blinaprofile.io.atomic import write_csv

    write_csv(df, path)


def cmd_featurize(a: argparse.Namespace) -> int:
    import pandas as pd

    from blinaprofile.features.flow import featurize_manifest
    from blinaprofile.io.files import ensure_file
    from blinaprofile.io.privacy import file_pseudonym, manifest_columns
    from blinaprofile.io.read import read_manifest, split_warnings

    if a.manifest:
        df = read_manifest(a.manifest)
        # an unknown --keep-column is refused before any file is read
        manifest_columns(list(df.columns), keep=a.keep_column, path=a.manifest)
    elif a.files:
        if a.keep_column:
            raise _usage("--keep-column needs --manifest")
        paths = [ensure_file(f) for f in a.files]
        ids = [p.stem if a.keep_file_names else file_pseudonym(p) for p in paths]
        unreadable = next((p for p, i in zip(paths, ids, strict=True) if not i), None)
        if unreadable is not None:
            from blinaprofile.errors import InputError

            raise InputError("cannot read the file to name it by its checksum", path=unreadable)
        dup = sorted({i for i in ids if ids.count(i) > 1})
        if dup:
            raise _usage(f"the same sample is given more than once ({', '.join(dup)})")
        df = pd.DataFrame(
            {"sample_id": ids, "patient_id": ids, "path": [str(p.resolve()) for p in paths]}
        )
    else:
        raise _usage("featurize needs FILES or --manifest")
    table = featurize_manifest(
        df,
        strategy_path=a.strategy,
        adaptive=a.adaptive,
        n_jobs=a.jobs,
        fcs_options=_fcs_options(a),
        keep_columns=a.keep_column,
        keep_file_names=a.keep_file_names,
    )
    _write_csv_atomic(table, a.out)
    n_err = int((table["error"] != "").sum()) if "error" in table else 0
    print(f"wrote {len(table)} samples ({n_err} with errors) to {a.out}")
    dropped = table.attrs.get("dropped_columns", [])
    if dropped:
        print(
            f"dropped manifest column(s) not declared: {', '.join(dropped)} "
            "(use --keep-column to keep one)",
            file=sys.stderr,
        )
    files = dict(zip(df["sample_id"].astype(str), df["path"].astype(str), strict=True))
    for sid, cell in zip(table["sample_id"].astype(str), table["warnings"], strict=True):
        name = files.get(sid, sid) if a.keep_file_names else sid
        _print_warnings(name, split_warnings(cell))
    for r in table[table["error"] != ""].itertuples() if n_err else []:
        print(f"error: {r.error}", file=sys.stderr)
    return 0 if n_err == 0 else 1


class _UsageError(Exception):
    pass


def _usage(msg: str) -> _UsageError:
    return _UsageError(msg)


def _cohort_name(path: Path) -> str:
    """A cohort name from its file: the file's stem, or its folder's for generic names."""
    generic = {"features", "feature_table", "manifest", "table"}
    stem = path.stem
    return path.resolve().parent.name if stem.lower() in generic else stem


def cmd_train(a: argparse.Namespace) -> int:
    from blinaprofile.features.flow import featurize_manifest
    from blinaprofile.io.read import read_feature_table, read_manifest
    from blinaprofile.models.train import select_timepoint, train

    if a.manifest:
        manifest = read_manifest(a.manifest, require_response=True)
        if a.timepoint is not None:  # featurize only the samples trained on
            manifest = select_timepoint(manifest, a.timepoint, source=a.manifest)
        table = featurize_manifest(manifest, strategy_path=a.strategy, adaptive=a.adaptive)
        source = Path(a.manifest)
    else:
        table = read_feature_table(a.features)
        source = Path(a.features)
    # the simulator writes cohort.json beside its manifest: such data are simulated
    simulated = True if (source.parent / "cohort.json").is_file() else None
    res = train(
        table,
        config_path=a.config,
        export_dir=a.export,
        tracking_uri=a.tracking_uri,
        trained_on=a.trained_on or f"features from {source}",
        run_name=a.run_name,
        cohort=a.cohort or _cohort_name(source),
        simulated=simulated,
        source=source,
        timepoint=a.timepoint,
        register=not a.no_register,
        force=a.force,
    )
    _print_train(res)
    return 0


def _print_train(res: Any) -> None:
    def ci(m: dict[str, float], k: str) -> str:
        return f"{m[k]:.2f} [{m[k + '_ci_low']:.2f}, {m[k + '_ci_high']:.2f}]"

    def pval(m: dict[str, float]) -> str:
        p = m.get("perm_pvalue", float("nan"))
        return "n/a" if p != p else f"{p:.3f}"

    print(
        f"{'model':<18}{'OOF AUC [95% CI]':<24}{'bal. acc [95% CI]':<24}{'Brier':>7}{'perm. p':>9}"
    )
    for fam, m in res.metrics.items():
        mark = "  <- chosen" if fam == res.chosen else ""
        print(
            f"{fam:<18}{ci(m, 'roc_auc'):<24}{ci(m, 'balanced_accuracy'):<24}{m['brier']:>7.3f}{pval(m):>9}{mark}"
        )
    sel = getattr(res, "selection_pvalue", float("nan"))
    if sel == sel:
        print(f"p-value of the chosen family, adjusted for choosing it: {sel:.3f}")
    print(f"MLflow run     {res.run_id} (experiment {res.experiment!r}, cohort {res.cohort!r})")
    if res.version is not None:
        print(f"registered     {res.registered_model} version {res.version}, alias @{res.alias}")
    print(res.promotion_line())
    print(f"score with     --model {res.model_uri}")
    if res.export_dir:
        held = f"{res.registered_model} v{res.version}" if res.version else f"run {res.run_id}"
        print(f"exported to    {res.export_dir} ({held})")


def cmd_score(a: argparse.Namespace) -> int:
    import re

    from blinaprofile.io.read import fcs_read_options
    from blinaprofile.scoring.score import score_sample

    # the report reads the file again for its gating plots: the same options apply
    with fcs_read_options(_fcs_options(a)):
        res = score_sample(
            a.file,
            model=a.model,
            strategy=a.strategy,
            adaptive=a.adaptive,
            # without --sample-id: the pseudonym S-<sha12>, or the file's name if opted in
            sample_id=a.sample_id or (Path(a.file).stem if a.keep_file_names else None),
            threshold=a.threshold,
            keep_gating=not a.no_report,
            sample_key=a.sample_key,
        )
        _print_warnings(res.sample_id, res.warnings)
        written = []
        if not a.no_report:
            from blinaprofile.io.atomic import write_text
            from blinaprofile.scoring.report import write_report

            stem = re.sub(r"[^A-Za-z0-9._-]+", "_", res.sample_id) or "sample"
            out_dir = Path(a.out_dir)
            report = Path(a.report) if a.report else out_dir / f"{stem}.report.html"
            written.append(write_report(res, report))
            js = out_dir / f"{stem}.score.json"
            write_text(js, json.dumps(res.as_dict(), indent=2))
            written.append(js)
            ctx = res.context
            if ctx is not None and ctx.tree is not None:
                # keep the gating strategy actually used with the sample's results
                written.append(ctx.tree.export_gatingml(out_dir / f"{stem}.gating.xml"))
    if a.json:
        print(json.dumps(res.as_dict(), indent=2))
    else:
        print(res.summary())
    for w in written:
        print(f"wrote {w}", file=sys.stderr if a.json else sys.stdout)
    return 0


def cmd_score_batch(a: argparse.Namespace) -> int:
    from blinaprofile.io.read import split_warnings
    from blinaprofile.scoring.batch import DEFAULT_SAMPLE_TIMEOUT, collect_jobs, score_samples

    if a.manifest and a.inputs:
        raise _usage("give --manifest or input files/folder, not both")
    if not a.manifest and not a.inputs:
        raise _usage("score-batch needs --manifest or input files/folder")
    src: Any = a.manifest or (a.inputs[0] if len(a.inputs) == 1 else a.inputs)
    df = score_samples(
        src,
        model=a.model,
        n_jobs=a.jobs,
        scheduler=a.scheduler,
        out_dir=a.out,
        strategy=a.strategy,
        adaptive=a.adaptive,
        threshold=a.threshold,
        progress=False if a.no_progress else None,
        fcs_options=_fcs_options(a),
        sample_timeout=a.sample_timeout or DEFAULT_SAMPLE_TIMEOUT,
        keep_file_names=a.keep_file_names,
    )
    # rows are in input order: name each sample as its error lines do (by sample_id or
    # pseudonym; by its file only with --keep-file-names)
    names = (
        [j.path or str(j.sample_id) for j in collect_jobs(src)]
        if a.keep_file_names
        else df["sample_id"].astype(str).tolist()
    )
    for name, cell in zip(names, df["warnings"], strict=True):
        _print_warnings(name, split_warnings(cell))
    info = df.attrs.get("batch", {})
    calls = df["call"].value_counts().to_dict()
    print(
        f"{info.get('n_samples', len(df))} samples: {info.get('n_scored', 0)} scored now, "
        f"{info.get('n_skipped', 0)} already finished"
    )
    print("calls         " + ", ".join(f"{k} {v}" for k, v in sorted(calls.items())))
    print(f"results       {Path(a.out) / 'results.parquet'} and results.csv")
    errors = df[df["error"] != ""]
    for msg in errors["error"]:
        print(f"error: {msg}", file=sys.stderr)
    return 0 if errors.empty else 1


def cmd_promote(a: argparse.Namespace) -> int:
    import mlflow

    from blinaprofile.models.tracking import promote
    from blinaprofile.settings import settings

    uri = a.tracking_uri or settings.tracking_uri
    mlflow.set_tracking_uri(uri)
    client = mlflow.tracking.MlflowClient(uri)
    version, before = promote(client, a.name, str(a.model_version), alias=a.alias)
    moved = f" (was version {before})" if before and before != version else ""
    print(f"{a.name}@{a.alias} -> version {version}{moved}")
    print(f"score with     --model models:/{a.name}@{a.alias}")
    return 0


def cmd_compare(a: argparse.Namespace) -> int:
    from blinaprofile.models.compare import format_leaderboard, leaderboard, write_leaderboard

    df = leaderboard(
        a.experiment,
        tracking_uri=a.tracking_uri,
        max_runs=a.max_runs,
        sort_by=a.sort_by,
        cohort=a.cohort,
    )
    paths = write_leaderboard(df, a.out)
    cols = [
        "family",
        "training run",
        "n",
        "ROC AUC [95% CI]",
        "bal. accuracy [95% CI]",
        "Brier [95% CI]",
        "ECE",
        "perm. p",
        "registered",
    ]
    # one table per cohort: metrics from different cohorts are not comparable
    for cohort, part in df.groupby("cohort", sort=False):
        shown = format_leaderboard(part if a.top is None else part.head(a.top))
        print(f"cohort {cohort}")
        print(shown[cols].to_string())
    print(f"{len(df)} candidate runs; wrote {paths['csv']}, {paths['md']}, {paths['html']}")
    return 0


def cmd_schema(a: argparse.Namespace) -> int:
    from blinaprofile.features.schema import SCHEMA_VERSION, schema_table

    t = schema_table()
    if a.json:
        print(t.to_json(orient="records", indent=2))
    else:
        print(f"feature schema version {SCHEMA_VERSION}")
        print(t[["name", "unit", "parent", "modalities", "definition"]].to_string(index=False))
    return 0


def cmd_export_gating(a: argparse.Namespace) -> int:
    from blinaprofile.io.read import read_flow

    source = _gating_source(a)
    # the strategy's marker names are declared: $PnS labels it reads stay verbatim
    data = read_flow(a.file, declared_markers=source.needed_names())
    tree = source.bind(data.channels, data.markers, path=data.path)
    out = tree.export_gatingml(a.out)
    print(f"wrote {out}")
    return 0


def cmd_demo(a: argparse.Namespace) -> int:
    from blinaprofile.demo import run_demo

    run_demo(a.out, n_patients=a.n_patients, events=a.events)
    return 0


HANDLERS: dict[str, Callable[[argparse.Namespace], int]] = {
    "demo": cmd_demo,
    "simulate": cmd_simulate,
    "gate": cmd_gate,
    "featurize": cmd_featurize,
    "train": cmd_train,
    "score": cmd_score,
    "score-batch": cmd_score_batch,
    "promote": cmd_promote,
    "compare": cmd_compare,
    "schema": cmd_schema,
    "export-gating": cmd_export_gating,
}


#: errno values of a storage that cannot take more output (disk full, quota, read-only).
_STORAGE_ERRNOS = frozenset(
    getattr(errno, name) for name in ("ENOSPC", "EDQUOT", "EROFS", "EFBIG") if hasattr(errno, name)
)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``blinaprofile`` command."""
    parser = build_parser()
    a = parser.parse_args(argv)
    if a.version:
        from importlib.metadata import version

        print(version("blinaprofile"))
        return 0
    if not a.command:
        parser.print_help()
        return 2
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    if not getattr(a, "debug", False):
        # MLflow's INFO chatter (table migrations, uv.lock copies) buries our own output
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    # Errors: one line on stderr and a non-zero exit; the traceback only with --debug.
    # 2 = the user's input/config/model is at fault (the message names the file),
    # 3 = an internal error (a bug: please report it with the --debug traceback).
    debug = bool(getattr(a, "debug", False))
    try:
        return HANDLERS[a.command](a)
    except _UsageError as err:
        parser.error(str(err))
        return 2
    except KeyboardInterrupt:
        if debug:
            raise
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        from blinaprofile.errors import BlinaprofileError, one_line

        if debug:
            raise
        if isinstance(err, BrokenPipeError):  # e.g. `blinaprofile schema | head`
            return 141
        if isinstance(err, BlinaprofileError):
            print(f"error: {one_line(str(err))}", file=sys.stderr)
            return err.exit_code
        if isinstance(err, OSError) and err.filename is not None:
            # a file or folder the user named cannot be read or written (permissions,
            # disk full, read-only file system...)
            reason = err.strerror or type(err).__name__
            print(f"error: {one_line(f'{err.filename}: {reason}')}", file=sys.stderr)
            return 2
        if isinstance(err, OSError) and err.errno in _STORAGE_ERRNOS:
            # outputs go through blinaprofile.io.atomic, which names the file; this is the
            # last resort for a library that raised without a file name
            print(f"error: cannot write output: {err.strerror or err}", file=sys.stderr)
            return 2
        if isinstance(err, MemoryError):
            print(
                "error: out of memory (use fewer events per sample, fewer --jobs or more RAM)",
                file=sys.stderr,
            )
            return 3
        detail = one_line(f"{type(err).__name__}: {err}")
        print(f"internal error: {detail} (rerun with --debug for a traceback)", file=sys.stderr)
        return 3


if __name__ == "__main__":
    raise SystemExit(main())
