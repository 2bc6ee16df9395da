"""The `flexdiff` command line: train | sample | evaluate | bench | search | intervals | experts | studies.

A package of thin commands: each module registers its commands on the one `app`.
"""

from . import bench_cmd, experts_cmds, sampling_cmds, search_cmds, train_cmds  # noqa: F401 (they register commands)
from .app import app

__all__ = ["app", "main"]


def main() -> None:  # pragma: no cover - console entry point
    app()
