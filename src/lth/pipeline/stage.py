"""What every DVC stage script shares: params and runtime settings resolved once, and errors as one line.

The library raises; a stage prints one `lth:` line naming the problem and the fix, and exits 1 (or
128 + signal after a Ctrl-C or SIGTERM, with a checkpoint saved), never a traceback. A training stage whose
runtime asks for several processes re-launches itself under torchrun (`relaunch_distributed`).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lth.core import config, distributed, runtime
from lth.core.checkpoint import Stopped
from lth.core.hparams import Hparams
from lth.core.runtime import RuntimeSettings
from lth.pipeline.workspace import checkpoint_dir

# Errors a user can cause (bad params, settings, data or files) and fix; anything else is a bug: traceback.
USER_ERRORS = (config.HparamsError, runtime.SettingsError, ValueError, OSError, RuntimeError, FloatingPointError)


@dataclass(frozen=True)
class StageContext:
    hp: Hparams
    settings: RuntimeSettings
    params: Path

    def check_unchanged(self) -> None:
        """DVC records the params it finds when a stage ends: if params.yaml changed while this stage ran,
        its outputs belong to the old params, so fail before anything is recorded (dvc.lock, run-cache, MLflow)."""
        now = config.load(self.params)
        if now.hash != self.hp.hash:
            raise ParamsChanged(
                f"{self.params} changed while this stage ran (experiment {self.hp.hash[:8]} -> {now.hash[:8]}); its "
                "outputs are of the old params and are not recorded. Run `lth run` again: it trains the new params."
            )


class ParamsChanged(RuntimeError):
    """params.yaml changed during a stage."""


def load(params: str | Path = "params.yaml") -> StageContext:
    """The experiment's hyperparameters and runtime settings, validated and resolved once."""
    hp = config.load(params)
    return StageContext(hp, runtime.resolve(config.runtime_section(params), checkpoint_dir()), Path(params))


def relaunch_distributed(ctx: StageContext, run_id: str) -> bool:
    """When runtime.processes_per_node x runtime.nodes > 1 and this process is not one torchrun started:
    run this stage's command under torchrun (`run_id` names the job at the rendezvous) and return True once
    every rank has finished; else False (train here). The DVC stage's command is unchanged: runtime
    settings never re-run a stage."""
    if not distributed.launch_needed(ctx.settings):
        return False
    distributed.launch(ctx.settings, sys.argv, run_id, ctx.settings.threads_for(ctx.hp.model.name))
    return True


def run(main: Callable[[], None]) -> None:
    """Run a stage's body; a user error or a stop request becomes one line and an exit status. Under
    torchrun, rank 0 reports a stop (every rank stops with it), and each rank its own error."""
    rank = int(os.environ.get("RANK", 0))
    try:
        main()
    except Stopped as e:
        if rank == 0:
            print(f"lth: {e}", file=sys.stderr, flush=True)
        raise SystemExit(128 + e.signum) from None
    except USER_ERRORS as e:
        raise SystemExit(f"lth: rank {rank}: {e}" if rank else f"lth: {e}") from None
