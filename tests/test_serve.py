"""`longcat serve` on the tiny demo checkpoint: a real server on loopback, driven by headless
Chromium (Debian's package) for the page, and by plain HTTP for each safety point."""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import threading
import time
import urllib.error
import urllib.request
from dataclasses import replace
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

from longcat_train.cli import EXIT_CONFIG_ERROR, app
from longcat_train.config import load_config
from longcat_train.demo.synthetic import demo_configs, write_dataset
from longcat_train.lora import read_lora, write_lora
from longcat_train.lora.formats import LoraModule, LoraWeights
from longcat_train.components import load_dit_config
from longcat_train.memory import render_fits, render_peak_gib
from longcat_train.model import LongCatVideoTransformer3DModel
from longcat_train.serve.access import AccessRefused, bind_token
from longcat_train.serve.jobs import RenderJob
from longcat_train.serve.server import build_server
from longcat_train.serve.service import PreviewService, RenderRefused, RenderRequest
from longcat_train.serve.uploads import MAX_IMAGE_BYTES
from longcat_train.training.checkpoint import LORA_FILE, STATE_JSON
from longcat_train.training.loss_plot import write_loss_curve
from longcat_train.validation.command import run_validate
from longcat_train.validation.outputs import write_render
from longcat_train.validation.previews import PreviewRenderer

from .device_guard import ForbiddenOnMps, no_float64_or_cuda

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]
# small renders (5 frames of 48x64, 2 steps with CFG): the VAE decode, most of a render's time on
# the CPU, stays around a second on two cores
RENDER = {"resolution": "48x64", "frames": 5, "steps": 2, "guidance": 4.0, "seed": 5}


def _lora(path: Path, model_dir: Path, seed: int) -> Path:
    transformer = LongCatVideoTransformer3DModel.from_pretrained(model_dir, subfolder="dit")
    generator = torch.Generator().manual_seed(seed)
    modules = {
        name: LoraModule(torch.randn(4, m.in_features, generator=generator) * 0.5,
                         torch.randn(m.out_features, 4, generator=generator) * 0.5, alpha=4.0)
        for name, m in transformer.named_modules() if name.endswith("ffn.w2")
    }
    return write_lora(path, LoraWeights(modules), "comfyui")


