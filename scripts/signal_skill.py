#!/usr/bin/env python3
"""How well each hotness signal predicts the routed mass of the step its plan serves
(dynaexq.eval.predict): share of the oracle's captured mass, top-12 per layer, lag 2.

    python scripts/signal_skill.py tuning      # rust, yaml (unseen, tuning)
    python scripts/signal_skill.py embedded    # the model's own held-out domains
"""

from __future__ import annotations

import sys

from dynaexq.eval.predict import routing_trace, signal_skill
from dynaexq.eval.run import embedded_domains, unseen_domains
from dynaexq.eval.stream import as_streams
from dynaexq.runtime.load import calibration_scores, load_with_policy


def main(which: str) -> None:
    full, _ = load_with_policy(None, policy="full")
    doms = embedded_domains() if which == "embedded" else unseen_domains(which)
    for name, t in doms.items():
        cal, ev = t[:4096], t[4096:]
        prior = calibration_scores(full, [cal])
        tr = routing_trace(full, as_streams(ev, 4, 256, 8192), window=256, chunk=32)
        sk = signal_skill(tr, prior, 12)
        print(name, " ".join(f"{k}={v:.3f}" for k, v in sk.items()))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "tuning")
