"""The web page of `dalle serve` in a real headless browser: Debian's chromium driven by Playwright.

One `dalle serve` subprocess (`serve_helpers.ServeProcess`: embedded model, free port on 127.0.0.1, a temporary
`--out`, isolated home, offline) serves this module; the `--api-key` test starts its own and is slow.
Playwright's own browser download cannot work offline, so the browser is the system's `/usr/bin/chromium`
(`apt-get install chromium`; `.ci/run` installs it).
`DALLE_PAGE_SCREENSHOT=/tmp/page.png python -m pytest tests/test_serve_page.py` saves what the page looked like.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from serve_helpers import ServeProcess

CHROMIUM = Path("/usr/bin/chromium")
# Headless, offline and quiet: no sandbox (CI runs as root), no GPU, none of the background calls home.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]
PROMPT = "a red circle on a blue background"
# The server preloads the embedded model, but its first pass is slow (about 1 s alone, 10 s on 2 busy cores).
GENERATION_TIMEOUT_MS = 60_000

if not CHROMIUM.exists():
    pytest.skip(f"no Chromium at {CHROMIUM}: `apt-get install chromium` to run the page tests (CI's .ci/run does)",
                allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="the page tests need `pip install playwright`")


# ---- the server -------------------------------------------------------------------------------------------

def _http(method: str, url: str, body: dict | None = None, key: str | None = None) -> tuple[int, dict]:
    """One plain HTTP request; the status and the JSON body, errors included."""
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _file_of(server: ServeProcess, url: str) -> Path:
    """The file in the output folder that a /files/... URL serves."""
    path = urllib.parse.unquote(urllib.parse.urlparse(url).path)
    assert path.startswith("/files/"), url
    return server.out / path.removeprefix("/files/")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = ServeProcess.start(tmp_path_factory.mktemp("serve"))
    yield s
    s.stop()


# ---- the browser ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        b = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser):
    """A fresh page (its own localStorage) that fails the test on any JavaScript error."""
    context = browser.new_context(viewport={"width": 1100, "height": 900})
    p = context.new_page()
    p.set_default_timeout(30_000)
    errors: list[str] = []
    p.on("pageerror", lambda e: errors.append(str(e)))
    yield p
    screenshot = os.environ.get("DALLE_PAGE_SCREENSHOT")
    if screenshot:
        p.screenshot(path=screenshot, full_page=True)
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def _record_progress(page) -> None:
    """Keep every text the progress line shows: a step can come and go between two looks from the test."""
    page.evaluate("""() => {
        window.progressSeen = [];
        new MutationObserver(() => window.progressSeen.push(document.getElementById('progress').textContent))
            .observe(document.getElementById('progress'), {childList: true, characterData: true, subtree: true});
    }""")


def _wait_for_fresh_images(page, server: ServeProcess, count: int) -> list:
    """Wait until the gallery marks `count` just-made images and each has loaded (64 px: the embedded model)."""
    try:
        page.wait_for_function(
            """n => { const imgs = [...document.querySelectorAll('#gallery .card.fresh > img')];
                      return imgs.length === n && imgs.every(i => i.complete && i.naturalWidth === 64); }""",
            arg=count, timeout=GENERATION_TIMEOUT_MS)
    except sync_api.TimeoutError:
        said = [page.locator(f"#{part}").text_content() for part in ("error", "progress")]
        pytest.fail(f"no {count} new image(s) in the gallery; the page says {said}; "
                    f"the server's log ends:\n{server.log_text()[-3000:]}")
    return page.locator("#gallery .card.fresh").all()


def listed_settings(server: ServeProcess, card) -> dict:
    """The settings /dalle/v1/images lists for a gallery card's image, once its PNG is checked to be in --out."""
    url = card.locator("details a").get_attribute("href")
    assert _file_of(server, url).is_file(), url
    status, body = _http("GET", server.url + "/dalle/v1/images?limit=50")
    assert status == 200, body
    (image,) = [image for image in body["images"] if image["name"] == _file_of(server, url).name]
    return image["settings"]


# ---- the tests --------------------------------------------------------------------------------------------

