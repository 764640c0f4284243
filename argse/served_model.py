"""The loader MLflow imports to load the served AR-GSE model (MLflow's ``loader_module`` flavour).

The model folder holds data only; MLflow calls :func:`_load_pyfunc` with its ``data/components``
folder, and the code that runs is this installed package: every file of the model is checked against
the digests its run sealed on the tracking server before any of them is read
(:func:`argse.serving.load_checked`).
"""

from argse.serving import load_checked


def _load_pyfunc(data_path: str):
    return load_checked(data_path)
