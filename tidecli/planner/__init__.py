"""Cost model and solver: (model config, hardware profile, VRAM budget, decoding) → plan.

Pure and CPU-testable: nothing here imports torch except `calibrate`, which runs the engine
(and imports it inside its functions).
"""

from tidecli.planner.costs import Calibration, HardwareCosts, hardware_costs
from tidecli.planner.model import Breakdown, cpu_cost, io_cost, predict, solve_tau
from tidecli.planner.plan import Plan
from tidecli.planner.solver import make_plan, predict_for, predictor
from tidecli.planner.stats import RoutingStats, published_stats, trace_stats
from tidecli.planner.workload import Workload

__all__ = ["Breakdown", "Calibration", "HardwareCosts", "Plan", "RoutingStats", "Workload",
           "cpu_cost", "hardware_costs", "io_cost", "make_plan", "predict", "predict_for",
           "predictor", "published_stats", "solve_tau", "trace_stats"]