def _png(path: Path, height: int = 48, width: int = 80) -> Path:
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8)).save(path)
    return path


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_model) -> Path:
    """The demo project on the tiny model, with what a training run leaves: a checkpoint's LoRA, the
    final LoRA, a validation render at step 2, events.jsonl and loss.png."""
    root = tmp_path_factory.mktemp("serve_project")
    write_dataset(root / "data", count=1, val_count=1)
    config = demo_configs(root, tiny_model, steps=4)
    output = root / "output"
    checkpoint = output / "checkpoint-2"
    checkpoint.mkdir(parents=True)
    _lora(checkpoint / LORA_FILE, tiny_model, seed=1)
    (checkpoint / STATE_JSON).write_text("{}")
    _lora(output / LORA_FILE, tiny_model, seed=2)
    frames = np.random.default_rng(1).integers(0, 255, (9, 64, 64, 3), dtype=np.uint8)
    write_render(output / "validation" / "step_2", "00_a-square-scene", frames)
    events = [{"event": "start", "step": 0}] + [
        {"event": "step", "step": s, "loss": 1.0 / s, "loss_ema": 1.0 / s, "lr": 1e-3} for s in (1, 2)]
    (output / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    write_loss_curve(output / "events.jsonl", output / "loss.png")
    (root / "outside.png").write_bytes((output / "loss.png").read_bytes())
    (output / "escape.png").symlink_to(root / "outside.png")
    return config


class RunningServer:
    def __init__(self, config: Path, **options) -> None:
        self.port = _free_port()
        self.preview = build_server(load_config(config), "127.0.0.1", self.port, "cpu", **options)
        self.thread = threading.Thread(target=self.preview.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.preview.server.started:
            assert time.time() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"

    def request(self, path: str, data: bytes | None = None, headers: dict | None = None,
                method: str | None = None) -> tuple[int, bytes]:
        request = urllib.request.Request(self.url + path, data=data, headers=headers or {}, method=method)
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as error:
            return error.code, error.read()

    def json(self, path: str, body: dict | None = None) -> tuple[int, dict]:
        data = None if body is None else json.dumps(body).encode()
        status, raw = self.request(path, data, {"Content-Type": "application/json"} if data else None)
        return status, json.loads(raw)

    def wait_done(self, job_ids: list[int], timeout: float = 120) -> list[dict]:
        deadline = time.time() + timeout
        while time.time() < deadline:
            jobs = {job["id"]: job for job in self.json("/api/status")[1]["jobs"]}
            if all(jobs[i]["state"] in ("done", "failed") for i in job_ids):
                return [jobs[i] for i in job_ids]
            time.sleep(0.2)
        raise AssertionError(f"renders {job_ids} did not finish in {timeout} s")

    def stop(self) -> None:
        self.preview.server.should_exit = True
        self.thread.join(timeout=60)


@pytest.fixture(scope="module")
def server(project):
    running = RunningServer(project)
    yield running
    running.stop()


def _decode(data: bytes) -> np.ndarray:
    with av.open(io.BytesIO(data)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def test_the_page_renders_compares_and_plays_in_headless_chromium(server, tmp_path) -> None:
    if not CHROMIUM.is_file():
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} is missing: .ci/run installs Debian's chromium")
        pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium)")
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    from playwright.sync_api import sync_playwright

    start = _png(tmp_path / "start.png")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(server.url + "/")
            # the run's LoRAs, validation renders and loss plot are listed
            page.wait_for_function("document.querySelectorAll('#lora option').length >= 3")
            labels = page.eval_on_selector_all("#lora option", "os => os.map(o => o.textContent)")
            assert labels[:3] == ["none", "step 2", "final"]
            page.wait_for_selector("#validation video")
            assert "step 2" in page.inner_text("#validation")
            assert page.get_attribute("#loss", "src").startswith("/files/loss.png")
            assert "step 2: loss 0.5000" in page.inner_text("#last-step")

            # a validation render the training run writes while the page is open shows up by itself
            frames = np.zeros((5, 48, 64, 3), dtype=np.uint8)
            write_render(server.preview.service.folders.output_dir / "validation" / "step_4", "00_later", frames)

            page.set_input_files("#image", str(start))
            page.fill("#prompt", "a red boat on a calm lake")
            for field, value in RENDER.items():
                page.fill(f"#{field}", str(value))
            page.check("#compare")
            page.select_option("#lora-b", label="step 2")
            page.click("#render")
            try:
                page.wait_for_function("document.querySelectorAll('.pair .job[data-state=done] video').length === 2",
                                       timeout=120_000)
            except PlaywrightTimeout:
                raise AssertionError(f"the compared renders did not show: jobs {server.json('/api/status')[1]['jobs']}, "
                                     f"page: {page.inner_text('#jobs')!r}, form: {page.inner_text('#form-error')!r}")
            page.wait_for_function("[...document.querySelectorAll('.pair video')].every(v => v.readyState >= 2 "
                                   "&& v.currentTime > 0)", timeout=30_000)
            shown = page.eval_on_selector_all(".pair video", "vs => vs.map(v => [v.videoWidth, v.videoHeight, "
                                                             "v.duration, new URL(v.src).pathname])")
            page.wait_for_function("document.getElementById('validation').innerText.includes('step 4')")
            page.screenshot(path=str(tmp_path / "serve-page.png"))
            assert "download mp4" in page.inner_text(".pair")
        finally:
            browser.close()

    assert (tmp_path / "serve-page.png").stat().st_size > 0  # the artifact the test keeps
    videos = []
    for width, height, duration, path in shown:
        assert (width, height) == (64, 48) and duration == pytest.approx(5 / 15, abs=0.05)
        status, data = server.request(path)
        assert status == 200
        frames = _decode(data)
        assert frames.shape == (5, 48, 64, 3)
        videos.append(frames)
    assert np.abs(videos[0].astype(int) - videos[1].astype(int)).mean() > 1  # the LoRA changed the render


def test_renders_run_one_at_a_time_and_free_drops_the_model(server, project) -> None:
    status, freed = server.request("/api/free", b"", method="POST")
    assert status == 200 and json.loads(freed) == {"model_loaded": False}
    body = {"prompt": "text only", **RENDER, "steps": 1}
    ids = [server.json("/api/renders", {**body, "seed": seed})[1]["id"] for seed in (1, 2)]
    jobs = server.wait_done(ids)
    assert [(job["state"], job["step"], job["steps"], job["eta_s"]) for job in jobs] == [("done", 1, 1, 0.0)] * 2
    spans = sorted((job["started"], job["finished"]) for job in jobs)
    assert spans[0][1] <= spans[1][0]  # the second started after the first finished
    assert server.json("/api/status")[1]["model_loaded"] is True  # loaded again, and kept


@pytest.mark.parametrize("path", [
    "/files/../config.json", "/files/%2e%2e/config.json", "/files/..%2Fconfig.json", "/files//etc/passwd.png",
    "/files/%2Fetc%2Fpasswd.png", "/files/escape.png", "/files/serve/../../outside.png", "/files/..%5Coutside.png",
    "/files/checkpoint-2/lora.safetensors", "/static/../app.py", "/static/%2e%2e/app.py",
])
def test_no_request_reads_outside_the_run(server, path) -> None:
    status, body = server.request(path)
    assert status in (400, 404), (status, body[:200])
    assert b"longcat" not in body and b"root:" not in body


def test_files_inside_the_run_are_served(server) -> None:
    status, data = server.request("/files/validation/step_2/00_a-square-scene.mp4")
    assert status == 200 and _decode(data).shape == (9, 64, 64, 3)


@pytest.mark.parametrize("field, value", [
    ("image", "../config.json"), ("image", "/etc/passwd"), ("image", "loss.png"),  # not an upload
    ("lora", "../outside.safetensors"), ("lora", "/etc/passwd"), ("lora", "escape.png"),
])
def test_render_requests_name_only_the_runs_files(server, field, value) -> None:
    status, body = server.json("/api/renders", {"prompt": "x", **RENDER, field: value})
    assert status == 409 and value in body["error"]


def test_uploads_are_size_limited_and_decoded_as_images_only(server, project, tmp_path) -> None:
    status, body = server.request("/api/uploads/image", _png(tmp_path / "ok.png").read_bytes())
    stored = project.parent / "output" / json.loads(body)["path"]
    assert status == 200 and stored.parent.name == "uploads" and Image.open(stored).format == "PNG"

    uploads = project.parent / "output" / "serve" / "uploads"
    kept = sorted(uploads.iterdir())
    oversized = b"\x89PNG" + bytes(MAX_IMAGE_BYTES)
    refused = {
        "over the limit": oversized,
        "not an image": b"#!/bin/sh\nrm -rf /\n",
        "a video": (project.parent / "output" / "validation" / "step_2" / "00_a-square-scene.mp4").read_bytes(),
        "a truncated PNG": stored.read_bytes()[:60],
        "a GIF": _gif(),
        "empty": b"",
    }
    for what, data in refused.items():
        status, body = server.request("/api/uploads/image", data)
        assert status == 400, what
        assert "error" in json.loads(body), what
    status, body = server.request("/api/uploads/lora", b"not safetensors at all")
    assert status == 400 and "not a LoRA file" in json.loads(body)["error"]
    assert sorted(uploads.iterdir()) == kept  # nothing refused was kept, no partial file left


def _gif() -> bytes:
    encoded = io.BytesIO()
    Image.new("P", (8, 8)).save(encoded, format="GIF")
    return encoded.getvalue()


def test_an_uploaded_lora_becomes_a_choice(server, project, tmp_path) -> None:
    lora = _lora(tmp_path / "external.safetensors", load_config(project).model_dir, seed=3)
    status, body = server.request("/api/uploads/lora", lora.read_bytes())
    path = json.loads(body)["path"]
    assert status == 200 and path.startswith("serve/uploads/lora-")
    assert path in [choice["path"] for choice in server.json("/api/run")[1]["loras"]]


def test_other_hosts_and_other_origins_are_refused(server) -> None:
    status, _ = server.request("/api/status", headers={"Host": "attacker.example:80"})
    assert status == 400  # a DNS-rebinding page reaches loopback under its own name
    status, _ = server.request("/api/free", b"", {"Origin": "http://attacker.example"}, "POST")
    assert status == 403
    status, _ = server.request("/api/status", headers={"Host": f"localhost:{server.port}"})
    assert status == 200


def test_a_token_is_required_when_one_is_set(project) -> None:
    guarded = RunningServer(project, token="s3cret-token")
    try:
        assert guarded.request("/api/status")[0] == 401
        assert guarded.request("/files/loss.png")[0] == 401
        assert guarded.request("/api/status", headers={"Authorization": "Bearer wrong"})[0] == 401
        assert guarded.request("/api/status", headers={"Authorization": "Bearer s3cret-token"})[0] == 200
        opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor())
        with opener.open(guarded.url + "/?token=s3cret-token", timeout=30) as page:  # the printed link
            assert b"LongCat-Video previews" in page.read()
        with opener.open(guarded.url + "/api/status", timeout=30) as status:  # the cookie it set
            assert json.loads(status.read())["device"] == "cpu"
    finally:
        guarded.stop()


