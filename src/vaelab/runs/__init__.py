"""Runs of a model in folders: the options of a run (``options``), training into a run folder,
``vaelab train`` (``folder``), and applying a saved model, ``vaelab evaluate``, ``gap``, ``sample``
and the rest (``apply``).

May import every room below it: the estimator, the trainer, the evaluation, the data, ``vaelab.io``;
never the report or the CLI.
"""
