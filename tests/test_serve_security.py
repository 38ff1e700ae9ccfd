"""`dalle serve` security: loopback unless there is a key, the key on every API route (Bearer, or Basic as Open
WebUI sends it), signed file links, the key never logged, and no FastAPI/torch import for `--help`."""

from __future__ import annotations

import base64
import subprocess
import sys

import httpx
import pytest

from conftest import run_dalle
from serve_helpers import ServeProcess

KEY = "sk-test-0123456789abcdef"

PROTECTED = [
    ("POST", "/v1/images/generations", {"prompt": "a red circle", "steps": 2}),
    ("GET", "/v1/models", None),
    ("POST", "/v1/images/edits", {"prompt": "a red circle"}),  # checked before the body is read: JSON will do
    ("POST", "/v1/images/variations", None),
    ("POST", "/sdapi/v1/txt2img", {"prompt": "a red circle", "steps": 2}),
    ("POST", "/sdapi/v1/img2img", {"prompt": "a red circle", "init_images": []}),
    ("GET", "/sdapi/v1/sd-models", None),
    ("GET", "/sdapi/v1/samplers", None),
    ("GET", "/sdapi/v1/options", None),
    ("POST", "/sdapi/v1/options", {"sd_model_checkpoint": "shapes"}),
    ("GET", "/dalle/v1/images", None),
    ("GET", "/dalle/v1/progress", None),
    ("GET", "/files/0000-1-a-red-circle.png", None),
]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    started = ServeProcess.start(tmp_path_factory.mktemp("secure"), env={"DALLE_API_KEY": KEY})
    yield started
    started.stop()


def test_unit_key_checks_and_loopback_rule():
    from dallecli.errors import UsageError
    from dallecli.serve.auth import file_signature, key_matches, signature_matches
    from dallecli.serve.config import ServeConfig, check_config, is_loopback

    assert key_matches(f"Bearer {KEY}", KEY) and key_matches(f"bearer  {KEY} ", KEY)
    assert key_matches("Basic " + base64.b64encode(f"anyone:{KEY}".encode()).decode(), KEY)
    for wrong in (None, "", KEY, f"Bearer {KEY}x", f"Bearer {KEY[:-1]}", f"Token {KEY}", "Basic !!!",
                  "Basic " + base64.b64encode(KEY.encode()).decode()):
        assert not key_matches(wrong, KEY), wrong
    assert key_matches(None, None)  # no key: loopback only, nothing to check
    assert signature_matches(KEY, "a.png", file_signature(KEY, "a.png"))
    assert not signature_matches(KEY, "b.png", file_signature(KEY, "a.png")) and not signature_matches(KEY, "a.png", None)
    assert all(is_loopback(h) for h in ("127.0.0.1", "127.9.9.9", "localhost", "::1", "[::1]"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "192.168.1.2", "example.com"))
    with pytest.raises(UsageError, match="--api-key"):
        check_config(ServeConfig(host="0.0.0.0"))
    check_config(ServeConfig(host="0.0.0.0", api_key=KEY))
    assert KEY not in repr(ServeConfig(api_key=KEY))


def test_non_loopback_host_without_a_key_does_not_start(tmp_path):
    for host in ("0.0.0.0", "::", "192.0.2.1"):
        done = run_dalle("serve", "--host", host, "--port", "0", "--out", str(tmp_path / "out"), timeout=60)
        assert done.returncode == 2, done.stderr
        assert done.stderr.strip().count("\n") == 0 and "--api-key" in done.stderr
    short = run_dalle("serve", "--host", "0.0.0.0", "--api-key", "short", "--out", str(tmp_path / "out"))
    assert short.returncode == 2 and "at least 8" in short.stderr
    assert not (tmp_path / "out").exists()


def test_help_imports_neither_fastapi_nor_torch():
    code = ("import sys; from dallecli.cli.app import app; sys.argv=['dalle','serve','--help']\n"
            "try: app()\nexcept SystemExit: pass\n"
            "print(sorted(m for m in ('torch','diffusers','fastapi','uvicorn','httpx') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip().splitlines()[-1] == "[]"
    assert "--api-key" in done.stdout and "DALLE_API_KEY" in done.stdout


@pytest.mark.parametrize("method, path, body", PROTECTED)
def test_every_api_route_needs_the_key(server, method, path, body):
    before = sorted(server.out.iterdir()) if server.out.exists() else []
    for headers, code in [({}, "missing_api_key"), ({"Authorization": "Bearer wrong-key-123"}, "invalid_api_key"),
                          ({"Authorization": f"Bearer {KEY[:-1]}"}, "invalid_api_key"),
                          ({"Authorization": KEY}, "invalid_api_key")]:
        answer = httpx.request(method, f"{server.url}{path}", json=body, headers=headers, timeout=60)
        assert answer.status_code == 401, (path, headers, answer.text)
        assert answer.json()["error"]["code"] == code
        assert set(answer.json()["error"]) == {"message", "type", "param", "code"}
    assert (sorted(server.out.iterdir()) if server.out.exists() else []) == before


def test_the_page_itself_is_public(server):
    assert httpx.get(f"{server.url}/").status_code == 200
    assert httpx.get(f"{server.url}/static/index.html").status_code == 200


def test_openai_client_with_the_key_and_signed_file_links(server):
    from openai import AuthenticationError, OpenAI

    with pytest.raises(AuthenticationError):
        OpenAI(base_url=f"{server.url}/v1", api_key="wrong-key-123", max_retries=0).models.list()
    client = OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)
    result = client.images.generate(prompt="a red circle", size="64x64", extra_body={"seed": 1, "steps": 2})
    url = result.data[0].url
    assert "?sig=" in url
    assert httpx.get(url).status_code == 200  # a browser <img> or a plain download: the signed link suffices
    bare, sig = url.split("?sig=")
    assert httpx.get(bare).status_code == 401
    assert httpx.get(f"{bare}?sig={'0' * len(sig)}").status_code == 401
    assert httpx.get(bare, headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    other = bare.rsplit("/", 1)[0] + "/0001-1-a-red-circle.png"
    assert httpx.get(f"{other}?sig={sig}").status_code == 401  # a signature opens its own file only
    page = httpx.get(f"{server.url}/dalle/v1/images", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert httpx.get(page["images"][0]["url"]).status_code == 200


def test_basic_auth_as_open_webui_sends_it(server):
    good = "Basic " + base64.b64encode(f"dalle:{KEY}".encode()).decode()
    bad = "Basic " + base64.b64encode(b"dalle:wrong-key-123").decode()
    assert httpx.get(f"{server.url}/sdapi/v1/options", headers={"authorization": good}).json()["sd_model_checkpoint"]
    assert httpx.get(f"{server.url}/sdapi/v1/options", headers={"authorization": bad}).status_code == 401


def test_the_key_is_never_logged(server):
    httpx.get(f"{server.url}/v1/models", headers={"Authorization": f"Bearer {KEY}"})
    httpx.get(f"{server.url}/v1/models", headers={"Authorization": f"Bearer {KEY}x"})
    assert "API key required" in server.log_text()
    assert KEY not in server.log_text()
