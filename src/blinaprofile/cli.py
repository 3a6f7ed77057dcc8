"""Command-line interface: a thin layer over the public functions scripts use.

Only the standard library is imported at start-up, so ``blinaprofile --help`` is
instant; each command imports what it needs.
"""

from __future__ import annotations

import argparse
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
    "score": "score one sample: probability, call, QC verdict and key features",
    "promote": "point a registry alias (e.g. champion) at a model version",
    "schema": "print the versioned feature schema",
    "export-gating": "write the gating strategy bound to a sample as GatingML 2.0",
}


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--debug", action="store_true", help="show tracebacks on errors")


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
    p.add_argument("--scenario", default="default", help="name in configs/simulation or a YAML path")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--n-patients", type=int, default=None)
    p.add_argument("--events", type=int, default=None, help="events per sample")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--brightness-shift", type=float, default=None)
    p.add_argument("--panel", default=None, help="panel YAML (default: the shipped T-cell panel)")
    _add_common(p)

    p = sub.add_parser("gate", help=COMMANDS["gate"])
    p.add_argument("file")
    p.add_argument("--strategy", default=None, help="gating YAML (default: configs/gating/default_tcell.yaml)")
    p.add_argument("--adaptive", action="store_true", help="place thresholds per sample")
    p.add_argument("--h5ad", default=None, help="write the gated events as AnnData")
    p.add_argument("--json", action="store_true")
    _add_common(p)

    p = sub.add_parser("featurize", help=COMMANDS["featurize"])
    p.add_argument("files", nargs="*")
    p.add_argument("--manifest", default=None)
    p.add_argument("--out", required=True, help="CSV to write")
    p.add_argument("--strategy", default=None)
    p.add_argument("--adaptive", action="store_true")
    p.add_argument("--jobs", type=int, default=None)
    _add_common(p)

    p = sub.add_parser("train", help=COMMANDS["train"])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--manifest", help="manifest CSV with response labels (files are featurized)")
    src.add_argument("--features", help="feature table CSV (from 'featurize') with response")
    p.add_argument("--config", default=None, help="training YAML (default: configs/train/default.yaml)")
    p.add_argument("--export", default=None, help="also save the final model to this folder")
    p.add_argument("--strategy", default=None)
    p.add_argument("--adaptive", action="store_true")
    p.add_argument("--trained-on", default=None, help="free text stored with the model")
    _add_common(p)

    p = sub.add_parser("score", help=COMMANDS["score"])
    p.add_argument("file", help="FCS file, .h5ad, 10x .h5 or 10x folder")
    p.add_argument("--model", default=None, help="models:/NAME@ALIAS, runs:/..., or a model folder")
    p.add_argument("--strategy", default=None)
    p.add_argument("--adaptive", action="store_true")
    p.add_argument("--threshold", type=float, default=None)
    p.add_argument("--sample-id", default=None)
    p.add_argument("--json", action="store_true", help="print JSON instead of a summary")
    _add_common(p)

    p = sub.add_parser("promote", help=COMMANDS["promote"])
    p.add_argument("name")
    p.add_argument("version")
    p.add_argument("--alias", default="champion")
    _add_common(p)

    p = sub.add_parser("schema", help=COMMANDS["schema"])
    p.add_argument("--json", action="store_true")
    _add_common(p)

    p = sub.add_parser("export-gating", help=COMMANDS["export-gating"])
    p.add_argument("file", help="an FCS file whose channels the strategy is bound to")
    p.add_argument("--strategy", default=None)
    p.add_argument("--out", required=True)
    _add_common(p)
    return parser


# --------------------------------------------------------------------------- commands
def _scenario_path(name: str) -> Path:
    from .settings import settings

    p = Path(name)
    if p.suffix in (".yaml", ".yml"):
        return p
    return settings.config_dir / "simulation" / f"{name}.yaml"


def cmd_simulate(a: argparse.Namespace) -> int:
    from .config import PanelConfig, SimulationConfig, load_config
    from .settings import settings
    from .simulate import simulate_cohort

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


def cmd_gate(a: argparse.Namespace) -> int:
    from .gate import gate_sample, load_strategy
    from .read import read_flow

    data = read_flow(a.file)
    adata = gate_sample(data, load_strategy(a.strategy), adaptive=a.adaptive)
    g = adata.uns["gating"]
    if a.h5ad:
        tmp = Path(a.h5ad).with_suffix(".h5ad.tmp")
        adata.write_h5ad(tmp)
        os.replace(tmp, a.h5ad)
    if a.json:
        print(json.dumps({k: g[k] for k in ("strategy", "counts", "percent_of_parent", "thresholds", "flags")}, indent=2, default=float))
        return 0
    print(f"{Path(a.file).name}: {adata.n_obs} events, strategy {g['strategy']}")
    print(f"{'gate':<14}{'count':>9}{'% parent':>10}")
    for gid, n in g["counts"].items():
        print(f"{gid:<14}{n:>9}{g['percent_of_parent'][gid]:>10.2f}")
    for f in g["flags"]:
        print(f"QC flag: {f}")
    if a.h5ad:
        print(f"wrote {a.h5ad}")
    return 0


def _write_csv_atomic(df: Any, path: str | os.PathLike[str]) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    df.to_csv(tmp, index=False)
    os.replace(tmp, p)


