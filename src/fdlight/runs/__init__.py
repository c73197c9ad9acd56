"""Running a stage: the run directory, the Trainer and its callbacks, the gathered weights, the run template."""
