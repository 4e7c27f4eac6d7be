"""DVC stage: train every trial of one round (the ticket of IMP round k, or one of its controls), write
their outputs, then log them to MLflow. With runtime.processes_per_node x runtime.nodes > 1 it re-launches
itself under torchrun, and its processes train each network together (docs/distributed.md)."""

from lth.pipeline import numerics

numerics.pin()  # before torch is imported: ATen, MKL and oneDNN choose their kernels at start-up

import argparse  # noqa: E402
from pathlib import Path  # noqa: E402

from lth.core import distributed  # noqa: E402
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
    if stage.relaunch_distributed(ctx, f"lth-{ctx.hp.hash[:8]}-{args.kind}-round-{args.round}"):
        return  # the ranks that torchrun started trained the round, and rank 0 logged it
    with distributed.process_group(ctx.settings) as settings:
        job = Round(ctx.hp, args.kind, args.round, Path(RUNS_DIR), Path(DATA_DIR))
        metrics = run_round(job, settings)
        ctx.check_unchanged()
        if distributed.is_writer():
            log_finished(ctx.hp, [job.trial(m["trial"]).out for m in metrics])


if __name__ == "__main__":
    stage.run(main)
