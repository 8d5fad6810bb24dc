"""Config of an emergence sweep (`l2e-emergence --config configs/emergence/*.yaml`).

Defaults are the CI-sized time-axis sweep (5 skills, 16 bits, width 128); the paper-scale settings of
Nam et al. (width 1000, batch 4000, 32 bits, ...) live in configs/emergence/paper_*.yaml.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from l2e_dist.config_utils import ConfigError, apply_override, build, load_yaml
from l2e_dist.emergence.skill_model import AXES, Axis
from l2e_dist.emergence.tasks import TaskConfig
from l2e_dist.l2e.config import L2EConfig

Method = Literal["none", "l2e", "memel"]

# The engine's own defaults (lambda 1e-9, SUM reduction) are for LM-scale token sums. Here `mean` reduction
# makes lambda independent of the batch size, and lambda = 1e-4 keeps the inhibition a perturbation: at init
# (std 0.01) activations sit ~1e-2 from their running means, so the gradient of log((z-mu)^2 + delta) on a
# selected activation is ~2/(z-mu) ~ 1e2 against ~0.1 from the MSE (2*|f-y|*|w_out| ~ 2*5*0.01). Larger
# lambdas stop the skills from emerging at all (the sweep: docs/benchmarks.md).
TESTBED_L2E_DEFAULTS: dict[str, Any] = {"reduction": "mean", "reg_lambda": 1e-4, "inhibit_ratio": 0.02}


@dataclass
class TrainSettings:
    """How one network of a sweep is trained (the fields every axis shares)."""

    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: float = 0.05
    lr_halve_every: int = 0  # steps between halvings of the lr; 0 = constant
    init_std: float = 0.01  # std of the normal init of every weight and bias
    batch_size: int = 1000
    steps: int = 8000
    eval_every: int = 100  # steps between measurements of R_k/S (the time axis' resolution)

    def validate(self) -> None:
        for key in ("lr", "init_std"):
            if getattr(self, key) <= 0:
                raise ConfigError(key, f"must be > 0, got {getattr(self, key)}")
        for key in ("steps", "eval_every", "batch_size"):
            if getattr(self, key) < 1:
                raise ConfigError(key, f"must be >= 1, got {getattr(self, key)}")
        if self.lr_halve_every < 0:
            raise ConfigError("lr_halve_every", f"must be >= 0 (0 = constant lr), got {self.lr_halve_every}")


@dataclass
class TimeAxisConfig(TrainSettings):
    """Time axis: fresh samples every step; R_k/S is logged every eval_every steps."""

    width: int = 128

    def validate(self) -> None:
        super().validate()
        if self.width < 1:
            raise ConfigError("width", f"must be >= 1, got {self.width}")


@dataclass
class DataAxisConfig(TrainSettings):
    """Data axis: one network per training-set size D, trained `steps` steps on that fixed set.

    `batch_size` larger than D means full-batch steps, so then one step is one epoch (as in Nam et al.).
    R_k/S is measured at the end on fresh samples (generalisation).
    """

    width: int = 128
    sizes: list[int] = field(default_factory=lambda: [100, 200, 400, 800, 1600, 3200, 6400])
    batch_size: int = 100_000
    init_std: float = 0.001
    steps: int = 5000  # at 16 bits, one repeat: skills 1-4 emerged in order (theta_D ~ 240); noisy, use repeats
    eval_every: int = 1000  # only the final measurement enters the data axis

    def validate(self) -> None:
        super().validate()
        if self.width < 1:
            raise ConfigError("width", f"must be >= 1, got {self.width}")
        _check_positive_list("sizes", self.sizes)


@dataclass
class WidthAxisConfig(TrainSettings):
    """Width axis: one network per hidden width N, trained on fresh samples; R_k/S measured at the end."""

    widths: list[int] = field(default_factory=lambda: [2, 4, 6, 8, 10, 12, 16, 20, 24, 32])
    optimizer: Literal["sgd", "adam"] = "adam"
    init_std: float = 0.05
    # Nam et al. use Adam lr 0.05 (configs/emergence/paper_width.yaml). At this small scale (16 bits, one
    # repeat) lr 0.01 for 8000 steps gave cleaner curves than lr 0.05 for 3000 steps; still noisy: use repeats.
    lr: float = 0.01
    eval_every: int = 1000  # only the final measurement enters the width axis

    def validate(self) -> None:
        super().validate()
        _check_positive_list("widths", self.widths)


def _check_positive_list(key: str, values: list[int]) -> None:
    if not values:
        raise ConfigError(key, "must list at least one value")
    if any(v < 1 for v in values):
        raise ConfigError(key, f"values must be >= 1, got {values}")
    if len(set(values)) != len(values):
        raise ConfigError(key, f"duplicate values in {values}")


@dataclass
class SkillModelConfig:
    """The analytic model's settings that are not fitted.

    init_strength r0 = R_k(0)/S fixes the time model's c = (1 - r0)/r0, i.e. how long the plateau before a
    skill's rise is relative to the rise itself; theta_T is then the single fitted parameter.
    """

    init_strength: float = 1e-3
    threshold: float = 0.5  # emergence = first point where R_k/S reaches this

    def validate(self) -> None:
        if not 0.0 < self.init_strength < 0.5:
            raise ConfigError("init_strength", f"must be in (0, 0.5), got {self.init_strength}")
        if not 0.0 < self.threshold < 1.0:
            raise ConfigError("threshold", f"must be in (0, 1), got {self.threshold}")


@dataclass
class InhibitionConfig:
    """Which inhibition methods to compare (each runs on the same seeds) and the engine's settings.

    `l2e` holds L2EConfig fields (l2e_dist/l2e/config.py) except `method` (given by `methods`) and `layers`
    (the testbed has one hidden layer, index 0); unset fields take TESTBED_L2E_DEFAULTS, then the engine's.
    """

    methods: list[Method] = field(default_factory=lambda: ["none"])
    l2e: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        if not self.methods:
            raise ConfigError("methods", "list at least one of none, l2e, memel")
        if len(set(self.methods)) != len(self.methods):
            raise ConfigError("methods", f"duplicate method in {self.methods}")
        for key in ("method", "layers"):
            if key in self.l2e:
                raise ConfigError(
                    f"l2e.{key}",
                    "set by the testbed (methods are listed in inhibition.methods; the one hidden layer is 0)",
                )
        self.engine_config("none")

    def engine_config(self, method: Method) -> L2EConfig:
        """The engine's config for one method, validated with the same builder as pretraining configs."""
        return build(L2EConfig, {**TESTBED_L2E_DEFAULTS, **self.l2e, "method": method, "layers": [0]}, "l2e")


