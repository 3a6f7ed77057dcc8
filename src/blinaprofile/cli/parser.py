"""The command line's parser: commands, options with help and defaults, argument types.

Only the standard library is imported here, so ``blinaprofile --help`` is instant.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

COMMANDS: dict[str, str] = {
    "demo": "simulate a cohort, gate, featurize, train (MLflow) and score a new sample",
    "simulate": "write a simulated FCS cohort with per-event truth and a manifest",
    "gate": "gate one FCS file and print population counts (optionally save .h5ad)",
    "featurize": "build the per-sample feature table from FCS files or a manifest",
    "train": "cross-validate models, log to MLflow, register and export the best",
    "score": "score one sample: HTML report, JSON, probability with interval, call "
    "(responder, nonresponder, uncertain or no call) and why",
    "score-batch": "score many samples (manifest or folder) in parallel; resumable Parquet/CSV",
    "promote": "point a registry alias (e.g. champion) at a model version",
    "compare": "leaderboard of training runs (metrics with 95 percent CIs, p-values) from MLflow",
    "schema": "print the versioned feature schema",
    "export-gating": "write the gating strategy bound to a sample as GatingML 2.0",
    "convert": "write a CSV/TSV table of events (one column per marker) as an FCS file",
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


def _positive_int(text: str) -> int:
    """argparse type: a whole number > 0."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number")
    return v


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--debug", action="store_true", help="show tracebacks on errors")


def _add_fcs_options(p: argparse.ArgumentParser) -> None:
    """The documented relaxations of the FCS reader's integrity checks (off by default), and
    how to label and scale channels (gate, featurize, score, score-batch)."""
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
    g = p.add_argument_group("channel labels and scale")
    g.add_argument(
        "--panel",
        default=None,
        metavar="PANEL.yaml",
        help="the lab's panel: labels the channels it lists whose $PnS is empty, declares its "
        "markers and checks the gating strategy's required markers are in it",
    )
    g.add_argument(
        "--marker",
        action="append",
        default=[],
        metavar="CHANNEL=MARKER",
        help="label a channel with a marker whatever its $PnS says (repeatable), e.g. "
        "Pt195Di=Viability; declares the marker",
    )
    g.add_argument(
        "--display-scale",
        action="store_true",
        help="the values are display-scale channel numbers (0-$PnR, e.g. 0-1023), not "
        "intensities: map them back through FlowJo's default logicle before gating",
    )


def fcs_options(a: argparse.Namespace) -> Any:
    """The :class:`blinaprofile.io.read.FCSReadOptions` the command line asks for."""
    from blinaprofile.io.read import FCSReadOptions

    given = list(getattr(a, "marker", None) or [])
    pairs = [m.split("=", 1) for m in given]
    bad = [m for m, p in zip(given, pairs, strict=True) if len(p) != 2 or not all(p)]
    if bad:
        raise usage(f"--marker takes CHANNEL=MARKER, got {bad}")
    return FCSReadOptions(
        allow_tot_mismatch=bool(getattr(a, "accept_tot_mismatch", False)),
        data_offsets=getattr(a, "data_offsets", None) or "strict",
        markers=tuple((c.strip(), m.strip()) for c, m in pairs),
        panel=getattr(a, "panel", None),
        display_scale=bool(getattr(a, "display_scale", False)),
    )


def check_panel(a: argparse.Namespace, tree: Any = None) -> None:
    """With ``--panel``: the strategy's required markers must be in it (one error if not)."""
    if not getattr(a, "panel", None):
        return
    from blinaprofile.gating.strategy import check_panel, load_strategy

    check_panel(tree if tree is not None else load_strategy(a.strategy), a.panel)


def print_warnings(file: str, warnings: Sequence[str]) -> None:
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


def _add_modality_option(p: argparse.ArgumentParser) -> None:
    """Score a sample of another modality than the model's training data (as uncertain)."""
    p.add_argument(
        "--allow-other-modality",
        action="store_true",
        help="score a sample of another modality than the model was trained on (e.g. "
        "single-cell on a flow model) with the call 'uncertain' instead of refusing it",
    )


def _add_qc_option(p: argparse.ArgumentParser) -> None:
    """``--qc FILE``: QC thresholds for both modalities (featurize, train, score, score-batch)."""
    p.add_argument(
        "--qc",
        default=None,
        metavar="QC.yaml",
        help="QC thresholds (keys of configs/qc.yaml; default: that file); a 'single_cell:' "
        "section sets the single-cell minimums min_cells, min_cd3, min_cd4, min_cd8 "
        "(default: sample_qc of the annotator's configs/single_cell.yaml)",
    )