def cmd_featurize(a: argparse.Namespace) -> int:
    import pandas as pd

    from .featurize import featurize_manifest

    if a.manifest:
        table = featurize_manifest(a.manifest, strategy_path=a.strategy, adaptive=a.adaptive, n_jobs=a.jobs)
    elif a.files:
        df = pd.DataFrame(
            {
                "sample_id": [Path(f).stem for f in a.files],
                "patient_id": [Path(f).stem for f in a.files],
                "path": [str(Path(f).resolve()) for f in a.files],
            }
        )
        table = featurize_manifest(df, strategy_path=a.strategy, adaptive=a.adaptive, n_jobs=a.jobs)
    else:
        raise _usage("featurize needs FILES or --manifest")
    _write_csv_atomic(table, a.out)
    n_err = int((table["error"] != "").sum()) if "error" in table else 0
    print(f"wrote {len(table)} samples ({n_err} with errors) to {a.out}")
    for r in table[table["error"] != ""].itertuples() if n_err else []:
        print(f"error: {r.error}", file=sys.stderr)
    return 0 if n_err == 0 else 1


class _UsageError(Exception):
    pass


def _usage(msg: str) -> _UsageError:
    return _UsageError(msg)


def cmd_train(a: argparse.Namespace) -> int:
    import pandas as pd

    from .featurize import featurize_manifest
    from .read import RESPONSE_CODES, read_manifest
    from .train import train

    if a.manifest:
        manifest = read_manifest(a.manifest, require_response=True)
        table = featurize_manifest(manifest, strategy_path=a.strategy, adaptive=a.adaptive)
        source = a.manifest
    else:
        from .errors import InputError

        fp = Path(a.features)
        if not fp.is_file():
            raise InputError("feature table not found", path=fp)
        table = pd.read_csv(fp)
        if table["response"].dtype == object:
            table["response"] = table["response"].str.lower().map(RESPONSE_CODES)
        source = a.features
    res = train(table, config_path=a.config, export_dir=a.export, trained_on=a.trained_on or f"features from {source}")
    _print_train(res)
    return 0


def _print_train(res: Any) -> None:
    print(f"{'model':<12}{'OOF AUC':>9}{'95% CI':>16}{'bal.acc':>9}{'brier':>8}")
    for fam, m in res.metrics.items():
        ci = f"[{m['roc_auc_ci_low']:.2f}, {m['roc_auc_ci_high']:.2f}]"
        mark = " <- chosen" if fam == res.chosen else ""
        print(f"{fam:<12}{m['roc_auc']:>9.3f}{ci:>16}{m['balanced_accuracy']:>9.3f}{m['brier']:>8.3f}{mark}")
    print(f"MLflow run     {res.run_id} (experiment {res.experiment!r})")
    print(f"registered     {res.registered_model} version {res.version}, alias @{res.alias}")
    print(f"score with     --model {res.model_uri}")
    if res.export_dir:
        print(f"exported to    {res.export_dir}")


def cmd_score(a: argparse.Namespace) -> int:
    from .score import score_sample

    res = score_sample(
        a.file,
        model=a.model,
        strategy=a.strategy,
        adaptive=a.adaptive,
        sample_id=a.sample_id,
        threshold=a.threshold,
    )
    if a.json:
        print(json.dumps(res.as_dict(), indent=2))
    else:
        print(res.summary())
    return 0


def cmd_promote(a: argparse.Namespace) -> int:
    import mlflow

    from .errors import ModelError
    from .settings import settings

    mlflow.set_tracking_uri(settings.tracking_uri)
    client = mlflow.tracking.MlflowClient(settings.tracking_uri)
    try:
        client.get_model_version(a.name, str(a.version))
        client.set_registered_model_alias(a.name, a.alias, str(a.version))
    except mlflow.exceptions.MlflowException as err:
        raise ModelError(f"cannot promote {a.name} version {a.version}: {err.message}") from None
    print(f"{a.name}@{a.alias} -> version {a.version}")
    return 0


def cmd_schema(a: argparse.Namespace) -> int:
    from .schema import SCHEMA_VERSION, schema_table

    t = schema_table()
    if a.json:
        print(t.to_json(orient="records", indent=2))
    else:
        print(f"feature schema version {SCHEMA_VERSION}")
        print(t[["name", "unit", "parent", "modalities", "definition"]].to_string(index=False))
    return 0


def cmd_export_gating(a: argparse.Namespace) -> int:
    from .gate import load_strategy
    from .read import read_flow

    data = read_flow(a.file)
    tree = load_strategy(a.strategy).bind(data.channels, data.markers, path=data.path)
    out = tree.export_gatingml(a.out)
    print(f"wrote {out}")
    return 0


def cmd_demo(a: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(a.out, n_patients=a.n_patients, events=a.events)
    return 0


HANDLERS: dict[str, Callable[[argparse.Namespace], int]] = {
    "demo": cmd_demo,
    "simulate": cmd_simulate,
    "gate": cmd_gate,
    "featurize": cmd_featurize,
    "train": cmd_train,
    "score": cmd_score,
    "promote": cmd_promote,
    "schema": cmd_schema,
    "export-gating": cmd_export_gating,
}


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
    try:
        return HANDLERS[a.command](a)
    except _UsageError as err:
        parser.error(str(err))
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        from .errors import BlinaprofileError

        if getattr(a, "debug", False):
            raise
        if isinstance(err, BlinaprofileError):
            print(f"error: {err}", file=sys.stderr)
            return err.exit_code
        print(f"internal error: {type(err).__name__}: {err} (rerun with --debug for a traceback)", file=sys.stderr)
        return 3


if __name__ == "__main__":
    raise SystemExit(main())
