"""The web chat in headless Chromium: send messages, watch the streamed replies, read the token view.

Needs Debian's `chromium` and `chromium-driver` and the `selenium` package
(`scripts/install_browser.sh` installs them); skipped, saying why, when they are absent.
"""

import re
import shutil
import tempfile

import httpx
import pytest

from picochat.config import get_preset
from picochat.serve.app import create_app, load_models
from picochat.tools import TOOLS_SYSTEM_PROMPT, Tools
from test_serve import (  # noqa: F401 (serve_run is a fixture)
    CALC_ANSWER,
    CALC_CALL,
    CALC_RESULT,
    GatedTransformer,
    calculating,
    serve_run,
    serving,
    tiny_model,
)

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (scripts/install_browser.sh installs it)")
from selenium.common.exceptions import TimeoutException  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                                reason="chromium and chromium-driver are not installed (scripts/install_browser.sh installs them)")

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1280,900"]


@pytest.fixture(scope="module")
def server(serve_run):
    tokenizer, models, _ = load_models(serve_run, None, "cpu")
    with serving(create_app(tokenizer, models)) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="picochat-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS + [f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def set_value(driver, element_id: str, value) -> None:
    """Set a settings control as a user would, firing its change event."""
    driver.execute_script(
        "const e = document.getElementById(arguments[0]); e.value = arguments[1];"
        "e.dispatchEvent(new Event('input')); e.dispatchEvent(new Event('change'));", element_id, str(value))


def send_and_wait(driver, text: str) -> str:
    """Type a message, press Enter, wait for the streamed reply to finish; return its text."""
    before = len(driver.find_elements(By.CSS_SELECTOR, ".message.assistant"))
    box = driver.find_element(By.ID, "input")
    box.send_keys(text)
    box.send_keys(Keys.ENTER)
    wait = WebDriverWait(driver, 60)
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, '.message.assistant[data-done="true"]')) == before + 1)
    reply = driver.find_elements(By.CSS_SELECTOR, ".message.assistant .content")[-1]
    return reply.get_property("textContent")


def shown_token_count(driver) -> int:
    return int(driver.find_element(By.ID, "token-count").text.split()[0])


def test_chat_streams_replies_and_shows_what_the_model_sees(browser, server):
    browser.get(server + "/")
    WebDriverWait(browser, 30).until(lambda d: d.find_element(By.ID, "model").get_property("value") == "demo-sft")
    set_value(browser, "temperature", 0)
    set_value(browser, "max-tokens", 12)

    first = send_and_wait(browser, "Hello, who are you?")
    conversation = [{"role": "user", "content": "Hello, who are you?"}]
    expected = httpx.post(f"{server}/v1/chat/completions", json={
        "model": "demo-sft", "messages": conversation, "temperature": 0, "max_tokens": 12}).json()
    assert first == expected["choices"][0]["message"]["content"] != ""
    conversation.append({"role": "assistant", "content": first})

    second = send_and_wait(browser, "Tell me more.")
    conversation.append({"role": "user", "content": "Tell me more."})
    expected = httpx.post(f"{server}/v1/chat/completions", json={
        "model": "demo-sft", "messages": conversation, "temperature": 0, "max_tokens": 12}).json()
    assert second == expected["choices"][0]["message"]["content"]  # the page sent the whole conversation
    conversation.append({"role": "assistant", "content": second})

    view = httpx.post(f"{server}/v1/tokenize", json={"messages": conversation}).json()
    WebDriverWait(browser, 30).until(lambda d: shown_token_count(d) == view["count"])
    tokens = browser.find_elements(By.CSS_SELECTOR, "#tokens .tok")
    assert [int(t.get_attribute("data-id")) for t in tokens] == [t["id"] for t in view["tokens"]]
    specials = [t.get_property("textContent") for t in browser.find_elements(By.CSS_SELECTOR, "#tokens .tok.special")]
    assert specials[:3] == ["<|endoftext|>", "<|im_start|>", "<|im_sep|>"]
    assert specials.count("<|im_end|>") == 4
    assert browser.find_element(By.ID, "rendered").get_property("textContent") == view["text"]

    browser.find_element(By.ID, "new-chat").click()
    WebDriverWait(browser, 30).until(lambda d: shown_token_count(d) == 0)
    assert browser.find_elements(By.CSS_SELECTOR, ".message") == []


def test_errors_are_shown_and_the_message_goes_back_to_the_box(browser, server):
    browser.get(server + "/")
    WebDriverWait(browser, 30).until(lambda d: d.find_element(By.ID, "model").get_property("value") == "demo-sft")
    browser.execute_script("const select = document.getElementById('model');"
                           "select.add(new Option('gpt-4o', 'gpt-4o')); select.value = 'gpt-4o';")
    box = browser.find_element(By.ID, "input")
    box.send_keys("Hello?")
    box.send_keys(Keys.ENTER)
    error = WebDriverWait(browser, 30).until(lambda d: d.find_elements(By.CSS_SELECTOR, ".message.error"))[0]
    assert "'gpt-4o' does not exist" in error.text
    assert box.get_property("value") == "Hello?"
    assert browser.find_elements(By.CSS_SELECTOR, ".message.user") == []


