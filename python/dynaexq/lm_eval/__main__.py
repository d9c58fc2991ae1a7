"""`python -m dynaexq.lm_eval ...`: lm-eval's command line with the `dynaexq` model."""

from __future__ import annotations

from lm_eval.__main__ import cli_evaluate

import dynaexq.lm_eval  # noqa: F401  (registers the model)

if __name__ == "__main__":
    cli_evaluate()
