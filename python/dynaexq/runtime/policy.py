"""Policies are data given to one runtime, not five runtimes.

- full:       every expert at the highest tier, no budget (the quality ceiling)
- static:     every expert at one tier (uniform post-training quantization)
- static-map: a hot set from offline calibration at the high tier, fixed thereafter
- dynamic:    dynaexq: the hot set follows the workload under the controller
- offload:    experts not resident; an LRU cache of high-tier experts filling the same
              bytes, loaded on demand through the same copy path
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

POLICIES = ("full", "static", "static-map", "dynamic", "offload")


class PolicyError(ValueError):
    """A policy name or setting is not valid."""


@dataclass(frozen=True)
class ControllerSettings:
    """How `dynamic` decides (see method.md, section 1)."""

    # Defaults measured on the embedded model (`dynaexq eval`): a short horizon re-planned
    # every step follows domain shifts; the paper's long horizon is alpha 0.9 with a plan
    # every T steps (`--alpha 0.9 --replan-every 4`).
    # "ema", "window" (the sum of the last `window` steps) or "regime" (the mean of the
    # steps since the routing last changed, from the calibration: runtime/regime.py)
    signal: str = "ema"
    prior_steps: float = 8.0  # regime: the calibration's weight, in controller steps
    shift_ratio: float = 2.0  # regime: a change is this many times the usual distance
    alpha: float = 0.5  # EMA factor per step
    window: int = 4  # steps in the window signal
    replan_every: int = 1  # T: controller steps between plans
    # One controller step covers at least this many routed tokens, whatever a forward pass
    # holds (a prefill chunk of many sequences, or one decode token): the horizon is then
    # the same in tokens for evaluation and for batch-1 decoding.
    step_tokens: int = 128
    delta: float = 0.005  # hysteresis, in routed-mass units
    max_transitions: int = 1 << 30  # R: per plan
    max_bytes_per_token: float = float("inf")  # churn cap: bytes moved per scored token
    in_flight: int = 4  # K
    # Staging slots (runtime/budget.py): "every" reserves K slots of every tier; "lowest"
    # only ceil(K / 2) of the lowest tier (a promotion into a full tier waits for a
    # demotion out of it), so the upper tiers' bytes hold experts and dynamic that does
    # not move holds the static assignment at the same bytes.
    staging: str = "every"
    # Where the staging slots live: "device" (counted in the budget), or "host" (staging
    # "lowest" only): page-locked host memory the device reads in place (the pool arena's
    # tail), outside the budget, so that dynamic holds the static knapsack's assignment at
    # the full budget and pays for a move with a few reads over the link instead (an
    # expert demoted into that slot is read from it until a later move frees the slot).
    staging_memory: str = "device"
    # Moves only when they pay: a planned move (or demote+promote pair) is made only if
    # its gain in planned value (routed mass x tier value) exceeds `move_gain` times the
    # current assignment's total value per top-tier slot's bytes it copies (0: any gain).
    move_gain: float = 0.0
    # Moves only when they pay for sure: a move's gain less `move_z` standard errors of it
    # (from the variance of the signal's one-step prediction error of each expert's
    # routed share) must still pay (0: no discount).
    move_z: float = 0.0
    split: str = "per-layer"  # hot slots per layer, or "global"
    planner: str = "top-n"  # "top-n" (hotness) or "value" (hotness x error reduction)
    # The no-harm rule (runtime/gate.py): "skill" follows the live signal only while its
    # plans have served the routing they were made for better than the static plan by
    # more than `gate_margin` (relative value, EMA `gate_alpha` over steps), else holds
    # the static plan; "off" always follows.
    gate: str = "off"
    gate_margin: float = 0.05
    gate_alpha: float = 0.8
    gate_lag: int = 2  # steps from a plan to the first step it serves (lockstep: 2)
    # The signal planned on: (1 - w) * live signal + w * calibration prior.
    prior_weight: float = 0.0
    # The knapsack's hotness (planner "value"): (1 - f) * each expert's calibration share
    # of its layer + f * an even share, a hedge against calibration text unlike the
    # workload (f = 1: tiers by error reduction per byte alone, hotness ignored).
    hotness_floor: float = 0.0
    # What a tier of an expert is worth per unit of routed share (planner "value"):
    # "weight": its relative weight error's reduction (text-blind); "output": the
    # reduction of its output error measured on the calibration text's activations
    # (runtime/sensitivity.py); "fisher": the loss increase it predicts there (the
    # squared projection of the output error on the loss gradient).
    value: str = "weight"
    # How many routed calibration tokens the weight error's estimate (scaled per layer to
    # the measured one) counts for against an expert's own measurement (value "output" or
    # "fisher"): few tokens, a noisy measurement, shrunk toward it.
    value_prior: float = 16.0
    # How the tiers' values add up across layers (planner "value"): "none" as `value`
    # predicts them; "layer" each layer's scaled so that its experts' values at a tier,
    # weighed by their calibration share, equal the loss increase measured on the
    # calibration text with that layer alone at that tier (runtime/sensitivity.py).
    value_scale: str = "none"
    # What a move's gain is discounted by (`move_z` standard errors of it): "routing" the
    # signal's noise alone; "measured" also the noise of the tier values themselves (value
    # scale "layer": each layer's loss at a tier is known to the standard error of its
    # measurement, so a move between tiers of layers measured close to each other must
    # clear that too).
    move_noise: str = "routing"

    def __post_init__(self) -> None:
        if self.signal not in ("ema", "window", "regime"):
            raise PolicyError(f"signal must be ema, window or regime, got {self.signal!r}")
        if self.prior_steps < 0 or self.shift_ratio <= 1.0:
            raise PolicyError(
                f"prior_steps must be >= 0 and shift_ratio > 1, got {self.prior_steps}, "
                f"{self.shift_ratio}"
            )
        if not 0.0 <= self.alpha < 1.0:
            raise PolicyError(f"alpha must be in [0, 1), got {self.alpha}")
        if min(self.window, self.replan_every, self.in_flight, self.step_tokens) < 1:
            raise PolicyError("window, replan_every, in_flight and step_tokens must be >= 1")
        if self.split not in ("per-layer", "global"):
            raise PolicyError(f"split must be per-layer or global, got {self.split!r}")
        if self.planner not in ("top-n", "value"):
            raise PolicyError(f"planner must be top-n or value, got {self.planner!r}")
        if self.staging not in ("every", "lowest"):
            raise PolicyError(f"staging must be every or lowest, got {self.staging!r}")
        if self.staging_memory not in ("device", "host"):
            raise PolicyError(f"staging_memory must be device or host, got {self.staging_memory!r}")
        if self.staging_memory == "host" and self.staging != "lowest":
            raise PolicyError("staging_memory 'host' needs staging 'lowest'")
        if self.move_gain < 0 or self.move_z < 0:
            raise PolicyError(
                f"move_gain and move_z must be >= 0, got {self.move_gain}, {self.move_z}"
            )
        if self.value_prior < 0:
            raise PolicyError(f"value_prior must be >= 0, got {self.value_prior}")
        if self.value not in ("weight", "output", "fisher"):
            raise PolicyError(f"value must be weight, output or fisher, got {self.value!r}")
        if self.gate not in ("skill", "off"):
            raise PolicyError(f"gate must be skill or off, got {self.gate!r}")
        if not 0.0 <= self.hotness_floor <= 1.0:
            raise PolicyError(f"hotness_floor must be in [0, 1], got {self.hotness_floor}")
        if not 0.0 <= self.prior_weight <= 1.0 or not 0.0 <= self.gate_alpha < 1.0:
            raise PolicyError("prior_weight must be in [0, 1] and gate_alpha in [0, 1)")
        if self.value_scale not in ("none", "layer"):
            raise PolicyError(f"value_scale must be none or layer, got {self.value_scale!r}")
        if self.move_noise not in ("routing", "measured"):
            raise PolicyError(f"move_noise must be routing or measured, got {self.move_noise!r}")
        if self.gate_lag < 0:
            raise PolicyError("gate_lag must be >= 0")


@dataclass(frozen=True)
class Policy:
    name: str
    tiers: tuple[str, ...] = ("int2", "bf16")  # any order; the runtime sorts by precision
    static_tier: str | None = None  # static: which tier (default the lowest)
    controller: ControllerSettings = field(default_factory=ControllerSettings)
    pcie_gbs: float = 25.0  # offload on the CPU backend: modelled link bandwidth

    def __post_init__(self) -> None:
        if self.name not in POLICIES:
            raise PolicyError(f"unknown policy {self.name!r}: use one of {', '.join(POLICIES)}")
        if len(self.tiers) < 1:
            raise PolicyError("a policy needs at least one tier")

    def with_controller(self, **kw: object) -> Policy:
        return replace(self, controller=replace(self.controller, **kw))  # type: ignore[arg-type]


# What `dynaexq.load`, `generate`, `serve` and `eval` run when given only a policy name
# (issue 13; chosen on the unseen tuning domains, rust / yaml and from round seven tcl /
# markdown / cpp too, then run once on held-back ones: docs/results/eval/unseen.md, rounds
# five to seven): four tiers; dynamic starts from the
# static knapsack at the same bytes (hotness floored halfway to even; each tier valued by
# the loss increase its output error predicts on the calibration text, "fisher"), plans on
# the mean routing since the workload last changed (from the calibration, 4 steps of
# weight since round six, 8 before; a change at 1.5x the usual distance; regimes seen
# before recalled), with one staging slot of the lowest tier (2 in flight: 4 gained a
# little at 3 bits and lost more at 6 bits and 20%, where the second slot's bytes cost),
# and moves only when a move's gain less one standard error of it (of the routing signal
# and of the measured tier values together, move_noise "measured", round seven) pays a
# small price per byte copied (0.05% of the plan's value per top-tier slot; 0.3% and half
# a standard error of the routing alone before round seven). Each layer's tier values are
# scaled to the loss measured with that layer alone at each tier (value_scale "layer",
# round six: the knapsack and dynamic gain 6 points of gap on average over the tuning
# sets' cells). Since session fourteen the staging slot is host memory the device reads
# (staging_memory "host"): it cost dynamic 0.4-0.8 points of gap at 4 bits and 20% where it
# made no move (docs/results/eval/unseen.md).
DEFAULT_TIERS = ("int2", "int3", "int4", "bf16")
# When dynamic calibrates again on served text (runtime/recalibrate.py): once on the first
# tokens, on each new workload regime's text, or on a timer on the last ones. A server
# takes the first and the last (its text arrives as finished requests).
RECALIBRATION_TRIGGERS = ("first", "regime", "window")
SERVED_RECALIBRATION_TRIGGERS = ("first", "window")

DEFAULT_CONTROLLER = ControllerSettings(
    signal="regime",
    shift_ratio=1.5,
    prior_steps=4.0,
    alpha=0.9,
    in_flight=2,
    staging="lowest",
    staging_memory="host",
    planner="value",
    split="global",
    move_gain=0.0005,
    move_z=1.0,
    hotness_floor=0.5,
    value="fisher",
    value_scale="layer",
    move_noise="measured",
)


def default_policy(name: str) -> Policy:
    """The policy `name` with the defaults above: dynamic takes them; the baselines keep
    their own meaning (static-map: the calibration's top-n experts at bf16 over int2, as in
    `dynaexq eval`; static: int2; offload: a bf16 cache)."""
    if name == "dynamic":
        return Policy(name, tiers=DEFAULT_TIERS, controller=DEFAULT_CONTROLLER)
    return Policy(name)
