"""Learning-rate schedule: linear warm-up, constant, linear decay to 0 over the last steps
(the Switch SAE paper decays over the final 20%)."""

from __future__ import annotations


def learning_rate(step: int, steps: int, peak: float, warmup_steps: int = 0,
                  decay_fraction: float = 0.2) -> float:
    """Rate for update number `step` (0-based) of `steps`.

    Warm-up: (step + 1) / warmup_steps * peak for the first `warmup_steps` updates.
    Decay: from the update `steps - round(decay_fraction * steps)` on, the rate falls
    linearly so the last update uses peak / n_decay and the (never taken) one after it 0."""
    if not 0 <= step < steps:
        raise ValueError(f"step {step} is outside the schedule's {steps} steps")
    n_decay = round(decay_fraction * steps)
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    decay_start = steps - n_decay
    if n_decay and step >= decay_start:
        return peak * (steps - step) / n_decay
    return peak
