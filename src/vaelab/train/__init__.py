"""Training a model: the trainer (``trainer``), its configuration and learning-rate schedule
(``config``), its minibatches (``batches``), the loss of a step (``loss``), the validation ELBO
(``validation``), what it reports and how it stops (``progress``), the random streams of training
keyed by (seed, epoch, batch) (``streams``), checkpoints (``checkpoint``), data-parallel workers
(``distributed``, ``launch``) and ``torch.compile`` (``fastpath``).

May import the model, the objectives, the components, the distributions, ``vaelab.data`` and
``vaelab.io``; never the evaluation, the estimator or the outer rooms.
"""
