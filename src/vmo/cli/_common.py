"""What every ``vmo`` subcommand module shares: the state directory the command line names."""

from __future__ import annotations

import argparse
from pathlib import Path

from vmo.home import StateDir


def state_dir(args: argparse.Namespace) -> StateDir:
    """``--home`` when given, else ``$VMO_HOME`` or ``~/.vmo``."""
    return StateDir(Path(args.home)) if args.home else StateDir.default()
