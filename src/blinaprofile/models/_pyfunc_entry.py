"""MLflow "model from code" entry point for blinaprofile responder models.

MLflow executes this file (the copy inside the model folder) when ``mlflow models serve``
or ``mlflow.pyfunc.load_model`` loads a model; it must call ``mlflow.models.set_model``.
Scoring with ``blinaprofile`` never runs it. ``load_context`` applies the same checks as
scoring (:func:`blinaprofile.models.loading.open_model_folder`: this file byte-identical to
the installed one, no ``code/`` folder, the expected ``loader_module``, no extra Python files
or unknown artifacts, skops types on the allow-list) and builds the runtime from the folder.
``predict`` answers a bad request (threshold outside [0, 1], unknown parameter, missing
feature) with an ``MlflowException`` (``INVALID_PARAMETER_VALUE``, HTTP 400) carrying one
line and no stack trace.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import mlflow.models
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel

from blinaprofile.errors import BlinaprofileError
from blinaprofile.models.loading import open_model_folder

logger = logging.getLogger("blinaprofile.serve")


class BlinaprofilePyfunc(PythonModel):
    """pyfunc wrapper: feature table in; probability (with interval), call and call_reason
    (``responder``, ``nonresponder``, ``uncertain``, ``no call``), contributions out."""

    def load_context(self, context: Any) -> None:
        folder = Path(__file__).resolve().parent  # the model folder MLflow is loading
        self.model = open_model_folder(folder)
        self.runtime = self.model.runtime
        self.training_features_path = self.model.training_features_path

    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        try:
            return self.model.predict(model_input, params=params)
        except BlinaprofileError as err:
            raise MlflowException(str(err), error_code=INVALID_PARAMETER_VALUE) from None
        except Exception as err:  # MLflow would answer with the stack trace: log it instead
            logger.exception("prediction failed")
            raise MlflowException(
                f"prediction failed ({type(err).__name__}); the details are in the server log",
                error_code=INVALID_PARAMETER_VALUE,
            ) from None


mlflow.models.set_model(BlinaprofilePyfunc())
