"""DVC stage: train every trial of one round (the ticket of IMP round k, or one of its controls), write
their outputs, then log them to MLflow."""

from lth.pipeline import numerics

numerics.pin()  # before torch is imported: ATen, MKL and oneDNN choose their kernels at start-up

import argparse  # noqa: E402
from pathlib import Path  # noqa: E402

from lth.lottery.layout import KINDS  # noqa: E402
from lth.lottery.round import Round, run_round  # noqa: E402
from lth.pipeline import render, stage  # noqa: E402
from lth.pipeline.workspace import DATA_DIR, RUNS_DIR  # noqa: E402
from lth.tracking.writer import log_finished  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--round", type=int, required=True, help="round index (0 = dense)")
    parser.add_argument("--kind", choices=KINDS, default="ticket")
    args = parser.parse_args()
    ctx = stage.load()
    render.check_stage(ctx.hp, args.kind, args.round)
    job = Round(ctx.hp, args.kind, args.round, Path(RUNS_DIR), Path(DATA_DIR))
    metrics = run_round(job, ctx.settings)
    ctx.check_unchanged()
    log_finished(ctx.hp, [job.trial(m["trial"]).out for m in metrics])


if __name__ == "__main__":
    stage.run(main)
