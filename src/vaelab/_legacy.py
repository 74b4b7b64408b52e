"""The module names of vaelab's flat layout, kept importable as names of the rooms they moved to.

Code written against the layout before the rooms (``from vaelab.loglik import log_likelihood``,
``import vaelab.training``) keeps working: each old name is the new module itself, registered in
``sys.modules`` and as an attribute of ``vaelab``, so there is one module object, not a copy. Only
modules that ``import vaelab`` loads anyway are registered here, so this costs no import time; the
outer rooms (runs, report, CLI) were never imported by users' code but through the ``vaelab``
command.
"""

from __future__ import annotations

import importlib
import sys

import vaelab

# old name → the module it now is
MOVED = {
    "ais": "vaelab.evaluation.ais",
    "checkpoint": "vaelab.train.checkpoint",
    "conditioning": "vaelab.model.conditioning",
    "diagnostics": "vaelab.evaluation.diagnostics",
    "distributed": "vaelab.train.distributed",
    "fastpath": "vaelab.train.fastpath",
    "files": "vaelab.io.files",
    "flows": "vaelab.components.flows",
    "gap": "vaelab.evaluation.gap",
    "hierarchy": "vaelab.components.hierarchy",
    "kl": "vaelab.distributions.kl",
    "likelihoods": "vaelab.components.likelihoods",
    "linear": "vaelab.evaluation.linear",
    "loglik": "vaelab.evaluation.loglik",
    "made": "vaelab.components.made",
    "networks": "vaelab.components.networks",
    "noise": "vaelab.objectives.noise",
    "npyrows": "vaelab.data.npyrows",
    "posteriors": "vaelab.components.posteriors",
    "ppca": "vaelab.evaluation.ppca",
    "priors": "vaelab.components.priors",
    "registry": "vaelab.model.registry",
    "serialization": "vaelab.estimator.serialization",
    "streams": "vaelab.train.streams",
    "training": "vaelab.train.trainer",
}


def install() -> None:
    """Register every old name as the module it moved to."""
    for old, new in MOVED.items():
        module = importlib.import_module(new)
        sys.modules[f"vaelab.{old}"] = module
        setattr(vaelab, old, module)
