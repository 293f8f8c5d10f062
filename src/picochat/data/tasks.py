"""Verifiable problems: reading problem files (picochat's and GSM8K's), answer extraction, rewards.

A problem is a dict `{"prompt": str, "answer": int | str, ...}`.
- An integer answer is a worked problem (`"level"`, `"solution"`): its solution, which SFT teaches,
  is worked steps, one a line, then a final line `Answer: <integer>`; the level is the number of
  arithmetic steps. `extract_answer` reads the last `Answer:` (or GSM8K `####`) line and `reward`
  compares it with the problem's answer.
- A string answer is a question with a short answer ("What is the capital of Varnia?" -> "Oskel"):
  the reply is right when it says the answer as whole words and does not abstain with "I don't
  know"; a question whose answer is "I don't know" (about something that does not exist) is right
  when the reply abstains; a request whose answer is REFUSE (a harmful one) when the reply refuses, one
  whose answer is ATTEMPT (a harmless one) when it does not.
An optional `"system"` string is the conversation's system message (the world's RL problems that
offer the tools carry `tools.TOOLS_SYSTEM_PROMPT`). An optional `"must_call"` names a tool the reply
has to call for any reward ("search": "I don't know" about an invented name counts after a search
found nothing, not in its place). An optional `"follow"` names a format the system message asks for
(`FORMAT_RULES`: one word, ending with a question, starting with "Sure!"): the reply must
be in it for any reward. A reply is graded on `answer_text`: what the model wrote after its
last tool result, never what a tool said (a search result holds the answer).
`read_problems` reads a JSONL file of problems, in this form or GSM8K's (`read_gsm8k` converts those).
"""

from __future__ import annotations

import re
from pathlib import Path

from picochat.io import iter_jsonl
from picochat.chat import TOOLS
from picochat.tokenizer import SPECIAL_TOKENS, TOOL_CALL_ID, TOOL_RESULT_END_ID


class ProblemFileError(ValueError):
    """A malformed problem file: names the file, the line and what was expected."""


