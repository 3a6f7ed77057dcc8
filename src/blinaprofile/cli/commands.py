"""The command handlers: each reads its options and calls the same public functions scripts use.

Each handler imports what it needs when it runs (the CLI starts with the standard library only).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from blinaprofile.cli.parser import check_panel, fcs_options, print_warnings, usage


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
            raise usage(f"--rename takes OLD=NEW, got {bad}")
        tree = rename_gates(tree, {old: new for old, new in pairs})
    return tree


def cmd_gate(a: argparse.Namespace) -> int:
    from dataclasses import replace

    from blinaprofile.gating.panel import absent_notes
    from blinaprofile.gating.sample import gate_events, gating_summary, sample_label
    from blinaprofile.gating.strategy import as_exported, scale_problems
    from blinaprofile.io.read import read_flow

    # pre-gated exports: gates whose markers the file lacks are skipped or omitted
    tree = replace(_gating_source(a), partial=True)
    check_panel(a, tree)
    # the strategy's marker names are declared: $PnS labels it reads stay verbatim
    data = read_flow(a.file, fcs_options=fcs_options(a), declared_markers=tree.needed_names())
    tree = as_exported(tree, data)
    bound = tree.bind(data.channels, data.markers, path=data.path)  # as gate_sample binds it
    adata = None
    if a.h5ad:  # AnnData (and anndata's slow import) only when it is written
        from blinaprofile.gating.sample import gate_sample

        adata = gate_sample(data, tree, adaptive=a.adaptive, keep_file_names=a.keep_file_names)
        g, n_events = adata.uns["gating"], adata.n_obs
    else:
        gated, res = gate_events(data, tree, adaptive=a.adaptive)
        g, n_events = gating_summary(gated, res, adaptive=a.adaptive), res.n_events
    problems = scale_problems(bound, data)
    g["flags"] = [*g["flags"], *problems]
    g["skipped_gates"] = {gid: gone.reason for gid, gone in bound.skipped.items()}
    label = sample_label(data, keep_file_names=a.keep_file_names)  # the pseudonym by default
    warned = [*data.warnings, *problems, *absent_notes(bound.skipped)]
    print_warnings(label, warned)
    if a.plot:
        from blinaprofile.gating.plot import plot_sample, save_gating_png

        title = f"{label}: {tree.name}"
        save_gating_png(plot_sample(data, tree, adaptive=a.adaptive, title=title), a.plot)
    if adata is not None:
        from blinaprofile.io.atomic import atomic_path

        with atomic_path(a.h5ad) as tmp:
            adata.write_h5ad(tmp)
    if a.json:
        keys = ("strategy", "counts", "percent_of_parent", "thresholds", "flags", "skipped_gates")
        out = {k: g[k] for k in keys} | {"warnings": warned}
        print(json.dumps(out, indent=2, default=float))
        return 0
    print(f"{label}: {n_events} events, strategy {g['strategy']}")
    print(f"{'gate':<14}{'count':>9}{'% parent':>10}")
    for gid, n in g["counts"].items():
        print(f"{gid:<14}{n:>9}{g['percent_of_parent'][gid]:>10.2f}")
    for gid, gone in bound.skipped.items():
        what = "skipped" if gone.policy == "skip" else "not evaluated"
        print(f"gate {gid} {what}: {gone.reason}")
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


def _qc_files(a: argparse.Namespace) -> tuple[Any, Any]:
    """``(QCConfig, SampleQCSpec)`` from ``--qc`` (``(None, None)`` without it)."""
    if not getattr(a, "qc", None):
        return None, None
    from blinaprofile.features.singlecell import load_qc_file

    return load_qc_file(a.qc)


#: Printed by ``train --h5ad`` (``meta.json`` records the same: ``cv_annotator``).
CV_ANNOTATOR_NOTE = (
    "the CV refits the annotator inside each outer training split (its samples' cells "
    "only) and labels the split's test samples with it, so no test patient informs a "
    "threshold (docs/single_cell.md)"
)
NO_PATIENT_KEY = (
    "no --patient-key: CV groups by sample; samples of one patient may land on both sides "
    "of a split"
)


def _single_cell_table(
    a: argparse.Namespace, path: str, *, annotator: Any = None, labels: bool, stream: bool = False
) -> tuple[Any, Any, dict[str, Any], Any]:
    """Featurize a single-cell cohort object for ``featurize`` / ``train --h5ad``.

    Prints one line each on the samples and the labels, and warns (stderr) when several
    samples have no patient column or a sample fails QC. Returns the feature table (with
    ``response`` 1/0 when ``--label-key`` is given), the :class:`SingleCellFeatures`,
    what to record with a model and the object read (with ``stream``, an ``.h5ad`` that can be
    streamed is: only its ``obs`` is returned).
    """
    import pandas as pd

    from blinaprofile.features.singlecell import featurize_cells, sample_responses
    from blinaprofile.io.singlecell import read_single_cell

    _, sc_qc = _qc_files(a)
    if stream:  # featurize: streamed (features.singlecell_chunked.featurize_object)
        from blinaprofile.features.singlecell_chunked import featurize_object
        from blinaprofile.settings import settings

        feats, adata = featurize_object(
            path,
            annotator=annotator,
            sample_key=a.sample_key,
            patient_key=a.patient_key,
            x_kind=a.x_kind,
            sample_qc=sc_qc,
            max_cells_per_sample=a.fit_cells_per_sample,
            n_jobs=settings.n_jobs if a.jobs is None else a.jobs,
        )
    else:  # train --h5ad: the CV refits the annotator on each split's cells
        adata = read_single_cell(path, sample_key=a.sample_key, x_kind=a.x_kind)
        feats = featurize_cells(
            adata,
            annotator=annotator,
            sample_key=a.sample_key,
            patient_key=a.patient_key,
            x_kind=a.x_kind,
            sample_qc=sc_qc,
        )
    table = feats.table
    info = table.attrs["blinaprofile"]
    skey, pkey, n = info["sample_key"], info["patient_key"], len(table)
    name = Path(path).name
    where = f"from obs {skey!r}" if skey else "(no sample column: the object is one sample)"
    who = f"patients from obs {pkey!r}" if pkey else "no patient column: each sample its own"
    print(f"samples       {n} {where}; {who}")
    if not pkey and n > 1:
        print(f"warning: {name}: {NO_PATIENT_KEY}", file=sys.stderr)
    fit = feats.annotator.state_
    fitted = f"{fit.n_samples} samples, {fit.n_cells} cells"
    if labels and getattr(a, "label_key", None):
        codes = sample_responses(
            adata, label_key=a.label_key, sample_key=skey or None, default_sample="sample"
        )
        table["response"] = pd.array([codes.get(str(s)) for s in table["sample_id"]], dtype="Int64")
        r = table["response"]
        missing = int(r.isna().sum())
        print(
            f"labels        obs {a.label_key!r}: {int((r == 1).sum())} responder, "
            f"{int((r == 0).sum())} nonresponder"
            + (f", {missing} without a label" if missing else "")
        )
    failing = table[~table["qc_pass"]]
    for row in failing.head(5).itertuples():
        print(f"warning: {row.sample_id}: fails QC: {row.qc_reasons}", file=sys.stderr)
    if len(failing) > 5:
        print(
            f"warning: {len(failing) - 5} more of {n} samples fail QC (column qc_reasons)",
            file=sys.stderr,
        )
    notes = {
        "fitted": fitted,
        "sample_key": skey,
        "patient_key": pkey,
        "cv_groups": "patient" if pkey else "sample (no patient column)",
        "x_kind": info["x_kind"],
        "simulated": "simulation" in adata.uns,
    }
    return table, feats, notes, adata


def _refuse_single_cell_manifest(df: Any, manifest: str, command: str) -> None:
    """Point manifest rows naming single-cell objects to the commands that take them."""
    from blinaprofile.errors import ManifestError
    from blinaprofile.io.read import modality_of

    sc = [
        str(f)
        for f, q in zip(df["file"], df["path"], strict=True)
        if modality_of(q) == "single_cell"
    ]
    if not sc:
        return
    use = (
        f"blinaprofile train --h5ad {sc[0]} --sample-key KEY --label-key KEY"
        if command == "train"
        else f"blinaprofile featurize {sc[0]} --sample-key KEY"
    )
    raise ManifestError(
        f"{len(sc)} row(s) point at single-cell objects ({sc[0]}): {command} a single-cell "
        f"cohort object with `{use}` (score such rows with `blinaprofile score-batch --manifest "
        f"{manifest} --sample-key KEY`)",
        path=manifest,
    )


def _featurize_single_cell(a: argparse.Namespace) -> int:
    """``featurize OBJECT`` for a single-cell cohort object."""
    from blinaprofile.io.atomic import atomic_path

    if a.manifest or len(a.files) != 1:
        raise usage(
            "featurize takes one single-cell object (FCS files and single-cell objects cannot "
            "be mixed); combine samples into one .h5ad with a sample column, or featurize each "
            "with --annotator JSON"
        )
    if a.annotator and a.fit_cells_per_sample is not None:
        raise usage("--fit-cells-per-sample applies to an annotator fitted here, not --annotator")
    annotator = None
    if a.annotator:
        from blinaprofile.annotate.estimator import TCellAnnotator

        annotator = TCellAnnotator.from_json(a.annotator)
    table, feats, notes, _ = _single_cell_table(
        a, a.files[0], annotator=annotator, labels=True, stream=True
    )
    if feats.fitted_on_input:
        out = a.annotator_out
        kept = f"written to {out}" if out else "--annotator-out keeps it"
        print(
            f"annotator     fitted on this object ({notes['fitted']}): features depend on its "
            f"samples; {kept} (--annotator labels other samples the same way)"
        )
        if out:
            with atomic_path(out) as tmp:
                feats.annotator.to_json(tmp)
    else:
        print(f"annotator     {a.annotator} (fitted on {notes['fitted']}), not refitted")
    _write_csv_atomic(table, a.out)
    n_fail = int((~table["qc_pass"]).sum())
    print(f"wrote {len(table)} samples ({n_fail} failing QC) to {a.out}")
    return 0


def cmd_featurize(a: argparse.Namespace) -> int:
    import pandas as pd

    from blinaprofile.features.flow import featurize_manifest
    from blinaprofile.io.files import ensure_file
    from blinaprofile.io.privacy import file_pseudonym, manifest_columns
    from blinaprofile.io.read import modality_of, read_manifest, split_warnings

    if any(modality_of(f) == "single_cell" for f in a.files):
        return _featurize_single_cell(a)
    sc_only = [
        o
        for o in ("label_key", "annotator", "annotator_out", "fit_cells_per_sample")
        if getattr(a, o)
    ]
    if sc_only:
        flag = "--" + sc_only[0].replace("_", "-")
        raise usage(f"{flag} applies to a single-cell object (.h5ad, 10x .h5 or folder)")
    qc, _ = _qc_files(a)
    if a.manifest:
        df = read_manifest(a.manifest)
        _refuse_single_cell_manifest(df, a.manifest, "featurize")
        # an unknown --keep-column is refused before any file is read
        manifest_columns(list(df.columns), keep=a.keep_column, path=a.manifest)
    elif a.files:
        if a.keep_column:
            raise usage("--keep-column needs --manifest")
        paths = [ensure_file(f) for f in a.files]
        ids = [p.stem if a.keep_file_names else file_pseudonym(p) for p in paths]
        unreadable = next((p for p, i in zip(paths, ids, strict=True) if not i), None)
        if unreadable is not None:
            from blinaprofile.errors import InputError

            raise InputError("cannot read the file to name it by its checksum", path=unreadable)
        dup = sorted({i for i in ids if ids.count(i) > 1})
        if dup:
            raise usage(f"the same sample is given more than once ({', '.join(dup)})")
        df = pd.DataFrame(
            {"sample_id": ids, "patient_id": ids, "path": [str(p.resolve()) for p in paths]}
        )
    else:
        raise usage("featurize needs FILES or --manifest")
    check_panel(a)
    table = featurize_manifest(
        df,
        strategy_path=a.strategy,
        adaptive=a.adaptive,
        qc=qc,
        n_jobs=a.jobs,
        fcs_options=fcs_options(a),
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
        print_warnings(name, split_warnings(cell))
    for r in table[table["error"] != ""].itertuples() if n_err else []:
        print(f"error: {r.error}", file=sys.stderr)
    return 0 if n_err == 0 else 1


def _cohort_name(path: Path) -> str:
    """A cohort name from its file: the file's stem, or its folder's for generic names."""
    generic = {"features", "feature_table", "manifest", "table"}
    stem = path.stem
    return path.resolve().parent.name if stem.lower() in generic else stem


def cmd_train(a: argparse.Namespace) -> int:
    from blinaprofile.features.flow import featurize_manifest
    from blinaprofile.io.read import read_feature_table, read_manifest
    from blinaprofile.models.train import train

    if a.change_from is not None and a.timepoint is None:
        raise usage(
            f"--change-from {a.change_from} needs --timepoint (the later timepoint, e.g. D28)"
        )
    if a.change_from is not None and a.change_from.strip() == a.timepoint.strip():
        raise usage(
            f"--timepoint and --change-from are both {a.timepoint.strip()!r}: change features "
            "compare two timepoints (e.g. --timepoint D28 --change-from baseline)"
        )
    annotator, notes, per_fold = None, None, None
    no_patient_column = False
    if a.h5ad:
        table, annotator, notes, simulated, per_fold = _single_cell_training_table(a)
        source = Path(a.h5ad)
    else:
        sc_only = [o for o in ("sample_key", "patient_key", "label_key") if getattr(a, o)]
        if sc_only:
            flag = "--" + sc_only[0].replace("_", "-")
            raise usage(f"{flag} applies to a single-cell cohort: train --h5ad OBJECT")
    if a.manifest:
        qc, _ = _qc_files(a)
        manifest = read_manifest(a.manifest, require_response=True)
        no_patient_column = _no_patient(manifest)
        _refuse_single_cell_manifest(manifest, a.manifest, "train")
        if a.timepoint is not None:  # featurize only the samples trained on
            manifest = _training_samples(manifest, a.timepoint, a.change_from, a.manifest)
        table = featurize_manifest(manifest, strategy_path=a.strategy, adaptive=a.adaptive, qc=qc)
        source = Path(a.manifest)
    elif a.features:
        if a.qc:
            raise usage(
                "--qc has no effect on a feature table (its qc_pass is already computed): "
                "pass --qc to `blinaprofile featurize`"
            )
        table = read_feature_table(a.features)
        source = Path(a.features)
    if not a.h5ad:
        _warn_sample_grouping(table, source, no_column=no_patient_column)
        # the simulator writes cohort.json beside its manifest: such data are simulated
        simulated = True if (source.parent / "cohort.json").is_file() else None
    if a.change_from is not None:
        _warn_unpaired(table, a.timepoint, a.change_from, source)
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
        change_from=a.change_from,
        on_unpaired="ignore",  # _warn_unpaired printed its one line
        register=not a.no_register,
        force=a.force,
        annotator=annotator,
        annotator_notes=notes,
        fold_featurizer=per_fold,
    )
    _print_train(res)
    if a.change_from is not None:  # the model scores a patient's two samples together
        print(
            f"change features {a.timepoint} - {a.change_from}: score a patient's {a.timepoint} "
            f"sample with `blinaprofile score POST.fcs --baseline BASE.fcs`"
        )
    return 0


def _training_samples(manifest: Any, timepoint: str, change_from: str | None, path: str) -> Any:
    """The manifest rows ``train`` featurizes: ``timepoint``, and ``change_from`` if given."""
    import pandas as pd

    from blinaprofile.models.train import select_timepoint

    rows = [select_timepoint(manifest, timepoint, source=path)]
    if change_from is not None:
        rows.append(select_timepoint(manifest, change_from, source=path))
    return pd.concat(rows, ignore_index=True)


def _no_patient(manifest: Any) -> bool:
    return bool(manifest.attrs.get("patient_id_from_sample", False))


def _warn_sample_grouping(table: Any, source: Path, *, no_column: bool) -> None:
    """Warn when CV will group by sample although samples may share a patient.

    A manifest without ``patient_id`` gets the sample as its patient; so does a feature
    table made from one. When such a cohort holds several timepoints, samples of one
    patient may land on both sides of a split, which inflates the CV estimate.
    """
    if "patient_id" not in table.columns or "sample_id" not in table.columns:
        return
    same = bool((table["patient_id"].astype(str) == table["sample_id"].astype(str)).all())
    if not (no_column or same):
        return
    tps: list[str] = []
    if "timepoint" in table.columns:
        tps = sorted({str(t) for t in table["timepoint"].dropna() if str(t).strip()})
    if not no_column and len(tps) < 2:
        return  # one sample per patient, declared as such
    what = "has no patient_id column" if no_column else "gives every sample its own patient_id"
    extra = (
        f" although it holds {len(tps)} timepoints ({', '.join(tps[:4])})" if len(tps) > 1 else ""
    )
    print(
        f"warning: {source.name}: {what}{extra}: CV groups by sample, so samples of one "
        "patient may land on both sides of a split; add a patient_id column",
        file=sys.stderr,
    )


def _warn_unpaired(table: Any, timepoint: str | None, change_from: str, source: Path) -> None:
    """``train --change-from``: one warning line on the patients that cannot be paired
    (``train`` is told to drop them silently: the line is the one warning)."""
    from blinaprofile.features.change import pairing_problems

    problems = pairing_problems(
        table, timepoint=str(timepoint), baseline=change_from, source=source
    )
    unpaired = {p: r for p, r in problems.items() if r.startswith("no ")}
    if unpaired and len(unpaired) == len(problems):
        shown = ", ".join(f"{p} ({r})" for p, r in list(unpaired.items())[:20])
        more = f" ... and {len(unpaired) - 20} more" if len(unpaired) > 20 else ""
        print(
            f"warning: {source}: {len(unpaired)} patient(s) dropped, they lack a sample for "
            f"change features ({timepoint} - {change_from}): {shown}{more}",
            file=sys.stderr,
        )


def _single_cell_training_table(
    a: argparse.Namespace,
) -> tuple[Any, Any, dict[str, Any], Any, Any]:
    """``train --h5ad``: features, the annotator fitted on the cohort, its notes, simulated,
    and the per-fold annotator featurizer for the CV."""
    from blinaprofile.errors import SingleCellInputError
    from blinaprofile.features.singlecell import FoldAnnotatorFeatures

    if not a.label_key:
        raise usage("train --h5ad needs --label-key (the obs column with each sample's response)")
    if a.timepoint is not None or a.change_from is not None:
        flag = "--timepoint" if a.timepoint is not None else "--change-from"
        raise usage(f"{flag} applies to manifests and feature tables; subset the object")
    table, feats, notes, adata = _single_cell_table(a, a.h5ad, labels=True)
    unlabelled = table.loc[table["response"].isna(), "sample_id"].astype(str).tolist()
    if unlabelled:
        raise SingleCellInputError(
            f"{len(unlabelled)} sample(s) have no response in obs {a.label_key!r}: "
            f"{unlabelled[:10]}; training needs every sample labelled",
            path=a.h5ad,
        )
    if table["response"].nunique() < 2:
        raise SingleCellInputError(
            f"every sample has the same response in obs {a.label_key!r}; training needs "
            "responders and nonresponders",
            path=a.h5ad,
        )
    print(
        f"annotator     fitted on this cohort ({notes['fitted']}); stored with the model "
        "(artifacts/single_cell_annotator.json)"
    )
    print(f"note: {CV_ANNOTATOR_NOTE}")
    simulated = True if notes.pop("simulated") else None
    _, sc_qc = _qc_files(a)
    per_fold = FoldAnnotatorFeatures(
        adata,
        annotator=feats.annotator,
        sample_key=notes["sample_key"] or None,
        patient_key=notes["patient_key"] or None,
        x_kind=notes["x_kind"],
        sample_qc=sc_qc,
    )
    return table, feats.annotator, notes, simulated, per_fold


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

    from blinaprofile.scoring.helper import start_helper

    # forked first, while this process runs one thread: it draws the report's gating figure
    helper = None if a.no_report else start_helper()
    from blinaprofile.io.read import fcs_read_options
    from blinaprofile.scoring.score import score_sample

    folder = Path(a.file)
    if folder.is_dir() and not any(folder.glob("matrix.mtx*")):
        n = sum(1 for _ in folder.glob("*.fcs"))
        what = f"a folder of {n} FCS files" if n else "a folder, not a 10x matrix folder"
        raise usage(
            f"{a.file} is {what}: score many samples with `blinaprofile score-batch "
            f"{a.file} --out results`"
        )
    check_panel(a)
    qc, sc_qc = _qc_files(a)
    # the report reads the file again for its gating plots: the same options apply
    with fcs_read_options(fcs_options(a)):
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
            allow_other_modality=a.allow_other_modality,
            qc=qc,
            single_cell_qc=sc_qc,
            baseline=a.baseline,
            baseline_id=Path(a.baseline).stem if a.baseline and a.keep_file_names else None,
        )
        print_warnings(res.sample_id, res.warnings)
        written = []
        if not a.no_report:
            from blinaprofile.io.atomic import write_text
            from blinaprofile.scoring.report import write_report

            stem = re.sub(r"[^A-Za-z0-9._-]+", "_", res.sample_id) or "sample"
            out_dir = Path(a.out_dir)
            report = Path(a.report) if a.report else out_dir / f"{stem}.report.html"
            written.append(write_report(res, report, helper=helper))
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
    from blinaprofile.models.runtime import CALL_STATES
    from blinaprofile.scoring.batch import DEFAULT_SAMPLE_TIMEOUT, collect_jobs, score_samples

    if a.manifest and a.inputs:
        raise usage("give --manifest or input files/folder, not both")
    if not a.manifest and not a.inputs:
        raise usage("score-batch needs --manifest or input files/folder")
    check_panel(a)
    qc, sc_qc = _qc_files(a)
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
        fcs_options=fcs_options(a),
        sample_timeout=a.sample_timeout or DEFAULT_SAMPLE_TIMEOUT,
        keep_file_names=a.keep_file_names,
        allow_other_modality=a.allow_other_modality,
        qc=qc,
        sample_key=a.sample_key,
        single_cell_qc=sc_qc,
    )
    # rows are in input order: name each sample as its error lines do (by sample_id or
    # pseudonym; by its file only with --keep-file-names)
    names = (
        [
            f"{j.path} ({j.sample_id})" if j.sample_key else j.path or str(j.sample_id)
            for j in collect_jobs(src, sample_key=a.sample_key)
        ]
        if a.keep_file_names and "paired" not in df.attrs.get("batch", {})
        else df["sample_id"].astype(str).tolist()
    )
    for name, cell in zip(names, df["warnings"], strict=True):
        print_warnings(name, split_warnings(cell))
    info = df.attrs.get("batch", {})
    calls = df["call"].value_counts().to_dict()
    order = [*(s for s in (*CALL_STATES, "error") if s in calls), *sorted(calls)]
    if "paired" in info:  # a change-feature model scores patients (scoring.paired_batch)
        print(f"{len(df)} patients paired for change features ({info['paired']})")
    else:
        print(
            f"{info.get('n_samples', len(df))} samples: {info.get('n_scored', 0)} scored now, "
            f"{info.get('n_skipped', 0)} already finished"
        )
    print("calls         " + ", ".join(f"{k} {calls[k]}" for k in dict.fromkeys(order)))
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
    from blinaprofile.gating.sample import gate_events

    # the strategy as applied to this sample: per-sample placement moves its thresholds
    tree, res = gate_events(data, source, adaptive=a.adaptive)
    out = tree.placed(res).export_gatingml(a.out)
    print(f"wrote {out}")
    return 0


def cmd_convert(a: argparse.Namespace) -> int:
    from blinaprofile.io.table import convert_table

    table = convert_table(a.table, a.out)
    labels = ", ".join(
        f"{c}={m}" if m and m != c else c
        for c, m in zip(table.channels, table.markers, strict=True)
    )
    print(f"wrote {a.out}: {table.n_events} events x {len(table.channels)} channels ({labels})")
    note = table.scale_note()
    if note:
        print_warnings(a.table, [note])
    return 0


def cmd_demo(a: argparse.Namespace) -> int:
    from blinaprofile.demo import run_demo

    run_demo(a.out, n_patients=a.n_patients, events=a.events)
    return 0
