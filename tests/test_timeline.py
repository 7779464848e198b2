"""The timeline page: self-contained, a bar per phase attempt, write markers whose panel shows
the context as ``state_at`` does, and quick for a session of 10,000 events. The page is driven
in headless Chromium through Playwright (the system ``chromium``)."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import orjson
import pytest

import eventctx
from eventctx import ContextManager, Inspector, PluginRunner, demo
from eventctx.cli import main
from eventctx.timeline import write_timeline

SCRIPT_BREAK = "</script><script>document.title='pwned'</script>"


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Headless Chromium, or a skip saying why it cannot run."""
    try:
        from playwright.sync_api import Error, sync_playwright  # noqa: PLC0415
    except ImportError:
        pytest.skip("playwright is not importable (pip install playwright)")
    executable = next(
        filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None
    )
    if executable is None:
        pytest.skip("no chromium executable found (apt-get install chromium)")
    with sync_playwright() as playwright:
        try:
            found = playwright.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        except Error as exc:
            pytest.skip(f"{executable} cannot be launched: {str(exc).splitlines()[0]}")
        yield found
        found.close()


def _build(fn: Callable[..., None], *args: Any) -> None:
    """Run ``fn`` in another thread: Playwright's sync API keeps an event loop running in this
    one, and the runner (which may run async phases) refuses to run inside a loop."""
    with ThreadPoolExecutor(1) as pool:
        pool.submit(fn, *args).result()


def _demo(url: str) -> None:
    demo.run(url, out=lambda line: None)


def _open(browser: Any, path: Path) -> tuple[Any, list[str]]:
    """A page showing ``path``, ready, and the requests it made for anything but itself."""
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    foreign: list[str] = []
    url = path.resolve().as_uri()
    page.on("request", lambda request: request.url != url and foreign.append(request.url))
    page.goto(url)
    page.wait_for_function("window.timelineReady === true", timeout=30_000)
    return page, foreign


def _writers(state: eventctx.State) -> dict[str, list[Any]]:
    """Each present key's writer as the page shows it: phase, execution, attempt, version, op."""
    return {
        k: [p.phase, p.execution_id, p.attempt, p.version, p.op]
        for k, p in state.provenance.items()
        if k in state.data
    }


def test_demo_page(db_url: str, browser: Any, tmp_path: Path) -> None:
    _build(_demo, db_url)
    path = write_timeline(db_url, demo.SESSION, tmp_path / "timeline.html")
    page, foreign = _open(browser, path)
    assert foreign == []  # no CDN, nothing fetched

    with Inspector(db_url) as insp:
        runs = insp.runs(demo.SESSION)
        writes = list(insp.history(demo.SESSION, types=["KeySet"]))
        first = writes[0]
        later = next(
            w.key for w in writes if w.key not in insp.state_at(demo.SESSION, first.version).data
        )
        expected = insp.state_at(demo.SESSION, first.version)
    attempts = [
        (run.execution_id, name, a.attempt, a.status)
        for run in runs
        for name, phase in run.phase_runs.items()
        for a in phase.attempts
    ]
    assert any(status == "interrupted" for *_, status in attempts)  # the killed attempt
    for execution, name, number, status in attempts:
        bar = page.locator(
            f'.bar[data-execution="{execution}"][data-phase="{name}"][data-attempt="{number}"]'
        )
        assert bar.count() == 1 and bar.get_attribute("data-status") == status
    assert page.locator(".bar").count() == len(attempts)
    assert page.locator("#verify").text_content().startswith("chain verified")

    page.locator(f'.marker[data-version="{first.version}"]').click()
    panel = page.locator("#panel")
    assert panel.get_attribute("data-version") == str(first.version)
    assert orjson.loads(panel.get_attribute("data-state")) == expected.data
    assert orjson.loads(panel.get_attribute("data-writers")) == _writers(expected)
    shown = page.locator("#state tr").evaluate_all("rows => rows.map(r => r.dataset.key)")
    assert shown == list(expected.data) and later not in shown

    page.fill("#search", "no-such-key")  # the filter hides markers and rows of other keys
    assert page.locator('.marker[data-type="KeySet"]').count() == 0
    assert page.locator("#state tr").count() == 0
    page.fill("#search", "")
    page.screenshot(path=str(tmp_path / "timeline.png"), full_page=True)
    assert (tmp_path / "timeline.png").stat().st_size > 0


def _flaky(tries: list[int]) -> Any:
    """A phase whose first attempt writes a key and fails (its write is rolled back)."""

    def flaky(_: Any) -> str:
        tries.append(1)
        eventctx.current_context().set("draft", len(tries))
        if len(tries) == 1:
            raise RuntimeError("first attempt fails")
        return "ok"

    return flaky