@dataclass
class EmergenceConfig:
    task: TaskConfig = field(default_factory=TaskConfig)
    axes: list[Axis] = field(default_factory=lambda: ["time"])
    time_axis: TimeAxisConfig = field(default_factory=TimeAxisConfig)
    data_axis: DataAxisConfig = field(default_factory=DataAxisConfig)
    width_axis: WidthAxisConfig = field(default_factory=WidthAxisConfig)
    repeats: int = 2
    seed: int = 0  # run r of every method and axis point uses the same init and data stream
    workers: int = 0  # worker processes; 0 = every available CPU, 1 = run in this process
    eval_samples_per_skill: int = 1000
    skill_model: SkillModelConfig = field(default_factory=SkillModelConfig)
    inhibition: InhibitionConfig = field(default_factory=InhibitionConfig)
    output_dir: str = "runs/emergence"
    figures: bool = True

    def validate(self) -> None:
        if not self.axes:
            raise ConfigError("axes", f"list at least one of {list(AXES)}")
        if len(set(self.axes)) != len(self.axes):
            raise ConfigError("axes", f"duplicate axis in {self.axes}")
        if self.repeats < 1:
            raise ConfigError("repeats", f"must be >= 1, got {self.repeats}")
        if self.eval_samples_per_skill < 16:
            raise ConfigError("eval_samples_per_skill", "must be >= 16 so that R_k/S is measurable")
        if self.workers < 0:
            raise ConfigError("workers", f"must be >= 0 (0 = all CPUs), got {self.workers}")

    def axis_settings(self, axis: Axis) -> TimeAxisConfig | DataAxisConfig | WidthAxisConfig:
        return {"time": self.time_axis, "data": self.data_axis, "width": self.width_axis}[axis]



def load_config(path: str | None, overrides: list[str] | None = None) -> EmergenceConfig:
    """YAML file (or the defaults when path is None) plus `key.sub=value` overrides, validated."""
    data = load_yaml(path) if path else {}
    for assignment in overrides or []:
        data = apply_override(data, assignment)
    return build(EmergenceConfig, data)
