"""The simulated cohort scenario model (``configs/simulation/*.yaml``)."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, field_validator, model_validator

from blinaprofile.config.base import FileSafeName, Fraction, Positive, StrictModel

__all__ = [
    "SIMULATION_CD4_SUBSETS",
    "SIMULATION_CD8_SUBSETS",
    "SIMULATION_COMPOSITION",
    "SIMULATION_LATENT",
    "LatentSpec",
    "SimulationConfig",
    "SubsetSplit",
]


class LatentSpec(StrictModel):
    """A per-patient fraction drawn as logit-normal; class means differ for signal."""

    responder: Fraction
    nonresponder: Fraction
    sd: Positive = Field(description="between-patient SD on the logit scale")


class SubsetSplit(StrictModel):
    """Dirichlet split of a parent into subsets (class-independent)."""

    mean: dict[str, Fraction]
    concentration: Annotated[float, Field(ge=0.5, le=1e6)] = 30.0

    @field_validator("mean")
    @classmethod
    def _sums_to_one(cls, v: dict[str, float]) -> dict[str, float]:
        total = sum(v.values())
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"subset means must sum to 1 (got {total:.4f})")
        return v


#: latent fractions the event simulator needs (also checked by :mod:`blinaprofile.simulate.cohort`).
SIMULATION_LATENT = (
    "cd3_pct_lymph",
    "cd8_pct_cd3",
    "cd8_em_pct_cd8",
    "cd8_tim3_pct_cd8",
    "cd8_pd1_pct_cd8",
    "cd4_treg_pct_cd4",
)
#: subset names of the CD8 non-EM split and of the CD4 split.
SIMULATION_CD8_SUBSETS = ("naive", "cm", "temra")
SIMULATION_CD4_SUBSETS = ("naive", "cm", "em", "temra")
#: composition keys the simulator reads; the first four are shares of all events.
SIMULATION_COMPOSITION = (
    "debris",
    "doublets",
    "monocytes",
    "dead_lymphocytes",
    "b_of_non_t",
    "dn_of_t",
)


class SimulationConfig(StrictModel):
    """A simulated cohort scenario (``configs/simulation/*.yaml``).

    ``n_patients`` is at least 2: every cohort gets at least one responder and one
    nonresponder (cross-validated training needs at least 2 patients of each class and
    says so itself, naming the counts).
    """

    name: str
    description: str = ""
    n_patients: Annotated[int, Field(ge=2, le=100_000)] = 40
    responder_fraction: Fraction = 0.5
    timepoints: list[FileSafeName] = Field(
        default_factory=lambda: ["D28"], min_length=1, max_length=100
    )
    within_patient_sd: Annotated[float, Field(ge=0.0, le=10.0)] = 0.2
    events_per_sample: Annotated[int, Field(ge=100, le=50_000_000)] = 20_000
    brightness_shift: Annotated[float, Field(ge=0.0, lt=0.9)] = 0.10
    latent: dict[str, LatentSpec]
    cd8_memory: SubsetSplit
    cd4_memory: SubsetSplit
    composition: dict[str, Fraction]
    seed: Annotated[int, Field(ge=0, lt=2**64)] = 0

    @model_validator(mode="after")
    def _simulatable(self) -> SimulationConfig:
        dup = sorted({t for t in self.timepoints if self.timepoints.count(t) > 1})
        if dup:
            raise ValueError(f"timepoints: duplicate name(s) {dup}")
        missing = [k for k in SIMULATION_LATENT if k not in self.latent]
        if missing:
            raise ValueError(f"latent: missing required fraction(s) {missing}")
        for field_name, need in (
            ("cd8_memory", SIMULATION_CD8_SUBSETS),
            ("cd4_memory", SIMULATION_CD4_SUBSETS),
        ):
            got = set(getattr(self, field_name).mean)
            if got != set(need):
                raise ValueError(
                    f"{field_name}.mean: needs exactly the subsets {list(need)}, got {sorted(got)}"
                )
        unknown = sorted(set(self.composition) - set(SIMULATION_COMPOSITION))
        if unknown:
            raise ValueError(
                f"composition: unknown key(s) {unknown}; known: {list(SIMULATION_COMPOSITION)}"
            )
        events = sum(self.composition.get(k, 0.0) for k in SIMULATION_COMPOSITION[:4])
        if events >= 0.95:
            raise ValueError(
                f"composition: debris + doublets + monocytes + dead_lymphocytes = {events:.3f} "
                f"leaves (almost) no live lymphocytes; keep it below 0.95"
            )
        return self
