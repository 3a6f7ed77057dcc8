"""The CLI guides: every option has help, every command an example, misspellings get a
"did you mean", and a command's own mistakes print that command's usage."""

from __future__ import annotations

import pytest

from blinaprofile.cli import build_parser, main


def test_every_option_has_help_and_every_command_an_example() -> None:
    parser = build_parser()
    commands = parser.commands  # type: ignore[attr-defined]
    assert set(commands) >= {"gate", "featurize", "train", "score", "score-batch", "promote"}
    for name, sp in commands.items():
        assert sp.epilog and sp.epilog.startswith("example:\n  blinaprofile " + name), name
        for act in sp._actions:
            assert act.help, (name, act.option_strings or act.dest)


@pytest.mark.parametrize(
    ("argv", "usage", "hint"),
    [
        (["scor", "x.fcs"], "usage: blinaprofile [-h]", "did you mean 'score'?"),
        (["score", "x.fcs", "--treshold", "0.5"], "usage: blinaprofile score", "'--threshold'"),
        (["gate", "x.fcs", "--jsn"], "usage: blinaprofile gate", "did you mean '--json'?"),
        (
            ["score-batch", "--out", "o", "--sample-timout", "5"],
            "usage: blinaprofile score-batch",
            "--sample-timeout",
        ),
    ],
)
def test_misspellings_get_a_suggestion_and_the_right_usage(
    argv: list[str], usage: str, hint: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(usage), err
    assert hint in err, err


def test_help_shows_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["compare", "--help"])
    out = capsys.readouterr().out
    assert "(default: roc_auc)" in out and "example:" in out


def test_messages_point_to_the_right_command(
    small_cohort, tmp_path, capsys: pytest.CaptureFixture[str]
) -> None:
    fcs_dir = small_cohort.out_dir / "fcs"
    with pytest.raises(SystemExit) as info:
        main(["score", str(fcs_dir)])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: blinaprofile score")
    assert "score-batch" in err and "folder of 8 FCS files" in err, err
    # a manifest given as a feature table: pointed to --manifest, not a list of columns
    assert main(["train", "--features", str(small_cohort.manifest)]) == 2
    err = capsys.readouterr().err
    assert f"train --manifest {small_cohort.manifest}" in err and "lacks" not in err, err
