"""Cost model and solver: (model config, hardware profile, VRAM budget, decoding) → plan.

Pure and CPU-testable: nothing here imports torch or builds an engine; whoever runs steps
(runtime/calibrate.py) hands the planner its measurements.
"""

from tidecli.planner.costs import Calibration, HardwareCosts, hardware_costs
from tidecli.planner.model import Breakdown, cpu_cost, io_cost, predict, solve_tau
from tidecli.planner.plan import Plan
from tidecli.planner.solver import make_plan, predictor
from tidecli.planner.stats import RoutingStats, published_stats, trace_stats
from tidecli.planner.workload import Workload

__all__ = ["Breakdown", "Calibration", "HardwareCosts", "Plan", "RoutingStats", "Workload",
           "cpu_cost", "hardware_costs", "io_cost", "make_plan", "predict",
           "predictor", "published_stats", "solve_tau", "trace_stats"]