# --- a model of the cpu preset's context: the page's own defaults must fit it -----------------------
@pytest.fixture(scope="module")
def cpu_context_server(serve_run):
    tokenizer, _, _ = load_models(serve_run, None, "cpu")
    model = tiny_model(tokenizer.vocab_size, seed=2, context=get_preset("cpu").model["max_seq_len"])
    with serving(create_app(tokenizer, {"demo-sft": model})) as url:
        yield url


def fresh_page(driver, url: str) -> None:
    """The page as a first-time visitor sees it: no saved settings."""
    driver.get(url + "/")
    driver.execute_script("localStorage.clear(); sessionStorage.clear();")
    driver.get(url + "/")
    WebDriverWait(driver, 30).until(lambda d: d.find_element(By.ID, "model").get_property("value") == "demo-sft")
    WebDriverWait(driver, 30).until(lambda d: d.find_element(By.ID, "max-tokens").get_property("value") != "")


def test_the_first_message_with_the_page_s_defaults_gets_a_reply_on_a_cpu_preset_model(browser, cpu_context_server):
    fresh_page(browser, cpu_context_server)
    assert browser.find_element(By.ID, "max-tokens").get_property("value") == "128"  # half the context of 256
    send_and_wait(browser, "Hello, who are you?")
    assert browser.find_elements(By.CSS_SELECTOR, ".message.error") == []
    assert not browser.find_element(By.ID, "context-full").is_displayed()
    status = browser.find_element(By.ID, "status").text
    assert re.fullmatch(r"\d+ prompt tokens, [1-9]\d* reply tokens", status), status


@pytest.mark.slow  # about 25 s on 2 busy cores: 40 replies of up to 128 tokens
def test_a_40_turn_chat_with_the_page_s_defaults_drops_the_oldest_messages_and_never_fails(browser, cpu_context_server):
    fresh_page(browser, cpu_context_server)
    turns = 40
    for turn in range(turns):  # replies of up to 128 tokens: the context of 256 holds about two exchanges
        send_and_wait(browser, f"Tell me more about Oskel, part {turn}.")
    assert len(browser.find_elements(By.CSS_SELECTOR, '.message.assistant[data-done="true"]')) == turns
    assert browser.find_elements(By.CSS_SELECTOR, ".message.error") == []
    assert not browser.find_element(By.ID, "context-full").is_displayed()
    notices = [n.text for n in browser.find_elements(By.CSS_SELECTOR, "#messages .notice")]
    counts = [int(re.fullmatch(r"(\d+) older messages? (?:was|were) dropped to fit the model's 256-token context\.", n).group(1))
              for n in notices]
    assert len(counts) >= turns // 4 and all(count % 2 == 0 for count in counts)  # whole exchanges, again and again
    faded = len(browser.find_elements(By.CSS_SELECTOR, ".message.dropped"))
    blank = len([f for f in browser.find_elements(By.CSS_SELECTOR, ".finish") if "no reply" in f.text])
    assert faded == sum(counts) + 2 * blank
    assert browser.execute_script("return messages.length") == 2 * turns - faded  # the conversation the page sends
    prompt, reply = map(int, re.fullmatch(r"(\d+) prompt tokens, (\d+) reply tokens", browser.find_element(By.ID, "status").text).groups())
    assert prompt + reply <= 256


def test_a_message_too_long_for_the_context_alone_gets_a_notice_and_goes_back_to_the_box(browser, cpu_context_server):
    fresh_page(browser, cpu_context_server)
    send_and_wait(browser, "Hello.")
    box = browser.find_element(By.ID, "input")
    notice = browser.find_element(By.ID, "context-full")
    long_message = "word " * 300
    box.send_keys(long_message)
    box.send_keys(Keys.ENTER)
    WebDriverWait(browser, 30).until(lambda d: notice.is_displayed())
    assert "does not fit the model's context" in notice.text
    assert box.get_property("value") == long_message.strip()
    assert browser.find_elements(By.CSS_SELECTOR, ".message.error") == []
    assert len(browser.find_elements(By.CSS_SELECTOR, ".message.user")) == 1
    box.clear()
    send_and_wait(browser, "Hello again.")
    assert not notice.is_displayed()


