"""The experiment runner behind tools/experiment.py: an experiment's YAML (spec) -> its models or rounds,
run as commands on the GPUs present (steps; comparison + results; rounds), or planned (plan)."""
from .comparison import Runner
from .plan import cost_lines, plan_text
from .results import Results, pick, picks_markdown
from .rounds import RoundsRunner
from .spec import (REFERENCE_KINDS, SEED_KEYS, STAGE_SECONDS, Experiment, ExperimentError, Model, Round, Rounds, SpecError,
                   eval_tasks, load, load_rounds, merge, point_name, read_picks, read_spec, run_models, samples_per_task,
                   seed_name, seeds_of, settings, sweep_models, sweep_spec)
from .steps import PY, Steps, gpu_count, last_line, slot_gpus, tool_name

__all__ = ["PY", "REFERENCE_KINDS", "SEED_KEYS", "STAGE_SECONDS", "Experiment", "ExperimentError", "Model", "Results",
           "Round", "Rounds", "RoundsRunner", "Runner", "SpecError", "Steps", "cost_lines", "eval_tasks", "gpu_count",
           "last_line", "load", "load_rounds", "merge", "pick", "picks_markdown", "plan_text", "point_name", "read_picks",
           "read_spec", "run_models", "samples_per_task", "seed_name", "seeds_of", "settings", "slot_gpus", "sweep_models",
           "sweep_spec", "tool_name"]
