"""The demo under load: `crem-demo` in its own process (tests/demo_server.py, the command with a "slow question"
hook), 20 sessions at once over HTTP (`gradio_client`, one client per session, one thread each), each searching,
asking about one of its hits and asking the Ask tab. Every answer must equal the one that request got alone (the
sequential oracle, computed first), the server's memory must stay flat over repeated rounds, a request held up
inside the model must not stop the others, a full queue refuses with a message, and the page stays usable (and
shows the queue) while the model slots are busy."""

from __future__ import annotations

import contextlib
import os
import re
import statistics
import subprocess
import sys
import threading
import time
import urllib.request

import pytest
from gradio_client import Client, handle_file
from helpers import COLOURS, colour_image, free_port
from playwright import sync_api

HERE = os.path.dirname(os.path.abspath(__file__))
CHROMIUM = "/usr/bin/chromium"
SESSIONS = 20
CONCURRENCY = 2
QUEUE_SIZE = 24  # the 20 sessions' requests all fit (at most 20 in flight); more are refused
QUESTIONS = ("What is in the image?", "Which colour is it?", "Describe the square.", "Is it bright?", "What shape?")
WAIT_MS = 30_000


def _rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as handle:
        return int(next(line for line in handle if line.startswith("VmRSS:")).split()[1])


@pytest.fixture(scope="module")
def server(model, processor, tmp_path_factory):
    """`crem-demo` on a free port in a subprocess: the tiny model saved to a folder, a gallery of colour squares."""
    root = tmp_path_factory.mktemp("load")
    model.save_pretrained(root / "model")
    processor.save_pretrained(root / "model")
    (root / "gallery").mkdir()
    (root / "gates").mkdir()
    images = {}
    for i, name in enumerate(COLOURS):
        images[name] = str(root / "gallery" / f"{name}.png")
        colour_image(name, i).save(images[name])
    port = free_port()
    env = {**os.environ, "CREM_TEST_GATES": str(root / "gates"), "HF_HUB_OFFLINE": "1"}
    env["PYTHONPATH"] = os.pathsep.join([HERE, env.get("PYTHONPATH", "")])
    command = [sys.executable, os.path.join(HERE, "demo_server.py"), "--model", str(root / "model"), "--gallery",
               str(root / "gallery"), "--port", str(port), "--workdir", str(root / "work"), "--device", "cpu",
               "--concurrency", str(CONCURRENCY), "--queue-size", str(QUEUE_SIZE)]  # fmt: skip
    log = open(root / "server.log", "w")
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 120
    while True:
        assert process.poll() is None, (root / "server.log").read_text()
        try:
            urllib.request.urlopen(url, timeout=2).close()
            break
        except OSError:
            assert time.monotonic() < deadline, "the demo did not start in 2 minutes"
            time.sleep(0.3)
    yield {"url": url, "pid": process.pid, "images": images, "gates": root / "gates", "log": root / "server.log"}
    process.terminate()
    process.wait(timeout=30)
    log.close()


@contextlib.contextmanager
def _client(url: str):
    client = Client(url, verbose=False, download_files=False)
    try:
        yield client
    finally:
        client.close()


def _close_all(clients: list[Client]) -> None:
    """Close clients side by side (each close waits about a second for its heartbeat thread)."""
    threads = [threading.Thread(target=client.close) for client in clients]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)


def _cells(html: str) -> list[str]:
    return re.findall(r"<td>(.*?)</td>", html)


def _session(client: Client, images: dict, i: int, latencies: list | None = None) -> dict:
    """
    Session `i`'s requests, in order: a text search (its own query and top-k), a question about one of its hits (its
    own question, item and length) and an Ask-tab question about an image. Returns what the page would show, less
    the timings and the thumbnails' temporary paths.
    """
    names = list(COLOURS)

    def call(api: str, *args):
        started = time.perf_counter()
        out = client.predict(*args, api_name=api)
        if latencies is not None:
            latencies.append((api, time.perf_counter() - started))
        return out

    k = 2 + i % 3
    gallery, table, picked, status = call("/search", f"a {names[i % len(names)]} square number {i}", None, k)
    hits = [choice[0] for choice in picked["choices"]]
    item = hits[i % len(hits)]
    stored, stored_status = call("/ask_stored", item, QUESTIONS[i % len(QUESTIONS)], 3 + i % 6)
    question = QUESTIONS[(i + 2) % len(QUESTIONS)]
    image = images[names[(3 * i + 1) % len(names)]]
    _, native, native_stats, compressed, compressed_stats, ask_status = call("/ask", handle_file(image), question,
                                                                             2 + i % 7)  # fmt: skip
    return {
        "search": ([entry["caption"] for entry in gallery], _cells(table), hits, status),
        "ask_stored": (item, stored, stored_status),
        "ask": (native, _cells(native_stats)[:2], compressed, _cells(compressed_stats)[:2], ask_status),
    }


