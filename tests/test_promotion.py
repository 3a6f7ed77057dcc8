"""Promotion needs evidence: the serving alias moves only on a model that beats chance, never
silently and never over a hand-set alias without --force; exported folders name their
version; model cards carry the numbers; paired and longitudinal designs train.

One tracking store per module; the registry scenario (five trainings through the CLI) runs
once and each test checks one part of it. Feature tables come straight from the generative
model (``test_honesty.cohort_features``), no FCS files.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from blinaprofile.config import ModelSpec, PromotionRule, TrainConfig, validate_config
from blinaprofile.errors import ConfigError
from blinaprofile.features.schema import MODEL_FEATURES, SCHEMA_VERSION
from blinaprofile.models.train import promotion_failures, train
from blinaprofile.models.validation import (
    evaluate,
    grouped_splits,
    label_design,
    permuted_labels,
    prepare_training_data,
)
from test_honesty import cohort_features

NAME = "promo-model"
CONFIG = f"""\
experiment: promotion
registered_model: {NAME}
outer_folds: 4
inner_folds: 2
repeats: 1
n_bootstrap: 300
n_permutations: 20
seed: 3
models:
  - family: logreg_l2
    params: {{C: 0.3}}
"""


def _features_csv(table: pd.DataFrame, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    table.to_csv(folder / "features.csv", index=False)
    return folder / "features.csv"


@pytest.fixture(scope="module")
def store(tmp_path_factory, sim_config, null_config):
    """A tracking store, the small training config and three cohorts' feature files.

    40-patient draws of the default scenario reach CV AUCs from 0.53 to 0.92 (seeds 31-40);
    the two "good" cohorts are seeds 31 and 37 (CV AUC 0.92 and 0.83, CI lower bounds 0.82
    and 0.71), so that they meet the promotion rule by a clear margin.
    """
    from blinaprofile.settings import settings

    root = tmp_path_factory.mktemp("promotion")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    cfg = root / "train.yaml"
    cfg.write_text(CONFIG)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.setattr(settings, "tracking_uri", uri)
        mp.setattr(settings, "n_jobs", 1)
        mp.chdir(root)
        yield {
            "root": root,
            "uri": uri,
            "config": cfg,
            "good_a": _features_csv(
                cohort_features(sim_config, n_patients=40, seed=31), root / "good_a"
            ),
            "good_b": _features_csv(
                cohort_features(sim_config, n_patients=40, seed=37), root / "good_b"
            ),
            "null": _features_csv(
                cohort_features(null_config, n_patients=40, seed=33), root / "null40"
            ),
        }


def _cli(*args: str) -> tuple[int, str, str]:
    """Run the CLI in this process: exit code, stdout, stderr."""
    import contextlib
    import io

    from blinaprofile.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return code, out.getvalue(), err.getvalue()


def _aliases(uri: str) -> dict[str, str]:
    import mlflow

    rm = mlflow.tracking.MlflowClient(uri).get_registered_model(NAME)
    return {a: str(v) for a, v in rm.aliases.items()}


@pytest.fixture(scope="module")
def scenario(store):
    """Good cohort -> null cohort -> good cohort -> hand promotion -> good (no force / force)."""
    steps: dict[str, dict] = {}

    def train_cli(step: str, features: Path, *extra: str) -> None:
        args = ["train", "--features", str(features), "--config", str(store["config"]), *extra]
        code, out, err = _cli(*args)
        assert code == 0, err
        print(f"\n$ blinaprofile {' '.join(args[:3])} ... {' '.join(extra)}\n{out}")
        steps[step] = {"out": out, "aliases": _aliases(store["uri"])}

    train_cli("good_a", store["good_a"], "--export", str(store["root"] / "model_a"))
    train_cli("null", store["null"], "--trained-on", "simulated null cohort, seed 33")
    train_cli("good_b", store["good_b"])
    code, out, err = _cli("promote", NAME, "1", "--alias", "champion")
    assert code == 0, err
    steps["promote"] = {"out": out, "aliases": _aliases(store["uri"])}
    train_cli("good_b_no_force", store["good_b"])
    train_cli("good_b_force", store["good_b"], "--force")
    return steps


# --------------------------------------------------------------------------- the rule
def test_promotion_rule_is_configurable_and_validated(tmp_path):
    base = {"models": [{"family": "logreg_l2"}]}
    cfg = validate_config(TrainConfig, base)
    assert cfg.promotion == PromotionRule(min_auc_ci_low=0.5, max_perm_pvalue=0.05)
    off = validate_config(TrainConfig, {**base, "promotion": {"max_perm_pvalue": None}})
    assert off.promotion.max_perm_pvalue is None
    for bad, phrase in (
        ({"promotion": {"candidate_alias": "champion"}}, "promotion.candidate_alias: must differ"),
        ({"alias": "v2"}, "alias: 'v2' is reserved"),
        ({"promotion": {"max_perm_pvalue": 0}}, "promotion.max_perm_pvalue"),
        ({"promotion": {"min_auc": 0.6}}, "promotion.min_auc: unknown key"),
    ):
        with pytest.raises(ConfigError, match=re.escape(phrase)) as err:
            validate_config(TrainConfig, {**base, **bad}, source=tmp_path / "train.yaml")
        assert "train.yaml" in str(err.value)


def test_promotion_failures_say_why_with_the_numbers():
    m = {"roc_auc": 0.553, "roc_auc_ci_low": 0.43, "roc_auc_ci_high": 0.68}
    rule = PromotionRule()
    assert promotion_failures(m, selection_pvalue=0.41, rule=rule, n_permutations=99) == [
        "CV AUC 0.553 [0.430, 0.680]: CI lower bound not above 0.5",
        "permutation p 0.410 not below 0.05",
    ]
    good = {"roc_auc": 0.8, "roc_auc_ci_low": 0.66, "roc_auc_ci_high": 0.91}
    assert promotion_failures(good, selection_pvalue=0.01, rule=rule, n_permutations=99) == []
    assert promotion_failures(good, selection_pvalue=np.nan, rule=rule, n_permutations=0) == [
        "no permutation p-value (n_permutations: 0)"
    ]
    (few,) = promotion_failures(good, selection_pvalue=0.2, rule=rule, n_permutations=4)
    assert few.startswith("4 permutations cannot give p < 0.05") and ">= 20" in few
    off = PromotionRule(min_auc_ci_low=None, max_perm_pvalue=None)
    assert promotion_failures(m, selection_pvalue=0.41, rule=off, n_permutations=0) == []


# --------------------------------------------------------------------------- the registry
def test_first_good_model_becomes_champion_and_says_so(scenario):
    step = scenario["good_a"]
    assert step["aliases"] == {"champion": "1"}
    assert f"@champion moved: {NAME} (none) -> v1" in step["out"]


def test_null_cohort_leaves_champion_and_says_why(scenario):
    step = scenario["null"]
    assert step["aliases"] == {"champion": "1", "candidate": "2"}
    (line,) = [ln for ln in step["out"].splitlines() if ln.startswith("not promoted: ")]
    assert line.endswith(f"{NAME} v2 is @candidate, @champion stays at v1")
    # the reasons quote the run's own numbers
    auc = re.search(r"OOF AUC.*\n(logreg_l2)\s+(\S+) \[(\S+), (\S+)\]", step["out"])
    assert auc is not None
    lo = float(auc.group(3).rstrip(","))
    pval = float(re.search(r"adjusted for choosing it: (\S+)", step["out"]).group(1))
    assert ("CI lower bound not above 0.5" in line) == (lo <= 0.5)
    assert ("not below 0.05" in line) == (pval >= 0.05)
    assert lo <= 0.5 or pval >= 0.05


def test_good_model_moves_champion_printing_old_and_new(scenario):
    step = scenario["good_b"]
    assert step["aliases"] == {"champion": "3", "candidate": "2"}
    assert f"@champion moved: {NAME} v1 -> v3" in step["out"]


def test_hand_promoted_alias_is_not_overridden_without_force(scenario, store):
    import mlflow

    assert scenario["promote"]["out"].startswith(f"{NAME}@champion -> version 1 (was version 3)")
    client = mlflow.tracking.MlflowClient(store["uri"])
    assert (
        client.get_model_version(NAME, "1").tags["blinaprofile.alias_set_by.champion"] == "promote"
    )
    held = scenario["good_b_no_force"]
    assert held["aliases"] == {"champion": "1", "candidate": "4"}
    assert (
        "not promoted: @champion (version 1) was set by promote; train replaces a hand-set "
        f"alias only with --force; {NAME} v4 is @candidate, @champion stays at v1"
    ) in held["out"]
    forced = scenario["good_b_force"]
    assert forced["aliases"] == {"champion": "5", "candidate": "4"}
    assert f"@champion moved: {NAME} v1 -> v5" in forced["out"]
    assert client.get_model_version(NAME, "5").tags["blinaprofile.alias_set_by.champion"] == "train"


def test_promote_lists_versions_and_aliases_when_wrong(scenario):
    code, _, err = _cli("promote", NAME, "9")
    assert code == 2
    assert err.strip() == (
        f"error: cannot promote {NAME} version 9: no such version; versions: 1, 2, 3, 4, 5; "
        "aliases: @candidate -> v4, @champion -> v5"
    )
    code, _, err = _cli("promote", NAME, "@nope")
    assert code == 2 and "no alias @nope; versions: 1, 2, 3, 4, 5" in err
    code, _, err = _cli("promote", NAME, "2", "--alias", "latest")
    assert code == 2 and "alias 'latest' is not valid" in err and "@champion -> v5" in err


def test_exported_folder_names_its_version_not_an_alias(scenario, store):
    (meta_file,) = (store["root"] / "model_a").rglob("meta.json")
    meta = json.loads(meta_file.read_text())
    assert meta["registered_model"] == NAME and meta["version"] == "1"
    assert "alias" not in meta
    assert (
        "exported to" in scenario["good_a"]["out"] and f"({NAME} v1)" in scenario["good_a"]["out"]
    )


def test_model_card_has_the_numbers(scenario, store):
    import mlflow

    client = mlflow.tracking.MlflowClient(store["uri"])
    mv = client.get_model_version(NAME, "2")
    card = mv.description
    run = client.get_run(mv.run_id)
    m, p = run.data.metrics, run.data.params
    table = pd.read_csv(store["null"])
    n_resp = int(table["response"].sum())
    expected = {
        "cohort": f"null40: 40 samples, 40 patients: {n_resp} responders, {40 - n_resp} nonresponders",
        "feature schema": f"version {SCHEMA_VERSION} ({len(MODEL_FEATURES)} features)",
        "CV ROC AUC [95% CI]": f"{m['roc_auc']:.3f} [{m['roc_auc_ci_low']:.3f}, {m['roc_auc_ci_high']:.3f}]",
        "balanced accuracy [95% CI]": (
            f"{m['balanced_accuracy']:.3f} [{m['balanced_accuracy_ci_low']:.3f}, "
            f"{m['balanced_accuracy_ci_high']:.3f}]"
        ),
        "permutation p": f"{m['perm_pvalue']:.3f} (20 permutations)",
        "threshold": f"{m['final_threshold']:.3f} (rule max_balanced_accuracy)",
        "trained on": "simulated null cohort, seed 33 (origin not stated)",
        "git commit": run.data.tags["git_commit"],
        "design": "one label per patient",
    }
    rows = dict(re.findall(r"^\| (.+?) \| (.*) \|$", card, flags=re.M))
    for key, value in expected.items():
        assert rows[key] == value, key
    assert rows["decision at training"].startswith("not promoted: ")
    assert p["n_permutations"] == "20"
    # the registered model's description lists the aliases, then the serving version's card
    desc = client.get_registered_model(NAME).description
    assert desc.startswith("Aliases: @candidate -> v4, @champion -> v5. Serving alias: @champion.")
    assert f"# {NAME} v5" in desc
    # the run: a name with family and cohort, headline metrics as its description, the
    # features file as the dataset's source, the experiment in MLflow's classic ML view
    assert run.info.run_name == "logreg_l2 on null40"
    note = run.data.tags["mlflow.note.content"]
    assert "| logreg_l2 (chosen) |" in note and "ROC AUC [95% CI]" in note and "Brier" in note
    (ds,) = run.inputs.dataset_inputs
    assert json.loads(ds.dataset.source)["uri"] == str(store["null"].resolve())
    exp = client.get_experiment(run.info.experiment_id)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"


def test_compare_groups_by_cohort_and_shows_aliases(scenario, store):
    from blinaprofile.models.compare import leaderboard

    lb = leaderboard("promotion", tracking_uri=store["uri"])
    assert set(lb["cohort"]) == {"good_a", "good_b", "null40"}
    assert list(lb["cohort"]) == sorted(lb["cohort"])  # grouped by cohort
    assert lb.loc[lb["cohort"] == "null40"].index.tolist() == [1]  # rank restarts per cohort
    by_version = dict(zip(lb["version"], lb["aliases"], strict=True))
    assert by_version["5"] == "@champion" and by_version["4"] == "@candidate"
    assert by_version["1"] == "" and by_version["2"] == ""
    only = leaderboard("promotion", tracking_uri=store["uri"], cohort="null40")
    assert set(only["cohort"]) == {"null40"} and len(only) == 1
    code, out, _ = _cli("compare", "--experiment", "promotion", "--out", str(store["root"] / "lb"))
    assert code == 0 and "cohort null40" in out and f"{NAME} v5 @champion" in out


# --------------------------------------------------------------------------- designs
def _paired_table(sim_config) -> pd.DataFrame:
    """44 patients sampled in two states; the label is the state (0 before, 1 after), and the
    'after' sample's effector-memory CD8 share is higher (one sample missing: 43 + 44)."""
    base = cohort_features(sim_config, n_patients=44, seed=41)
    after = cohort_features(sim_config, n_patients=44, seed=42)
    after["patient_id"] = base["patient_id"]
    after["cd8_em_pct_cd8"] = np.clip(after["cd8_em_pct_cd8"] * 1.6, 0, 99)
    before = base.assign(response=0, sample_id=base["sample_id"] + "_pre")
    after = after.assign(response=1, sample_id=after["sample_id"] + "_post")
    return pd.concat([before.iloc[1:], after], ignore_index=True)