def test_the_reply_appears_piece_by_piece_while_it_streams(browser, serve_run):
    tokenizer, models, _ = load_models(serve_run, None, "cpu")
    model = GatedTransformer(models["demo-sft"])  # each decoding step waits for the test's permit
    with serving(create_app(tokenizer, {"demo-sft": model})) as url:
        browser.get(url + "/")
        WebDriverWait(browser, 30).until(lambda d: d.find_element(By.ID, "model").get_property("value") == "demo-sft")
        set_value(browser, "temperature", 0)
        set_value(browser, "max-tokens", 30)
        box = browser.find_element(By.ID, "input")
        box.send_keys("Hello, who are you?")
        box.send_keys(Keys.ENTER)
        bubble = WebDriverWait(browser, 30).until(lambda d: d.find_elements(By.CSS_SELECTOR, ".message.assistant"))[0]
        partial = ""
        for _ in range(20):  # one step at a time until some text shows
            model.permits.release(1)
            try:
                partial = WebDriverWait(browser, 1).until(lambda d: bubble.find_element(By.CLASS_NAME, "content").get_property("textContent"))
                break
            except TimeoutException:
                continue
        assert partial and bubble.get_attribute("data-done") == "false"
        model.permits.release(10_000)
        WebDriverWait(browser, 30).until(lambda d: bubble.get_attribute("data-done") == "true")
        final = bubble.find_element(By.CLASS_NAME, "content").get_property("textContent")
        assert final.startswith(partial) and len(final) > len(partial)


def test_the_api_key_is_kept_for_the_tab_only(browser, server):
    browser.get(server + "/")
    browser.execute_script("localStorage.setItem('picochat.api-key', 'left by an older page')")
    browser.get(server + "/")
    WebDriverWait(browser, 30).until(lambda d: d.find_element(By.ID, "model").get_property("value") == "demo-sft")
    assert browser.execute_script("return localStorage.getItem('picochat.api-key')") is None
    set_value(browser, "api-key", "s3cret")
    assert browser.execute_script("return sessionStorage.getItem('picochat.api-key')") == "s3cret"
    assert browser.execute_script("return localStorage.getItem('picochat.api-key')") is None
    browser.get(server + "/")  # the same tab: the key is still there
    assert browser.find_element(By.ID, "api-key").get_property("value") == "s3cret"
    set_value(browser, "api-key", "")


# --- the server's tools ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tool_server(serve_run):
    """A server with the calculator and a model scripted to call it: `calc: 4 * 2`, then "So it is 8."."""
    tokenizer, models, _ = load_models(serve_run, None, "cpu")
    with serving(create_app(tokenizer, {"demo-sft": calculating(models["demo-sft"], tokenizer)}, tools=Tools(tokenizer))) as url:
        yield url


def test_a_tool_call_is_a_step_that_opens_to_its_result_and_the_token_view_shows_its_tokens(browser, tool_server):
    fresh_page(browser, tool_server)
    set_value(browser, "max-tokens", 24)  # the scripted reply takes 22: two exchanges fit the context of 128
    assert browser.find_element(By.ID, "use-tools").is_selected()
    assert browser.find_element(By.ID, "tools-note").text.startswith("calc: the server runs them")
    question = "What is 4 * 2?"
    assert send_and_wait(browser, question) == CALC_ANSWER  # the reply's text, without the tool markup
    bubble = browser.find_elements(By.CSS_SELECTOR, ".message.assistant")[-1]
    [step] = bubble.find_elements(By.CSS_SELECTOR, ".steps details.tool-step")
    summary, result = step.find_element(By.TAG_NAME, "summary"), step.find_element(By.TAG_NAME, "pre")
    assert summary.text == "⚙ calc: 4 * 2 → 8" and not result.is_displayed()
    summary.click()
    WebDriverWait(browser, 10).until(lambda d: result.is_displayed())
    assert result.text == CALC_RESULT
    content = bubble.find_element(By.CLASS_NAME, "content")
    assert browser.execute_script("return arguments[0].compareDocumentPosition(arguments[1]) & Node.DOCUMENT_POSITION_FOLLOWING",
                                  step, content)  # the step, then the text below it

    step_sent = {"call": CALC_CALL, "result": CALC_RESULT, "offset": 0}
    conversation = [{"role": "user", "content": question},
                    {"role": "assistant", "content": CALC_ANSWER, "tool_steps": [step_sent]}]
    view = httpx.post(f"{tool_server}/v1/tokenize", json={"messages": conversation}).json()
    WebDriverWait(browser, 30).until(lambda d: shown_token_count(d) == view["count"])
    specials = [t.get_property("textContent") for t in browser.find_elements(By.CSS_SELECTOR, "#tokens .tok.special")]
    assert ["<|tool_call|>", "<|/tool_call|>", "<|tool_result|>", "<|/tool_result|>"] == [s for s in specials if "tool" in s]
    assert TOOLS_SYSTEM_PROMPT in browser.find_element(By.ID, "rendered").get_property("textContent")

    send_and_wait(browser, "Thanks.")  # the page sent the step back: the server's prompt is the token view's
    thanks = conversation + [{"role": "user", "content": "Thanks."}]
    prompt = httpx.post(f"{tool_server}/v1/tokenize", json={"messages": thanks}).json()
    assert browser.find_element(By.ID, "status").text.startswith(f"{prompt['count']} prompt tokens")

    browser.find_element(By.ID, "use-tools").click()  # tools off: the conversation no longer offers them
    rendered = browser.find_element(By.ID, "rendered")
    WebDriverWait(browser, 30).until(lambda d: TOOLS_SYSTEM_PROMPT not in rendered.get_property("textContent"))
