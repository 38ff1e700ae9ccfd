"""`dalle serve` against real clients: the official openai package, plain HTTP for the errors, the AUTOMATIC1111
routes as Open WebUI calls them, `dalle generate --server`. One server for the module (embedded model, 127.0.0.1,
a free port); the images it makes are compared with in-process `dalle generate` runs, pixel for pixel."""

from __future__ import annotations

import base64
import http.client
import io
import json
import re
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from serve_helpers import ServeProcess, run_dalle_commands

PROMPT = "a red circle on a blue background"


REFERENCES = {  # in-process `dalle generate` runs the server's images must equal, pixel for pixel
    "seed7": ["--seed", "7"],
    "batched": ["--seed", "20", "-n", "4", "--batch-size", "4"],
    "pair": ["--seed", "5", "-n", "2"],
}


EDIT_PROMPT = "a blue square on a white background"


def edit_inputs(folder: Path) -> tuple[Path, Path, np.ndarray]:
    """A red circle on white (64x64) and an OpenAI-style mask (opaque white, transparent = repaint) over its box;
    and the boolean repaint area."""
    from dallecli.training import shapes

    shapes.render(shapes.Scene("circle", "red", "white", 30, 32, 32)).save(folder / "circle.png")
    mask = np.full((64, 64, 4), 255, dtype=np.uint8)
    mask[8:56, 8:56, 3] = 0
    Image.fromarray(mask, "RGBA").save(folder / "mask.png")
    return folder / "circle.png", folder / "mask.png", mask[..., 3] == 0


@pytest.fixture(scope="module")
def started(tmp_path_factory):
    """The module's server, and a thread making the reference images meanwhile (one process for all of them)."""
    folder = tmp_path_factory.mktemp("serve")
    made: dict[str, list[Path]] = {}
    circle, mask, _ = edit_inputs(folder)
    edits = {"edit3": ["edit", str(circle), EDIT_PROMPT, "--mask", str(mask), "--seed", "3"]}

    def references() -> None:
        commands = [["generate", PROMPT, "--out", str(folder / "ref" / name), *args] for name, args in REFERENCES.items()]
        commands += [[*args, "--out", str(folder / "ref" / name)] for name, args in edits.items()]
        for name, result in zip([*REFERENCES, *edits], run_dalle_commands(folder / "ref", commands)):
            assert result["code"] == 0, result["stderr"]
            made[name] = [Path(line) for line in result["stdout"].split()]

    thread = threading.Thread(target=references)
    thread.start()
    server = ServeProcess.start(folder, "--max-queue", "4", "--batch-window", "100")
    yield server, thread, made
    server.stop()
    thread.join()


@pytest.fixture
def server(started):
    return started[0]


@pytest.fixture
def references(started):
    _, thread, made = started
    thread.join()
    assert set(REFERENCES) <= set(made) and "edit3" in made, "the reference run failed"
    return made


def pixels(source) -> np.ndarray:
    image = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
    return np.asarray(image.convert("RGB"))


def chunks(source) -> dict:
    return dict(Image.open(io.BytesIO(source) if isinstance(source, bytes) else source).text)


def listing(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()} if folder.exists() else set()


