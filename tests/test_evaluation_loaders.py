"""Benchmark loaders on tiny fixture datasets in both input layouts (LLaVA-1.5's eval folders and
lmms-lab parquet files), built by `evaluation_fixtures.make_fixture` with real small images."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from defocus_mllm.evaluation import BENCHMARKS, BenchmarkDataError, get_benchmark
from defocus_mllm.evaluation.benchmarks.pope import pope_metrics
from defocus_mllm.prompts import SHORT_ANSWER_INSTRUCTION as SHORT_ANSWER
from evaluation_fixtures import (
    COLORS,
    FIXTURES,
    gqa_hf,
    gqa_llava,
    make_fixture,
    mmbench_hf,
    mmbench_llava,
    mme_llava,
    pope_hf,
    pope_llava,
    scienceqa_hf,
    scienceqa_llava,
    textvqa_hf,
    textvqa_llava,
    vqav2_hf,
    vqav2_llava,
    vqav2_llava_val,
    write_jsonl,
    write_parquet,
)


def test_every_benchmark_has_fixtures_in_both_layouts():
    names = {n for n, _ in FIXTURES}
    assert names | {"easy-vqa"} == set(BENCHMARKS)
    for n in names:
        assert (n, "hf") in FIXTURES and any(k[0] == n and k[1].startswith("llava") for k in FIXTURES)


@pytest.mark.parametrize("name,layout", sorted(FIXTURES))
def test_loader_reads_fixture(name, layout, tmp_path):
    fx = make_fixture(name, layout, tmp_path)
    bench = get_benchmark(name)
    samples = bench.load(**fx["kwargs"])
    assert len(samples) == fx["count"]
    ids = [s.question_id for s in samples]
    assert len(set(ids)) == len(ids), "question ids must be unique"
    for s in samples:
        # the instruction appears exactly once, at the end
        assert s.prompt.endswith(bench.instruction) and s.prompt.count(bench.instruction) == 1
        img = s.load_image()
        assert img.mode == "RGB" and img.size == (24, 24)
        assert (s.answers is not None) == fx["scored"]
    assert bench.split


def test_llava_vqav2_prompt_is_not_doubled_and_ids_kept(tmp_path):
    fx = vqav2_llava(tmp_path)
    samples = get_benchmark("vqav2").load(**fx["kwargs"])
    assert [s.question_id for s in samples] == [100, 101, 102]
    assert samples[0].prompt == f"What color is image 0?\n{SHORT_ANSWER}"


def test_textvqa_llava_matches_annotations_by_image_and_question(tmp_path):
    samples = get_benchmark("textvqa").load(**textvqa_llava(tmp_path)["kwargs"])
    assert [s.question_id for s in samples] == [500, 501, 502]
    assert samples[1].prompt.startswith("what number is shown?\nReference OCR token: ACME, 42\n")


def test_textvqa_hf_puts_ocr_tokens_in_prompt(tmp_path):
    s = get_benchmark("textvqa").load(**textvqa_hf(tmp_path)["kwargs"])[0]
    assert s.prompt == f"what is written 0?\nReference OCR token: STOP, sign\n{SHORT_ANSWER}"


def test_mme_llava_reads_answers_from_release_txt_files(tmp_path):
    samples = get_benchmark("mme").load(**mme_llava(tmp_path)["kwargs"])
    assert [s.answers[0] for s in samples] == ["Yes", "No", "Yes", "No"]
    assert [s.question_id for s in samples][:2] == ["artwork/images/10002.jpg#0", "artwork/images/10002.jpg#1"]
    assert samples[0].meta["image_key"] == samples[1].meta["image_key"] == "artwork/10002"
    assert samples[2].meta["category"] == "code_reasoning"


def test_pope_llava_pairs_labels_in_order_and_checks_images(tmp_path):
    fx = pope_llava(tmp_path)
    samples = get_benchmark("pope").load(**fx["kwargs"])
    assert [s.answers[0] for s in samples] == ["yes", "no"] * 3
    assert [s.meta["category"] for s in samples[::2]] == ["adversarial", "popular", "random"]
    label_file = fx["kwargs"]["data"] / "coco" / "coco_pope_popular.json"
    lines = label_file.read_text().splitlines()
    label_file.write_text("\n".join(reversed(lines)) + "\n")
    with pytest.raises(BenchmarkDataError, match="coco_pope_popular.json"):
        get_benchmark("pope").load(**fx["kwargs"])


def test_scienceqa_llava_keeps_image_questions_and_uses_problems(tmp_path):
    samples = get_benchmark("scienceqa").load(**scienceqa_llava(tmp_path)["kwargs"])
    assert [s.question_id for s in samples] == ["10", "11", "12"]
    assert [s.answers[0] for s in samples] == ["A", "B", "A"]
    assert [s.meta["num_choices"] for s in samples] == [2, 3, 2]
    assert samples[0].prompt.startswith("Context: N/A\nWhich animal 0?\nA. cat\nB. dog\nAnswer with")


def test_scienceqa_hf_prompt(tmp_path):
    s = get_benchmark("scienceqa").load(**scienceqa_hf(tmp_path)["kwargs"])[0]
    assert s.prompt == ("Context: A hint.\nWhich is 0?\nA. x\nB. y\nC. z\n"
                        "Answer with the option's letter from the given choices directly.")


def test_mmbench_rotates_a_file_without_copies(tmp_path):
    samples = get_benchmark("mmbench").load(**mmbench_llava(tmp_path)["kwargs"])
    q0 = [s for s in samples if s.meta["index"] % 1_000_000 == 0]
    assert [s.question_id for s in q0] == [0, 1_000_000, 2_000_000, 3_000_000]
    # answer "A" (red) moves one place up in each pass
    assert [s.answers[0] for s in q0] == ["A", "D", "C", "B"]
    assert [s.meta["options"][s.answers[0]] for s in q0] == ["red"] * 4
    assert q0[1].prompt.startswith("What colour is it?\nA. green\nB. blue\nC. yellow\nD. red\n")
    q1 = [s for s in samples if s.meta["index"] % 1_000_000 == 1]
    assert len(q1) == 2 and q1[0].prompt.startswith("Look closely.\nWhich shape?\nA. circle\nB. square\nAnswer")
    q2 = [s for s in samples if s.meta["index"] % 1_000_000 == 2]
    assert q2[0].prompt.startswith('Say "hi"?\nA. yes')
    # --limit counts questions, keeping all their passes
    assert len(get_benchmark("mmbench").load(**mmbench_llava(tmp_path / "b")["kwargs"], limit=2)) == 6


def test_gqa_hf_joins_image_tables(tmp_path):
    samples = get_benchmark("gqa").load(**gqa_hf(tmp_path)["kwargs"])
    assert samples[0].load_image().getpixel((5, 5)) == COLORS[0]
    assert samples[1].load_image().getpixel((5, 5)) == COLORS[1]
    assert samples[2].load_image().getpixel((5, 5)) == COLORS[0]


def test_easy_vqa_loads_package_questions():
    bench = get_benchmark("easy-vqa")
    samples = bench.load(limit=7)
    assert len(samples) == 7 and [s.question_id for s in samples] == list(range(7))
    assert samples[0].answers[0] in {"circle", "green", "red", "gray", "yes", "teal", "black", "rectangle", "yellow",
                                      "triangle", "brown", "blue", "no"}
    assert samples[0].load_image().size == (64, 64)
    assert len(bench.load(check_images=False)) == 9673


# ------------------------------------------------------------------ scoring plumbing (no model)


def test_scores_with_perfect_and_wrong_answers(tmp_path):
    bench = get_benchmark("pope")
    samples = bench.load(**pope_llava(tmp_path)["kwargs"])
    perfect = bench.score(samples, {s.question_id: s.answers[0].capitalize() + "." for s in samples})
    assert perfect["accuracy"] == 100.0 and perfect["f1"] == 100.0 and perfect["yes_ratio"] == 50.0
    assert set(perfect["per_split"]) == {"adversarial", "popular", "random"}
    always_yes = bench.score(samples, {s.question_id: "Yes" for s in samples})
    assert always_yes["accuracy"] == 50.0 and always_yes["yes_ratio"] == 100.0
    assert always_yes["per_split"]["random"] == pope_metrics(["Yes", "Yes"], ["yes", "no"])


def test_mmbench_circular_scoring_through_samples(tmp_path):
    bench = get_benchmark("mmbench")
    samples = bench.load(**mmbench_llava(tmp_path)["kwargs"])
    answers = {s.question_id: s.answers[0] for s in samples}
    # question 1 wrong in its second copy only: right in vanilla, wrong in circular
    wrong = next(s for s in samples if s.meta["index"] == 1_000_001)
    answers[wrong.question_id] = "A" if wrong.answers[0] != "A" else "B"
    m = bench.score(samples, answers)
    assert m["questions"] == 3 and m["circular"] == pytest.approx(200 / 3) and m["vanilla"] == 100.0
    # answering with the option text works too
    by_text = {s.question_id: s.meta["options"][s.answers[0]] for s in samples}
    assert bench.score(samples, by_text)["circular"] == 100.0


def test_vqa_scoring_post_processes_answers(tmp_path):
    bench = get_benchmark("vqav2")
    samples = bench.load(**vqav2_llava_val(tmp_path)["kwargs"])
    # 4 x "2" + 3 x "two" normalise to seven "2": full marks for "Two."; "3" has 3 votes: 0.9
    m = bench.score(samples, {200: "Two.", 201: "3", 202: "four"})
    assert m["accuracy"] == pytest.approx(100 * (1.0 + 0.9 + 0.0) / 3)
    assert m["per_answer_type"] == {"number": pytest.approx(45.0), "yes/no": 100.0}
    sub = bench.submission(samples, {200: "Two.", 201: "3", 202: "four"}, None)
    assert sub == [{"question_id": 200, "answer": "2"}, {"question_id": 201, "answer": "3"},
                   {"question_id": 202, "answer": "4"}]


def test_mme_scoring_through_samples(tmp_path):
    bench = get_benchmark("mme")
    samples = bench.load(**mme_llava(tmp_path)["kwargs"])
    answers = {s.question_id: "Yes" for s in samples}
    m = bench.score(samples, answers)
    # each image: one right of two -> acc 50, acc+ 0 -> 50 per subtask
    assert m["perception"] == 50.0 and m["cognition"] == 50.0
    assert bench.headline_values(m) == {"MME-P": 50.0, "MME-C": 50.0}


# ------------------------------------------------------------------ errors


def test_missing_image_names_file_and_question(tmp_path):
    fx = gqa_llava(tmp_path)
    (fx["kwargs"]["data"] / "data" / "images" / "n2.jpg").unlink()
    with pytest.raises(BenchmarkDataError, match=r"question '202'.*n2\.jpg"):
        get_benchmark("gqa").load(**fx["kwargs"])


@pytest.mark.parametrize("line,error", [
    # a malformed line is named by file and line
    ('{"question_id": 7, "image": "x.jpg", "text": ', r"llava_vqav2_mscoco_test-dev2015\.jsonl:4: not valid JSON"),
    # a missing key by line and question id
    (json.dumps({"question_id": 77, "text": "no image?"}), r":4 \(question_id=77\): missing key\(s\) 'image'"),
])
def test_bad_question_line_names_file_line_and_question(line, error, tmp_path):
    fx = vqav2_llava(tmp_path)
    qfile = fx["kwargs"]["data"] / "llava_vqav2_mscoco_test-dev2015.jsonl"
    with qfile.open("a") as f:
        f.write(line + "\n")
    with pytest.raises(BenchmarkDataError, match=error):
        get_benchmark("vqav2").load(**fx["kwargs"])


def test_unmatched_annotation_names_question(tmp_path):
    fx = gqa_llava(tmp_path)
    ann = fx["kwargs"]["data"] / "data" / "testdev_balanced_questions.json"
    gt = json.loads(ann.read_text())
    del gt["201"]
    ann.write_text(json.dumps(gt))
    with pytest.raises(BenchmarkDataError, match=r"question_id '201' not in"):
        get_benchmark("gqa").load(**fx["kwargs"])


def test_split_choice_and_layout_errors(tmp_path):
    fx = vqav2_hf(tmp_path)
    with pytest.raises(BenchmarkDataError, match=r"several splits \['testdev', 'validation'\]"):
        get_benchmark("vqav2").load(data=fx["kwargs"]["data"])
    with pytest.raises(BenchmarkDataError, match="available splits"):
        get_benchmark("vqav2").load(data=fx["kwargs"]["data"], split="train")
    test = get_benchmark("vqav2").load(data=fx["kwargs"]["data"], split="testdev")
    assert len(test) == 2 and test[0].answers is None
    (tmp_path / "empty").mkdir()
    with pytest.raises(BenchmarkDataError, match="found neither"):
        get_benchmark("pope").load(data=tmp_path / "empty")
    with pytest.raises(BenchmarkDataError, match="needs --data"):
        get_benchmark("pope").load()
    with pytest.raises(BenchmarkDataError, match="does not exist"):
        get_benchmark("pope").load(data=tmp_path / "nope")
    with pytest.raises(KeyError, match="unknown benchmark"):
        get_benchmark("imagenet")


def test_several_configurations_must_be_chosen(tmp_path):
    mmbench_hf(tmp_path)
    cn = tmp_path / "MMBench" / "cn" / "dev-00000-of-00001.parquet"
    cn.parent.mkdir()
    (tmp_path / "MMBench" / "en" / "dev-00000-of-00001.parquet").rename(cn)
    mmbench_hf(tmp_path)  # en again
    with pytest.raises(BenchmarkDataError, match=r"several splits \['cn/dev', 'en/dev'\]"):
        get_benchmark("mmbench").load(data=tmp_path / "MMBench")
    assert len(get_benchmark("mmbench").load(data=tmp_path / "MMBench" / "cn")) == 8
    bench = get_benchmark("mmbench")
    assert len(bench.load(data=tmp_path / "MMBench", split="en/dev")) == 8 and bench.split == "en/dev"
    with pytest.raises(BenchmarkDataError, match=r"--split 'dev' matches several splits \['cn/dev', 'en/dev'\]"):
        get_benchmark("mmbench").load(data=tmp_path / "MMBench", split="dev")


def test_corrupt_embedded_image_names_question(tmp_path):
    d = tmp_path / "POPE"
    write_parquet(d / "data" / "test-00000-of-00001.parquet",
             [{"question_id": "q1", "question": "Is it?", "answer": "yes", "category": "random",
               "image": {"bytes": b"not an image", "path": "x.png"}}])
    s = get_benchmark("pope").load(data=d)[0]
    with pytest.raises(BenchmarkDataError, match=r"test-00000-of-00001\.parquet \(row 0.*question 'q1'"):
        s.load_image()


# ------------------------------------------------------------------ issue 24: labels and columns checked at load


def _relabel_pope_llava(d: Path, labels: dict[str, str]) -> None:
    for f in sorted((d / "coco").glob("coco_pope_*.json")):
        rows = [json.loads(line) for line in f.read_text().splitlines()]
        write_jsonl(f, [{**r, "label": labels[r["label"]]} for r in rows])


@pytest.mark.parametrize("labels", [{"yes": "1", "no": "0"}, {"yes": True, "no": False}, {"yes": "y", "no": "n"}])
def test_pope_labels_other_than_yes_and_no_are_refused_naming_file_and_question(labels, tmp_path):
    fx = pope_llava(tmp_path)
    _relabel_pope_llava(fx["kwargs"]["data"], labels)
    # a model that always says yes would score 100% if any label but "no" counted as a yes
    with pytest.raises(BenchmarkDataError, match=r"line 1 of .*coco_pope_adversarial\.json: the label of question 1 "
                                                 r"is .*; POPE labels must be 'yes' or 'no'"):
        get_benchmark("pope").load(**fx["kwargs"])


def test_pope_parquet_labels_other_than_yes_and_no_are_refused(tmp_path):
    fx = pope_hf(tmp_path)
    path = next(fx["kwargs"]["data"].rglob("*.parquet"))
    rows = pq.read_table(path).to_pylist()
    write_parquet(path, [{**r, "answer": "1" if r["answer"] == "yes" else "0"} for r in rows])
    with pytest.raises(BenchmarkDataError, match=r"test-00000-of-00001\.parquet \(row 0\): the label of question '1' "
                                                 r"is '0'"):
        get_benchmark("pope").load(**fx["kwargs"])


def test_pope_labels_keep_lmms_eval_case_and_space_rule(tmp_path):
    fx = pope_llava(tmp_path)
    _relabel_pope_llava(fx["kwargs"]["data"], {"yes": " Yes", "no": "NO "})
    samples = get_benchmark("pope").load(**fx["kwargs"])
    assert [s.answers[0] for s in samples] == ["yes", "no"] * 3
    with pytest.raises(ValueError, match="POPE label 1 is '1'"):
        pope_metrics(["yes", "yes"], ["yes", "1"])


@pytest.mark.parametrize("name", sorted(n for n, layout in FIXTURES if layout == "hf"))
def test_parquet_files_without_an_image_column_are_named(name, tmp_path):
    fx = make_fixture(name, "hf", tmp_path)
    for path in sorted(Path(tmp_path).rglob("*.parquet")):
        table = pq.read_table(path)
        if "image" in table.column_names:
            pq.write_table(table.drop(["image"]), path)
    with pytest.raises(BenchmarkDataError, match=r"(\.parquet: no|none of its parquet files has an) 'image' column"):
        get_benchmark(name).load(**fx["kwargs"])
