"""The served AR-GSE model, logged from code (MLflow 3's models from code).

MLflow runs this file when the model is logged and when it is loaded; the ``argse`` package it
imports travels with the model (``code_paths``). Nothing else should import it.
"""

from mlflow.models import set_model

from argse.serving import ARGSEModel

set_model(ARGSEModel())