def _add_single_cell_options(p: argparse.ArgumentParser, *, labels: bool) -> None:
    """Keys and matrix kind of a single-cell cohort object (featurize, train --h5ad)."""
    g = p.add_argument_group("single-cell objects (.h5ad, 10x .h5 or 10x folder)")
    g.add_argument(
        "--sample-key",
        default=None,
        metavar="KEY",
        help="obs column naming each cell's sample (default: sample_id or sample if present)",
    )
    g.add_argument(
        "--patient-key",
        default=None,
        metavar="KEY",
        help="obs column naming each sample's patient: CV keeps a patient's samples together "
        "(default: patient_id, patient, donor_id or donor if present, else each sample)",
    )
    if labels:
        g.add_argument(
            "--label-key",
            default=None,
            metavar="KEY",
            help="obs column with each sample's response (responder/nonresponder, R/NR, 1/0, "
            "true/false, yes/no; any case) -> column 'response' 1/0",
        )
    g.add_argument(
        "--x-kind",
        choices=("auto", "counts", "log1p-cp10k", "log-tpm", "tpm"),
        default="auto",
        help="what the RNA matrix holds (default: detected)",
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


class GuidingParser(argparse.ArgumentParser):
    """argparse that guides: "did you mean" for misspelt commands and options, and the
    usage of the command that was typed (not the top-level usage) for its own mistakes."""

    def parse_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> argparse.Namespace:
        ns, extra = self.parse_known_args(args, namespace)
        if extra:
            commands: dict[str, argparse.ArgumentParser] = getattr(self, "commands", {})
            target = commands.get(getattr(ns, "command", None) or "", self)
            target.error(f"unrecognized arguments: {' '.join(extra)}")
        return ns

    def error(self, message: str) -> NoReturn:
        super().error(message + _suggestion(self, message))


def _suggestion(parser: argparse.ArgumentParser, message: str) -> str:
    """`` (did you mean ...?)`` for an unknown command or option in an argparse message."""
    import difflib
    import re

    m = re.search(r"invalid choice: '([^']*)'", message)
    if m:
        choices = list(getattr(parser, "commands", {})) or list(COMMANDS)
        near = difflib.get_close_matches(m.group(1), choices, n=1, cutoff=0.5)
        return f" (did you mean '{near[0]}'?)" if near else ""
    m = re.search(r"unrecognized arguments: (\S+)", message)
    if m and m.group(1).startswith("-"):
        options = [o for act in parser._actions for o in act.option_strings]
        near = difflib.get_close_matches(m.group(1).split("=")[0], options, n=1, cutoff=0.6)
        return f" (did you mean '{near[0]}'?)" if near else ""
    return ""


#: help for options that several commands share (applied where a command gave none)
OPTION_HELP: dict[str, str] = {
    "--n-patients": "patients to simulate (default: the scenario's)",
    "--seed": "random seed (default: the scenario's)",
    "--brightness-shift": "multiply every fluorescence channel by this factor (e.g. 1.25)",
    "--json": "print JSON instead of a table",
    "--manifest": "manifest CSV (sample_id, file, optional patient_id/response/timepoint)",
    "--strategy": "gating YAML, GatingML .xml or FlowJo .wsp (default: the shipped T-cell strategy)",
    "--jobs": "worker processes (default: BLINAPROFILE_N_JOBS or 2)",
    "--alias": "registry alias to point at the version",
    "--out": "file to write",
}
POSITIONAL_HELP: dict[tuple[str, str], str] = {
    ("gate", "file"): "the FCS file to gate",
    ("promote", "name"): "registered model name (e.g. blinaprofile-responder)",
}
#: one example per command, shown at the end of its --help
EXAMPLES: dict[str, str] = {
    "demo": "blinaprofile demo --out demo-output",
    "simulate": "blinaprofile simulate --out cohort --n-patients 60 --seed 1",
    "gate": "blinaprofile gate sample.fcs --plot gates.png --h5ad gated.h5ad",
    "featurize": "blinaprofile featurize --manifest cohort/manifest.csv --out features.csv",
    "train": "blinaprofile train --features features.csv --export my-model",
    "score": "blinaprofile score sample.fcs --model my-model --sample-id LAB-0042",
    "score-batch": "blinaprofile score-batch --manifest new/manifest.csv --out results",
    "promote": "blinaprofile promote blinaprofile-responder 3 --alias champion",
    "compare": "blinaprofile compare --out leaderboard",
    "schema": "blinaprofile schema --json",
    "export-gating": "blinaprofile export-gating sample.fcs --out strategy.xml",
    "convert": "blinaprofile convert events.csv --out events.fcs",
}


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Help with each option's default (when it has a meaningful one)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if (
            action.option_strings
            and "%(default)" not in text
            and "default" not in text
            and default not in (None, False, True, [], argparse.SUPPRESS)
        ):
            text += " (default: %(default)s)"
        return text


def _finish_help(commands: dict[str, argparse.ArgumentParser]) -> None:
    """Fill shared option help, add each command's example and show defaults."""
    for name, sp in commands.items():
        sp.formatter_class = HelpFormatter
        if name in EXAMPLES:
            sp.epilog = f"example:\n  {EXAMPLES[name]}"
        for act in sp._actions:
            if act.help is None:
                key = act.option_strings[0] if act.option_strings else None
                act.help = OPTION_HELP.get(key or "") or POSITIONAL_HELP.get((name, act.dest))


