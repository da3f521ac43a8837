"""Plain data of the training module (no torch import, so `fer --help` stays quick): the teacher's
default id, the paper's instructions, and the fit recipe's defaults."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_TEACHER = "Salesforce/blip2-flan-t5-xxl"

# Appendix B's task-related instructions, the default first; "empty" is the task-unrelated control
# (the other control, random text, is any free text).
INSTRUCTIONS: dict[str, str] = {
    "describer": (
        "Please play the role of a facial action describer. "
        "Objectively describe the detailed facial actions of the person in the image."
    ),
    "expert": (
        "Please play the role of a facial expression recognition expert. "
        "Describe the facial expression of the person in the image."
    ),
    "actions": "Please describe the detailed facial actions of the person in the image.",
    "empty": "",
}
DEFAULT_INSTRUCTION = "describer"


@dataclass
class FitConfig:
    """The paper's recipe as defaults; every field is a `fer train fit --field-name` option and the
    whole config is stored in the projection file."""

    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 1e-4
    batch_size: int = 512
    epochs: int = 5
    logit_scale: float = 100.0
    val_fraction: float = 0.02
    seed: int = 0
    log_interval: int = 10  # steps between log lines (the progress bar shows every step)

    def __post_init__(self) -> None:
        """A value that would train nothing (`--epochs 0` saved an untrained W) or fail mid-run is
        refused when the config is made, before a cache is read or an extraction starts."""
        problems = {
            "epochs": ("must be at least 1", self.epochs >= 1),
            "batch_size": (
                "must be at least 2: a pair's negatives are the other pairs of its batch",
                self.batch_size >= 2,
            ),
            "log_interval": ("must be at least 1", self.log_interval >= 1),
            "val_fraction": ("must be at least 0 and below 1", 0 <= self.val_fraction < 1),
            "lr": ("must be above 0", self.lr > 0),
            "logit_scale": ("must be above 0", self.logit_scale > 0),
            "momentum": ("must be at least 0", self.momentum >= 0),
            "weight_decay": ("must be at least 0", self.weight_decay >= 0),
        }
        for name, (rule, ok) in problems.items():
            if not ok:
                raise ValueError(f"--{name.replace('_', '-')} {rule}")
