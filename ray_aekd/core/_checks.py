"""Input checks shared by the core maths: one clear ``ValueError`` per bad input."""

from __future__ import annotations

import math

import torch

# Relative slack when comparing a tolerance with 1/M, so that 1/3 typed as a float is 1/M.
TOLERANCE_SLACK = 1e-9


def check_num_teachers(num_teachers: int) -> None:
    if num_teachers < 1:
        raise ValueError(f"Need at least one teacher; got M = {num_teachers}.")


def check_tolerance(tolerance: float, num_teachers: int) -> float:
    """Return the tolerance as a float in ``[1/M, 1]`` or raise naming the range for this M.

    A value within a relative 1e-9 below 1/M (float rounding of 1/M) is taken as exactly 1/M.
    """
    check_num_teachers(num_teachers)
    low = 1.0 / num_teachers
    value = float(tolerance)
    if not (low * (1 - TOLERANCE_SLACK) <= value <= 1.0):
        raise ValueError(
            f"tolerance must be in [1/M, 1] = [{low:.6g}, 1] for M = {num_teachers} teachers; got {tolerance!r}."
        )
    return max(value, low)


def check_temperature(temperature: float) -> None:
    if not (math.isfinite(float(temperature)) and float(temperature) > 0):
        raise ValueError(f"temperature must be a finite number > 0; got {temperature!r}.")


def check_logits(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> None:
    """Student ``[B, K]`` and teachers ``[M, B, K]`` with M >= 1."""
    if student_logits.dim() != 2:
        raise ValueError(f"student_logits must have shape [B, K]; got {list(student_logits.shape)}.")
    if teacher_logits.dim() != 3 or teacher_logits.shape[1:] != student_logits.shape:
        raise ValueError(
            "teacher_logits must have shape [M, B, K] matching student_logits [B, K] = "
            f"{list(student_logits.shape)}; got {list(teacher_logits.shape)}."
        )
    if teacher_logits.shape[0] < 1:
        raise ValueError("teacher_logits holds no teachers (M = 0); need at least one.")