def test_another_host_needs_the_flag_and_a_token(project) -> None:
    from typer.testing import CliRunner

    result = CliRunner().invoke(app, ["serve", "--config", str(project), "--host", "0.0.0.0"])
    assert result.exit_code == EXIT_CONFIG_ERROR and "--allow-remote" in result.output
    with pytest.raises(AccessRefused):
        bind_token("192.0.2.7", allow_remote=False, token=None)
    assert len(bind_token("0.0.0.0", allow_remote=True, token=None)) >= 24  # made when not given
    assert bind_token("0.0.0.0", allow_remote=True, token="given") == "given"
    assert bind_token("::1", allow_remote=False, token=None) is None


def test_progress_says_step_k_of_n_and_the_time_left(monkeypatch) -> None:
    clock = iter([102.0, 103.0, 105.0])
    monkeypatch.setattr("longcat_train.serve.jobs.time.time", lambda: next(clock))
    job = RenderJob(1, {}, state="running", started=100.0)
    job.on_step(1, 4)  # the first step's 2 s include encoding and loading: a rough guess
    assert (job.phase, job.step, job.steps, job.eta_s) == ("denoising", 1, 4, 6.0)
    job.on_step(2, 4)  # then the pace of the steps after the first
    assert job.eta_s == 2.0
    job.on_step(4, 4)
    assert (job.phase, job.eta_s) == ("decoding", 0.0)


