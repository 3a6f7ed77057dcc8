"""The ``blinaprofile`` entry point: dispatch to a command, one-line errors and exit codes."""

from __future__ import annotations

import argparse
import errno
import os
import sys
from collections.abc import Callable, Sequence

from blinaprofile.cli.commands import (
    cmd_compare,
    cmd_convert,
    cmd_demo,
    cmd_export_gating,
    cmd_featurize,
    cmd_gate,
    cmd_promote,
    cmd_schema,
    cmd_score,
    cmd_score_batch,
    cmd_simulate,
    cmd_train,
)
from blinaprofile.cli.parser import UsageError, build_parser

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
    "convert": cmd_convert,
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
    except UsageError as err:
        # the usage of the command that was typed, then the message
        getattr(parser, "commands", {}).get(a.command, parser).error(str(err))
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
