"""Kill points for the tests that stop a stage at an exact boundary with SIGKILL (as kill -9 would).

A subprocess started with this folder on PYTHONPATH and ``ARGSE_KILL_AT=<point>`` in its environment
kills itself at that point; the product has no hook for it: the functions are wrapped here, when
their module is imported.

    pipeline:<step>     after the pipeline ran the step (splits, experts, gating-selective, ...)
    experts:checkpoint  after an expert logged its first checkpoint
    experts:checkpoint:<expert>:<epoch>
                        after the expert <expert> logged its checkpoint of epoch <epoch>
    experts:stage:<n>   in the expert processes of an at-once stage: once <n> of them logged a
                        checkpoint, the stage's own process (their parent); each writes its pid in
                        the folder ARGSE_KILL_MARKS first
    integrity:<text>    after a run recorded digests of files whose artifact path (or version) holds
                        <text>, before it logged the files: integrity:epoch-4 (the epoch-4 checkpoint),
                        integrity:logits/ (an expert's logits), integrity:model/ (after its model)
    argse:registered    after the fit registered its model, inside its run
    argse:finished      after the fit's run FINISHED, before the champion alias moves

With ``ARGSE_KILL_NODE=<file>`` as well, a point fires only while ``<file>`` exists, and once: the first
process to reach it takes the file (renames it to ``<file>.fired``) and kills the process whose pid it
holds with all its descendants (``argse.testing.process_tree.kill_tree``), itself among them: a whole Ray node, when
the file names the ``ray start --block`` process that started the node.
"""

import importlib.abc
import importlib.machinery
import os
import signal
import sys

POINT = os.environ.get("ARGSE_KILL_AT", "")
NODE = os.environ.get("ARGSE_KILL_NODE", "")


def _kill() -> None:
    if NODE:
        try:
            os.rename(NODE, NODE + ".fired")  # of the processes that reach the point, one takes it
        except FileNotFoundError:
            return  # not armed, or fired already
        from argse.testing.process_tree import kill_tree

        with open(NODE + ".fired") as f:
            kill_tree(int(f.read()))
    os.kill(os.getpid(), signal.SIGKILL)


def _pipeline(module) -> None:
    original = module.Pipeline._run_stage

    def _run_stage(self, step):
        result = original(self, step)
        if POINT == f"pipeline:{step.name}":
            _kill()
        return result

    module.Pipeline._run_stage = _run_stage


def _experts(module) -> None:
    original, train_and_log = module.train, module.train_and_log
    training = []  # the expert this process trains now

    def named(name, *args, **kwargs):
        training[:] = [name]
        return train_and_log(name, *args, **kwargs)

    def train(state, data, **kwargs):
        inner = kwargs.get("on_checkpoint")

        def on_checkpoint(epoch):
            if inner is not None:
                inner(epoch)
            if POINT == "experts:checkpoint" or POINT == f"experts:checkpoint:{training[0]}:{epoch}":
                _kill()
            if POINT.startswith("experts:stage:"):
                _kill_stage_once(int(POINT.rsplit(":", 1)[1]))

        return original(state, data, **{**kwargs, "on_checkpoint": on_checkpoint})

    module.train, module.train_and_log = train, named


def _kill_stage_once(processes: int) -> None:
    """Mark this expert process as checkpointed; the last of ``processes`` to do so kills their parent."""
    marks = os.environ["ARGSE_KILL_MARKS"]
    mark = os.path.join(marks, str(os.getpid()))
    if os.path.exists(mark):
        return
    with open(mark, "w"):
        pass
    if len(os.listdir(marks)) == processes:
        os.kill(os.getppid(), signal.SIGKILL)


def _fit(module) -> None:
    register, crown = module.register, module.crown

    def registered(*args, **kwargs):
        version = register(*args, **kwargs)
        if POINT == "argse:registered":
            _kill()
        return version

    def crowning(name, version=None, **kwargs):
        if POINT == "argse:finished" and version is not None:
            _kill()
        return crown(name, version, **kwargs)

    module.register, module.crown = registered, crowning


def _integrity(module) -> None:
    original = module.record

    def record(local, artifact_path, *, version=None, run_id=None):
        original(local, artifact_path, version=version, run_id=run_id)
        names = [*module.files_under(local, artifact_path), *([version] if version else [])]
        if any(POINT.removeprefix("integrity:") in name for name in names):
            _kill()

    module.record = record


PATCHES = {"pipeline": ("argse.stages.pipeline", _pipeline), "experts": ("argse.expert_runs.run", _experts),
           "argse": ("argse.stages.argse", _fit), "integrity": ("argse.tracking.integrity", _integrity)}


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Finds the one module to patch as Python would, and wraps its loading so the patch follows it."""

    def __init__(self, name, patch):
        self.name, self.patch = name, patch

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return None
        exec_module, patch = spec.loader.exec_module, self.patch

        def exec_and_patch(module):
            exec_module(module)
            patch(module)

        spec.loader.exec_module = exec_and_patch
        return spec


if POINT:
    target = PATCHES.get(POINT.split(":", 1)[0])
    if target is None:
        raise SystemExit(f"ARGSE_KILL_AT={POINT!r}: no such kill point")
    sys.meta_path.insert(0, _PatchOnImport(*target))
