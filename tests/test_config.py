"""Typed YAML configs: every problem is a ConfigError naming the file and the key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from blinaprofile.config import (
    GatingConfig,
    PanelConfig,
    QCConfig,
    SimulationConfig,
    TrainConfig,
    TransformSpec,
    load_config,
    parse_yaml,
    validate_config,
)
from blinaprofile.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
SHIPPED = {
    "panels/post_hct_tcell.yaml": PanelConfig,
    "gating/default_tcell.yaml": GatingConfig,
    "simulation/default.yaml": SimulationConfig,
    "simulation/null.yaml": SimulationConfig,
    "train/default.yaml": TrainConfig,
    "qc.yaml": QCConfig,
}


def _model_for(name: str) -> type | None:
    if name in SHIPPED:
        return SHIPPED[name]
    folder = name.split("/", 1)[0]
    return {
        "panels": PanelConfig,
        "gating": GatingConfig,
        "simulation": SimulationConfig,
        "train": TrainConfig,
    }.get(folder)


ALL_YAML = sorted(str(p.relative_to(CONFIGS)) for p in CONFIGS.rglob("*.yaml"))


@pytest.mark.parametrize("name", ALL_YAML)
def test_every_shipped_config_loads(name: str) -> None:
    """Every YAML in configs/ validates against its model (by folder)."""
    if name == "single_cell.yaml":
        from blinaprofile.annotate.config import SingleCellConfig, load_single_cell_config

        assert isinstance(load_single_cell_config(CONFIGS / name), SingleCellConfig)
        return
    model = _model_for(name)
    assert model is not None, f"configs/{name}: no config model for this location"
    assert isinstance(load_config(model, CONFIGS / name), model)


def test_shipped_defaults_are_present() -> None:
    assert set(SHIPPED) <= set(ALL_YAML)


def _mapping(name: str) -> dict[str, Any]:
    return yaml.safe_load((CONFIGS / name).read_text(encoding="utf-8"))


def _write(tmp_path: Path, data: Any, name: str = "c.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return p


def _error(model: type, data: Any, tmp_path: Path) -> str:
    p = _write(tmp_path, data)
    with pytest.raises(ConfigError) as info:
        load_config(model, p)
    msg = str(info.value)
    assert msg.startswith(f"{p}: "), msg
    assert info.value.path == str(p)
    assert "\n" not in msg
    return msg


# --------------------------------------------------------------------------- simulation
@pytest.mark.parametrize(
    ("change", "phrase"),
    [
        ({"n_patients": "many"}, "n_patients: Input should be a valid integer"),
        ({"n_patients": 1}, "n_patients: Input should be greater than or equal to 2"),
        ({"n_patients": 10**9}, "n_patients: Input should be less than or equal to 100000"),
        ({"responder_fraction": 0.0}, "responder_fraction: Input should be greater than 0"),
        ({"within_patient_sd": float("inf")}, "within_patient_sd: Input should be a finite number"),
        (
            {"events_per_sample": 10},
            "events_per_sample: Input should be greater than or equal to 100",
        ),
        ({"brightness_shift": 0.95}, "brightness_shift: Input should be less than 0.9"),
        ({"seed": -1}, "seed: Input should be greater than or equal to 0"),
        ({"timepoints": []}, "timepoints: List should have at least 1 item"),
        ({"timepoints": ["D28", "D28"]}, "timepoints: duplicate name(s) ['D28']"),
        ({"timepoints": ["D 28"]}, "timepoints.0: String should match pattern"),
        ({"timepoints": ["a/b"]}, "timepoints.0: String should match pattern"),
        ({"colour": "blue"}, "colour: unknown key"),
        ({"name": None}, "name: Input should be a valid string"),
    ],
)
def test_simulation_rejects(tmp_path: Path, change: dict[str, Any], phrase: str) -> None:
    data = {**_mapping("simulation/default.yaml"), **change}
    assert phrase in _error(SimulationConfig, data, tmp_path)


def test_simulation_needs_every_latent_fraction(tmp_path: Path) -> None:
    data = _mapping("simulation/default.yaml")
    del data["latent"]["cd8_tim3_pct_cd8"]
    assert "latent: missing required fraction(s) ['cd8_tim3_pct_cd8']" in _error(
        SimulationConfig, data, tmp_path
    )


def test_simulation_subset_split_must_sum_to_one_and_name_subsets(tmp_path: Path) -> None:
    data = _mapping("simulation/default.yaml")
    data["cd8_memory"]["mean"]["naive"] = 0.5
    assert "subset means must sum to 1" in _error(SimulationConfig, data, tmp_path)
    data = _mapping("simulation/default.yaml")
    data["cd4_memory"]["mean"] = {"naive": 0.5, "memory": 0.5}
    assert "cd4_memory.mean: needs exactly the subsets" in _error(SimulationConfig, data, tmp_path)


def test_simulation_composition(tmp_path: Path) -> None:
    data = _mapping("simulation/default.yaml")
    data["composition"]["platelets"] = 0.1
    assert "composition: unknown key(s) ['platelets']" in _error(SimulationConfig, data, tmp_path)
    data = _mapping("simulation/default.yaml")
    data["composition"].update(debris=0.5, monocytes=0.4)
    assert "leaves (almost) no live lymphocytes" in _error(SimulationConfig, data, tmp_path)


def test_simulation_concentration_bounds(tmp_path: Path) -> None:
    data = _mapping("simulation/default.yaml")
    data["cd8_memory"]["concentration"] = 1e-9
    assert "cd8_memory.concentration: Input should be greater than or equal to 0.5" in _error(
        SimulationConfig, data, tmp_path
    )


# --------------------------------------------------------------------------- QC / train
@pytest.mark.parametrize(
    ("change", "phrase"),
    [
        ({"min_events": -1}, "min_events: Input should be greater than or equal to 0"),
        ({"min_cd8": 1.5}, "min_cd8: Input should be a valid integer"),
        ({"ood_max_z": 0}, "ood_max_z: Input should be greater than 0"),
        ({"ood_max_z": float("nan")}, "ood_max_z: Input should be a finite number"),
        ({"min_event": 10}, "min_event: unknown key"),
    ],
)
def test_qc_rejects(tmp_path: Path, change: dict[str, Any], phrase: str) -> None:
    assert phrase in _error(QCConfig, {**_mapping("qc.yaml"), **change}, tmp_path)


@pytest.mark.parametrize(
    ("change", "phrase"),
    [
        ({"outer_folds": 1}, "outer_folds: Input should be greater than or equal to 2"),
        ({"repeats": "three"}, "repeats: Input should be a valid integer"),
        (
            {"threshold": {"rule": "fixed", "value": -0.1}},
            "threshold.value: Input should be greater",
        ),
        (
            {"threshold": {"rule": "youden"}},
            "threshold.rule: 'youden' is not allowed: use `max_balanced_accuracy`, "
            "`min_sensitivity` or `fixed`",
        ),
        ({"models": []}, "models: List should have at least 1 item"),
        ({"models": [{"family": "logreg_l2", "grid": {"clf__C": []}}]}, "models.0.grid.clf__C"),
        (
            {"models": [{"family": "logreg_l2", "params": {"C value": 1}}]},
            "not valid parameter names",
        ),
        (
            {"select_by": "accuracy"},
            "select_by: 'accuracy' is not allowed: use `roc_auc` or `brier`",
        ),
    ],
)
def test_train_rejects(tmp_path: Path, change: dict[str, Any], phrase: str) -> None:
    assert phrase in _error(TrainConfig, {**_mapping("train/default.yaml"), **change}, tmp_path)


# --------------------------------------------------------------------------- gating / panel
def test_gating_tree_order_and_transforms(tmp_path: Path) -> None:
    data = _mapping("gating/default_tcell.yaml")
    data["gates"][1]["parent"] = data["gates"][-1]["id"]
    assert "is not defined before it" in _error(GatingConfig, data, tmp_path)
    data = _mapping("gating/default_tcell.yaml")
    data["gates"].append(dict(data["gates"][0]))
    assert "duplicate gate ids" in _error(GatingConfig, data, tmp_path)
    data = _mapping("gating/default_tcell.yaml")
    key = next(iter(data["channel_transforms"]))
    data["channel_transforms"][key] = "nope"
    assert f"channel_transforms.{key}: unknown transform 'nope'" in _error(
        GatingConfig, data, tmp_path
    )


@pytest.mark.parametrize(
    ("spec", "phrase"),
    [
        ({"type": "logicle", "w": 3.0, "m": 4.5}, "w <= m / 2"),
        ({"type": "logicle", "w": 0.5, "m": 4.5, "a": 4.0}, "a <= m - 2w"),
        ({"type": "hyperlog", "w": 0.0}, "hyperlog needs w > 0"),
        ({"type": "logicle", "t": 0}, "t: Input should be greater than 0"),
        ({"type": "log", "m": float("inf")}, "m: Input should be a finite number"),
        ({"type": "sqrt"}, "type: 'sqrt' is not allowed: use `linear`, `log`"),
    ],
)
def test_transform_parameters(spec: dict[str, Any], phrase: str) -> None:
    with pytest.raises(ConfigError, match="invalid TransformSpec") as info:
        validate_config(TransformSpec, spec, source="t.yaml")
    assert phrase in str(info.value)
    assert str(info.value).startswith("t.yaml: ")


def test_gate_shapes(tmp_path: Path) -> None:
    data = _mapping("gating/default_tcell.yaml")
    data["gates"][0] = {"id": "g", "type": "polygon", "dims": ["FSC-A"], "vertices": [[0, 0]]}
    assert "a polygon gate needs exactly two 'dims'" in _error(GatingConfig, data, tmp_path)
    data = _mapping("gating/default_tcell.yaml")
    i, gate = next((i, g) for i, g in enumerate(data["gates"]) if g["type"] == "rectangle")
    dim = next(iter(gate["ranges"]))
    gate["ranges"][dim] = {"min": 0.8, "max": 0.2}
    assert f"gates.{i}.ranges.{dim}: min (0.8) must be below max (0.2)" in _error(
        GatingConfig, data, tmp_path
    )
    data = _mapping("gating/default_tcell.yaml")
    data["gates"][0]["id"] = "1bad id"
    assert "gates.0.id: String should match pattern" in _error(GatingConfig, data, tmp_path)


@pytest.mark.parametrize(
    ("channel", "phrase"),
    [
        ("", "String should have at least 1 character"),
        (" FSC-A", "String should match pattern"),
        ("FSC,A", "String should match pattern"),
        ("|FSC", "String should match pattern"),
        ("FSC\tA", "String should match pattern"),
    ],
)
def test_panel_channel_names(tmp_path: Path, channel: str, phrase: str) -> None:
    data = _mapping("panels/post_hct_tcell.yaml")
    data["channels"][0]["channel"] = channel
    assert phrase in _error(PanelConfig, data, tmp_path)


# --------------------------------------------------------------------------- YAML itself
@pytest.mark.parametrize(
    ("text", "phrase"),
    [
        ("a: [1, 2\n", "not valid YAML at line 2, column 1"),
        ("a: 1\nb: 2\na: 3\n", "duplicate key 'a'"),
        ("base: &b {x: 1}\nother:\n  <<: *b\n  x: 2\n", None),  # merge keys may be overridden
        ("? [1, 2]\n: x\n", "a list or mapping cannot be a key"),
        ("when: 2024-02-30\n", "not valid YAML: day is out of range for month"),
        ("x: !!python/name:os.system\n", "could not determine a constructor"),
        ("x: !!binary Zm9v\n", None),
        ("[" * 5000 + "]" * 5000, "nested too deeply"),
    ],
)
def test_parse_yaml(text: str, phrase: str | None) -> None:
    if phrase is None:
        parse_yaml(text, source="s.yaml")
        return
    with pytest.raises(ConfigError) as info:
        parse_yaml(text, source="s.yaml")
    assert phrase in str(info.value)
    assert str(info.value).startswith("s.yaml: not valid YAML")


def test_yaml_merge_keys_may_be_overridden() -> None:
    data = parse_yaml("base: &b {x: 1, y: 5}\nother:\n  <<: *b\n  x: 2\n", source="s.yaml")
    assert data["other"] == {"x": 2, "y": 5}


def test_yaml_alias_bomb_is_bounded(tmp_path: Path) -> None:
    """A 'billion laughs' file is only a few hundred bytes; it must not hang or eat RAM."""
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 10):
        prev = f"*a{i - 1}"
        lines.append(f"a{i}: &a{i} [{', '.join([prev] * 9)}]")
    p = tmp_path / "bomb.yaml"
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    # PyYAML shares aliased nodes (no expansion at load), so this loads quickly and is then
    # rejected as an unknown key by the strict model.
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(QCConfig, p)


def test_config_file_problems(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(QCConfig, tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not a regular file"):
        load_config(QCConfig, tmp_path)
    big = tmp_path / "big.yaml"
    big.write_text("min_events: 1\n" + "# padding\n" * 200_000, encoding="utf-8")
    with pytest.raises(ConfigError, match="configs are small YAML files"):
        load_config(QCConfig, big)
    bom = tmp_path / "bom.yaml"
    bom.write_bytes(b"\xef\xbb\xbfmin_events: 7\n")
    assert load_config(QCConfig, bom).min_events == 7
    empty = tmp_path / "empty.yaml"
    empty.write_text("", encoding="utf-8")
    with pytest.raises(ConfigError, match="expected a mapping at the top level, got NoneType"):
        load_config(QCConfig, empty)


def test_configs_are_frozen_and_strict() -> None:
    cfg = QCConfig()
    with pytest.raises(ValueError, match="frozen"):
        cfg.min_events = 3  # type: ignore[misc]
    with pytest.raises(ConfigError, match="min_evnts: unknown key"):
        validate_config(QCConfig, {"min_evnts": 3}, source="q.yaml")


# --------------------------------------------------------------------------- suggestions
@pytest.mark.parametrize(
    ("change", "phrase"),
    [
        ({"compensaton": "file"}, "compensaton: unknown key; did you mean `compensation`?"),
        (
            {"chanel_transforms": {}},
            "chanel_transforms: unknown key; did you mean `channel_transforms`?",
        ),
        ({"colour": "blue"}, "colour: unknown key"),
        (
            {"compensation": "fil"},
            "compensation: 'fil' is not allowed (did you mean `file`?): use `file` or `none`; "
            "`file` to compensate with the file's spillover matrix ($SPILLOVER, SPILL), "
            "`none` for data without spillover",
        ),
    ],
)
def test_bad_keys_and_choices_suggest_the_right_one(
    tmp_path: Path, change: dict[str, Any], phrase: str
) -> None:
    data = {**_mapping("gating/default_tcell.yaml"), **change}
    msg = _error(GatingConfig, data, tmp_path)
    assert phrase in msg, msg
    if change == {"colour": "blue"}:
        assert "did you mean" not in msg


def test_nested_keys_are_suggested_from_their_own_model(tmp_path: Path) -> None:
    data = _mapping("gating/default_tcell.yaml")
    i, gate = next((i, g) for i, g in enumerate(data["gates"]) if g["id"] == "cd3")
    gate["ranges"]["CD3"] = {"mni": 0.4}
    gate["if_absnet"] = "skip"
    data["transforms"]["fluor"]["cofactr"] = 5
    msg = _error(GatingConfig, data, tmp_path)
    assert f"gates.{i}.ranges.CD3.mni: unknown key; did you mean `min`?" in msg
    assert f"gates.{i}.if_absnet: unknown key; did you mean `if_absent`?" in msg
    assert "transforms.fluor.cofactr: unknown key; did you mean `cofactor`?" in msg
    data = _mapping("train/default.yaml")
    data["promotion"] = {"min_auc_ci_lo": 0.5}
    assert "promotion.min_auc_ci_lo: unknown key; did you mean `min_auc_ci_low`?" in _error(
        TrainConfig, data, tmp_path
    )
    data = _mapping("gating/default_tcell.yaml")
    data["gates"][0]["if_absent"] = "skp"
    assert (
        "gates.0.if_absent: 'skp' is not allowed (did you mean `skip`?): use `skip`, `omit` "
        "or `error`; `skip` leaves it out" in _error(GatingConfig, data, tmp_path)
    )


# --------------------------------------------------------------------------- transforms
def test_arcsinh_with_cofactor_is_asinh_of_x_over_cofactor() -> None:
    import numpy as np

    from blinaprofile.gating.gates import make_transform

    x = np.array([-20.0, 0.0, 1.0, 5.0, 50.0, 500.0, 5000.0])
    for cofactor in (5.0, 150.0):
        spec = validate_config(TransformSpec, {"type": "arcsinh", "cofactor": cofactor})
        engine = spec.engine_spec()
        assert engine is not None and engine.type == "asinh" and engine.a == 0.0
        got = make_transform(engine).apply(x)
        np.testing.assert_allclose(got, np.arcsinh(x / cofactor), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(make_transform(engine).inverse(got), x, rtol=1e-9, atol=1e-9)
    assert validate_config(TransformSpec, {"type": "none"}).engine_spec() is None
    logicle = validate_config(TransformSpec, {"type": "logicle"})
    assert logicle.engine_spec() is logicle


@pytest.mark.parametrize(
    ("spec", "phrase"),
    [
        ({"type": "arcsinh"}, "arcsinh needs a cofactor (5 for mass cytometry, 150 spectral)"),
        ({"type": "arcsinh", "cofactor": 5, "t": 100}, "arcsinh takes only `cofactor`; drop ['t']"),
        ({"type": "arcsinh", "cofactor": 0}, "cofactor: Input should be greater than 0"),
        ({"type": "logicle", "cofactor": 5}, "`cofactor` is for type arcsinh, not logicle"),
        ({"type": "none", "m": 4}, "type none takes no parameters; drop ['m']"),
    ],
)
def test_arcsinh_and_none_parameters(spec: dict[str, Any], phrase: str) -> None:
    with pytest.raises(ConfigError) as info:
        validate_config(TransformSpec, spec, source="t.yaml")
    assert phrase in str(info.value)


def test_none_and_arcsinh_in_a_strategy(tmp_path: Path) -> None:
    from blinaprofile.gating.strategy import load_strategy

    tree = load_strategy(CONFIGS / "gating" / "cytof_tcell.yaml")
    dims = {d.name: d for g in tree.gates for d in g.dims}
    assert dims["Event_length"].transform is None  # `none`: values as stored
    tid = dims["CD3"].transform
    assert tid is not None
    ions = tree.transforms[tid]
    assert ions.type == "asinh" and ions.t == pytest.approx(5 * 1.1752011936438014)
    assert all(d.compensation == "uncompensated" for d in dims.values())
    assert tree.if_absent == {"cells": "error", "cd4_treg": "omit"}


# --------------------------------------------------------------------------- reference page
def _reference_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "config_reference", ROOT / "scripts" / "config_reference.py"
    )
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_config_reference_page_is_generated_from_the_models() -> None:
    """docs/config_reference.md is exactly what scripts/config_reference.py writes now."""
    page = (ROOT / "docs" / "config_reference.md").read_text(encoding="utf-8")
    assert _reference_script().render() == page, (
        "docs/config_reference.md is stale: run .venv/bin/python scripts/config_reference.py"
    )


def test_config_reference_lists_every_key_of_every_model() -> None:
    ref = _reference_script()
    page = ref.render()
    for _title, _where, top, nested in ref.SECTIONS:
        for model in (top, *nested):
            assert f"### {model.__name__}" in page
            for key, info in model.model_fields.items():
                assert f"| `{key}` |" in page, (model.__name__, key)
                assert info.description, f"{model.__name__}.{key} has no description"
    assert "| `cofactor` | number or null | `null` | > 0, <= 1e+06 |" in page
    assert "`none` for data without spillover" in page