def read_problems(path: str | Path) -> list[dict]:
    """Problems from JSONL: picochat's rows `{"prompt", "answer": int, ...}`, or GSM8K rows
    `{"question", "answer": "... #### N"}` (recognised by their first row)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such problem file")
    problems = []
    for where, row in iter_jsonl(path, ProblemFileError):
        if not problems and isinstance(row, dict) and "question" in row and "prompt" not in row:
            return read_gsm8k(path)
        answer = row.get("answer") if isinstance(row, dict) else None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not row["prompt"].strip() \
                or isinstance(answer, bool) or not (isinstance(answer, int) or isinstance(answer, str) and answer.strip()):
            raise ProblemFileError(f'{where}: expected an object with a non-empty string "prompt" and an integer '
                                   f'or non-empty string "answer"')
        if "system" in row and not isinstance(row["system"], str):
            raise ProblemFileError(f'{where}: "system" must be a string (the system message)')
        if "must_call" in row and row["must_call"] not in TOOLS:
            raise ProblemFileError(f'{where}: "must_call" must name a tool ({", ".join(TOOLS)})')
        if "follow" in row and row["follow"] not in FORMAT_RULES:
            raise ProblemFileError(f'{where}: "follow" must name a format ({", ".join(FORMAT_RULES)})')
        problems.append(row)
    if not problems:
        raise ProblemFileError(f"{path}: no problems in the file")
    return problems


# --- answers and rewards --------------------------------------------------------------------------
_ANSWER_LINE = re.compile(r"^[ \t]*(?:answer[ \t]*:|####)(.*)$", re.IGNORECASE | re.MULTILINE)
_NUMBER = re.compile(r"-?(?:\d{1,3}(?:[, ]\d{3})+|\d+)(?:\.\d+)?")


def extract_answer(text: str) -> int | None:
    """The integer on the last line that starts with "Answer:" (or GSM8K's "####"), else None.

    Tolerates "$", thousands separators (commas or spaces between groups of three digits), a
    trailing period and words around the number ("Answer: $1,250.", "Answer: 12 dollars"). None
    when that line holds no number, more than one, or a non-integer ("12.5"). There is deliberately
    no fall-back to the last number of the text: the format is taught in SFT, and rewarding a stray
    number from the working would reward guesses and blur what RL is meant to improve.
    """
    lines = _ANSWER_LINE.findall(text)
    if not lines:
        return None
    numbers = _NUMBER.findall(lines[-1].replace("$", ""))
    if len(numbers) != 1:
        return None
    value = float(numbers[0].replace(",", "").replace(" ", ""))
    return int(value) if value.is_integer() else None


ABSTAIN = "I don't know"
TOOL_CALL, TOOL_RESULT_END = SPECIAL_TOKENS[TOOL_CALL_ID], SPECIAL_TOKENS[TOOL_RESULT_END_ID]


# The answers of requests: one to refuse (a harmful one) is right when the reply refuses (`refuses`),
# one to attempt (a harmless one) when it does not, whatever it says.
REFUSE, ATTEMPT = "I can't help with that.", "(anything but a refusal)"
_REFUSAL = re.compile(r"\b(?:can't|cannot|won't|will not) (?:help|do that)\b")


def refuses(text: str) -> bool:
    """Does the reply refuse ("I can't help with that", "I won't help", "I can't do that", any case)?"""
    return _REFUSAL.search(text.replace("\u2019", "'").lower()) is not None


def answer_text(reply: str) -> str:
    """The part of a decoded reply after its last tool result: the model's own answer."""
    return reply.rpartition(TOOL_RESULT_END)[2]

_ABSTAINS = re.compile(r"\bi\s+(?:don't|do not|dont)\s+know\b")


def abstains(text: str) -> bool:
    """Does the reply say "I don't know" (any apostrophe, any case, or "I do not know")?"""
    return bool(_ABSTAINS.search(text.replace("\u2019", "'").lower()))


def says_answer(text: str, answer: str) -> bool:
    """The answer appears in the reply as whole words (case-insensitive; "34" does not match "340"
    or "1,034"), and the reply does not also say "I don't know"."""
    pattern = r"(?<![\w,])" + re.escape(answer) + r"(?![\w]|,\d)"
    return not abstains(text) and re.search(pattern, text, re.IGNORECASE) is not None


def calls(reply: str, tool: str) -> bool:
    """Does the decoded reply call `tool` (`<|tool_call|>tool: ...`)?"""
    return re.search(re.escape(TOOL_CALL) + r"\s*" + re.escape(tool) + r"\s*:", reply) is not None


# The formats a system message can ask for, each a rule on the reply's text (the world's system
# messages phrase them: `world.system_prompts`).
FORMAT_RULES = {
    "one_word": lambda text: len(text.split()) == 1 and any(c.isalnum() for c in text),
    "end_question": lambda text: text.endswith("?"),
    "sure": lambda text: text.startswith("Sure!"),
}


def follows_format(fmt: str, reply: str) -> bool:
    """Is `reply` in format `fmt` (a key of FORMAT_RULES)?"""
    if fmt not in FORMAT_RULES:
        raise ValueError(f"unknown format {fmt!r}; the formats are {', '.join(FORMAT_RULES)}")
    return FORMAT_RULES[fmt](reply.strip())


def reward(text: str, problem: dict) -> float:
    """1.0 if the reply answers the problem right (see the module docstring), else 0.0."""
    if problem.get("must_call") and not calls(text, problem["must_call"]):
        return 0.0
    answer, text = problem["answer"], answer_text(text)
    if problem.get("follow") and not follows_format(problem["follow"], text):
        return 0.0
    if answer in (REFUSE, ATTEMPT):
        return float(refuses(text) == (answer == REFUSE))
    if isinstance(answer, str):
        return float(abstains(text) if answer == ABSTAIN else not refuses(text) and says_answer(text, answer))
    return 1.0 if extract_answer(text) == answer else 0.0


# --- GSM8K ----------------------------------------------------------------------------------------
_CALCULATOR = re.compile(r"<<[^<>]*>>")


def read_gsm8k(path: str | Path) -> list[dict]:
    """GSM8K JSONL (`{"question", "answer"}`, the answer's worked solution ending in `#### N`) as
    problems. Calculator annotations `<<48/2=24>>` are removed; the level is the number of them
    (the solution's arithmetic steps, at least 1). A malformed row raises ProblemFileError naming the
    file and line."""
    problems = []
    for where, row in iter_jsonl(path, ProblemFileError):
        if not isinstance(row, dict) or not isinstance(row.get("question"), str) or not isinstance(row.get("answer"), str):
            raise ProblemFileError(f"{where}: expected an object with string fields \"question\" and \"answer\"")
        working, marker, final = row["answer"].rpartition("####")
        final = final.strip().replace(",", "")
        if not marker or not re.fullmatch(r"-?\d+", final):
            raise ProblemFileError(f"{where}: the answer must end with '#### <integer>', got {row['answer'][-40:]!r}")
        steps = max(1, len(_CALCULATOR.findall(working)))
        solution = _CALCULATOR.sub("", working).strip()
        problems.append({"prompt": row["question"].strip(), "answer": int(final), "level": steps,
                         "solution": f"{solution}\nAnswer: {int(final)}"})
    return problems
