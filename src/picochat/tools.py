"""The tools the engine runs for the model: a safe calculator and a search over documents.

A model calls a tool by writing `<|tool_call|>name: argument<|/tool_call|>` (picochat.chat defines
the call); the engine hands the ids between the markers to `Tools.result_ids` and feeds the answer
back into the sequence as `<|tool_result|>` result `<|/tool_result|>`, the result after one space
(`chat.RESULT_LEAD`):

    <|tool_call|>calc: 8 + 6<|/tool_call|><|tool_result|> 14<|/tool_result|>
    <|tool_call|>search: capital of Dekfusesh<|/tool_call|><|tool_result|> [1] Kimere is the capital of
    Dekfusesh. ...
    [2] ...<|/tool_result|>

- `calc: EXPRESSION` parses the expression with `ast` and evaluates only numbers and arithmetic
  operators (never `eval`), with bounded exponents and magnitudes.
- `search: QUERY` looks the query up in the search index (`picochat.data.index`) and answers with
  the best passages, numbered `[1] ...`, one per line, best first, as many as fit in the token
  budget (the room left for the completion minus ANSWER_RESERVE_TOKENS for the answer); a passage
  that does not fit whole is cut at a word and ends with "...". No match: "no results".

Anything else gets a short error the model can read, `error: <what was wrong>`: no `:` (or no
name), an unknown tool, an empty or over-long argument, an expression the calculator refuses
(`9**9**9`), no search index, a call still open after MAX_CALL_TOKENS tokens (the engine closes it).
A tool never raises into the engine.
"""

from __future__ import annotations

import ast
import math
import operator

from picochat.chat import RESULT_LEAD, ToolCallError, parse_tool_call, result_text
from picochat.data.index import SearchIndex, SearchIndexError
from picochat.tokenizer import TOOL_CALL_END_ID, TOOL_CALL_ID, TOOL_RESULT_END_ID, TOOL_RESULT_ID

MAX_EXPRESSION_CHARS = 200
MAX_QUERY_CHARS = 200
MAX_CALL_TOKENS = 256  # a call still open after this many tokens is closed with an error
MAX_EXPONENT = 100
MAX_MAGNITUDE = 10**18  # larger intermediate or final values are refused
SEARCH_RESULTS = 3
DUPLICATE_LOOKAHEAD = 4  # passages fetched per result, so that results stay distinct when passages repeat
# The system message that offers the tools: a model trained on the world calls them only when offered.
TOOLS_SYSTEM_PROMPT = "Tools: calc, search."
ANSWER_RESERVE_TOKENS = 64  # room a search result leaves for the model's answer after it
MIN_CUT_PASSAGE_TOKENS = 16  # a passage cut shorter than this is left out instead
NO_RESULTS_TEXT = "no results"
CUT_MARK = "..."


class CalculatorError(ValueError):
    """An expression the calculator refuses or cannot compute."""


class ToolError(ValueError):
    """A call a tool refuses; its message is what the model reads after "error: "."""


_BINARY_OPS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY_OPS = {ast.UAdd: operator.pos, ast.USub: operator.neg}


def _evaluate(node: ast.AST) -> int | float:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        value = node.value
    elif isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY_OPS:
        value = _UNARY_OPS[type(node.op)](_evaluate(node.operand))
    elif isinstance(node, ast.BinOp) and type(node.op) in _BINARY_OPS:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > MAX_EXPONENT:
            raise CalculatorError(f"exponent {right} is larger than {MAX_EXPONENT}")
        try:
            value = _BINARY_OPS[type(node.op)](left, right)
        except ZeroDivisionError:
            raise CalculatorError("division by zero") from None
        except OverflowError:
            raise CalculatorError("result too large") from None
    else:
        raise CalculatorError(f"only numbers, + - * / // % ** and parentheses are allowed, not {type(node).__name__}")
    if isinstance(value, complex):
        raise CalculatorError("the result is not a real number")
    if isinstance(value, float) and not math.isfinite(value):
        raise CalculatorError("the result is not a finite number")
    if abs(value) > MAX_MAGNITUDE:
        raise CalculatorError(f"a value exceeds {MAX_MAGNITUDE:.0e}")
    return value


def calculate(expression: str) -> str:
    """Evaluate an arithmetic expression safely; return the result as text ("12", "2.5").

    Integral results print without a decimal point; others with up to 10 significant digits.
    """
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise CalculatorError(f"expression longer than {MAX_EXPRESSION_CHARS} characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except (SyntaxError, ValueError) as err:  # ValueError: null bytes in the source
        raise CalculatorError("not an arithmetic expression") from err
    value = _evaluate(tree.body)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value) if isinstance(value, int) else f"{value:.10g}"


