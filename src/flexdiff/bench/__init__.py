"""`flexdiff bench`: methods side by side, one run, same model, same initial noise.

Every method samples from the same x_T as the teacher, so quality is reported both against real
data and as paired differences to the teacher. Three rooms: `methods` (what runs), `run` (running
it, with a resumable cache) and `report` (table, plot, grids).
"""

from .methods import PRESETS, BenchConfig, Method, config_from_options
from .report import markdown_table, plot_bench
from .run import run_bench

__all__ = ["PRESETS", "BenchConfig", "Method", "config_from_options", "markdown_table", "plot_bench", "run_bench"]
