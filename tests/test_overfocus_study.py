"""eval/overfocus_study.py end to end at smoke size (--quick): five models trained, evaluated, diagnosed, written."""

import json
import math
from pathlib import Path

import pytest

from helpers import load_script

REPO = Path(__file__).resolve().parents[1]
STUDY = REPO / "eval" / "overfocus_study.py"
FIVE = ["vit-noncausal", "vit-causal", "mamba-causal", "defocus-vit", "defocus-mamba"]


def load_study():
    return load_script(STUDY, "overfocus_study")


def test_quick_study_writes_table_json_and_figures_for_five_models(tmp_path):
    study = load_study()
    assert list(study.STUDY_MODELS) == FIVE
    out = tmp_path / "study"
    assert study.main(["--quick", "--out", str(out), "--seed", "1"]) == 0

    report = json.loads((out / "overfocus_study.json").read_text())
    assert report["settings"]["seed"] == 1 and report["settings"]["steps"] == study.QUICK["steps"]
    assert report["command"].endswith("--quick --out " + str(out) + " --seed 1")
    rows = report["models"]
    assert [r["name"] for r in rows] == FIVE
    for row in rows:
        assert 0.0 <= row["accuracy"] <= 100.0 and row["train_seconds"] > 0 and row["params"] > 100_000
        assert sorted(row["layers"]) == ["0", "1", "2", "3"]
        for key in ("mean_entropy", "last_entropy", "mean_top_key_share", "gradient_top_share"):
            assert math.isfinite(row[key]) and 0.0 < row[key] <= 1.0, (row["name"], key)
    by_name = {r["name"]: r for r in rows}
    # same size for every model: the ViTs share one parameter count; De-focus adds only the filter and aux head
    assert by_name["vit-causal"]["params"] == by_name["vit-noncausal"]["params"]
    assert 0 < by_name["defocus-vit"]["params"] - by_name["vit-causal"]["params"] < 1000
    # the strategies of the comparison: scheduled drop path and the aux loss for De-focus only
    assert by_name["defocus-mamba"]["overrides"]["use_scheduled_drop_path"] is True
    assert by_name["mamba-causal"]["overrides"]["aux_loss_mode"] == "none"
    # a uniform causal map gives key 0 a 1/65-of-the-harmonic-sum share; a bidirectional one 1/65
    assert by_name["vit-noncausal"]["mean_top_key_share"] < by_name["vit-causal"]["mean_top_key_share"]

    table = (out / "overfocus_table.md").read_text().splitlines()
    assert len(table) == 2 + 5 and all(f"| {name} |" in "\n".join(table) for name in FIVE)
    figures = ["overfocus_attention.png", "overfocus_cls_attention.png", "overfocus_gradient.png",
               "overfocus_layers.png", "overfocus_loss.png"]
    assert sorted(Path(p).name for p in report["figures"]) == sorted(figures)
    for name in figures:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


def test_unknown_model_is_refused(tmp_path):
    study = load_study()
    with pytest.raises(ValueError, match="unknown study model"):
        study.run_study(["vit-bidirectional"], study.StudySettings(**study.QUICK), tmp_path)
    with pytest.raises(SystemExit):
        study.parse_args(["--models", "vit-bidirectional"])
