"""The training configuration models (``configs/train/*.yaml``)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, field_validator, model_validator

from blinaprofile.config.base import StrictModel

__all__ = ["AliasName", "ModelSpec", "PromotionRule", "ThresholdRule", "TrainConfig"]


class ModelSpec(StrictModel):
    """One candidate model family with its hyper-parameter grid."""

    family: Literal[
        "logreg_l2", "logreg_l1", "logreg_elasticnet", "random_forest", "xgboost", "linear_svm"
    ] = Field(
        description="the model family",
        json_schema_extra={
            "choices": {
                "logreg_l2": "is L2-penalised logistic regression",
                "logreg_l1": "is L1-penalised (sparse) logistic regression",
                "logreg_elasticnet": "is elastic-net logistic regression",
                "random_forest": "is a random forest",
                "xgboost": "is gradient-boosted trees (XGBoost)",
                "linear_svm": "is a linear support-vector machine (calibrated)",
            }
        },
    )
    params: dict[str, Any] = Field(
        default_factory=dict, description="fixed pipeline parameters (`clf__C: 1.0`)"
    )
    grid: dict[str, Annotated[list[Any], Field(min_length=1)]] = Field(
        default_factory=dict, description="parameter -> values tuned by the inner CV"
    )

    @field_validator("params", "grid")
    @classmethod
    def _names(cls, v: dict[str, Any]) -> dict[str, Any]:
        bad = [k for k in v if not k.replace("__", "_").isidentifier()]
        if bad:
            raise ValueError(f"not valid parameter names: {bad}")
        return v


class ThresholdRule(StrictModel):
    """How the decision threshold is chosen inside cross-validation."""

    rule: Literal["max_balanced_accuracy", "min_sensitivity", "fixed"] = Field(
        default="max_balanced_accuracy",
        description="how the threshold is chosen",
        json_schema_extra={
            "choices": {
                "max_balanced_accuracy": "takes the threshold with the best balanced accuracy",
                "min_sensitivity": "takes the highest threshold reaching `value` sensitivity",
                "fixed": "uses `value` itself",
            }
        },
    )
    value: Annotated[float, Field(ge=0.0, le=1.0)] = Field(
        default=0.5, description="min_sensitivity: the sensitivity; fixed: the threshold"
    )


def _not_reserved_alias(name: str) -> str:
    if name.lower() == "latest" or (name[:1] in "vV" and name[1:].isdigit()):
        raise ValueError(f"{name!r} is reserved by the MLflow registry (latest, v1, v2...)")
    return name


# A registry alias: what MLflow accepts (letters, digits, _ and -), minus its reserved names.
AliasName = Annotated[
    str,
    Field(min_length=1, max_length=255, pattern=r"^[\w-]+$"),
    AfterValidator(_not_reserved_alias),
]


class PromotionRule(StrictModel):
    """The evidence a training run needs before it may move the serving alias.

    A criterion set to ``null`` is not required. A run that does not meet the rule is
    registered under ``candidate_alias`` and the serving alias stays where it was.
    """

    min_auc_ci_low: Annotated[float, Field(ge=0.0, lt=1.0)] | None = Field(
        default=0.5, description="the CV ROC AUC 95% CI lower bound must be above this"
    )
    max_perm_pvalue: Annotated[float, Field(gt=0.0, le=1.0)] | None = Field(
        default=0.05, description="the permutation p-value must be below this"
    )
    candidate_alias: AliasName = Field(
        default="candidate", description="the alias a run without the evidence gets"
    )


class TrainConfig(StrictModel):
    """Training configuration (``configs/train/*.yaml``)."""

    experiment: str = Field(default="blinaprofile", description="MLflow experiment name")
    registered_model: str = Field(
        default="blinaprofile-responder", description="MLflow registered model name"
    )
    alias: AliasName = Field(
        default="champion", description="the serving alias a run meeting `promotion` takes"
    )
    features: list[str] | None = Field(
        default=None,
        description="feature columns to train on (null: the features both modalities provide)",
    )
    models: list[ModelSpec] = Field(
        min_length=1, description="candidate model families (see ModelSpec)"
    )
    select_by: Literal["roc_auc", "brier"] = Field(
        default="roc_auc",
        description="which family is refit and registered",
        json_schema_extra={
            "choices": {
                "roc_auc": "picks the highest out-of-fold ROC AUC",
                "brier": "picks the lowest out-of-fold Brier score",
            }
        },
    )
    outer_folds: Annotated[int, Field(ge=2, le=20)] = Field(
        default=5, description="patient-grouped, stratified outer CV folds"
    )
    inner_folds: Annotated[int, Field(ge=2, le=20)] = Field(
        default=3, description="inner CV folds (tuning and threshold)"
    )
    repeats: Annotated[int, Field(ge=1, le=100)] = Field(
        default=2, description="repetitions of the outer CV with other shuffles"
    )
    n_bootstrap: Annotated[int, Field(ge=0, le=100_000)] = Field(
        default=500, description="patient bootstrap resamples for the 95% CIs"
    )
    n_permutations: Annotated[int, Field(ge=0, le=100_000)] = Field(
        default=0, description="label permutations for the p-value (0: none)"
    )
    threshold: ThresholdRule = Field(
        default=ThresholdRule(), description="the decision threshold rule (see ThresholdRule)"
    )
    promotion: PromotionRule = Field(
        default_factory=PromotionRule,
        description="evidence needed to take `alias` (see PromotionRule)",
    )
    seed: int = Field(default=0, description="random seed of folds, models and resamples")

    @model_validator(mode="after")
    def _candidate_is_not_serving(self) -> TrainConfig:
        if self.promotion.candidate_alias == self.alias:
            raise ValueError(
                f"promotion.candidate_alias: must differ from alias ({self.alias!r}), the "
                "serving alias a run without the evidence must not take"
            )
        return self
