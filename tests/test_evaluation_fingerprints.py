"""Resuming is keyed on what makes the answers (evaluation/fingerprints.py): another model, another dtype, other
generation settings or another image under the same name are refused, a copied model folder is the same model, and
models sharing a folder name get their own default output. Tiny models saved to disk, eval/run.py's main() in
process."""

from __future__ import annotations

import json
import shutil

import pytest
from PIL import Image

from defocus_mllm.evaluation import model_fingerprint
from evaluation_fixtures import make_fixture
from evaluation_helpers import EASY_VQA_ARGS as EASY, answers as _answers, benchmark_cli_args as _cli_args
from evaluation_helpers import eval_run_script

run = eval_run_script()


def test_models_sharing_a_folder_name_get_their_own_default_output(two_models, tmp_path, monkeypatch):
    a, b = two_models
    alone = tmp_path / "b-alone"
    run.main(["--model", str(b), *EASY, "--output", str(alone)])
    monkeypatch.chdir(tmp_path)
    run.main(["--model", str(a), *EASY])
    run.main(["--model", str(b), *EASY])
    folders = sorted(p.parent for p in (tmp_path / "outputs" / "eval").glob("*/easy-vqa"))
    assert len(folders) == 2 and all(f.name.startswith("final-") for f in folders)
    fp_b = model_fingerprint(run.load_model(str(b), "float32")[0])[:10]
    out_b = tmp_path / "outputs" / "eval" / f"final-{fp_b}" / "easy-vqa"
    out_a = next(f for f in folders if f != out_b.parent) / "easy-vqa"
    assert _answers(out_a) != _answers(alone), "the two test models should answer differently"
    # b's answers are b's, not a's reused from a folder named after `final`
    assert _answers(out_b) == _answers(alone)
    assert json.loads((out_b / "run.json").read_text())["key"]["model"].startswith(fp_b)


def test_resume_refuses_another_model_or_other_settings(two_models, tmp_path):
    a, b = two_models
    out = tmp_path / "out"
    run.main(["--model", str(a), *EASY, "--output", str(out)])
    first = _answers(out)
    with pytest.raises(ValueError, match="weights or config differ"):
        run.main(["--model", str(b), *EASY, "--output", str(out)])
    with pytest.raises(ValueError, match="generation settings differ"):
        run.main(["--model", str(a), *EASY, "--max-new-tokens", "5", "--output", str(out)])
    with pytest.raises(ValueError, match="weights or config differ"):  # same weights, another dtype
        run.main(["--model", str(a), *EASY, "--dtype", "bfloat16", "--output", str(out)])
    assert _answers(out) == first  # nothing was touched

    # --overwrite starts afresh with b: its answers, its key
    run.main(["--model", str(b), *EASY, "--output", str(out), "--overwrite"])
    run.main(["--model", str(b), *EASY, "--output", str(tmp_path / "b")])
    assert _answers(out) == _answers(tmp_path / "b")
    assert json.loads((out / "run.json").read_text())["key"] == json.loads((tmp_path / "b" / "run.json").read_text())["key"]

    # the same model from a copied folder is the same model: resumed, nothing asked again
    copy = tmp_path / "copy" / "final"
    shutil.copytree(b, copy)
    run.main(["--model", str(copy), *EASY, "--limit", "6", "--output", str(out)])
    assert _answers(out)[:4] == _answers(tmp_path / "b")


def test_resume_refuses_a_folder_without_run_json(two_models, tmp_path):
    a, _ = two_models
    out = tmp_path / "old"
    run.main(["--model", str(a), *EASY, "--output", str(out)])
    (out / "run.json").unlink()  # as an older version left it
    with pytest.raises(ValueError, match="no run.json"):
        run.main(["--model", str(a), *EASY, "--output", str(out)])


def test_resume_refuses_answers_about_another_image(two_models, tmp_path):
    a, _ = two_models
    fx = make_fixture("pope", "llava", tmp_path / "data")
    out = tmp_path / "out"
    args = ["--model", str(a), "--benchmark", "pope", *_cli_args(fx["kwargs"]), "--max-new-tokens", "2",
            "--output", str(out), "--quiet"]
    run.main(args)
    image = sorted((tmp_path / "data").rglob("*.jpg"))[2]
    Image.new("RGB", (40, 40), (9, 9, 9)).save(image)  # same name, another picture
    with pytest.raises(ValueError, match="another image"):
        run.main(args)


def test_resume_notices_an_edited_generation_config(two_models, tmp_path):
    model = tmp_path / "model" / "final"
    shutil.copytree(two_models[0], model)
    out = tmp_path / "out"
    run.main(["--model", str(model), *EASY, "--output", str(out)])
    first = _answers(out)
    config_file = model / "generation_config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    config_file.write_text(json.dumps({**config, "repetition_penalty": 1.7}))
    with pytest.raises(ValueError, match=r"generation settings differ \(max_new_tokens, or the model's "
                                         r"generation_config\.json\)"):
        run.main(["--model", str(model), *EASY, "--limit", "6", "--output", str(out)])
    assert _answers(out) == first  # nothing mixed in
