"""The lmms-eval model plugin (`--model defocus_llava`, defocus_mllm/evaluation/lmms_eval_plugin.py), end to end and
offline: a tiny saved LLaVA, a local lmms-eval task over a few easy-VQA questions written as a parquet file, and
lmms-eval's own command line in a subprocess. Its answers must be those of the project's `run_benchmark`.

lmms-eval is the optional extra `lmms-eval` (docs/evaluation.md says how to install it over a CPU-only torch)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from defocus_mllm.evaluation import build_prompt, generate_answers, get_benchmark, run_benchmark
from evaluation_helpers import eval_run_script

run = eval_run_script()

if importlib.util.find_spec("lmms_eval") is None:
    pytest.skip("lmms-eval is not installed: pip install -e '.[lmms-eval]' (see docs/evaluation.md, 'lmms-eval plugin')",
                allow_module_level=True)

NUM_QUESTIONS = 6
MAX_NEW_TOKENS = 8
CHOICES = ["yes", "no", "circle", "rectangle", "triangle", "red", "green", "blue", "black", "gray", "teal", "brown",
           "yellow"]

TASK_UTILS = '''
CHOICES = {choices!r}


def doc_to_visual(doc):
    return [doc["image"]]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["prompt"]


def process_results(doc, results):
    return {{"exact_match": float(results[0].strip().lower() == doc["answer"].lower())}}


def doc_to_choice(doc):
    return CHOICES
'''

GENERATE_TASK = """task: defocus_easy_vqa_local
dataset_path: parquet
dataset_kwargs:
  data_files:
    test: {parquet}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: {max_new_tokens}
  temperature: 0
  do_sample: false
  until: ["</s>"]
process_results: !function utils.process_results
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 0.0
"""

CHOICE_TASK = """task: defocus_easy_vqa_local_mc
dataset_path: parquet
dataset_kwargs:
  data_files:
    test: {parquet}
test_split: test
output_type: multiple_choice
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
doc_to_choice: !function utils.doc_to_choice
metric_list:
  - metric: acc
metadata:
  version: 0.0
