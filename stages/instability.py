"""DVC stage: the instability analysis of one ticket round (lth.lottery.instability): for every trial, train a
copy from the round's starting point with another data order, interpolate it with the round's network on the
test set, write the curve and the error barrier, then log them to MLflow."""

from lth.pipeline import numerics

numerics.pin()  # before torch is imported: ATen, MKL and oneDNN choose their kernels at start-up

import argparse  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from lth.lottery import instability  # noqa: E402
from lth.pipeline import render, stage  # noqa: E402
from lth.pipeline.workspace import DATA_DIR, RUNS_DIR  # noqa: E402
from lth.tracking.writer import log_instability_finished  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--round", type=int, required=True, help="the ticket round to analyse (0 = dense)")
    args = parser.parse_args()
    ctx = stage.load()
    render.check_stage(ctx.hp, instability.INSTABILITY, args.round)
    directories = instability.run_round(ctx.hp, args.round, Path(RUNS_DIR), Path(DATA_DIR), ctx.settings)
    for directory in directories:
        s = instability.read_summary(directory)
        print(
            f"lth: instability round {s['round']} trial {s['trial']}: error barrier {s['error_barrier']:.4f} (test "
            f"error {s['error_a']:.4f} and {s['error_b']:.4f} at the ends, {s['max_error']:.4f} at alpha "
            f"{s['max_error_alpha']:.2f})",
            file=sys.stderr,
            flush=True,
        )
    ctx.check_unchanged()
    log_instability_finished(ctx.hp, directories)


if __name__ == "__main__":
    stage.run(main)