def _more_writes(url: str) -> None:
    """After the demo: writes outside phases, a delete, a failed attempt, a clear."""
    with ContextManager(url) as manager:
        ctx = manager.get_context(demo.SESSION)
        ctx.update({"note": SCRIPT_BREAK, "gone": 1})
        ctx.delete("gone")
        PluginRunner(manager, [_flaky([])], retries=1).run(demo.SESSION, input={})
        ctx.refresh()
        ctx.clear()
        ctx.set("after", {"k": [1, None]})


def test_page_fold_equals_state_at(db_url: str, browser: Any, tmp_path: Path) -> None:
    """Without embedded states the page folds the events itself: after every write it must
    agree with ``state_at`` (rollbacks, clears, deletes and writes outside phases included),
    and a stored string cannot break out of the data's script element."""
    _build(_demo, db_url)
    _build(_more_writes, db_url)
    path = write_timeline(db_url, demo.SESSION, tmp_path / "t.html", embed_states_up_to=0)
    assert SCRIPT_BREAK not in path.read_text()
    page, foreign = _open(browser, path)
    assert foreign == [] and page.title() == f"timeline: {demo.SESSION}"
    with Inspector(db_url) as insp:
        versions = [
            e.version
            for e in insp.history(demo.SESSION, types=["KeySet", "KeyDeleted", "ContextCleared"])
        ]
        expected = {v: insp.state_at(demo.SESSION, v) for v in versions}
    found = page.evaluate(
        """versions => versions.map(v => {
            const s = stateAfter(v);
            return [Object.fromEntries(s.data),
                    Object.fromEntries([...s.data.keys()].map(k => [k, s.writers.get(k)]))];
        })""",
        versions,
    )
    for v, (data, writers) in zip(versions, found, strict=True):
        assert data == expected[v].data, v
        assert writers == _writers(expected[v]), v
    assert page.locator(".block[data-outside] .marker").count() > 0  # writes outside phases


def _big_session(url: str, events: int) -> None:
    """A session of about ``events`` events: key writes in small batches outside runs, and
    single writes inside them (so that writes are spread over time)."""
    keys = [f"item.{i:04d}" for i in range(400)]

    def busy(_: Any) -> None:
        ctx = eventctx.current_context()
        for n in range(300):
            ctx.set(keys[n], {"pass": n, "key": keys[n]})

    with ContextManager(url) as manager:
        ctx = manager.create_context("big")
        while ctx.version < events - 1000:
            start = ctx.version % 380
            ctx.update({k: ctx.version + i for i, k in enumerate(keys[start : start + 20])})
        runner = PluginRunner(manager, [busy, _flaky([])], retries=1)
        while ctx.version < events:
            runner.run("big", input={})
            ctx.refresh()


def test_big_session_is_quick(browser: Any, tmp_path: Path) -> None:
    """10,000 events: markers are aggregated per pixel column, the page is interactive quickly
    (the time is printed, not asserted), and a click late in the log folds to ``state_at``."""
    url = f"sqlite:///{tmp_path / 'big.db'}"
    _build(_big_session, url, 10_000)
    path = write_timeline(url, "big", tmp_path / "big.html")
    page, foreign = _open(browser, path)
    assert foreign == []
    ready = page.evaluate("window.timelineReadyMs")
    markers = page.locator(".marker").count()
    writes = page.evaluate("D.events.filter(e => WRITES.has(e[2])).length")
    assert writes > 9000 and markers < writes / 5  # aggregated, at most one per 8 px of a lane
    clicking = page.evaluate(  # the first click folds from the start of the log
        """() => { const t = performance.now();
                   [...document.querySelectorAll(".marker")].pop().click();
                   return performance.now() - t; }"""
    )
    clicked = int(page.locator("#panel").get_attribute("data-version"))
    with Inspector(url) as insp:
        last = list(insp.history("big", types=["KeySet"]))[-1].version
        expected = insp.state_at("big", last)
        assert orjson.loads(page.locator("#panel").get_attribute("data-state")) == (
            insp.state_at("big", clicked).data
        )
    assert page.evaluate("v => Object.fromEntries(stateAfter(v).data)", last) == expected.data
    print(
        f"\n10k-event timeline: interactive after {ready:.0f} ms, {markers} markers for "
        f"{writes} writes, {path.stat().st_size // 1024} KiB; the first click (v{clicked}) "
        f"took {clicking:.0f} ms"
    )


def test_cli_timeline(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite:///{tmp_path / 'demo.db'}"
    _build(_demo, url)
    out = tmp_path / "page.html"
    assert main(["--url", url, "timeline", demo.SESSION, "-o", str(out)]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {out}"
    html = out.read_text()
    assert "<script src" not in html and "http://" not in html and "https://" not in html
    assert main(["--url", url, "timeline", "nope", "-o", str(tmp_path / "x.html")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("eventctx: session 'nope' does not exist") and err.count("\n") == 1
    assert not (tmp_path / "x.html").exists()
    assert (
        main(["--url", url, "timeline", demo.SESSION, "-o", str(tmp_path / "no/dir/x.html")]) == 1
    )
    err = capsys.readouterr().err
    assert err.startswith("eventctx: cannot write") and err.count("\n") == 1