def test_paired_design_is_grouped_by_patient_and_trains(sim_config, store):
    table = _paired_table(sim_config)
    assert (table["response"] == 0).sum() == 43 and (table["response"] == 1).sum() == 44
    _, y, g, _, _ = prepare_training_data(table, list(MODEL_FEATURES))
    assert label_design(y, g) == "labels vary within patients"
    for tr, te in grouped_splits(y, g, n_splits=5, seed=0):
        assert not set(g[tr]) & set(g[te])  # a patient's samples never straddle a split
        assert 0.3 < y[te].mean() < 0.7  # folds stratified on the sample label
    cfg = TrainConfig(
        models=[ModelSpec(family="logreg_l2")],
        outer_folds=4,
        inner_folds=2,
        repeats=1,
        n_bootstrap=200,
        n_permutations=20,
        experiment="paired",
        registered_model="paired-model",
    )
    ev = evaluate(table, config=cfg, n_jobs=1)
    fe = ev.families["logreg_l2"]
    print(f"\npaired design: CV AUC {fe.auc:.3f}, permutation p {fe.metrics['perm_pvalue']:.3f}")
    assert fe.auc > 0.7 and fe.metrics["perm_pvalue"] < 0.05
    res = train(table, config=cfg, tracking_uri=store["uri"], cohort="paired", register=False)
    assert "| design | labels vary within patients |" in res.model_card
    assert "44 patients; labels vary within patients: 44 samples labelled 1, 43 labelled 0" in (
        res.model_card
    )
    assert res.version is None and res.promotion_line().startswith("not registered")


