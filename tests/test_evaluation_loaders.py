"""Benchmark loaders on tiny fixture datasets in both input layouts (LLaVA-1.5's eval folders and
lmms-lab parquet files), written here with real small images. `make_fixture` is also used by the
end-to-end tests (tests/test_evaluation_e2e.py)."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from defocus_mllm.evaluation import BENCHMARKS, SHORT_ANSWER, BenchmarkDataError, get_benchmark, pope_metrics

COLORS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (255, 0, 255)]


def _image(i: int, size: int = 24) -> Image.Image:
    img = Image.new("RGB", (size, size), COLORS[i % len(COLORS)])
    img.putpixel((i % size, 0), (0, 0, 0))  # every image differs
    return img


def _save(path: Path, i: int) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    _image(i).save(path)
    return path.name


def _png_bytes(i: int) -> bytes:
    buf = io.BytesIO()
    _image(i).save(buf, format="PNG")
    return buf.getvalue()


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _parquet(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=2)  # several row groups on purpose


def _hf_image(i: int) -> dict:
    return {"bytes": _png_bytes(i), "path": f"{i}.png"}


def _q(text: str) -> str:
    return f"{text}\n{SHORT_ANSWER}"


# Each builder writes one benchmark in one layout under `root` and returns the keyword arguments of
# `Benchmark.load` / `run_benchmark` plus what the tests expect.


def vqav2_llava(root: Path) -> dict:
    d = root / "vqav2"
    qs = []
    for i in range(3):
        name = _save(d / "test2015" / f"COCO_test2015_{i:012d}.jpg", i)
        qs.append({"question_id": 100 + i, "image": name, "text": _q(f"What color is image {i}?"), "category": "default"})
    _jsonl(d / "llava_vqav2_mscoco_test-dev2015.jsonl", qs)
    _jsonl(d / "llava_vqav2_mscoco_test2015.jsonl", qs + [{"question_id": 999, "image": "x.jpg", "text": "?"}])
    return {"kwargs": {"data": d}, "count": 3, "scored": False, "submission": 4}


def vqav2_llava_val(root: Path) -> dict:
    d = root / "vqav2val"
    qs, anns = [], []
    for i in range(3):
        name = _save(d / "val2014" / f"COCO_val2014_{i:012d}.jpg", i)
        qs.append({"question_id": 200 + i, "image": name, "text": _q(f"How many things {i}?")})
        anns.append({"question_id": 200 + i, "answer_type": "number" if i else "yes/no",
                     "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": j + 1}
                                 for j, a in enumerate(["2"] * 4 + ["two"] * 3 + ["3"] * 3)]})
    _jsonl(d / "llava_vqav2_val.jsonl", qs)
    (d / "v2_mscoco_val2014_annotations.json").write_text(json.dumps({"annotations": anns}))
    return {"kwargs": {"data": d, "question_file": d / "llava_vqav2_val.jsonl", "image_folder": d / "val2014",
                       "annotation_file": d / "v2_mscoco_val2014_annotations.json"},
            "count": 3, "scored": True, "submission": 3}


def vqav2_hf(root: Path) -> dict:
    d = root / "VQAv2"
    val = [{"question_id": 300 + i, "question": f"What is {i}?", "image": _hf_image(i), "answer_type": "other",
            "answers": [{"answer": "red", "answer_confidence": "yes", "answer_id": j} for j in range(1, 11)]}
           for i in range(5)]
    test = [{"question_id": 400 + i, "question": f"What is {i}?", "image": _hf_image(i), "answer_type": None,
             "answers": None} for i in range(2)]
    _parquet(d / "data" / "validation-00000-of-00001.parquet", val)
    _parquet(d / "data" / "testdev-00000-of-00001.parquet", test)
    return {"kwargs": {"data": d, "split": "validation"}, "count": 5, "scored": True, "submission": 5}


def gqa_llava(root: Path) -> dict:
    d = root / "gqa"
    qs, gt = [], {}
    for i in range(4):
        name = _save(d / "data" / "images" / f"n{i}.jpg", i)
        qs.append({"question_id": f"20{i}", "image": name, "text": _q(f"Is it {i}?")})
        gt[f"20{i}"] = {"answer": "yes" if i % 2 else "no", "imageId": f"n{i}", "isBalanced": True,
                        "types": {"structural": "verify", "semantic": "attr", "detailed": "existC"}}
    _jsonl(d / "llava_gqa_testdev_balanced.jsonl", qs)
    (d / "data" / "testdev_balanced_questions.json").write_text(json.dumps(gt))
    return {"kwargs": {"data": d}, "count": 4, "scored": True}


def gqa_hf(root: Path) -> dict:
    d = root / "GQA"
    qs = [{"id": f"q{i}", "imageId": f"n{i % 2}", "question": f"Where is {i}?", "answer": "left",
           "fullAnswer": "It is on the left.", "isBalanced": True,
           "types": {"structural": "query", "semantic": "rel", "detailed": "relS"}} for i in range(3)]
    ims = [{"id": f"n{i}", "image": _hf_image(i)} for i in range(2)]
    _parquet(d / "testdev_balanced_instructions" / "testdev-00000-of-00001.parquet", qs)
    _parquet(d / "testdev_balanced_images" / "testdev-00000-of-00001.parquet", ims)
    return {"kwargs": {"data": d}, "count": 3, "scored": True}


def textvqa_llava(root: Path) -> dict:
    d = root / "textvqa"
    qs, anns = [], []
    for i, (img, q) in enumerate([("a1", "what brand is this?"), ("a1", "what number is shown?"), ("b2", "what does it say?")]):
        _save(d / "train_images" / f"{img}.jpg", i)
        # LLaVA's file stores the image id as question_id, so two questions on one image share it
        qs.append({"question_id": img, "image": f"{img}.jpg",
                   "text": f"{q}\nReference OCR token: ACME, 42\n{SHORT_ANSWER}"})
        anns.append({"question_id": 500 + i, "image_id": img, "question": q.capitalize(), "answers": ["acme"] * 10})
    _jsonl(d / "llava_textvqa_val_v051_ocr.jsonl", qs)
    (d / "TextVQA_0.5.1_val.json").write_text(json.dumps({"data": anns}))
    return {"kwargs": {"data": d}, "count": 3, "scored": True}


def textvqa_hf(root: Path) -> dict:
    d = root / "textvqa_hf"
    rows = [{"question_id": 600 + i, "question": f"what is written {i}?", "image": _hf_image(i),
             "answers": ["stop"] * 10, "ocr_tokens": ["STOP", "sign"]} for i in range(3)]
    _parquet(d / "data" / "validation-00000-of-00001.parquet", rows)
    return {"kwargs": {"data": d}, "count": 3, "scored": True}


def vizwiz_llava(root: Path) -> dict:
    d = root / "vizwiz"
    qs = []
    for i in range(3):
        name = _save(d / "test" / f"VizWiz_test_{i:08d}.jpg", i)
        qs.append({"question_id": i, "image": name,
                   "text": f"What is this {i}?\nWhen the provided information is insufficient, respond with "
                           f"'Unanswerable'.\n{SHORT_ANSWER}"})
    _jsonl(d / "llava_test.jsonl", qs)
    return {"kwargs": {"data": d}, "count": 3, "scored": False, "submission": 3}


def vizwiz_hf(root: Path) -> dict:
    d = root / "VizWiz-VQA"
    rows = [{"question_id": f"VizWiz_val_{i:08d}", "question": f"What is {i}?", "image": _hf_image(i),
             "answers": ["unanswerable"] * 6 + ["blue"] * 4, "category": "other"} for i in range(3)]
    _parquet(d / "data" / "val-00000-of-00001.parquet", rows)
    return {"kwargs": {"data": d}, "count": 3, "scored": True, "submission": 3}


def pope_llava(root: Path) -> dict:
    d = root / "pope"
    qs, labels = [], {}
    qid = 1
    for cat in ("adversarial", "popular", "random"):
        labels[cat] = []
        for k in range(2):
            name = _save(d / "val2014" / f"COCO_val2014_{qid:012d}.jpg", qid)
            text = f"Is there a dog in the image {qid}?"
            qs.append({"question_id": qid, "image": name, "text": _q(text), "category": cat})
            labels[cat].append({"question_id": k + 1, "image": name, "text": text, "label": "yes" if k == 0 else "no"})
            qid += 1
    _jsonl(d / "llava_pope_test.jsonl", qs)
    for cat, rows in labels.items():
        _jsonl(d / "coco" / f"coco_pope_{cat}.json", rows)
    return {"kwargs": {"data": d}, "count": 6, "scored": True}


def pope_hf(root: Path) -> dict:
    d = root / "POPE"
    rows = [{"id": str(i), "question_id": str(i + 1), "question": f"Is there a cat {i}?", "answer": "yes" if i % 2 else "no",
             "image_source": f"COCO_val2014_{i:012d}", "image": _hf_image(i),
             "category": ("adversarial", "popular", "random")[i % 3]} for i in range(6)]
    _parquet(d / "data" / "test-00000-of-00001.parquet", rows)
    return {"kwargs": {"data": d}, "count": 6, "scored": True}


def scienceqa_llava(root: Path) -> dict:
    d = root / "scienceqa"
    items, problems = [], {}
    for i in range(4):
        pid = str(10 + i)
        choices = ["cat", "dog", "bird"][: 2 + i % 2]
        problems[pid] = {"question": f"Which animal {i}?", "choices": choices, "answer": i % len(choices),
                         "hint": "", "split": "test"}
        opts = "\n".join(f"{'ABC'[j]}. {c}" for j, c in enumerate(choices))
        item = {"id": pid, "conversations": [{"from": "human", "value": f"<image>\nContext: N/A\nWhich animal {i}?\n{opts}"},
                                             {"from": "gpt", "value": "ABC"[i % len(choices)]}]}
        if i != 3:  # the last one has no image: not part of ScienceQA-IMG
            _save(d / "images" / "test" / pid / "image.png", i)
            item["image"] = f"{pid}/image.png"
        items.append(item)
    (d / "llava_test_CQM-A.json").write_text(json.dumps(items))
    (d / "problems.json").write_text(json.dumps(problems))
    (d / "pid_splits.json").write_text(json.dumps({"test": list(problems)}))
    return {"kwargs": {"data": d}, "count": 3, "scored": True}


def scienceqa_hf(root: Path) -> dict:
    d = root / "ScienceQA"
    rows = [{"image": _hf_image(i), "question": f"Which is {i}?", "choices": ["x", "y", "z"], "answer": i % 3,
             "hint": "A hint." if i == 0 else "", "subject": "natural science"} for i in range(3)]
    _parquet(d / "ScienceQA-IMG" / "test-00000-of-00001.parquet", rows)
    return {"kwargs": {"data": d}, "count": 3, "scored": True}


def mme_llava(root: Path) -> dict:
    """LLaVA-1.5's MME layout as released: ``llava_mme.jsonl`` uses the image path as ``question_id`` and
    asks without MME's " Please answer yes or no." (LLaVA's instruction instead); the release keeps the
    answers in ``<category>/questions_answers_YN/<stem>.txt`` (categories with ``images/``) or beside the
    image, and some of its questions have two spaces before "Please"."""
    d = root / "MME"
    img_root = d / "MME_Benchmark_release_version"
    qs = []
    layout = [("artwork", "images/10002.jpg", "questions_answers_YN/10002.txt", " "),
              ("code_reasoning", "0020.png", "0020.txt", "  ")]
    for n, (cat, img, txt, space) in enumerate(layout):
        _save(img_root / cat / img, n)
        q_yes, q_no = f"Is this {cat} A?", f"Is this {cat} B?"
        (img_root / cat / txt).parent.mkdir(parents=True, exist_ok=True)
        (img_root / cat / txt).write_text(f"{q_yes}{space}Please answer yes or no.\tYes\n"
                                          f"{q_no}{space}Please answer yes or no.\tNo\n")
        for q in (q_yes, q_no):
            qs.append({"question_id": f"{cat}/{img}", "image": f"{cat}/{img}", "text": _q(q), "category": cat})
    _jsonl(d / "llava_mme.jsonl", qs)
    return {"kwargs": {"data": d}, "count": 4, "scored": True}


def mme_hf(root: Path) -> dict:
    d = root / "MME_hf"
    rows = []
    for n, cat in enumerate(["existence", "existence", "numerical_calculation"]):
        for ans in ("Yes", "No"):
            rows.append({"question_id": f"{cat}/{n}.png", "image": _hf_image(n), "question": f"Q {n} {ans}? Please answer yes or no.",
                         "answer": ans, "category": cat})
    _parquet(d / "data" / "test-00000-of-00001.parquet", rows)
    return {"kwargs": {"data": d}, "count": 6, "scored": True}


def mmbench_llava(root: Path) -> dict:
    d = root / "mmbench"
    d.mkdir(parents=True, exist_ok=True)
    header = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image", "source", "l2-category",
              "comment", "split"]
    rows = [
        [0, "What colour is it?", "nan", "red", "green", "blue", "yellow", "A", "color", "", "s", "l2", "nan", "dev"],
        [1, "Which shape?", "Look closely.", "circle", "square", "nan", "nan", "B", "shape", "", "s", "l2", "nan", "dev"],
        [2, 'Say "hi"?', "nan", "yes", "no", "maybe", "nan", "C", "misc", "", "s", "l2", "nan", "dev"],
    ]
    lines = ["\t".join(header)]
    for i, r in enumerate(rows):
        r[9] = base64.b64encode(_png_bytes(i)).decode()
        lines.append("\t".join(str(x) if '"' not in str(x) else '"' + str(x).replace('"', '""') + '"' for x in r))
    (d / "mmbench_dev_20230712.tsv").write_text("\n".join(lines) + "\n")
    return {"kwargs": {"data": d}, "count": 4 + 2 + 3, "scored": True}


def mmbench_hf(root: Path) -> dict:
    d = root / "MMBench" / "en"
    rows = [{"index": i, "question": f"Pick {i}", "hint": None, "A": "a", "B": "b", "C": "c" if i else None,
             "D": None, "answer": "AB"[i % 2], "category": "cat", "image": _hf_image(i), "source": "s",
             "L2-category": "l2", "comment": None, "split": "dev"} for i in range(3)]
    _parquet(d / "dev-00000-of-00001.parquet", rows)
    return {"kwargs": {"data": d}, "count": 2 + 3 + 3, "scored": True}


FIXTURES = {
    ("vqav2", "llava"): vqav2_llava,
    ("vqav2", "llava-val"): vqav2_llava_val,
    ("vqav2", "hf"): vqav2_hf,
    ("gqa", "llava"): gqa_llava,
    ("gqa", "hf"): gqa_hf,
    ("textvqa", "llava"): textvqa_llava,
    ("textvqa", "hf"): textvqa_hf,
    ("vizwiz", "llava"): vizwiz_llava,
    ("vizwiz", "hf"): vizwiz_hf,
    ("pope", "llava"): pope_llava,
    ("pope", "hf"): pope_hf,
    ("scienceqa", "llava"): scienceqa_llava,
    ("scienceqa", "hf"): scienceqa_hf,
    ("mme", "llava"): mme_llava,
    ("mme", "hf"): mme_hf,
    ("mmbench", "llava"): mmbench_llava,
    ("mmbench", "hf"): mmbench_hf,
}


def make_fixture(name: str, layout: str, root: Path) -> dict:
    if name == "easy-vqa":
        return {"kwargs": {}, "count": None, "scored": True}
    return FIXTURES[(name, layout)](root)


# ------------------------------------------------------------------ tests


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


def test_malformed_question_line_names_file_and_line(tmp_path):
    fx = vqav2_llava(tmp_path)
    qfile = fx["kwargs"]["data"] / "llava_vqav2_mscoco_test-dev2015.jsonl"
    with qfile.open("a") as f:
        f.write('{"question_id": 7, "image": "x.jpg", "text": \n')
    with pytest.raises(BenchmarkDataError, match=r"llava_vqav2_mscoco_test-dev2015\.jsonl:4: not valid JSON"):
        get_benchmark("vqav2").load(**fx["kwargs"])


def test_missing_key_names_question_id(tmp_path):
    fx = vqav2_llava(tmp_path)
    qfile = fx["kwargs"]["data"] / "llava_vqav2_mscoco_test-dev2015.jsonl"
    with qfile.open("a") as f:
        f.write(json.dumps({"question_id": 77, "text": "no image?"}) + "\n")
    with pytest.raises(BenchmarkDataError, match=r":4 \(question_id=77\): missing key\(s\) 'image'"):
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
    _parquet(d / "data" / "test-00000-of-00001.parquet",
             [{"question_id": "q1", "question": "Is it?", "answer": "yes", "category": "random",
               "image": {"bytes": b"not an image", "path": "x.png"}}])
    s = get_benchmark("pope").load(data=d)[0]
    with pytest.raises(BenchmarkDataError, match=r"test-00000-of-00001\.parquet \(row 0.*question 'q1'"):
        s.load_image()


# ------------------------------------------------------------------ issue 24: labels and columns checked at load


def _relabel_pope_llava(d: Path, labels: dict[str, str]) -> None:
    for f in sorted((d / "coco").glob("coco_pope_*.json")):
        rows = [json.loads(line) for line in f.read_text().splitlines()]
        _jsonl(f, [{**r, "label": labels[r["label"]]} for r in rows])


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
    _parquet(path, [{**r, "answer": "1" if r["answer"] == "yes" else "0"} for r in rows])
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
