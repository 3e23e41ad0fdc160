"""Tiny fixture datasets of every benchmark in both input layouts (LLaVA-1.5's eval folders and lmms-lab parquet
files), with real small images: the loader, end-to-end and official-rule tests all build their data with these."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from defocus_mllm.prompts import SHORT_ANSWER_INSTRUCTION

COLORS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (255, 0, 255)]


def _image(i: int, size: int = 24) -> Image.Image:
    img = Image.new("RGB", (size, size), COLORS[i % len(COLORS)])
    img.putpixel((i % size, 0), (0, 0, 0))  # every image differs
    return img


def _save(path: Path, i: int) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    _image(i).save(path)
    return path.name


def png_bytes(i: int) -> bytes:
    buf = io.BytesIO()
    _image(i).save(buf, format="PNG")
    return buf.getvalue()


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def write_parquet(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=2)  # several row groups on purpose


def hf_image(i: int) -> dict:
    return {"bytes": png_bytes(i), "path": f"{i}.png"}


def _q(text: str) -> str:
    return f"{text}\n{SHORT_ANSWER_INSTRUCTION}"


# Each builder writes one benchmark in one layout under `root` and returns the keyword arguments of
# `Benchmark.load` / `run_benchmark` plus what the tests expect.


def vqav2_llava(root: Path) -> dict:
    d = root / "vqav2"
    qs = []
    for i in range(3):
        name = _save(d / "test2015" / f"COCO_test2015_{i:012d}.jpg", i)
        qs.append({"question_id": 100 + i, "image": name, "text": _q(f"What color is image {i}?"), "category": "default"})
    write_jsonl(d / "llava_vqav2_mscoco_test-dev2015.jsonl", qs)
    write_jsonl(d / "llava_vqav2_mscoco_test2015.jsonl", qs + [{"question_id": 999, "image": "x.jpg", "text": "?"}])
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
    write_jsonl(d / "llava_vqav2_val.jsonl", qs)
    (d / "v2_mscoco_val2014_annotations.json").write_text(json.dumps({"annotations": anns}))
    return {"kwargs": {"data": d, "question_file": d / "llava_vqav2_val.jsonl", "image_folder": d / "val2014",
                       "annotation_file": d / "v2_mscoco_val2014_annotations.json"},
            "count": 3, "scored": True, "submission": 3}


def vqav2_hf(root: Path) -> dict:
    d = root / "VQAv2"
    val = [{"question_id": 300 + i, "question": f"What is {i}?", "image": hf_image(i), "answer_type": "other",
            "answers": [{"answer": "red", "answer_confidence": "yes", "answer_id": j} for j in range(1, 11)]}
           for i in range(5)]
    test = [{"question_id": 400 + i, "question": f"What is {i}?", "image": hf_image(i), "answer_type": None,
             "answers": None} for i in range(2)]
    write_parquet(d / "data" / "validation-00000-of-00001.parquet", val)
    write_parquet(d / "data" / "testdev-00000-of-00001.parquet", test)
    return {"kwargs": {"data": d, "split": "validation"}, "count": 5, "scored": True, "submission": 5}


def gqa_llava(root: Path) -> dict:
    d = root / "gqa"
    qs, gt = [], {}
    for i in range(4):
        name = _save(d / "data" / "images" / f"n{i}.jpg", i)
        qs.append({"question_id": f"20{i}", "image": name, "text": _q(f"Is it {i}?")})
        gt[f"20{i}"] = {"answer": "yes" if i % 2 else "no", "imageId": f"n{i}", "isBalanced": True,
                        "types": {"structural": "verify", "semantic": "attr", "detailed": "existC"}}
    write_jsonl(d / "llava_gqa_testdev_balanced.jsonl", qs)
    (d / "data" / "testdev_balanced_questions.json").write_text(json.dumps(gt))
    return {"kwargs": {"data": d}, "count": 4, "scored": True}


def gqa_hf(root: Path) -> dict:
    d = root / "GQA"
    qs = [{"id": f"q{i}", "imageId": f"n{i % 2}", "question": f"Where is {i}?", "answer": "left",
           "fullAnswer": "It is on the left.", "isBalanced": True,
           "types": {"structural": "query", "semantic": "rel", "detailed": "relS"}} for i in range(3)]
    ims = [{"id": f"n{i}", "image": hf_image(i)} for i in range(2)]
    write_parquet(d / "testdev_balanced_instructions" / "testdev-00000-of-00001.parquet", qs)
    write_parquet(d / "testdev_balanced_images" / "testdev-00000-of-00001.parquet", ims)
    return {"kwargs": {"data": d}, "count": 3, "scored": True}


def textvqa_llava(root: Path) -> dict:
    d = root / "textvqa"
    qs, anns = [], []
    for i, (img, q) in enumerate([("a1", "what brand is this?"), ("a1", "what number is shown?"), ("b2", "what does it say?")]):
        _save(d / "train_images" / f"{img}.jpg", i)
        # LLaVA's file stores the image id as question_id, so two questions on one image share it
        qs.append({"question_id": img, "image": f"{img}.jpg",
                   "text": f"{q}\nReference OCR token: ACME, 42\n{SHORT_ANSWER_INSTRUCTION}"})
        anns.append({"question_id": 500 + i, "image_id": img, "question": q.capitalize(), "answers": ["acme"] * 10})
    write_jsonl(d / "llava_textvqa_val_v051_ocr.jsonl", qs)
    (d / "TextVQA_0.5.1_val.json").write_text(json.dumps({"data": anns}))
    return {"kwargs": {"data": d}, "count": 3, "scored": True}


def textvqa_hf(root: Path) -> dict:
    d = root / "textvqa_hf"
    rows = [{"question_id": 600 + i, "question": f"what is written {i}?", "image": hf_image(i),
             "answers": ["stop"] * 10, "ocr_tokens": ["STOP", "sign"]} for i in range(3)]
    write_parquet(d / "data" / "validation-00000-of-00001.parquet", rows)
    return {"kwargs": {"data": d}, "count": 3, "scored": True}


def vizwiz_llava(root: Path) -> dict:
    d = root / "vizwiz"
    qs = []
    for i in range(3):
        name = _save(d / "test" / f"VizWiz_test_{i:08d}.jpg", i)
        qs.append({"question_id": i, "image": name,
                   "text": f"What is this {i}?\nWhen the provided information is insufficient, respond with "
                           f"'Unanswerable'.\n{SHORT_ANSWER_INSTRUCTION}"})
    write_jsonl(d / "llava_test.jsonl", qs)
    return {"kwargs": {"data": d}, "count": 3, "scored": False, "submission": 3}


def vizwiz_hf(root: Path) -> dict:
    d = root / "VizWiz-VQA"
    rows = [{"question_id": f"VizWiz_val_{i:08d}", "question": f"What is {i}?", "image": hf_image(i),
             "answers": ["unanswerable"] * 6 + ["blue"] * 4, "category": "other"} for i in range(3)]
    write_parquet(d / "data" / "val-00000-of-00001.parquet", rows)
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
    write_jsonl(d / "llava_pope_test.jsonl", qs)
    for cat, rows in labels.items():
        write_jsonl(d / "coco" / f"coco_pope_{cat}.json", rows)
    return {"kwargs": {"data": d}, "count": 6, "scored": True}


def pope_hf(root: Path) -> dict:
    d = root / "POPE"
    rows = [{"id": str(i), "question_id": str(i + 1), "question": f"Is there a cat {i}?", "answer": "yes" if i % 2 else "no",
             "image_source": f"COCO_val2014_{i:012d}", "image": hf_image(i),
             "category": ("adversarial", "popular", "random")[i % 3]} for i in range(6)]
    write_parquet(d / "data" / "test-00000-of-00001.parquet", rows)
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
    rows = [{"image": hf_image(i), "question": f"Which is {i}?", "choices": ["x", "y", "z"], "answer": i % 3,
             "hint": "A hint." if i == 0 else "", "subject": "natural science"} for i in range(3)]
    write_parquet(d / "ScienceQA-IMG" / "test-00000-of-00001.parquet", rows)
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
    write_jsonl(d / "llava_mme.jsonl", qs)
    return {"kwargs": {"data": d}, "count": 4, "scored": True}


def mme_hf(root: Path) -> dict:
    d = root / "MME_hf"
    rows = []
    for n, cat in enumerate(["existence", "existence", "numerical_calculation"]):
        for ans in ("Yes", "No"):
            rows.append({"question_id": f"{cat}/{n}.png", "image": hf_image(n), "question": f"Q {n} {ans}? Please answer yes or no.",
                         "answer": ans, "category": cat})
    write_parquet(d / "data" / "test-00000-of-00001.parquet", rows)
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
        r[9] = base64.b64encode(png_bytes(i)).decode()
        lines.append("\t".join(str(x) if '"' not in str(x) else '"' + str(x).replace('"', '""') + '"' for x in r))
    (d / "mmbench_dev_20230712.tsv").write_text("\n".join(lines) + "\n")
    return {"kwargs": {"data": d}, "count": 4 + 2 + 3, "scored": True}


def mmbench_hf(root: Path) -> dict:
    d = root / "MMBench" / "en"
    rows = [{"index": i, "question": f"Pick {i}", "hint": None, "A": "a", "B": "b", "C": "c" if i else None,
             "D": None, "answer": "AB"[i % 2], "category": "cat", "image": hf_image(i), "source": "s",
             "L2-category": "l2", "comment": None, "split": "dev"} for i in range(3)]
    write_parquet(d / "dev-00000-of-00001.parquet", rows)
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
    """Write benchmark `name` in `layout` under `root`; `{"kwargs": load / run_benchmark arguments, "count": questions,
    "scored": whether answers are known}` (easy-VQA needs no files)."""
    if name == "easy-vqa":
        return {"kwargs": {}, "count": None, "scored": True}
    return FIXTURES[(name, layout)](root)
