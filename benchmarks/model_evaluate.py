"""Run ``sdl model evaluate`` with INFO logging (per-member progress in the log), same arguments.

Usage: ``python benchmarks/model_evaluate.py --data FILE --target e_form --json OUT [...]``
(the measurement of issue 4; results in ``benchmarks/results/model_evaluate_*.json``).
"""

from __future__ import annotations

import logging
import sys

from sdl.cli.main import app

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("pymatgen").setLevel(logging.ERROR)
    sys.argv = ["sdl", "model", "evaluate", *sys.argv[1:]]
    app()
