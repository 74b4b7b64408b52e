"""A test hook, never part of the library: with ``VAELAB_TEST_NAN_STEP=N`` in its environment, a
``vaelab`` process (tests/test_survival.py puts this folder on its PYTHONPATH) sees the loss of
optimiser step N turn NaN until the run has rolled back once (with ``VAELAB_TEST_NAN_RANK=R``,
only on worker R of a data-parallel run); with ``VAELAB_TEST_KILL_STEP=M``
too, it SIGKILLs itself after the first checkpoint written at step M or later after a rollback."""

import os

if os.environ.get("VAELAB_TEST_NAN_STEP"):
    import math
    import signal

    from vaelab.train import trainer as _trainer

    _NAN_STEP = int(os.environ["VAELAB_TEST_NAN_STEP"])
    _KILL_STEP = int(os.environ.get("VAELAB_TEST_KILL_STEP", "0"))
    _RANK = os.environ.get("VAELAB_TEST_NAN_RANK")
    _loss_of_step = _trainer.Trainer._loss_of_step
    _save_checkpoint = _trainer.Trainer.save_checkpoint

    def _planted(self):
        loss_of = _loss_of_step(self)

        def step(*args, **kwargs):
            loss, terms = loss_of(*args, **kwargs)
            here = _RANK is None or int(_RANK) == self.world.rank
            if self.step + 1 == _NAN_STEP and self.rollbacks == 0 and here:
                loss = loss * math.nan
            return loss, terms

        return step

    def _save_then_die(self, train):
        _save_checkpoint(self, train)
        if _KILL_STEP and self.rollbacks and self.step >= _KILL_STEP:
            os.kill(os.getpid(), signal.SIGKILL)

    _trainer.Trainer._loss_of_step = _planted
    _trainer.Trainer.save_checkpoint = _save_then_die
