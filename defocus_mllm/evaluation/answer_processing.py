"""Answer normalisation and the soft accuracies of the official VQA evaluations.

Two official answer processors exist and LLaVA-1.5 uses both (``docs/evaluation.md`` says which
benchmark follows which):

* the **VQA evaluation tool** (GT-Vision-Lab/VQA, ``PythonEvaluationTools/vqaEvaluation/vqaEval.py``):
  :func:`normalize_answer` and :func:`vqa_accuracy`, the rules of the VQAv2 server;
* the **EvalAI answer processor** (``EvalAIAnswerProcessor`` in LLaVA's ``llava/eval/m4c_evaluator.py``,
  copied there from MMF): :func:`evalai_answer`, which LLaVA applies to every VQAv2 and VizWiz answer
  before writing the submission file, and :func:`evalai_vqa_accuracy`, the ``TextVQAAccuracyEvaluator``
  of the same file (LLaVA's TextVQA score; lmms-eval scores VizWiz-VQA val the same way).

Both are independent implementations of the official rules, written from reading the code. The VQA
tool's rules, including the quirks that decide the numbers:

1. Newlines and tabs become spaces and the text is stripped (always, for predictions and answers).
2. Punctuation. Each of ``; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !`` is *deleted* when the
   original text contains it next to a space (``"p "`` or ``" p"``) or when the text contains a
   digit-comma-digit sequence anywhere ("1,000"); otherwise it is *replaced by a space*. The
   decision is made per character on the original text, not on the partly processed one.
   Apostrophes, colons, ``#``, ``$``, ``%``, ``&``, ``*`` and the like are never touched.
3. Periods not followed by a digit are deleted ("3.5" keeps its period, "two." loses it). The
   official pattern carries a look-behind typo (``(?!<=\\d)``) that makes it a no-op, so a period
   after a digit is deleted too ("5." becomes "5"). The official call also passes ``re.UNICODE``
   in the *count* position, so at most 32 periods are deleted; we mirror that.
4. Lower-case, split on whitespace, map the number words ``none zero one ... ten`` to digits
   (``none`` becomes ``0``), drop the articles ``a an the``, then map the contraction table
   word by word and join with single spaces.
5. Steps 2-4 are applied to the prediction and to the answers **only when the human answers
   (after step 1) are not all identical**. When all annotators agree, the official code compares
   the raw (whitespace-cleaned) strings, case and punctuation included.
6. Accuracy: for each of the ``n`` human answers, leave it out and count how many of the others
   equal the prediction; ``min(1, matches / 3)``; average over the ``n`` subsets. With 10 answers,
   a prediction given by ``k`` annotators scores
   ``(k * min(1, (k - 1) / 3) + (10 - k) * min(1, k / 3)) / 10``: 0.3 for k=1, 0.6 for k=2, 0.9 for
   k=3 and 1.0 for k >= 4.

Python 3's ``re`` treats every Unicode decimal digit as ``\\d``; the original Python 2 script saw
only ASCII digits. That can only differ on non-ASCII digits next to a comma or a period.

The EvalAI processor (:func:`evalai_answer`) differs from the VQA tool before step 2: it first
lower-cases, *deletes* every ``,`` and ``?``, splits possessives (``'s`` becomes `` 's``: "what's" gives
"what 's", a separate word the contraction table never joins back) and strips. Because the commas are
gone by then, its digit-comma-digit test never fires ("red,white" gives "redwhite" where the VQA tool
gives "red white"). Steps 1-4 follow, always (no "only when the answers differ" rule).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

# Contraction table of the official evaluation (data, reproduced as is: keys with capitals such as
# "Im" can never match because the text is lower-cased first, and "somebody'd" maps *to* the
# apostrophe-free form; both are faithful to the reference).
CONTRACTIONS: dict[str, str] = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll",
    "let's": "let's", "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're",
    "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}

NUMBER_WORDS: dict[str, str] = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}

ARTICLES: frozenset[str] = frozenset({"a", "an", "the"})

# The punctuation characters the official rules remove or turn into spaces (order is irrelevant:
# every decision is taken on the original text).
PUNCTUATION: tuple[str, ...] = (
    ";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!",
)

_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
# A period not followed by a digit (the official look-behind is a typo that never applies).
_PERIOD = re.compile(r"\.(?!\d)")
# The official call passes re.UNICODE (== 32) as `count`: only the first 32 periods go.
_PERIOD_COUNT = 32


def clean_whitespace(text: str) -> str:
    """Step 1 of the official rules: newlines and tabs to spaces, then strip."""
    return text.replace("\n", " ").replace("\t", " ").strip()


def process_punctuation(text: str) -> str:
    """Step 2 and 3: the punctuation and period rules (see the module docstring)."""
    delete_all = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for p in PUNCTUATION:
        if delete_all or (p + " ") in text or (" " + p) in text:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD.sub("", out, count=_PERIOD_COUNT)


def process_digits_articles(text: str) -> str:
    """Step 4: lower-case, number words to digits, drop articles, expand contractions."""
    words = []
    for word in text.lower().split():
        word = NUMBER_WORDS.get(word, word)
        if word not in ARTICLES:
            words.append(word)
    return " ".join(CONTRACTIONS.get(word, word) for word in words)


def normalize_answer(answer: str) -> str:
    """Normalise an answer with the official VQA rules (whitespace, punctuation, digits, articles,
    contractions).

    >>> normalize_answer("Two.")
    '2'
    >>> normalize_answer("a dog")
    'dog'
    >>> normalize_answer("isnt")
    "isn't"
    """
    return process_digits_articles(process_punctuation(clean_whitespace(answer)))


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """Soft VQA accuracy of one prediction against the human answers, in [0, 1].

    Mirrors the official evaluation, including that normalisation is applied only when the human
    answers are not all identical (rule 5 of the module docstring) and that each of the ``n``
    leave-one-out subsets counts matches among the other ``n - 1`` answers. Consequently a single
    reference answer always scores 0 (there is nothing left after leaving it out); pass the answer
    repeated (e.g. ten times) to score against one reference.
    """
    if len(answers) == 0:
        raise ValueError("vqa_accuracy needs at least one reference answer")
    prediction = clean_whitespace(prediction)
    refs = [clean_whitespace(a) for a in answers]
    if len(set(refs)) > 1:
        refs = [process_digits_articles(process_punctuation(a)) for a in refs]
        prediction = process_digits_articles(process_punctuation(prediction))
    return _leave_one_out_accuracy(prediction, refs)


def _leave_one_out_accuracy(prediction: str, refs: Sequence[str]) -> float:
    """Mean over the annotators of `min(1, matches among the others / 3)` for already-processed answers."""
    total_matches = sum(1 for a in refs if a == prediction)
    score = 0.0
    for ref in refs:
        # leave this annotator out: the others that match are all matches minus (possibly) itself
        matches = total_matches - (1 if ref == prediction else 0)
        score += min(1.0, matches / 3.0)
    return score / len(refs)


# ---------------------------------------------------------------------------------------------
# The EvalAI answer processor (LLaVA's m4c_evaluator.py)
# ---------------------------------------------------------------------------------------------

# EvalAIAnswerProcessor.COMMA_STRIP: one or more commas between digits (tested on the text after
# word_tokenize has deleted every comma, so it never matches inside evalai_answer).
_EVALAI_COMMA = re.compile(r"(?<=\d),+(?=\d)")


def _evalai_word_tokenize(text: str) -> str:
    """``EvalAIAnswerProcessor.word_tokenize``: lower-case, delete ``,`` and ``?``, split ``'s``, strip."""
    return text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()


