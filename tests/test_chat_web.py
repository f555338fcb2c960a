"""chat_web.py: the app on a real uvicorn server (a tiny checkpoint in a tmp base dir) answered
through the official `openai` client, bad requests, the body cap, concurrency with slow fake
engines, and the chat page in headless Chromium (skipped when Chromium is not installed)."""

import re
import json
import time
import select
import contextlib
import shutil
import socket
import threading
from pathlib import Path

import pytest
import requests

import chat_web
from test_engine import make_tokenizer, save_tiny_checkpoint

MAX_TOKENS_LIMIT = 64


@contextlib.contextmanager
def serving(app):
    """`app` on uvicorn in a thread, on a port the OS picks when it binds; yields the base URL."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started:
        assert time.time() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.02)
    yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("webbase")
    save_tiny_checkpoint(base, stage="sft")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SPEEDCHAT_BASE_DIR", str(base))
        workers, meta = chat_web.load_workers("sft", "cpu")
    limits = chat_web.Limits(max_messages=20, max_message_chars=600, max_tokens=MAX_TOKENS_LIMIT, default_max_tokens=16)
    sequence_len = workers[0].engine.model.config.sequence_len
    app = chat_web.create_app(chat_web.WorkerPool(workers), f"speedchat-sft-{meta['tag']}", sequence_len, limits)
    with serving(app) as url:
        yield url


@pytest.fixture
def client(server):
    import openai

    return openai.OpenAI(base_url=server + "/v1", api_key="not-needed", max_retries=0, timeout=30)


HELLO = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello! How are you?"}]


def test_openai_client_plain_and_streamed(client):
    models = client.models.list()
    model_id = models.data[0].id
    assert model_id == "speedchat-sft-d2"
    plain = client.chat.completions.create(model=model_id, messages=HELLO, max_tokens=12, temperature=0)
    text = plain.choices[0].message.content
    assert plain.choices[0].message.role == "assistant"
    assert plain.choices[0].finish_reason in ("stop", "length")
    assert plain.usage.prompt_tokens > 0 and 0 < plain.usage.completion_tokens <= 12
    assert text, "the tiny model's greedy reply should not be empty"

    stream = client.chat.completions.create(model="anything", messages=HELLO, max_tokens=12, temperature=0, stream=True)
    chunks = list(stream)
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) >= 2  # it really streamed
    assert "".join(pieces) == text  # greedy: streamed and plain replies agree
    assert chunks[-1].choices[0].finish_reason == plain.choices[0].finish_reason

    # sampling with a seed is reproducible; top_p is accepted
    a = client.chat.completions.create(model=model_id, messages=HELLO, max_tokens=8, temperature=1.0, top_p=0.9, seed=3)
    b = client.chat.completions.create(model=model_id, messages=HELLO, max_tokens=8, temperature=1.0, top_p=0.9, seed=3)
    assert a.choices[0].message.content == b.choices[0].message.content


def test_a_long_conversation_keeps_its_newest_turns(client):
    turns = [{"role": "system", "content": "Be brief."}]
    for i in range(8):  # ~60 tokens a turn: far more than the 256-token context
        turns += [{"role": "user", "content": f"Question {i}: what is the capital of France? " * 3},
                  {"role": "assistant", "content": "Paris is the capital of France. " * 3}]
    reply = client.chat.completions.create(model="m", messages=turns + [HELLO[1]], max_tokens=16, temperature=0)
    dropped = reply.model_extra["dropped_messages"]
    assert dropped % 2 == 0 and 0 < dropped < 16  # whole turns, the oldest ones, not all of them
    assert reply.usage.prompt_tokens <= 256 - 16 and reply.choices[0].message.content
    short = client.chat.completions.create(model="m", messages=HELLO, max_tokens=16, temperature=0)
    assert short.model_extra["dropped_messages"] == 0


def post(server, body, raw=None, **headers):
    data = raw if raw is not None else json.dumps(body)
    return requests.post(server + "/v1/chat/completions", data=data, timeout=30,
                         headers={"Content-Type": "application/json", **headers})


BAD_REQUESTS = [
    ("malformed JSON", None, b'{"messages": [', 400),
    ("not an object", [1, 2], None, 400),
    ("no messages", {"messages": []}, None, 400),
    ("too many messages", {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}] * 10
                           + [{"role": "user", "content": "hi"}]}, None, 400),
    ("message too long", {"messages": [{"role": "user", "content": "x" * 601}]}, None, 400),
    ("last message too long", {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
                                            {"role": "user", "content": "x7Q!" * 150}], "max_tokens": 64}, None, 400),
    ("bad role", {"messages": [{"role": "tool", "content": "hi"}]}, None, 400),
    ("roles out of order", {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}, None, 400),
    ("last not user", {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}, None, 400),
    ("content not text", {"messages": [{"role": "user", "content": 5}]}, None, 400),
    ("max_tokens too big", {"messages": HELLO, "max_tokens": MAX_TOKENS_LIMIT + 1}, None, 400),
    ("max_tokens not int", {"messages": HELLO, "max_tokens": "10"}, None, 400),
    ("max_tokens overflow", None, b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1' + b"0" * 400 + b"}", 400),
    ("temperature too high", {"messages": HELLO, "temperature": 5}, None, 400),
    ("temperature NaN", None, b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', 400),
    ("top_p zero", {"messages": HELLO, "top_p": 0}, None, 400),
    ("seed overflow", {"messages": HELLO, "seed": 2**64}, None, 400),
    ("n > 1", {"messages": HELLO, "n": 2}, None, 400),
    ("deep nesting", None, b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400),
    ("body too large", None, b'{"messages": "' + b"x" * 2_100_000 + b'"}', 413),
]


@pytest.mark.parametrize("name, body, raw, status", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_requests_get_4xx_and_server_keeps_serving(server, name, body, raw, status):
    r = post(server, body, raw)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"]
    ok = post(server, {"messages": HELLO, "max_tokens": 2})
    assert ok.status_code == 200


def test_chunked_body_is_capped_while_it_streams_in(server):
    """300 chunks of 1 MiB with no Content-Length: answered 413 early, and the server's peak memory
    does not grow by the body (reading it whole first cost ~600 MB)."""
    status_file = Path("/proc/self/status")  # the server runs in this process
    peak = lambda: int(re.search(r"VmHWM:\s+(\d+) kB", status_file.read_text()).group(1)) * 1024
    before = peak()
    chunk = b"%x\r\n" % (1 << 20) + b" " * (1 << 20) + b"\r\n"
    sent, answer = 0, b""
    with socket.create_connection(("127.0.0.1", int(server.rsplit(":", 1)[1])), timeout=30) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Transfer-Encoding: chunked\r\n\r\n")
        with contextlib.suppress(OSError):  # the server may answer and hang up while we send
            while sent < 300 and not select.select([s], [], [], 0)[0]:  # until the server answers
                s.sendall(chunk)
                sent += 1
        answer = s.recv(4096)
    assert answer.startswith(b"HTTP/1.1 413") and sent < 300
    grew = peak() - before
    print(f"chunked 300 MiB body: 413 after {sent} MiB sent; server peak RSS grew by {grew / 2**20:.1f} MiB")
    assert grew < 64 << 20


def test_bad_flags_and_a_taken_port_fail_before_the_model_loads(tmp_path, monkeypatch):
    from common import UserError

    monkeypatch.setenv("SPEEDCHAT_BASE_DIR", str(tmp_path))  # no checkpoint: the flags are checked first
    for flags in (["--max-tokens", "0"], ["--max-tokens", "5000"], ["--temperature", "nan"], ["--top-k", "-2"],
                  ["--port", "70000"]):
        with pytest.raises(SystemExit):
            chat_web.main(["--device", "cpu"] + flags)
    with pytest.raises(UserError, match="no sft checkpoint"):  # a lower limit alone lowers the default reply length
        chat_web.main(["--device", "cpu", "--max-tokens-limit", "256"])
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(UserError, match=f"cannot listen on 127.0.0.1:{port}"):
            chat_web.main(["--device", "cpu", "--port", str(port)])


def test_other_routes(server):
    assert requests.get(server + "/health", timeout=5).json()["status"] == "ok"
    r = requests.get(server + "/no/such/page", timeout=5)
    assert r.status_code == 404 and "error" in r.json()
    r = requests.get(server + "/v1/chat/completions", timeout=5)
    assert r.status_code == 405 and "error" in r.json() and r.headers["Allow"] == "POST"
    page = requests.get(server + "/", timeout=5)
    assert page.status_code == 200 and "<textarea" in page.text and "/v1/chat/completions" in page.text
    schema = requests.get(server + "/openapi.json", timeout=5).json()
    body = schema["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    fields = schema["components"]["schemas"][body["$ref"].rsplit("/", 1)[1]]["properties"]
    assert {"messages", "max_tokens", "temperature", "top_p", "stream"} <= set(fields)
    assert fields["max_tokens"]["anyOf"][0]["maximum"] == MAX_TOKENS_LIMIT


# ---------------------------------------------------------------------------
# The worker pool, in-process, with slow fake engines (timing-independent of any model)


class SlowEngine:
    """Stands in for Engine: one token every `delay` seconds, never stops by itself.
    Counts how many generations run at once, and how many were closed early."""

    stats = {"active": 0, "max_active": 0, "closed": 0}
    lock = threading.Lock()

    def __init__(self, tokenizer, delay=0.02, says=None):
        self.tokenizer, self.delay = tokenizer, delay
        self.stop_tokens = {tokenizer.get_bos_token_id(), tokenizer.encode_special("<|assistant_end|>")}
        self.says = says or tokenizer.encode("a")

    def generate(self, ids, num_samples=1, max_tokens=8, **sampling):
        with self.lock:
            self.stats["active"] += 1
            self.stats["max_active"] = max(self.stats["max_active"], self.stats["active"])
        done = False
        try:
            for i in range(max_tokens):
                time.sleep(self.delay)
                yield [self.says[i % len(self.says)]] * num_samples, [1] * num_samples
            done = True
        finally:
            with self.lock:
                self.stats["active"] -= 1
                self.stats["closed"] += not done


@pytest.fixture
def pool_server():
    SlowEngine.stats.update(active=0, max_active=0, closed=0)
    tok = make_tokenizer()
    pool = chat_web.WorkerPool([chat_web.Worker(SlowEngine(tok), "cpu") for _ in range(2)])
    with serving(chat_web.create_app(pool, "slow", sequence_len=4096, limits=chat_web.Limits(max_tokens=2000))) as url:
        yield url


def test_pool_runs_one_request_per_worker_and_queues_the_rest(pool_server):
    results = []
    body = {"messages": HELLO, "max_tokens": 25}  # 0.5 s each: 5 requests on 2 workers take 3 rounds
    threads = [threading.Thread(target=lambda: results.append(post(pool_server, body))) for _ in range(5)]
    for t in threads:
        t.start()
    deadline = time.time() + 5
    while requests.get(pool_server + "/health", timeout=5).json()["free_workers"] != 0:  # answers while busy
        assert time.time() < deadline, "the workers never got busy"
        time.sleep(0.02)
    for t in threads:
        t.join(timeout=30)
    assert [r.status_code for r in results] == [200] * 5
    assert all(r.json()["choices"][0]["message"]["content"] == "a" * 25 for r in results)
    assert SlowEngine.stats["max_active"] == 2  # both workers busy at once, never more


def test_tool_calls_read_the_same_in_content_plain_and_streamed():
    tok = make_tokenizer()
    special = tok.encode_special
    says = ([special("<|python_start|>")] + tok.encode("12*7") + [special("<|python_end|>"), special("<|output_start|>")]
            + tok.encode("84") + [special("<|output_end|>")] + tok.encode(" So 84.") + [special("<|assistant_end|>")])
    pool = chat_web.WorkerPool([chat_web.Worker(SlowEngine(tok, delay=0, says=says), "cpu")])
    with serving(chat_web.create_app(pool, "tool", sequence_len=4096)) as url:
        plain = post(url, {"messages": HELLO, "max_tokens": 100}).json()["choices"][0]["message"]["content"]
        with requests.post(url + "/v1/chat/completions", json={"messages": HELLO, "stream": True}, stream=True) as r:
            events = [json.loads(line[6:]) for line in r.iter_lines() if line and line != b"data: [DONE]"]
    assert plain == "".join(e["choices"][0]["delta"].get("content", "") for e in events) == "[calculator: 12*7 -> 84] So 84."


def test_client_hanging_up_stops_generation_and_frees_the_worker(pool_server):
    body = {"messages": HELLO, "max_tokens": 1500, "stream": True}  # 30 s if nobody stopped it
    with requests.post(pool_server + "/v1/chat/completions", json=body, stream=True, timeout=30) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = (line for line in r.iter_lines() if line)
        assert json.loads(next(lines)[6:])["choices"][0]["delta"]["role"] == "assistant"
        assert json.loads(next(lines)[6:])["choices"][0]["delta"]["content"] == "a"
    deadline = time.time() + 10
    while SlowEngine.stats["closed"] != 1 or requests.get(pool_server + "/health", timeout=5).json()["free_workers"] != 2:
        assert time.time() < deadline, f"the generation was not stopped after the client hung up: {SlowEngine.stats}"
        time.sleep(0.05)
    assert SlowEngine.stats["active"] == 0


# ---------------------------------------------------------------------------
# The page, in headless Chromium


def find_chromium():
    browser = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
    driver = shutil.which("chromedriver")
    return browser, driver


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver

    binary, driver_path = find_chromium()
    if not binary or not driver_path:
        pytest.skip("Chromium and chromedriver are not installed (apt-get install -y chromium chromium-driver)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1000,800"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def page_server():
    """The page against an engine that takes 0.02 s a token: a reply arrives in pieces, never in one read."""
    pool = chat_web.WorkerPool([chat_web.Worker(SlowEngine(make_tokenizer()), "cpu")])
    with serving(chat_web.create_app(pool, "slow", sequence_len=4096, limits=chat_web.Limits(default_max_tokens=20))) as url:
        yield url


def test_page_streams_a_reply_and_edits_history(page_server, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 30)
    browser.get(page_server + "/")
    browser.find_element(By.ID, "temperature").send_keys("0")

    def idle_with_reply(driver):
        return (driver.execute_script("return document.body.dataset.busy") == "0"
                and driver.find_elements(By.CSS_SELECTOR, ".msg.assistant"))

    box = browser.find_element(By.ID, "input")
    box.send_keys("Hi there")  # the random model says 16 tokens, in several pieces
    browser.find_element(By.ID, "send").click()
    wait.until(idle_with_reply)
    assert not browser.find_elements(By.CSS_SELECTOR, ".msg.error")
    reply = browser.find_element(By.CSS_SELECTOR, ".msg.assistant").text
    assert reply
    assert browser.execute_script("return window.chunksReceived") >= 2  # arrived in pieces

    # click the user message, edit it, Enter: the reply is regenerated from there
    chunks_before = browser.execute_script("return window.chunksReceived")
    browser.find_element(By.CSS_SELECTOR, ".msg.user").click()
    area = browser.find_element(By.CSS_SELECTOR, ".msg.user textarea")
    area.clear()
    area.send_keys("What is the capital of France?", Keys.ENTER)
    wait.until(idle_with_reply)
    assert not browser.find_elements(By.CSS_SELECTOR, ".msg.error")
    users = browser.find_elements(By.CSS_SELECTOR, ".msg.user")
    assert [u.text for u in users] == ["What is the capital of France?"]
    assert len(browser.find_elements(By.CSS_SELECTOR, ".msg.assistant")) == 1
    # a new reply streamed in after the edit (not the old one left on the page)
    assert browser.execute_script("return window.chunksReceived") > chunks_before
    assert browser.find_element(By.CSS_SELECTOR, ".msg.assistant").text

    browser.find_element(By.ID, "new").click()
    assert not browser.find_elements(By.CSS_SELECTOR, ".msg")


def test_page_keeps_answering_as_the_context_fills(server, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(server + "/")
    browser.find_element(By.ID, "temperature").send_keys("0")
    browser.find_element(By.ID, "max_tokens").send_keys("32")
    idle = lambda driver: driver.execute_script("return document.body.dataset.busy") == "0"  # noqa: E731
    for i in range(6):  # ~70 tokens a turn into a 256-token context, 32 of them kept for the reply
        browser.find_element(By.ID, "input").send_keys(f"Turn {i}: what is the capital of France? " * 4)
        browser.find_element(By.ID, "send").click()
        WebDriverWait(browser, 30).until(lambda d: idle(d) and len(d.find_elements(By.CSS_SELECTOR, ".msg.assistant")) == i + 1)
        assert not browser.find_elements(By.CSS_SELECTOR, ".msg.error")
    assert browser.find_elements(By.CSS_SELECTOR, ".msg.dropped") and browser.find_elements(By.CSS_SELECTOR, ".note")
    # a message too long by itself: an error, and the question goes back to the input box, not into the history
    browser.execute_script("document.getElementById('input').value = arguments[0]", "x7Q!" * 140)
    browser.find_element(By.ID, "send").click()
    WebDriverWait(browser, 30).until(lambda d: idle(d) and d.find_elements(By.CSS_SELECTOR, ".msg.error"))
    assert "prompt limit" in browser.find_element(By.CSS_SELECTOR, ".msg.error").text
    assert len(browser.find_elements(By.CSS_SELECTOR, ".msg.user")) == 6
    assert browser.find_element(By.ID, "input").get_attribute("value") == "x7Q!" * 140
    # and the conversation goes on: the next question is answered
    browser.execute_script("document.getElementById('input').value = 'And of Italy?'")
    browser.find_element(By.ID, "send").click()
    WebDriverWait(browser, 30).until(lambda d: idle(d) and len(d.find_elements(By.CSS_SELECTOR, ".msg.assistant")) == 7)
    assert not browser.find_elements(By.CSS_SELECTOR, ".msg.error")