def _run_sessions(url: str, images: dict, count: int = SESSIONS) -> tuple[list[dict], list, float]:
    """`count` sessions at once (one client and thread each, started together): results, latencies, wall seconds."""
    clients = [Client(url, verbose=False, download_files=False) for _ in range(count)]
    results: list = [None] * count
    latencies: list = []
    start = threading.Barrier(count)

    def one(i: int):
        start.wait()
        try:
            results[i] = _session(clients[i], images, i, latencies)
        except Exception as error:  # noqa: BLE001  (reported by the assertion below, with the session)
            results[i] = error

    threads = [threading.Thread(target=one, args=(i,)) for i in range(count)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    wall = time.perf_counter() - started
    assert not any(thread.is_alive() for thread in threads), "a session did not finish in 2 minutes"
    _close_all(clients)
    return results, latencies, wall


def _summary(latencies: list) -> str:
    lines = []
    for api in ("/search", "/ask_stored", "/ask"):
        values = sorted(seconds for name, seconds in latencies if name == api)
        p95 = values[min(len(values) - 1, round(0.95 * (len(values) - 1)))]
        lines.append(f"{api}: n={len(values)} median {statistics.median(values):.3f} s, p95 {p95:.3f} s, "
                     f"max {values[-1]:.3f} s")  # fmt: skip
    return "; ".join(lines)


def test_twenty_sessions_at_once_each_get_their_own_answers_and_memory_stays_flat(server):
    url, images = server["url"], server["images"]
    oracle = []
    alone: list = []
    clients = [Client(url, verbose=False, download_files=False) for _ in range(SESSIONS)]
    for i, client in enumerate(clients):  # each request alone: one session at a time, one request at a time
        oracle.append(_session(client, images, i, alone))
    _close_all(clients)
    assert len({repr(result) for result in oracle}) == SESSIONS  # the sessions differ: cross-talk would show
    assert all("crem-error" not in repr(result) for result in oracle), oracle

    rss = [_rss_kb(server["pid"])]
    for _ in range(2):  # two rounds: the second must not grow the server's memory (nothing kept per request)
        results, latencies, wall = _run_sessions(url, images)
        rss.append(_rss_kb(server["pid"]))
        failed = {i: result for i, result in enumerate(results) if isinstance(result, Exception)}
        assert not failed, failed
        assert len(latencies) == 3 * SESSIONS
        for i, (got, expected) in enumerate(zip(results, oracle, strict=True)):
            assert got == expected, f"session {i} got another answer under load"
    print(f"\nalone: {_summary(alone)}\n20 at once ({wall:.1f} s): {_summary(latencies)}\nserver RSS (MB): "
          + ", ".join(f"{kb / 1024:.0f}" for kb in rss))  # fmt: skip
    assert rss[2] - rss[1] < 64 * 1024, f"the server's memory grew by {(rss[2] - rss[1]) / 1024:.0f} MB in a round"


def test_a_request_held_in_the_model_does_not_stop_the_other_sessions(server):
    url, images = server["url"], server["images"]
    gate = server["gates"] / "held"
    with _client(url) as client:
        held = client.submit(handle_file(images["red"]), "SLOW-held", 4, api_name="/ask")
        time.sleep(1.0)  # it has taken a worker and waits inside it
        assert not held.done()
        started = time.perf_counter()
        results, latencies, wall = _run_sessions(url, images, count=8)
        assert not held.done(), "the held request finished early: the test proves nothing"
        assert not any(isinstance(result, Exception) for result in results), results
        assert wall < 60 and max(seconds for _, seconds in latencies) < 30, _summary(latencies)
        print(f"\n8 sessions beside a held request ({time.perf_counter() - started:.1f} s): {_summary(latencies)}")
        gate.touch()
        _, native, _, compressed, _, status = held.result(timeout=60)
        assert "Prompt of" in status and native is not None and compressed is not None


def test_a_full_queue_refuses_with_a_message_and_the_page_shows_the_queue(server):
    url, images = server["url"], server["images"]
    assert os.path.exists(CHROMIUM), f"no Chromium at {CHROMIUM}: run scripts/install.sh (apt-get install chromium)"
    gates = [server["gates"] / f"busy{i}" for i in range(CONCURRENCY)]
    client = Client(url, verbose=False, download_files=False)
    busy = [client.submit(handle_file(images["blue"]), f"SLOW-{gate.name}", 2, api_name="/ask") for gate in gates]
    try:
        time.sleep(1.0)  # every worker is held
        with sync_api.sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(url)
            page.locator("#search-text textarea").fill("a red square")
            page.locator("#search-button").click()
            # The page names the request's place in the queue while it waits.
            status = page.locator("#search-status .progress-text")
            sync_api.expect(status).to_contain_text(re.compile(r"queue: 1/\d+"), timeout=WAIT_MS)
            page.get_by_role("tab", name="Embed").click()  # the page itself stays usable meanwhile
            sync_api.expect(page.locator("#embed-button")).to_be_visible(timeout=WAIT_MS)
            page.get_by_role("tab", name="Search").click()

            waiting = [client.submit("green", None, 2, api_name="/search") for _ in range(QUEUE_SIZE - 1)]
            time.sleep(1.0)
            refused = client.submit("blue", None, 2, api_name="/search")  # one beyond the queue's size
            with pytest.raises(Exception, match="Queue is full"):
                refused.result(timeout=30)

            for gate in gates:
                gate.touch()
            rows = page.locator("#search-hits tbody tr")
            rows.first.wait_for(timeout=WAIT_MS)
            assert rows.count() == 5  # the default top-k
            assert "Traceback" not in page.content()
            browser.close()
        for job in busy + waiting:
            assert "crem-error" not in repr(job.result(timeout=60))
    finally:
        for gate in gates:
            gate.touch()
        client.close()