def _evalai_punctuation(text: str) -> str:
    """``EvalAIAnswerProcessor.process_punctuation``: the VQA tool's rule with its own comma pattern."""
    delete_all = _EVALAI_COMMA.search(text) is not None
    out = text
    for p in PUNCTUATION:
        if (p + " ") in text or (" " + p) in text or delete_all:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD.sub("", out, count=_PERIOD_COUNT)


def evalai_answer(answer: str) -> str:
    """An answer as LLaVA-1.5 writes it into the VQAv2 and VizWiz submission files (``EvalAIAnswerProcessor``
    of ``llava/eval/m4c_evaluator.py``): word_tokenize (lower-case, delete ``,`` ``?``, ``'s`` -> `` 's``,
    strip), newlines and tabs to spaces and strip, the punctuation and period rules, then number words,
    articles and contractions as in :func:`normalize_answer`.

    >>> evalai_answer("What's")
    "what 's"
    >>> evalai_answer("red,white")
    'redwhite'
    >>> evalai_answer("Two.")
    '2'
    """
    text = clean_whitespace(_evalai_word_tokenize(answer))
    return process_digits_articles(_evalai_punctuation(text))


def evalai_vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """Soft accuracy of ``TextVQAAccuracyEvaluator`` (``llava/eval/m4c_evaluator.py``), in [0, 1].

    The prediction and **every** human answer go through :func:`evalai_answer` (always, unlike
    :func:`vqa_accuracy`); for each of the ``n`` answers, the others equal to the prediction are counted,
    ``min(1, count / 3)``, averaged over the ``n`` answers (leave-one-out by position, so identical answers
    are removed one at a time). The official evaluator asserts ten answers; any number is accepted here.
    """
    if len(answers) == 0:
        raise ValueError("evalai_vqa_accuracy needs at least one reference answer")
    return _leave_one_out_accuracy(evalai_answer(prediction), [evalai_answer(a) for a in answers])
