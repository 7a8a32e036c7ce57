"""The chat page in a real browser: headless Chromium (Debian's chromium and chromium-driver) driven
by selenium types into the page served by ``gasungbi serve`` and reads the streamed replies."""

import shutil
import tempfile

import pytest


webdriver = pytest.importorskip("selenium.webdriver")
CHROMIUM, DRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"

if not (shutil.which(CHROMIUM) and shutil.which(DRIVER)):
    pytest.skip("needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)",
                allow_module_level=True)


@pytest.fixture(scope="module")
def browser():
    from selenium.webdriver.chrome.service import Service
    profile = tempfile.mkdtemp(prefix="chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={profile}"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


LAST_REPLY = ("const a = document.querySelectorAll('.msg.assistant .answer'); "
              "return a.length ? a[a.length - 1].textContent : null;")


def _say(driver, text: str) -> str:
    """Type ``text``, send it, wait for the streamed reply to finish; returns the reply."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    driver.execute_script("window.updates = 0; new MutationObserver(() => window.updates++).observe("
                          "document.getElementById('messages'), "
                          "{subtree: true, childList: true, characterData: true});")
    box = driver.find_element(By.ID, "prompt")
    box.send_keys(text)
    driver.find_element(By.ID, "send").click()
    WebDriverWait(driver, 30).until(
        lambda d: d.execute_script("return document.body.dataset.state") == "idle"
        and "tokens/s" in d.find_element(By.ID, "stats").text)
    assert driver.execute_script("return window.updates") > 3  # the reply grew piece by piece
    return driver.execute_script(LAST_REPLY)


def test_chat_page_streams_multi_turn_replies(checkpoint, model, tokenizer, browser, start_server, chat_ref, one_thread):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    s = start_server(checkpoint, "--reasoning-parser", "none")
    browser.get(s.url + "/")
    WebDriverWait(browser, 20).until(lambda d: "tiny" in d.find_element(By.ID, "model").text)
    for field, value in (("temperature", "0"), ("max-tokens", "12")):
        el = browser.find_element(By.ID, field)
        el.clear()
        el.send_keys(value)
    first = _say(browser, "hello")
    history = [{"role": "user", "content": "hello"}]
    assert first == chat_ref(model, tokenizer, history, 12).text and first
    second = _say(browser, "the quick brown fox")
    history += [{"role": "assistant", "content": first}, {"role": "user", "content": "the quick brown fox"}]
    assert second == chat_ref(model, tokenizer, history, 12).text  # the page sent the whole conversation
    stats = browser.find_element(By.ID, "stats").text
    assert "tokens/s" in stats and "first token" in stats, stats
    assert len(browser.find_elements(By.CSS_SELECTOR, ".msg.user")) == 2
    assert not browser.find_elements(By.CSS_SELECTOR, ".msg.error")


def test_chat_page_folds_the_reasoning(checkpoint, model, tokenizer, browser, start_server, one_thread, tmp_path):
    """A template that opens <think> (as DeepSeek-R1's does): the reply's thoughts arrive as
    reasoning_content and the page shows them folded, apart from the answer."""
    import json

    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from gasungbi.data.conventions import Conventions
    from gasungbi.infer.generate import generate
    from gasungbi.serve.reasoning import split

    template = ("<|bos|>{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
                "{% if add_generation_prompt %}<|assistant|><think>{% endif %}")
    path = tmp_path / "r1-like"
    shutil.copytree(checkpoint, path)
    cfg_file = path / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text()) if cfg_file.exists() else {}
    cfg_file.write_text(json.dumps({**cfg, "chat_template": template}))
    conv = Conventions.load(path)
    ids = conv.chat_ids([{"role": "user", "content": "hello"}])
    [ref] = generate(model, [ids], max_new_tokens=12, stop_tokens=conv.stop_ids, tokenizer=conv.tokenizer)
    want_reasoning, want_answer = split(ref.text, inside=True)
    s = start_server(path)
    browser.get(s.url + "/")
    WebDriverWait(browser, 20).until(lambda d: "r1-like" in d.find_element(By.ID, "model").text)
    for field, value in (("temperature", "0"), ("max-tokens", "12")):
        el = browser.find_element(By.ID, field)
        el.clear()
        el.send_keys(value)
    assert _say(browser, "hello") == want_answer
    thoughts = browser.find_elements(By.CSS_SELECTOR, ".msg.assistant details.thoughts")[-1]
    assert want_reasoning and thoughts.get_attribute("open") is None  # folded
    assert browser.execute_script("return arguments[0].querySelector('div').textContent", thoughts) == want_reasoning
