"""Reading results back: aggregation into DVC metrics and plot data, figures, the HTML report, comparing
experiments and sweeps."""