def test_permutations_respect_the_design(sim_config):
    table = _paired_table(sim_config)
    _, y, g, _, _ = prepare_training_data(table, list(MODEL_FEATURES))
    perm = permuted_labels(y, g, np.random.default_rng(0))
    # every patient keeps its own labels (shuffled among its samples), so the null keeps the design
    for p in np.unique(g):
        assert sorted(perm[g == p]) == sorted(y[g == p])
    assert (perm != y).any()


def test_timepoint_selects_one_timepoint(sim_config, store):
    d0 = cohort_features(sim_config, n_patients=30, seed=51).assign(timepoint="D0")
    d28 = cohort_features(sim_config, n_patients=30, seed=51).assign(timepoint="D28")
    d0["sample_id"] += "_D0"
    csv = _features_csv(pd.concat([d0, d28], ignore_index=True), store["root"] / "longitudinal")
    code, out, err = _cli(
        "train",
        "--features",
        str(csv),
        "--config",
        str(store["config"]),
        "--timepoint",
        "D28",
        "--no-register",
        "--cohort",
        "longitudinal-D28",
    )
    assert code == 0, err
    import mlflow

    run_id = re.search(r"MLflow run\s+(\w+)", out).group(1)
    run = mlflow.tracking.MlflowClient(store["uri"]).get_run(run_id)
    assert run.data.params["n_samples"] == "30" and run.data.tags["timepoint"] == "D28"
    assert "not registered (--no-register)" in out
    code, _, err = _cli(
        "train",
        "--features",
        str(csv),
        "--config",
        str(store["config"]),
        "--timepoint",
        "D99",
    )
    assert code == 2
    assert (
        err.strip() == f"error: {csv}: no samples at timepoint 'D99'; the table has ['D0', 'D28']"
    )
