"""Answer normalisation and the soft accuracy of the official VQA evaluation.

This is an independent implementation of the rules of the VQA v2 evaluation
(GT-Vision-Lab/VQA, ``PythonEvaluationTools/vqaEvaluation``), which VQAv2, VizWiz and TextVQA
all score with. It was checked case by case against that script (see ``docs/evaluation.md``).
The rules, including the quirks that decide the numbers:

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
    total_matches = sum(1 for a in refs if a == prediction)
    score = 0.0
    for ref in refs:
        # leave this annotator out: the others that match are all matches minus (possibly) itself
        matches = total_matches - (1 if ref == prediction else 0)
        score += min(1.0, matches / 3.0)
    return score / len(refs)