"""


@pytest.fixture(scope="module")
def local_task(tmp_path_factory):
    return write_local_task(tmp_path_factory.mktemp("lmms_task"))


def write_local_task(root: Path):
    """The first easy-VQA test questions as a parquet file (images embedded as the files' bytes, as the Hub stores
    them) and two lmms-eval tasks over it: generation, and multiple choice (log-likelihoods)."""
    import datasets

    samples = get_benchmark("easy-vqa").load(limit=NUM_QUESTIONS)
    features = datasets.Features({"question_id": datasets.Value("int64"), "prompt": datasets.Value("string"),
                                  "answer": datasets.Value("string"), "image": datasets.Image()})
    rows = {"question_id": [s.question_id for s in samples], "prompt": [s.prompt for s in samples],
            "answer": [s.answers[0] for s in samples],
            "image": [{"bytes": s.image.path.read_bytes(), "path": s.image.path.name} for s in samples]}
    parquet = root / "data" / "test.parquet"
    parquet.parent.mkdir(exist_ok=True)
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(parquet))
    tasks = root / "tasks"
    tasks.mkdir(exist_ok=True)
    (tasks / "utils.py").write_text(TASK_UTILS.format(choices=CHOICES))
    (tasks / "defocus_easy_vqa_local.yaml").write_text(GENERATE_TASK.format(parquet=parquet, max_new_tokens=MAX_NEW_TOKENS))
    (tasks / "defocus_easy_vqa_local_mc.yaml").write_text(CHOICE_TASK.format(parquet=parquet))
    return tasks, samples


def _only(paths: list[Path]) -> Path:
    assert len(paths) == 1, paths
    return paths[0]


@pytest.mark.slow
def test_lmms_eval_cli_runs_the_plugin_and_gives_run_benchmarks_answers(model_dir, local_task, tmp_path):
    tasks, samples = local_task
    out = tmp_path / "lmms_out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_HOME": str(tmp_path / "hf_home"), "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "lmms_eval", "--model", "defocus_llava",
           "--model_args", f"pretrained={model_dir},dtype=float32,device=cpu",
           "--tasks", "defocus_easy_vqa_local,defocus_easy_vqa_local_mc", "--include_path", str(tasks),
           "--batch_size", "3", "--output_path", str(out), "--log_samples"]
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]

    results = json.loads(_only(list(out.rglob("*_results.json"))).read_text())["results"]
    logged = [json.loads(line) for line in
              _only(list(out.rglob("*_samples_defocus_easy_vqa_local.jsonl"))).read_text().splitlines()]
    by_doc = {r["doc_id"]: r for r in logged}
    assert sorted(by_doc) == list(range(NUM_QUESTIONS))
    lmms_answers = [by_doc[i]["filtered_resps"] for i in range(NUM_QUESTIONS)]

    # the project's own evaluation of the same questions
    model, processor = run.load_model(str(model_dir), "float32")
    report = run_benchmark(model, processor, "easy-vqa", limit=NUM_QUESTIONS, batch_size=3,
                           max_new_tokens=MAX_NEW_TOKENS, output_dir=tmp_path / "ours", show_progress=False)
    ours = [json.loads(line)["answer"] for line in (tmp_path / "ours" / "predictions.jsonl").read_text().splitlines()]
    assert lmms_answers == ours
    assert len(set(ours)) > 1, "the test model should answer questions differently"
    expected = sum(a.strip().lower() == s.answers[0].lower() for a, s in zip(ours, samples)) / NUM_QUESTIONS
    assert results["defocus_easy_vqa_local"]["exact_match,none"] == pytest.approx(expected)
    assert report["num_questions"] == NUM_QUESTIONS

    # multiple choice goes through loglikelihood: one score per question
    acc = results["defocus_easy_vqa_local_mc"]["acc,none"]
    assert 0.0 <= acc <= 1.0
    mc = _only(list(out.rglob("*_samples_defocus_easy_vqa_local_mc.jsonl"))).read_text().splitlines()
    assert len(mc) == NUM_QUESTIONS


@pytest.mark.slow
def test_loglikelihood_is_the_continuations_mean_loss(model_dir, local_task):
    """In process: the plugin's loglikelihood against a direct forward pass (the character tokenizer of the test
    model encodes prompt + continuation as the concatenation of their encodings)."""
    # the class itself; lmms-eval's lookup of `defocus_llava` through the entry point is the subprocess test's
    from defocus_mllm.evaluation.lmms_eval_plugin import DefocusLlava, Loglikelihood

    _, samples = local_task
    lm = DefocusLlava.create_from_arg_string(f"pretrained={model_dir},dtype=float32,device=cpu", {"batch_size": "2"})
    model, processor = lm.model, lm.processor
    images = {i: s.load_image() for i, s in enumerate(samples[:2])}
    lm.task_dict = {"t": {"test": {i: {"image": images[i]} for i in images}}}

    def to_visual(doc):
        return [doc["image"]]

    class Request:
        def __init__(self, *args):
            self.args = args

    answers = lm.generate_until([Request(samples[i].prompt, {"max_new_tokens": 4}, to_visual, i, "t", "test")
                                 for i in images])
    assert answers == [generate_answers(model, processor, [samples[i]], max_new_tokens=4,
                                        show_progress=False)[samples[i].question_id] for i in images]

    # the greedy continuation as generated (not stripped), up to the end-of-sequence token
    prompt = build_prompt(processor, samples[0].prompt)
    inputs = processor(images=[images[0]], text=[prompt], return_tensors="pt")
    generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)[0, inputs["input_ids"].shape[1] :].tolist()
    eos = processor.tokenizer.eos_token_id
    greedy = processor.tokenizer.decode(generated[: generated.index(eos)] if eos in generated else generated)
    assert greedy
    scores = lm.loglikelihood([Request(samples[0].prompt, greedy, to_visual, 0, "t", "test"),
                               Request(samples[0].prompt, "zzq", to_visual, 0, "t", "test")])
    assert all(isinstance(s, Loglikelihood) for s in scores)
    assert scores[0][1] is True and scores[1][1] is False
    for (loss, _), cont in zip(scores, [greedy, "zzq"]):
        inputs = processor(images=[images[0]], text=[prompt + cont], return_tensors="pt")
        with torch.no_grad():
            logits = model(**inputs).logits[0].float()
        n = len(processor.tokenizer(cont, add_special_tokens=False)["input_ids"])
        ids = inputs["input_ids"][0, -n:]
        expected = -torch.log_softmax(logits[-n - 1 : -1], -1).gather(-1, ids[:, None]).mean().item()
        assert loss == pytest.approx(expected, rel=1e-4, abs=1e-4)
    assert scores[0][0] < scores[1][0]

    with pytest.raises(NotImplementedError, match="exactly one image"):
        lm.generate_until([Request("q", {}, lambda doc: [], 0, "t", "test")])


@pytest.mark.parametrize("gen_kwargs, message", [({"max_new_tokens": 0}, "max_new_tokens=0 must be"),
                                                 ({"max_new_tokens": -3}, "max_new_tokens=-3 must be"),
                                                 ({"max_new_tokens": 2.5}, "integer max new tokens, not 2.5")])
def test_a_task_asking_for_no_new_tokens_is_refused_not_read_as_unset(gen_kwargs, message):
    from defocus_mllm.evaluation.lmms_eval_plugin import _generation_settings

    with pytest.raises(ValueError, match=message):
        _generation_settings(gen_kwargs, 16)
    assert _generation_settings({"max_new_tokens": "5"}, 16)[0] == 5 and _generation_settings({}, 16)[0] == 16


@pytest.mark.parametrize("args, message", [("batch_size=0", "batch_size=0 must be"),
                                           ("batch_size=auto", "integer batch size, not 'auto'"),
                                           ("max_new_tokens=0", "max_new_tokens=0 must be")])
def test_model_arguments_below_one_are_refused(args, message, model_dir):
    from defocus_mllm.evaluation.lmms_eval_plugin import DefocusLlava

    with pytest.raises(ValueError, match=message):
        DefocusLlava.create_from_arg_string(f"pretrained={model_dir},device=cpu,{args}", {})