def test_generate_shows_progress_then_the_images_and_reuses_their_settings(server, page):
    page.goto(server.url + "/")
    page.get_by_label("Prompt", exact=True).fill(PROMPT)
    page.get_by_label("Seed").fill("5")
    page.get_by_label("Images", exact=True).fill("2")
    page.get_by_label("Steps").fill("4")  # a third of the embedded model's 12: the test's share of 2 cores
    _record_progress(page)
    # The warm server makes these images in a fraction of a second, faster than a poll can be sure to land:
    # the progress route answers "busy" here, so that what the page does with a poll is seen every time.
    busy = {"busy": True, "loading": False, "step": 2, "steps": 4, "queued": 1, "model": "shapes"}
    page.route("**/dalle/v1/progress", lambda route: route.fulfill(json=busy))
    page.get_by_role("button", name="Generate").click()

    cards = _wait_for_fresh_images(page, server, 2)
    page.unroute("**/dalle/v1/progress")
    seen = page.evaluate("window.progressSeen")
    assert "step 2 of 4 (1 queued)" in seen, seen
    assert page.locator("#error").text_content() == ""
    described = page.evaluate("""[
        describeProgress({busy: true, loading: true, step: 0, steps: 12, queued: 0, model: "shapes"}),
        describeProgress({busy: true, loading: false, step: 0, steps: 12, queued: 2, model: "shapes"}),
        describeProgress({busy: false, loading: false, step: 0, steps: 0, queued: 0, model: null})]""")
    assert described == ["loading model shapes…", "starting (12 steps)… (2 queued)", "waiting for the server…"]

    # Each image is a PNG in the output folder; the API lists it with the settings it was made with.
    shown = [listed_settings(server, card) for card in cards]
    assert sorted(s["seed"] for s in shown) == [5, 6]
    assert all(s["prompt"] == PROMPT and s["steps"] == 4 for s in shown)

    # Clicking an image opens its parameters; they are the image's own.
    chosen, settings = [(card, s) for card, s in zip(cards, shown) if s["seed"] == 6][0]
    chosen.locator(":scope > img").click()
    parameters = chosen.locator("dl").inner_text()
    for value in (settings["seed"], settings["steps"], settings["model"], f"{settings['width']}×{settings['height']}"):
        assert str(value) in parameters

    # "Use these settings again" puts them back into the form, after the form was changed.
    page.get_by_label("Prompt", exact=True).fill("something else")
    page.get_by_label("Seed").fill("")
    page.get_by_label("Steps").fill("")
    chosen.get_by_role("button", name="Use these settings again").click()
    assert page.get_by_label("Prompt", exact=True).input_value() == PROMPT
    assert page.get_by_label("Seed").input_value() == str(settings["seed"])
    assert page.get_by_label("Steps").input_value() == str(settings["steps"])
    assert page.get_by_label("Width").input_value() == str(settings["width"])
    assert float(page.get_by_label("Guidance").input_value()) == settings["guidance_scale"]

    # ...and they are what the next request sends: seeds from the reused one on, the same prompt and steps.
    page.get_by_role("button", name="Generate").click()
    again = [listed_settings(server, card) for card in _wait_for_fresh_images(page, server, 2)]
    assert sorted(s["seed"] for s in again) == [6, 7]
    assert all(s["prompt"] == PROMPT and s["steps"] == settings["steps"] for s in again)


@pytest.mark.parametrize("field, value", [("Width", "60"), ("Prompt", "")],
                         ids=["width-not-multiple-of-8", "empty-prompt"])
def test_an_api_error_shows_the_servers_message_and_writes_nothing(server, page, field, value):
    page.goto(server.url + "/")
    page.get_by_label("Prompt", exact=True).fill(PROMPT)
    page.get_by_label(field, exact=True).fill(value)
    before = sorted(server.out.rglob("*")) if server.out.exists() else []
    if field == "Prompt":
        page.get_by_label("Prompt", exact=True).press("Control+Enter")  # the keyboard way to generate
    else:
        page.get_by_role("button", name="Generate").click()

    body = {"prompt": PROMPT if field != "Prompt" else "", "n": 1, "response_format": "url"}
    if field == "Width":
        body["size"] = f"{value}x{value}"  # the page copies a missing height from the width
    status, expected = _http("POST", server.url + "/v1/images/generations", body)
    assert status == 400, expected
    error = page.locator("#error")
    sync_api.expect(error).to_have_text(expected["error"]["message"])
    sync_api.expect(page.get_by_role("button", name="Generate")).to_be_enabled()
    assert (sorted(server.out.rglob("*")) if server.out.exists() else []) == before


