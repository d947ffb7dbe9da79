"""Project commands beside LightningCLI's: sample, evaluate, compare, sweep, pipeline."""