@pytest.mark.parametrize("options, named", [
    (["--device", "tpu"], "--device"), (["--device", "cuda"], "--device"), (["--device", "mps"], "--device"),
    (["--gpu-memory", "-1"], "--gpu-memory"), (["--gpu-memory", "nan"], "--gpu-memory"),
])
def test_serve_options_are_checked_before_anything_loads(project, options, named) -> None:
    from typer.testing import CliRunner

    if "cuda" in options and torch.cuda.is_available() or "mps" in options and torch.backends.mps.is_available():
        pytest.skip("this machine has the device")
    result = CliRunner().invoke(app, ["serve", "--config", str(project), *options], env={"COLUMNS": "250"})
    assert result.exit_code == EXIT_CONFIG_ERROR and named in result.output


def test_a_render_predicted_not_to_fit_is_refused(project) -> None:
    service = PreviewService(load_config(project), "cpu", gpu_memory_gib=1.0)
    try:
        with pytest.raises(RenderRefused, match="predicted out of memory: 64x48"):
            service.submit(RenderRequest(prompt="x", **RENDER))
        assert service.queue.jobs() == []
    finally:
        service.close()
    assert render_fits(render_peak_gib("bf16", 48, 64, 5, 4.0, load_dit_config(load_config(project).model_dir)), 80.0)
    # the release at its default 480x832x93 with CFG does not fit a 24 GiB GPU in bf16
    assert not render_fits(render_peak_gib("bf16", 480, 832, 93, 4.0), 24.0)


def test_a_distilled_render_without_the_cfg_step_lora_is_refused_by_name(project) -> None:
    service = PreviewService(load_config(project), "cpu")
    try:
        with pytest.raises(RenderRefused, match="cfg_step_lora.safetensors: distilled previews need"):
            service.submit(RenderRequest(prompt="x", **RENDER, distilled=True))
        assert service.queue.jobs() == []
    finally:
        service.close()


def test_serve_and_validate_render_the_same_video(project, tmp_path) -> None:
    """One render path: the served render and `validate`'s, same settings and LoRA, same pixels."""
    loaded = load_config(project)
    image = _png(tmp_path / "start.png")
    lora = loaded.training.output_dir / "checkpoint-2" / LORA_FILE
    paths = run_validate(loaded, [(lora, 0.7)], image, "a boat", RENDER["resolution"], RENDER["frames"],
                         RENDER["steps"], RENDER["guidance"], RENDER["seed"], output=tmp_path / "validate", device="cpu")
    service = PreviewService(loaded, "cpu")
    try:
        shutil.copyfile(image, service.folders.uploads / "start-copy.png")
        request = RenderRequest(prompt="a boat", image="serve/uploads/start-copy.png",
                                lora=f"checkpoint-2/{LORA_FILE}", lora_strength=0.7, **RENDER)
        job = service.submit(request)
        deadline = time.time() + 120
        while job.state not in ("done", "failed"):
            assert time.time() < deadline
            time.sleep(0.1)
        assert job.state == "done", job.error
        served = np.asarray(Image.open(service.folders.output_dir / job.sheet))
    finally:
        service.close()
    assert np.array_equal(served, np.asarray(Image.open(paths[1])))  # lossless contact sheets


def test_a_cpu_render_makes_no_float64_tensor_and_no_cuda_call(project) -> None:
    loaded = load_config(project)
    renderer = PreviewRenderer(loaded, "cpu")
    lora = loaded.training.output_dir / LORA_FILE
    weights = read_lora(lora).weights
    settings = replace(renderer.default_settings(), height=32, width=32, num_frames=5, steps=2)
    with no_float64_or_cuda():  # the first render: it encodes the prompts and loads the model too
        result = renderer.render("a boat", settings, torch.zeros(3, 1, settings.height, settings.width), [(weights, 1.0)])
    assert result.frames.shape == (settings.num_frames, settings.height, settings.width, 3)
    # the guard does fail on what MPS lacks
    for forbidden in (lambda: torch.zeros(2, dtype=torch.float64), lambda: torch.ones(2).double(),
                      lambda: torch.cuda.synchronize()):
        with pytest.raises(ForbiddenOnMps), no_float64_or_cuda():
            forbidden()
