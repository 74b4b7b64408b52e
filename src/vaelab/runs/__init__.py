"""Runs in folders, the layer the CLI stands on: a run's options (``options``), training in a
folder with its checkpoints and metrics (``folder``), and using a saved model folder (``apply``).
May import everything below it; only the report and the CLI import it."""