def build_parser() -> argparse.ArgumentParser:
    """The ``blinaprofile`` parser: one subcommand per pipeline step."""
    parser = GuidingParser(
        prog="blinaprofile",
        description="Immune-profiling responder classifier for blinatumomab maintenance.",
        epilog="Run 'blinaprofile COMMAND --help' for a command's options and an example.",
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=GuidingParser)

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
    p.add_argument("files", nargs="*", help="FCS files, or one single-cell cohort object")
    p.add_argument("--manifest", default=None)
    p.add_argument("--out", required=True, help="CSV to write")
    p.add_argument("--strategy", default=None)
    _add_placement(p)
    p.add_argument("--jobs", type=int, default=None)
    _add_qc_option(p)
    _add_single_cell_options(p, labels=True)
    ann = p.add_mutually_exclusive_group()
    ann.add_argument(
        "--annotator",
        default=None,
        metavar="JSON",
        help="single-cell: label cells with this fitted annotator (e.g. a model's "
        "artifacts/single_cell_annotator.json) instead of fitting one on the object",
    )
    ann.add_argument(
        "--annotator-out",
        default=None,
        metavar="JSON",
        help="single-cell: write the annotator fitted on the object here",
    )
    p.add_argument(
        "--fit-cells-per-sample",
        type=_positive_int,
        default=None,
        metavar="N",
        help="single-cell: fit the annotator on at most N cells of each sample (a stratified "
        "subsample, seed 0; default: every cell), then label every cell with it; an .h5ad "
        "is then never held whole",
    )
    _add_fcs_options(p)
    _add_privacy_options(p, keep_column=True)
    _add_common(p)

    p = sub.add_parser("train", help=COMMANDS["train"])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--manifest", help="manifest CSV with response labels (files are featurized)")
    src.add_argument("--features", help="feature table CSV (from 'featurize') with response")
    src.add_argument(
        "--h5ad",
        metavar="OBJECT",
        help="single-cell cohort (.h5ad, 10x .h5 or folder) with --sample-key and --label-key; "
        "the annotator fitted on it is stored with the model",
    )
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
    p.add_argument(
        "--change-from",
        default=None,
        metavar="BASELINE",
        help="with --timepoint: also train on each patient's change since this timepoint, "
        "delta_<feature> = value at --timepoint minus value at BASELINE (percentage points for "
        "%% features), one row per patient; patients lacking either sample are dropped with a "
        "warning; scoring then needs the baseline sample (score --baseline). Default: none "
        "(one sample per prediction). Example: --timepoint D28 --change-from baseline",
    )
    _add_qc_option(p)
    _add_single_cell_options(p, labels=True)
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
    p.add_argument(
        "--baseline",
        default=None,
        metavar="BASE.fcs",
        help="the same patient's baseline sample, for a model trained on change features "
        "(train --change-from): FILE is scored with its change since BASE.fcs. Default: none "
        "(required by such models, refused by others). Example: "
        "score d28.fcs --baseline baseline.fcs --model my-model",
    )
    p.add_argument("--model", default=None, help="models:/NAME@ALIAS, runs:/..., or a model folder")
    p.add_argument("--strategy", default=None)
    _add_placement(p)
    p.add_argument(
        "--threshold", type=_probability, default=None, help="decision threshold in [0, 1]"
    )
    p.add_argument(
        "--sample-id", default=None, help="default: S-<first 12 hex of the file's sha256>"
    )
    p.add_argument(
        "--sample-key",
        default=None,
        help="single-cell: obs column naming the sample (the object must hold one; score-batch "
        "scores every sample of a cohort object)",
    )
    _add_qc_option(p)
    _add_modality_option(p)
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
        "--sample-key",
        default=None,
        metavar="KEY",
        help="single-cell: obs column naming samples; a cohort object is scored sample by "
        "sample (default: sample_id or sample if present); manifest rows pointing at an "
        "object score the cells of their sample_id",
    )
    _add_qc_option(p)
    _add_modality_option(p)
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
    _add_placement(p)
    p.add_argument("--out", required=True)
    _add_common(p)

    p = sub.add_parser("convert", help=COMMANDS["convert"])
    p.add_argument(
        "table",
        help="CSV/TSV of events: a header naming each column's channel or marker "
        "(FlowJo's 'BV421-A :: CCR7' gives both), one row per event",
    )
    p.add_argument("--out", required=True, help="the FCS file to write")
    _add_common(p)
    parser.commands = dict(sub.choices)  # type: ignore[attr-defined]
    _finish_help(parser.commands)  # type: ignore[attr-defined]
    return parser


# --------------------------------------------------------------------------- commands


class UsageError(Exception):
    pass


def usage(msg: str) -> UsageError:
    return UsageError(msg)
