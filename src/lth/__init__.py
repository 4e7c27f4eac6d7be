"""lth: reproducible Lottery Ticket Hypothesis experiments (iterative magnitude pruning, DVC, MLflow).

The flow: params.yaml -> `lth.pipeline` renders dvc.yaml -> DVC runs `stages/` -> the stages call
`lth.lottery` (rounds, trials, branches) over `lth.core` (hparams, data, models, pruning, training) ->
DVC outputs, then `lth.tracking` logs them to MLflow and `lth.reporting` aggregates them.
See docs/architecture.md.
"""

__version__ = "0.2.0"
