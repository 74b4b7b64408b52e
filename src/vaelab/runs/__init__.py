"""Runs in folders, the room the CLI stands on: a run's options (``options``), training in a
folder with its checkpoints and metrics (``folder``, ``vaelab train``), and using a saved model
folder: opening it and reading its data (``model_data``), ``vaelab evaluate`` (``evaluate``),
``vaelab gap`` (``inference_gaps``), ``sample`` / ``reconstruct`` / ``encode`` (``outputs``).

May import everything below it; only the report and the CLI import it.
"""