def test_settings_from_an_image_are_shown_as_text_never_as_markup(server, page):
    """Prompts are user data: an image whose settings hold markup shows it as text, also back in the form."""
    from PIL import Image

    from dallecli.images import write_png

    hostile = '<img src=x onerror="window.pwned=1"> & <b>bold</b>'
    settings = {"prompt": hostile, "negative_prompt": "<script>window.pwned=2</script>", "seed": 3, "steps": 12,
                "guidance_scale": 4.0, "width": 64, "height": 64, "model": '<i onclick="window.pwned=3">m</i>',
                "scheduler": "dpm++", "loras": []}
    # Written the way the server writes its images, so no generation is needed to put it in the gallery.
    name = write_png(Image.new("RGB", (64, 64), "navy"), server.out, settings, "DPM++ 2M").name
    page.goto(server.url + "/")

    card = page.locator("#gallery .card").filter(has=page.locator(f"a[href$='/files/{name}']"))
    sync_api.expect(card.locator(":scope > img")).to_have_js_property("naturalWidth", 64)
    assert card.locator("summary").text_content() == hostile
    assert card.locator(":scope > img").get_attribute("alt") == hostile
    card.locator(":scope > img").click()
    assert settings["negative_prompt"] in card.locator("dl").text_content()
    card.get_by_role("button", name="Use these settings again").click()
    assert page.get_by_label("Prompt", exact=True).input_value() == hostile
    assert page.get_by_label("Negative prompt").input_value() == settings["negative_prompt"]
    assert page.get_by_label("Model").input_value() == settings["model"]
    assert page.locator("#gallery b, #gallery i, #gallery script, #gallery img[src='x'], option i").count() == 0
    assert page.evaluate("window.pwned") is None


def test_before_a_key_is_typed_the_page_asks_for_one_and_shows_a_refusal_only_for_a_typed_key(server, page):
    """A server with a key refuses the page's first calls (no key yet): the page asks for the key in a neutral
    line, not the server's 401 text; a typed key that is refused shows the server's message. The key check is
    the server's own (`auth.key_error`), put in front of the module's server by routing its API calls."""
    from dallecli.serve.auth import key_error

    key = "the-right-key"

    def keyed(route):
        sent = route.request.headers.get("authorization")
        if sent == f"Bearer {key}":
            route.continue_()
        else:
            route.fulfill(status=401, json=key_error(sent).body())

    page.route(lambda url: "/v1/" in urllib.parse.urlparse(url).path, keyed)
    page.goto(server.url + "/")
    error = page.locator("#error")
    sync_api.expect(error).to_have_text("This server asks for an API key: enter it above.")
    sync_api.expect(error).to_have_class("notice")  # shown in the muted colour, not the error's

    page.get_by_label("Prompt", exact=True).fill(PROMPT)
    page.get_by_role("button", name="Generate").click()  # refused for want of a key: still the prompt
    sync_api.expect(page.get_by_role("button", name="Generate")).to_be_enabled()
    sync_api.expect(error).to_have_text("This server asks for an API key: enter it above.")

    page.get_by_label("API key").fill("a-wrong-key")
    page.get_by_label("API key").press("Tab")  # a change event: models and gallery reloaded with the key
    sync_api.expect(error).to_have_text(key_error("Bearer a-wrong-key").message)
    sync_api.expect(error).not_to_have_class("notice")

    page.get_by_label("API key").fill(key)
    page.get_by_label("API key").press("Tab")
    sync_api.expect(error).to_have_text("")
    sync_api.expect(page.locator("#model option")).to_have_text(["server default", "shapes"])  # models listed


@pytest.mark.slow
def test_api_key_the_page_asks_for_the_key_refuses_a_wrong_one_then_works_with_it(tmp_path, browser):
    key = "page-test-key"
    server = ServeProcess.start(tmp_path, "--api-key", key)
    context = browser.new_context()
    try:
        page = context.new_page()
        page.goto(server.url + "/")
        status, expected = _http("GET", server.url + "/v1/models")
        assert status == 401, expected
        # no key typed yet: the page asks for one instead of showing the 401's text
        sync_api.expect(page.locator("#error")).to_have_text("This server asks for an API key: enter it above.")

        page.get_by_label("Prompt", exact=True).fill(PROMPT)
        page.get_by_role("button", name="Generate").click()
        sync_api.expect(page.get_by_role("button", name="Generate")).to_be_enabled()
        sync_api.expect(page.locator("#error")).to_have_text("This server asks for an API key: enter it above.")
        assert not server.out.exists() or not any(server.out.rglob("*.png"))

        page.get_by_label("API key").fill("not-" + key)  # a wrong key: now the server's refusal shows
        page.get_by_label("API key").press("Tab")
        status, refused = _http("GET", server.url + "/v1/models", key="not-" + key)
        assert status == 401, refused
        sync_api.expect(page.locator("#error")).to_have_text(refused["error"]["message"])

        page.get_by_label("API key").fill(key)
        page.get_by_label("API key").press("Tab")  # a change event: stored, models and gallery reloaded
        sync_api.expect(page.locator("#error")).to_have_text("")
        page.get_by_role("button", name="Generate").click()
        (card,) = _wait_for_fresh_images(page, server, 1)
        url = card.locator("details a").get_attribute("href")
        assert _file_of(server, url).is_file()
        assert page.locator("#error").text_content() == ""

        # The key is kept in localStorage for the next visit.
        page.reload()
        assert page.get_by_label("API key").input_value() == key
        sync_api.expect(page.locator("#gallery .card")).to_have_count(1)
    finally:
        context.close()
        server.stop()
