"""The experts' MLflow side, below the experts stage: one expert trained in its run
(:mod:`~argse.expert_runs.run`), the children of an ``--expert all`` run, trained one after another or
at once in spawned processes (:mod:`~argse.expert_runs.at_once`), and resuming a killed run
(:mod:`~argse.expert_runs.resume`). The training itself is :mod:`argse.training`'s."""
