"""Fitness evaluation: objectives declared in YAML, scored through lm-eval by one `Evaluator` per worker.

`objectives` (pure dataclasses, picklable, driver side) -> `tasks` (lm-eval tasks, requests built once)
-> `hf` / `vllm_backend` (the model a candidate's weights are written into) -> `evaluator`.
"""

from evomerge.fitness.objectives import CandidateFailed, FitnessConfigError, Objective, ObjectiveSet, load_objectives, parse_objectives

__all__ = ["CandidateFailed", "FitnessConfigError", "Objective", "ObjectiveSet", "load_objectives", "parse_objectives"]
