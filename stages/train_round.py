"""DVC stage: train every trial of one round (the ticket of IMP round k, or one of its controls)."""

import argparse
from pathlib import Path

from lth import hparams, runtime
from lth.imp import KINDS, run_round
from lth.pipeline import DATA_DIR, RUNS_DIR

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--round", type=int, required=True, help="round index (0 = dense)")
    parser.add_argument("--kind", choices=KINDS, default="ticket")
    args = parser.parse_args()
    hp = hparams.load_or_exit()
    rt = runtime.configure()
    run_round(hp, args.round, args.kind, Path(RUNS_DIR), Path(DATA_DIR), device=rt["device"], quiet=rt["quiet"],
              checkpoint_seconds=rt["checkpoint_seconds"])
