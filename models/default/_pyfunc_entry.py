"""MLflow "model from code" entry point for blinaprofile responder models.

MLflow executes this file when loading a model; it must define the model and call
``mlflow.models.set_model``. The heavy lifting lives in :mod:`blinaprofile.models.packaging`.
"""

from __future__ import annotations

import json
from typing import Any

import mlflow.models
import pandas as pd
from mlflow.pyfunc import PythonModel

from blinaprofile.models.packaging import ResponderModel, load_pipeline


class BlinaprofilePyfunc(PythonModel):
    """pyfunc wrapper: feature table in; probability (with interval), call, contributions out."""

    def load_context(self, context: Any) -> None:
        with open(context.artifacts["meta"], encoding="utf-8") as fh:
            meta = json.load(fh)
        pipe = load_pipeline(context.artifacts["pipeline"], meta["trusted_types"])
        refits = None
        if "uncertainty" in context.artifacts:
            refits = load_pipeline(context.artifacts["uncertainty"], meta["trusted_types"])
        self.runtime = ResponderModel(pipe, meta, refits)
        self.training_features_path = context.artifacts.get("training_features")

    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        threshold = (params or {}).get("threshold")
        return self.runtime.predict(model_input, threshold=threshold)


mlflow.models.set_model(BlinaprofilePyfunc())