def wait_until(check, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def progress(server) -> dict:
    return httpx.get(f"{server.url}/dalle/v1/progress").json()


def generate(server, **body) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/images/generations", json=body, timeout=300)


def test_openai_client_b64_json_equals_local_generate_pixel_for_pixel(server, references):
    from openai import OpenAI

    client = OpenAI(base_url=f"{server.url}/v1", api_key="not-needed-on-loopback", max_retries=0)
    result = client.images.generate(model="dall-e-3", prompt=PROMPT, n=1, size="64x64", response_format="b64_json",
                                    quality="hd", extra_body={"seed": 7})
    assert abs(result.created - time.time()) < 600
    item = result.data[0]
    png = base64.b64decode(item.b64_json)
    assert Image.open(io.BytesIO(png)).size == (64, 64)
    assert item.revised_prompt is None
    settings = item.model_extra["dalle"]
    assert json.loads(chunks(png)["dalle"]) == settings and settings["seed"] == 7
    [local] = references["seed7"]
    assert np.array_equal(pixels(png), pixels(local))
    assert chunks(png) == chunks(local)  # both metadata chunks: the same settings as `dalle generate`
    assert "ignored field(s) dalle does not use: quality" in server.log_text()


def test_openai_client_url_format_points_at_the_written_files(server):
    from openai import OpenAI

    client = OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
    result = client.images.generate(prompt="a small green square", n=2, size="64x64", extra_body={"seed": 8, "steps": 3})
    assert [item.model_extra["dalle"]["seed"] for item in result.data] == [8, 9]
    for item in result.data:
        assert item.url.startswith(f"{server.url}/files/") and item.b64_json is None
        fetched = httpx.get(item.url)
        assert fetched.status_code == 200 and fetched.headers["content-type"] == "image/png"
        name = item.url.rsplit("/", 1)[1]
        assert (server.out / name).read_bytes() == fetched.content
        assert pixels(fetched.content).shape == (64, 64, 3)
    assert [m.id for m in client.models.list()] == ["shapes"]


@pytest.mark.parametrize("body, status, param", [
    ({"prompt": ""}, 400, "prompt"),
    ({"prompt": "   "}, 400, "prompt"),
    ({"n": 1}, 400, "prompt"),
    ({"prompt": "x", "n": 0}, 400, "n"),
    ({"prompt": "x", "n": 11}, 400, "n"),
    ({"prompt": "x", "n": "many"}, 400, "n"),
    ({"prompt": "x", "size": "65x64"}, 400, "size"),
    ({"prompt": "x", "size": "4096x4096"}, 400, "size"),
    ({"prompt": "x", "size": "big"}, 400, "size"),
    ({"prompt": "x", "response_format": "jpeg"}, 400, "response_format"),
    ({"prompt": "x", "steps": 0}, 400, "steps"),
    ({"prompt": "x", "seed": -5}, 400, "seed"),
    ({"prompt": "x", "guidance_scale": 1000}, 400, "guidance_scale"),
    ({"prompt": "x", "scheduler": "nonsense"}, 400, "scheduler"),
    ({"prompt": "x", "model": "sd-turbo"}, 404, "model"),
    ({"prompt": "x", "model": "nope"}, 404, "model"),
    ({"prompt": "x", "model": "nobody/nothing"}, 404, "model"),
    ({"prompt": "x", "model": "/etc"}, 404, "model"),
    ({"prompt": "x", "model": "../../models/shapes"}, 404, "model"),
])
def test_bad_requests_get_openai_errors_and_write_nothing(server, body, status, param):
    before = listing(server.out)
    answer = generate(server, **body)
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["type"] == "invalid_request_error" and error["param"] == param
    if status == 404:  # in API words, not the CLI's "--model 'nope' is not a registry alias"
        assert error["code"] == "model_not_found" and error["message"].startswith(f"model '{body['model']}' is not")
    assert listing(server.out) == before


def test_malformed_bodies_unknown_routes_and_large_bodies_keep_the_error_shape(server):
    before = listing(server.out)
    url = f"{server.url}/v1/images/generations"
    for answer, status in [(httpx.post(url, content=b"{not json"), 400), (httpx.post(url, content=b"[1, 2]"), 400),
                           (httpx.get(url), 405), (httpx.get(f"{server.url}/v1/nothing"), 404),
                           (httpx.post(url, content=b"{" + b" " * (4 * 1024 * 1024) + b"}"), 413)]:
        assert answer.status_code == status
        assert set(answer.json()["error"]) == {"message", "type", "param", "code"}
    chunked = httpx.post(url, content=iter([b'{"prompt": "', b"x" * (3 * 1024 * 1024), b"x" * (2 * 1024 * 1024), b'"}']))
    assert chunked.status_code == 413  # no Content-Length: counted as it arrives
    assert listing(server.out) == before


def test_concurrent_requests_become_one_pass_equal_to_a_batched_run_and_a_full_queue_answers_503(server, references):
    answers: dict[int, httpx.Response] = {}

    def ask(seed: int, **extra) -> None:
        answers[seed] = generate(server, prompt=PROMPT, seed=seed, size="64x64", response_format="b64_json", **extra)

    blocker = threading.Thread(target=ask, args=(1,), kwargs={"steps": 400})  # other settings, a pass of its own, long enough to outlast queueing on a loaded machine
    blocker.start()
    wait_until(lambda: progress(server)["busy"] and progress(server)["steps"] == 400)
    waiting = []
    for queued, seed in enumerate((20, 21, 22, 23), start=1):  # one by one, so that the pass keeps this order
        waiting.append(threading.Thread(target=ask, args=(seed,)))
        waiting[-1].start()
        wait_until(lambda: progress(server)["queued"] == queued)
    before = listing(server.out)
    full = generate(server, prompt=PROMPT, seed=99)
    assert full.status_code == 503 and full.json()["error"]["code"] == "queue_full"
    assert not any(name.startswith("0") and "-99-" in name for name in listing(server.out) - before)
    for thread in (blocker, *waiting):
        thread.join()
    assert all(answers[seed].status_code == 200 for seed in (1, 20, 21, 22, 23))
    assert re.search(r"pass \d+: 4 image\(s\) from 4 request\(s\)", server.log_text())
    for seed, path in zip((20, 21, 22, 23), references["batched"]):
        png = base64.b64decode(answers[seed].json()["data"][0]["b64_json"])
        assert np.array_equal(pixels(png), pixels(path)), seed
        assert chunks(png) == chunks(path)


def test_a1111_routes_as_open_webui_calls_them(server):
    headers = {"authorization": "Basic Og=="}  # Open WebUI sends Basic auth (here an empty user:password)
    sdapi = f"{server.url}/sdapi/v1"
    options = httpx.get(f"{sdapi}/options", headers=headers).json()
    assert options["sd_model_checkpoint"] == "shapes"
    models = httpx.get(f"{sdapi}/sd-models", headers=headers).json()
    assert [set(m) for m in models] == [{"title", "model_name", "hash", "sha256", "filename", "config"}]
    options["sd_model_checkpoint"] = models[0]["title"]
    assert httpx.post(f"{sdapi}/options", json=options, headers=headers).status_code == 200
    assert httpx.post(f"{sdapi}/options", json={"sd_model_checkpoint": "sd-turbo"}).status_code == 404
    samplers = httpx.get(f"{sdapi}/samplers").json()
    assert {"Euler a", "DPM++ 2M", "DPM++ 2M Karras", "DDIM"} <= {s["name"] for s in samplers}
    answer = httpx.post(f"{sdapi}/txt2img", headers=headers, timeout=300, json={
        "prompt": "a blue triangle", "negative_prompt": "red", "batch_size": 2, "n_iter": 1, "width": 64, "height": 64,
        "steps": 3, "cfg_scale": 5, "sampler_name": "Euler a", "seed": 3, "restore_faces": False})
    assert answer.status_code == 200, answer.text
    result = answer.json()
    assert set(result) == {"images", "parameters", "info"}
    info = json.loads(result["info"])
    assert info["all_seeds"] == [3, 4] and info["sampler_name"] == "Euler a" and info["cfg_scale"] == 5
    for image, seed in zip(result["images"], (3, 4)):
        png = base64.b64decode(image)
        assert pixels(png).shape == (64, 64, 3)
        text = chunks(png)
        assert f"Seed: {seed}" in text["parameters"] and "Sampler: Euler a" in text["parameters"]
        assert json.loads(text["dalle"])["negative_prompt"] == "red"


def test_files_serves_only_pngs_directly_in_the_output_folder(server):
    secret = server.out.parent / "secret.png"
    secret.write_bytes(b"TOP SECRET")
    (server.out / "sub").mkdir(exist_ok=True)
    (server.out / "sub" / "inner.png").write_bytes(b"TOP SECRET")
    (server.out / "folder.png").mkdir(exist_ok=True)
    link = server.out / "link.png"
    if not link.exists():
        link.symlink_to(secret)
    (server.out / ".tmp-partial.png").write_bytes(b"TOP SECRET")
    (server.out / "notes.txt").write_text("TOP SECRET")
    try:
        attempts = ["/files/..%2Fsecret.png", "/files/%2e%2e%2fsecret.png", "/files/../secret.png",
                    "/files/..%5Csecret.png", "/files/%2Fetc%2Fpasswd", "/files//etc/passwd",
                    "/files/sub%2Finner.png", "/files/sub/inner.png", "/files/link.png", "/files/folder.png",
                    "/files/.tmp-partial.png", "/files/notes.txt", "/files/secret.png%00.png",
                    f"/files/{'%2E%2E%2F' * 8}etc%2Fpasswd", "/static/..%2F..%2Fsecret.png", "/static/../secret.png"]
        for path in attempts:
            connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
            connection.request("GET", path)  # sent exactly as written: no client-side normalisation
            answer = connection.getresponse()
            body = answer.read()
            connection.close()
            assert answer.status in (400, 404), (path, answer.status)
            assert b"TOP SECRET" not in body and b"root:" not in body, path
    finally:
        link.unlink()
        for name in (".tmp-partial.png", "notes.txt", "sub/inner.png"):
            (server.out / name).unlink()
        (server.out / "sub").rmdir(), (server.out / "folder.png").rmdir()


def test_web_page_routes(server):
    page = httpx.get(f"{server.url}/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert httpx.get(f"{server.url}/static/index.html").status_code == 200
    state = progress(server)
    assert set(state) == {"busy", "loading", "step", "steps", "queued", "model"}
    assert state["busy"] is False and state["loading"] is False and state["queued"] == 0
    recent = httpx.get(f"{server.url}/dalle/v1/images", params={"limit": 3}).json()["images"]
    assert 1 <= len(recent) <= 3
    assert [set(item) for item in recent] == [{"url", "name", "created", "settings"}] * len(recent)
    assert [item["created"] for item in recent] == sorted((item["created"] for item in recent), reverse=True)
    first = recent[0]
    assert first["settings"] == json.loads(chunks(server.out / first["name"])["dalle"])
    assert httpx.get(first["url"]).content == (server.out / first["name"]).read_bytes()
    assert httpx.get(f"{server.url}/dalle/v1/images", params={"limit": 0}).status_code == 400


def test_generate_with_server_writes_what_an_in_process_run_writes(server, references, tmp_path):
    from typer.testing import CliRunner

    from dallecli.cli.app import app

    remote = tmp_path / "remote"
    done = CliRunner().invoke(app, ["generate", PROMPT, "--seed", "5", "-n", "2", "--out", str(remote)],
                              env={"DALLE_SERVER": server.url})
    assert done.exit_code == 0, done.output
    written = sorted(remote.glob("*.png"))
    assert done.stdout.split() == [str(p) for p in written]
    local = references["pair"]
    assert [p.name for p in written] == [p.name for p in local]
    for ours, theirs in zip(written, local):
        assert np.array_equal(pixels(ours), pixels(theirs)) and chunks(ours) == chunks(theirs)
    assert not [p for p in remote.iterdir() if p.name.startswith(".tmp")]
    refused = CliRunner().invoke(app, ["generate", PROMPT, "--server", "http://127.0.0.1:9", "--out", str(remote)])
    assert refused.exit_code == 1 and "cannot reach the dalle server at http://127.0.0.1:9" in refused.output
    bad = CliRunner().invoke(app, ["generate", PROMPT, "--server", server.url, "--width", "72", "--height", "4096",
                                   "--out", str(remote)])
    assert bad.exit_code == 2 and "out of range" in bad.output
    assert len(list(remote.glob("*.png"))) == 2


def test_openai_client_edit_keeps_unmasked_pixels_and_equals_a_local_dalle_edit(server, references, tmp_path):
    from openai import OpenAI

    from dallecli.engine.inputs import sha256_file

    circle, mask, repaint = edit_inputs(tmp_path)
    client = OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
    with open(circle, "rb") as image, open(mask, "rb") as mask_file:
        result = client.images.edit(image=image, mask=mask_file, prompt=EDIT_PROMPT, model="dall-e-2", size="64x64",
                                    response_format="b64_json", extra_body={"seed": 3})
    png = base64.b64decode(result.data[0].b64_json)
    after, before = pixels(png), pixels(circle)
    assert np.array_equal(after[~repaint], before[~repaint])  # the kept area, exactly as sent
    assert not np.array_equal(after[repaint], before[repaint])
    settings = result.data[0].model_extra["dalle"]
    assert json.loads(chunks(png)["dalle"]) == settings
    assert (settings["task"], settings["strength"], settings["seed"]) == ("inpaint", 1.0, 3)
    assert settings["init_image"] == {"path": "upload:circle.png", "sha256": sha256_file(circle)}
    assert settings["mask"] == {"path": "upload:mask.png", "sha256": sha256_file(mask)}
    [local] = references["edit3"]  # `dalle edit circle.png PROMPT --mask mask.png --seed 3`, one pass of one image
    assert np.array_equal(after, pixels(local))
    theirs = json.loads(chunks(local)["dalle"])
    assert {k: v for k, v in settings.items() if k not in ("init_image", "mask")} == \
        {k: v for k, v in theirs.items() if k not in ("init_image", "mask")}
    assert theirs["init_image"]["sha256"] == settings["init_image"]["sha256"]


def test_openai_client_variations_take_the_prompt_from_the_image_and_from_refuses_an_upload(server, tmp_path):
    from openai import OpenAI
    from typer.testing import CliRunner

    from dallecli.cli.app import app

    client = OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
    made = client.images.generate(prompt="a yellow triangle", size="64x64", extra_body={"seed": 2, "steps": 5})
    source = server.out / made.data[0].url.rsplit("/", 1)[1]  # a picture with its prompt in its metadata
    with open(source, "rb") as image:
        result = client.images.create_variation(image=image, n=2, size="64x64", extra_body={"seed": 11, "steps": 5})
    stored = json.loads(chunks(source)["dalle"])
    made = [item.model_extra["dalle"] for item in result.data]
    assert [(s["task"], s["strength"], s["seed"], s["prompt"]) for s in made] == \
        [("variation", 0.6, seed, stored["prompt"]) for seed in (11, 12)]
    assert all(s["init_image"]["path"] == f"upload:{source.name}" for s in made)
    copy = tmp_path / "variation.png"
    copy.write_bytes(httpx.get(result.data[0].url).content)
    replay = CliRunner().invoke(app, ["generate", "--from", str(copy), "--out", str(tmp_path / "out")])
    assert replay.exit_code == 2 and "from an uploaded init image" in replay.output
    assert "no copy was kept" in replay.output and "Traceback" not in replay.output


def test_edit_and_variation_errors_are_openai_errors_and_write_nothing(server, tmp_path):
    circle, mask, _ = edit_inputs(tmp_path)
    Image.new("L", (32, 32), 255).save(tmp_path / "small.png")
    before = listing(server.out)
    edits, variations = f"{server.url}/v1/images/edits", f"{server.url}/v1/images/variations"

    def post(url, files, **data) -> dict:
        answer = httpx.post(url, files=files, data=data, timeout=300)
        assert answer.status_code != 200, answer.text
        return {"status": answer.status_code, **answer.json()["error"]}

    image, small = ("image", circle.read_bytes()), ("small.png", (tmp_path / "small.png").read_bytes())
    cases = [
        (post(edits, {"image": image, "mask": small}, prompt="x"), 400, "mask", None),
        (post(edits, {"mask": small}, prompt="x"), 400, "image", "missing_required_parameter"),
        (post(edits, {"image": ("notes.png", b"not a picture")}, prompt="x"), 400, "image", None),
        (post(edits, {"image": image}, prompt="x"), 400, None, None),  # opaque and no mask: nothing to repaint
        (post(edits, {"image": image, "mask": ("m.png", mask.read_bytes())}), 400, "prompt", None),
        (post(edits, [("image[]", image), ("image[]", image)], prompt="x", strength="0.05", steps="4"), 400,
         "strength", None),
        (post(edits, {"image": image, "mask": ("m.png", mask.read_bytes())}, prompt="x", model="pixart-sigma"), 400,
         "model", "model_cannot_do_task"),
        (post(variations, {"image": image}, model="nope"), 404, "model", "model_not_found"),
        (post(variations, {"image": ("big.png", b"\0" * (17 * 1024 * 1024))}), 413, None, "request_too_large"),
        (post(variations, None, image="not a file"), 400, "image", "invalid_image"),
    ]
    for error, status, param, code in cases:
        assert (error["status"], error["param"]) == (status, param), error
        assert code is None or error["code"] == code, error
    assert "cannot do edit" in cases[6][0]["message"] and "runs no denoising step" in cases[5][0]["message"]
    assert "/v1/images/edits: 2 images sent; dalle uses the first" in server.log_text()
    assert listing(server.out) == before


def test_api_errors_name_the_request_field_never_the_cli_flag(server, tmp_path):
    """The engine's range checks (one rule for every command) in the API's words: "Invalid value for 'steps'",
    A1111's 'cfg_scale' and 'denoising_strength', never "--steps"; the CLI keeps its flags."""
    from dallecli.engine.request import field_problem

    circle, _, _ = edit_inputs(tmp_path)
    image = ("image", circle.read_bytes())
    before = listing(server.out)

    def json_error(path: str, **body) -> dict:
        answer = httpx.post(f"{server.url}{path}", json=body, timeout=300)
        assert answer.status_code == 400, answer.text
        return answer.json()["error"]

    def form_error(path: str, **data) -> dict:
        answer = httpx.post(f"{server.url}{path}", files={"image": image}, data=data, timeout=300)
        assert answer.status_code == 400, answer.text
        return answer.json()["error"]

    generations, init = "/v1/images/generations", base64.b64encode(circle.read_bytes()).decode()
    cases = [
        (json_error(generations, prompt="x", steps=0), "steps",
         "Invalid value for 'steps': must be between 1 and 1000, the diffusion's training timesteps (got 0)"),
        (json_error(generations, prompt="x", guidance_scale=1000), "guidance_scale",
         "Invalid value for 'guidance_scale': must be between 0 and 100 (got 1000.0)"),
        (json_error(generations, prompt="x", seed=-5), "seed",
         "Invalid value for 'seed': must be between 0 and 4294967295, or -1 for a random seed (got -5)"),
        (json_error(generations, prompt="x", clip_skip=0), "clip_skip",
         "Invalid value for 'clip_skip': must be a whole number >= 1 (1 = no skip, 2 = penultimate layer; got 0)"),
        (json_error(generations, prompt="x", size="65x64"), "size",
         "Invalid value for 'size': 65 is not a multiple of 8; the nearest valid sizes are 64 and 72"),
        (json_error(generations, prompt="x", size="4096x4096"), "size",
         "Invalid value for 'size': 4096 is out of range (8-2048 pixels on this server)"),
        (json_error(generations, prompt="x", width=60), "width",
         "Invalid value for 'width': 60 is not a multiple of 8; the nearest valid sizes are 56 and 64"),
        (json_error(generations, prompt="x", n=11), "n", "Invalid value for 'n': 11; it must be between 1 and 10"),
        (form_error("/v1/images/edits", prompt="x", strength="1.5"), "strength",
         "Invalid value for 'strength': must be above 0 and at most 1 (got 1.5)"),
        (form_error("/v1/images/edits", prompt="x", strength="0.05", steps="4"), "strength",
         "'strength' 0.05 with 4 'steps' runs no denoising step (int(4 x 0.05) = 0); send 'steps' 20 or more, or a "
         "higher 'strength'"),
        (form_error("/v1/images/variations", steps="1"), "steps",  # the default strength, 0.6
         "'strength' 0.6 with 1 'steps' runs no denoising step (int(1 x 0.6) = 0); send 'steps' 2 or more, or a "
         "higher 'strength'"),
        (json_error("/sdapi/v1/txt2img", prompt="x", steps=2000), "steps",
         "Invalid value for 'steps': must be between 1 and 1000, the diffusion's training timesteps (got 2000)"),
        (json_error("/sdapi/v1/txt2img", prompt="x", cfg_scale=-1), "cfg_scale",
         "Invalid value for 'cfg_scale': must be between 0 and 100 (got -1.0)"),
        (json_error("/sdapi/v1/img2img", prompt="x", init_images=[init], denoising_strength=0), "denoising_strength",
         "Invalid value for 'denoising_strength': must be above 0 and at most 1 (got 0.0)"),
        (json_error("/sdapi/v1/img2img", prompt="x", init_images=[init], denoising_strength=0.01, steps=3),
         "denoising_strength", "'denoising_strength' 0.01 with 3 'steps' runs no denoising step (int(3 x 0.01) = 0); "
         "send 'steps' 100 or more, or a higher 'denoising_strength'"),
    ]
    for error, param, message in cases:
        assert (error["param"], error["message"]) == (param, message), error
        assert "--" not in error["message"], error
    assert listing(server.out) == before
    # the CLI's wording stays the CLI's
    assert field_problem("steps", 0).startswith("--steps must be between 1 and 1000")


def test_a1111_img2img_with_and_without_a_mask(server, tmp_path):
    circle, _, _ = edit_inputs(tmp_path)
    white = np.zeros((64, 64), dtype=np.uint8)
    white[:, 32:] = 255  # A1111's masks: white = repaint
    mask = io.BytesIO()
    Image.fromarray(white).save(mask, format="PNG")
    encoded = base64.b64encode(circle.read_bytes()).decode()
    common = {"prompt": "a green triangle on a white background", "steps": 4, "seed": 5, "cfg_scale": 4}
    for extra in ({"mask": base64.b64encode(mask.getvalue()).decode(), "denoising_strength": 1.0},
                  {"denoising_strength": 0.5}):
        answer = httpx.post(f"{server.url}/sdapi/v1/img2img", timeout=300,
                            json={**common, "init_images": ["data:image/png;base64," + encoded], **extra})
        assert answer.status_code == 200, answer.text
        result = answer.json()
        info, png = json.loads(result["info"]), base64.b64decode(result["images"][0])
        settings = json.loads(chunks(png)["dalle"])
        assert info["denoising_strength"] == extra["denoising_strength"] and info["all_seeds"] == [5]
        assert f"Denoising strength: {extra['denoising_strength']:g}" in chunks(png)["parameters"]
        if "mask" in extra:
            assert settings["task"] == "inpaint"
            assert np.array_equal(pixels(png)[:, :32], pixels(circle)[:, :32])
        else:
            assert settings["task"] == "img2img" and settings["init_image"]["path"] == "upload:init_images[0]"


def test_sigterm_finishes_the_pass_in_flight_writes_no_partial_file_and_exits_0(server):
    answers = []
    thread = threading.Thread(target=lambda: answers.append(generate(server, prompt="a purple square", seed=31,
                                                                     steps=25, size="64x64")))
    thread.start()
    wait_until(lambda: progress(server)["busy"] and progress(server)["steps"] == 25)
    assert server.stop() == 0
    thread.join()
    assert answers[0].status_code == 200  # the pass in flight finished and was answered
    names = listing(server.out)
    assert not [n for n in names if n.startswith(".tmp")]
    assert any("-31-a-purple-square" in n for n in names)
    from dallecli.images import read_metadata

    for name in names:
        if name.endswith(".png"):
            read_metadata(server.out / name)  # whole, readable PNGs only
    assert "dalle serve: stopped" in server.log_text()
