"""Command-line interface: a thin layer over the public functions scripts use.

:mod:`~blinaprofile.cli.parser` (commands and options), :mod:`~blinaprofile.cli.commands`
(handlers) and :mod:`~blinaprofile.cli.dispatch` (dispatch, one-line errors, exit codes). Only the
standard library is imported at start-up, so ``blinaprofile --help`` is instant; each
command imports what it needs.
"""

from blinaprofile.cli.dispatch import main
from blinaprofile.cli.parser import build_parser

__all__ = ["build_parser", "main"]
