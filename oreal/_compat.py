"""Old import paths of modules that moved, kept working for one release (0.1 -> 0.2) with a warning.

The package was laid out flat until 0.1.0; issue 14 gave every concern its own sub-package. A finder on
`sys.meta_path` maps each old dotted name to its new module, warns once with `DeprecationWarning`, and
hands back the very same module object (so `isinstance` checks and monkeypatching see one module). It
also serves `python -m <old name>` (runpy asks the loader for the code), so old launch lines keep working.
No file is left at an old path: two modules never share a basename.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

MOVED = {
    "oreal.trainer": "oreal.algorithms.oreal",
    "oreal.recipes": "oreal.algorithms",
    "oreal.recipes.base": "oreal.algorithms.loop",
    "oreal.recipes.clipped": "oreal.algorithms.clipped",
    "oreal.recipes.grpo": "oreal.algorithms.grpo",
    "oreal.recipes.ppo": "oreal.algorithms.ppo",
    "oreal.recipes.models": "oreal.algorithms.clipped_models",
    "oreal.ppo": "oreal.algorithms.ppo_family",
    "oreal.policy": "oreal.algorithms.policy",
    "oreal.token_rm": "oreal.algorithms.token_rm",
    "oreal.filtering": "oreal.algorithms.filtering",
    "oreal.loss_terms": "oreal.algorithms.loss_terms",
    "oreal.reward.advantages": "oreal.algorithms.advantages",
    "oreal.sft": "oreal.algorithms.sft",
    "oreal.config": "oreal.runtime.config",
    "oreal.components": "oreal.runtime.build",
    "oreal.distributed": "oreal.runtime.distributed",
    "oreal.checkpoint": "oreal.runtime.checkpoint",
    "oreal.metrics": "oreal.runtime.metrics",
    "oreal.schedule": "oreal.runtime.schedule",
    "oreal.evaluation": "oreal.runtime.evaluation",
    "oreal.heldout": "oreal.runtime.heldout",
    "oreal.tiny_run": "oreal.runtime.tiny_model",
    "oreal.generation": "oreal.rollout.generator",
    "oreal.reward.evaluate": "oreal.reward.numeric_value",
    # the module shared its name with its main function, so `from oreal.reward import judge` could give either
    "oreal.reward.judge": "oreal.reward.judging",
    "oreal.plotting": "oreal.demo.plotting",
    "oreal.data.synthetic": "oreal.demo.task",
}


def warn_moved(old: str, new: str, stacklevel: int = 3) -> None:
    warnings.warn(f"{old} moved to {new}; the old name works until oreal 0.2", DeprecationWarning,
                  stacklevel=stacklevel)


class _AliasLoader(importlib.abc.Loader):
    def __init__(self, old: str, new: str):
        self.old, self.new = old, new

    def create_module(self, spec):
        warn_moved(self.old, self.new, stacklevel=2)
        return importlib.import_module(self.new)

    def exec_module(self, module) -> None:
        pass  # the new module is already executed; the import system files it under the old name too

    def get_code(self, fullname):  # `python -m <old name>`: run the new module's code as __main__
        spec = importlib.util.find_spec(self.new)
        return spec.loader.get_code(self.new)


class _MovedModuleFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        new = MOVED.get(fullname)
        if new is None:
            return None
        is_package = importlib.util.find_spec(new).submodule_search_locations is not None
        return importlib.util.spec_from_loader(fullname, _AliasLoader(fullname, new), is_package=is_package)


def install() -> None:
    if not any(isinstance(finder, _MovedModuleFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _MovedModuleFinder())  # before the path finder, which would load a 2nd copy