def with_tools(messages: list[dict]) -> list[dict]:
    """The conversation with the tools offered: TOOLS_SYSTEM_PROMPT as its system message, or as the
    first line of the one it has."""
    if messages and messages[0]["role"] == "system":
        return [{"role": "system", "content": f"{TOOLS_SYSTEM_PROMPT}\n{messages[0]['content']}"}, *messages[1:]]
    return [{"role": "system", "content": TOOLS_SYSTEM_PROMPT}, *messages]


def tools_offered(messages: list[dict]) -> bool:
    """Whether the conversation's system message offers the tools (its first line as `with_tools` writes it)."""
    return bool(messages) and messages[0]["role"] == "system" and messages[0]["content"].split("\n", 1)[0] == TOOLS_SYSTEM_PROMPT


class Tools:
    """The tools one engine runs: the calculator, and search when given an index (`SearchIndex`)."""

    def __init__(self, tokenizer, index: SearchIndex | None = None, max_call_tokens: int = MAX_CALL_TOKENS):
        self.tokenizer, self.index, self.max_call_tokens = tokenizer, index, max_call_tokens
        self.call, self.end_call, self.result, self.end_result = TOOL_CALL_ID, TOOL_CALL_END_ID, TOOL_RESULT_ID, TOOL_RESULT_END_ID

    def result_ids(self, call_ids: list[int], room: int) -> list[int]:
        """`<|tool_result|>` answer `<|/tool_result|>` for the ids between a call's markers, `room`
        being how many tokens the completion may still take (a search result fits in it, less
        ANSWER_RESERVE_TOKENS)."""
        budget = room - 2 - self._count(RESULT_LEAD) - ANSWER_RESERVE_TOKENS
        return self._wrap(self.answer(self.tokenizer.decode(call_ids), budget))

    def cut_off_ids(self) -> list[int]:
        """What the engine feeds after a call that has run on for max_call_tokens tokens: the call's
        end, then an error result."""
        return [self.end_call, *self._wrap(f"error: the call is longer than {self.max_call_tokens} tokens")]

    def answer(self, call: str, budget: int) -> str:
        """The result text of a call; a search result takes at most `budget` tokens."""
        try:
            name, argument = parse_tool_call(call)
            if name == "calc":
                return calculate(argument)
            return self._search(argument, budget)
        except (ToolCallError, ToolError, CalculatorError) as e:
            return f"error: {e}"

    def _search(self, query: str, budget: int) -> str:
        if self.index is None:
            raise ToolError("no search index is available")
        if len(query) > MAX_QUERY_CHARS:
            raise ToolError(f"the query is longer than {MAX_QUERY_CHARS} characters")
        try:
            passages = best_passages(self.index, query)
        except SearchIndexError:
            raise ToolError("the search index cannot be read") from None
        if not passages:
            return NO_RESULTS_TEXT
        text = render_passages(passages, budget, self._count)
        if not text:
            raise ToolError("no room left in the context for search results")
        return text

    def _count(self, text: str) -> int:
        return len(self.tokenizer.encode(text))

    def _wrap(self, text: str) -> list[int]:
        return [self.result, *self.tokenizer.encode(result_text(text)), self.end_result]


def best_passages(index: SearchIndex, query: str) -> list[str]:
    """The texts of the SEARCH_RESULTS best passages for `query`, each once: a corpus that repeats a
    sentence (the world states each fact many times) would otherwise fill a result with copies."""
    texts: list[str] = []
    for passage in index.search(query, SEARCH_RESULTS * DUPLICATE_LOOKAHEAD):
        if passage.text not in texts:
            texts.append(passage.text)
    return texts[:SEARCH_RESULTS]


def render_passages(passages: list[str], budget: int, count_tokens) -> str:
    """Passages numbered `[1] ...`, one per line, best first, in at most `budget` tokens as
    `count_tokens` counts them: whole while they fit, then the next one cut at a word (with
    CUT_MARK) when at least MIN_CUT_PASSAGE_TOKENS of it fit; "" when nothing fits."""
    lines: list[str] = []
    for number, passage in enumerate(passages, 1):
        line = f"[{number}] {' '.join(passage.split())}"  # one line: the passage's own line breaks become spaces
        if count_tokens("\n".join([*lines, line])) <= budget:
            lines.append(line)
            continue
        cut = _cut_to_fit(line, lambda text: count_tokens("\n".join([*lines, text])) <= budget)
        if cut is not None and count_tokens(cut) >= MIN_CUT_PASSAGE_TOKENS:
            lines.append(cut)
        break
    return "\n".join(lines)


def _cut_to_fit(line: str, fits) -> str | None:
    """The longest cut of `line` at a word, CUT_MARK appended, that `fits`; None if no cut fits."""
    words = line.split(" ")
    low, high = 1, len(words) - 2  # words kept after the number "[n]": at least one, not all
    best = None
    while low <= high:
        middle = (low + high) // 2
        candidate = " ".join(words[:middle + 1]) + CUT_MARK
        if fits(candidate):
            best, low = candidate, middle + 1
        else:
            high = middle - 1
    return best
