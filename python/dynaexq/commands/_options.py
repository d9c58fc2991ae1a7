"""Options more than one subcommand takes, defined once."""

from __future__ import annotations

from typing import Any


def add_value_scale(group: Any, default: str | None = None) -> None:
    """`--value-scale`: how the knapsack's and the controller's tier values add up across
    layers (`ControllerSettings.value_scale`; None: the policy's default)."""
    group.add_argument(
        "--value-scale",
        default=default,
        choices=("layer", "none"),
        help="static-knapsack / static-map / dynamic: scale each layer's tier values to the "
        "loss measured with that layer alone at each tier on the calibration text (layer, "
        "the default; about 4.5 ranking passes more at load, cached), or plan on the "
        "predicted values (none)",
    )
