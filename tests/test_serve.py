"""serve.py: POST /predict answers, every bad request gets a clear 4xx/5xx while the server keeps answering,
and the page works in a real (headless) browser."""
import base64
import http.client
import io
import json
import threading
import time
import urllib.error
import urllib.request

import cv2
import numpy as np
import pytest
import torch
import uvicorn
from PIL import Image

import coco_utils
import ensemble as ensembles
import images as imaging
import serve
import utils
from browser import chromium, free_port, start_script, stop  # noqa: F401  (chromium: a fixture)

MAX_UPLOAD = 100_000
MAX_PIXELS = 500_000


@pytest.fixture(scope="module")
def demo_root(demo_set):
    return demo_set(size=96, n_train=1, n_val=1, n_test=1)


@pytest.fixture(scope="module")
def checkpoint(demo_root, write_checkpoint):
    names = coco_utils.Coco(demo_root / "test.json", demo_root, expect_annotations=False).class_names
    return write_checkpoint(demo_root / utils.BEST_CHECKPOINT, names)


@pytest.fixture(scope="module")
def photo(demo_root):
    """A demo image as a PNG of the pixels images.read_image decodes (JPEG decoders may differ by a level)."""
    coco = coco_utils.Coco(demo_root / "test.json", demo_root, expect_annotations=False)
    rgb = imaging.read_image(coco.image_path(coco.images[0]))
    path = demo_root / "photo.png"
    cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    return path, rgb


def expected_mask(checkpoint, rgb):
    """The label map inference.py's code predicts for an image: its ensemble on its [0, 1] tensor."""
    ensemble, _ = ensembles.load_ensemble([str(checkpoint)], "cpu")
    image = ensembles.image_tensor_transform()(image=rgb)["image"]
    with torch.inference_mode():
        return ensemble(image[None])[0].argmax(0).byte().numpy()


class Running:
    """serve.create_app served by uvicorn in a thread on a free port."""

    def __init__(self, segmenter, **limits):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(serve.create_app(segmenter, **limits), host="127.0.0.1", port=self.port,
                                log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "the test server did not start"
            time.sleep(0.05)

    def close(self):
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def segmenter(checkpoint):
    return serve.Segmenter([str(checkpoint)])


@pytest.fixture(scope="module")
def server(segmenter):
    running = Running(segmenter, max_upload_bytes=MAX_UPLOAD, max_pixels=MAX_PIXELS, queue=1)
    yield running.url
    running.close()


def post(url, body=b"", content_type=None, headers=()):
    """(status, content type, body) of a POST; error statuses are returned, not raised."""
    request = urllib.request.Request(url, data=body, method="POST", headers=dict(headers))
    if content_type is not None:
        request.add_header("Content-Type", content_type)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.headers.get_content_type(), response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.headers.get_content_type(), err.read()


def multipart(field, file_name, payload):
    boundary = "testboundary7d3f"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"{file_name}\"\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n").encode() + payload + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def png_bytes(rgb):
    return cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))[1].tobytes()


def assert_refused(server, status, message, body=b"", content_type="image/png"):
    """The request gets `status` with a JSON message saying what is wrong, and the server still answers."""
    got_status, got_type, got = post(server + "/predict", body, content_type)
    assert (got_status, got_type) == (status, "application/json")
    assert message in json.loads(got)["detail"]
    rgb = np.zeros((8, 8, 3), np.uint8)
    assert post(server + "/predict", png_bytes(rgb), "image/png")[0] == 200


def test_predict_json_from_multipart(server, photo, checkpoint):
    path, rgb = photo
    status, content_type, body = post(server + "/predict", *multipart("file", "photo.png", path.read_bytes()))
    assert (status, content_type) == (200, "application/json")
    answer = json.loads(body)
    mask = np.asarray(Image.open(io.BytesIO(base64.b64decode(answer["mask_png"]))))
    expected = expected_mask(checkpoint, rgb)
    np.testing.assert_array_equal(mask, expected)
    assert (answer["height"], answer["width"]) == rgb.shape[:2]
    counts = np.bincount(expected.ravel(), minlength=11)
    assert {c["id"]: c["share"] for c in answer["classes"]} == {
        i: pytest.approx(counts[i] / expected.size) for i in np.flatnonzero(counts)}
    assert [c["share"] for c in answer["classes"]] == sorted((c["share"] for c in answer["classes"]), reverse=True)


@pytest.mark.parametrize("ask", ["?format=png", "accept"])
def test_predict_png_from_raw_body(server, photo, checkpoint, ask):
    path, rgb = photo
    headers = {"Accept": "image/png"} if ask == "accept" else {}
    status, content_type, body = post(server + "/predict" + ("?format=png" if ask != "accept" else ""),
                                      path.read_bytes(), "image/png", headers)
    assert (status, content_type) == (200, "image/png")
    mask = Image.open(io.BytesIO(body))
    assert mask.mode == "P"  # raw labels, coloured by the palette in any viewer
    np.testing.assert_array_equal(np.asarray(mask), expected_mask(checkpoint, rgb))


def test_a_large_photo_is_labelled_without_a_float_map_of_its_size(segmenter, checkpoint, largest_float_tensor,
                                                                   monkeypatch):
    """A 7000 x 7000 PNG once cost 2.7 GB here: 11 probabilities and 3 [0, 1] channels at the photo's size."""
    monkeypatch.setattr(ensembles, "BAND_PIXELS", 2 ** 13)
    height, width = 900, 1000
    rgb = cv2.resize(np.random.default_rng(0).integers(0, 256, (9, 10, 3), dtype=np.uint8), (width, height))
    _, model_largest = largest_float_tensor(  # the weights, the activations, a 64 x 64 photo's probabilities
        lambda: serve.Segmenter([str(checkpoint)]).predict(np.zeros((64, 64, 3), np.uint8)))
    mask, largest = largest_float_tensor(segmenter.predict, rgb)
    assert largest <= max(model_largest, 3 * 64 * width, 11 * 2 ** 13)  # or the photo's rows it reads, a band
    assert largest < height * width
    np.testing.assert_array_equal(mask, expected_mask(checkpoint, rgb))
    assert len(np.unique(mask)) > 1


def test_a_stalled_upload_gets_408_and_the_server_keeps_answering(segmenter):
    running = Running(segmenter, read_timeout=0.5)
    try:
        connection = http.client.HTTPConnection("127.0.0.1", running.port, timeout=30)
        connection.putrequest("POST", "/predict")
        connection.putheader("Content-Type", "image/png")
        connection.putheader("Content-Length", "1000")
        started = time.monotonic()
        connection.endheaders(b"\x89PNG")  # 4 of the 1000 bytes announced, then nothing
        response = connection.getresponse()
        assert response.status == 408 and time.monotonic() - started < 10
        assert json.loads(response.read())["detail"] == ("the upload stalled: nothing arrived for 0.5 s "
                                                         "(--read-timeout) after 4 bytes; send it again")
        connection.close()
        assert post(running.url + "/predict", png_bytes(np.zeros((8, 8, 3), np.uint8)), "image/png")[0] == 200
    finally:
        running.close()


def test_exif_orientation_is_applied(server):
    image = Image.fromarray(np.zeros((48, 64, 3), np.uint8))  # 64 wide, 48 high as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif)
    status, _, body = post(server + "/predict", buffer.getvalue(), "image/jpeg")
    assert status == 200
    assert (json.loads(body)["width"], json.loads(body)["height"]) == (48, 64)


def test_not_an_image_is_refused(server):
    assert_refused(server, 400, "not an image", b"just some text, not a photo")


def test_an_empty_body_is_refused(server):
    assert_refused(server, 400, "empty", b"")


def test_a_truncated_jpeg_is_refused(server, photo):
    _, rgb = photo
    jpeg = cv2.imencode(".jpg", rgb)[1].tobytes()
    assert_refused(server, 400, "truncated", jpeg[: len(jpeg) // 2], "image/jpeg")


def test_a_huge_upload_is_refused(server):
    assert_refused(server, 413, "limit", b"\0" * (MAX_UPLOAD + 1))


def test_an_image_with_too_many_pixels_is_refused(server):
    big = png_bytes(np.zeros((1000, 1000, 3), np.uint8))  # compresses to a few kB: the pixel count decides
    assert len(big) < MAX_UPLOAD
    assert_refused(server, 413, "--max-image-pixels", big)


def test_a_wrong_content_type_is_refused(server, photo):
    path, _ = photo
    assert_refused(server, 415, "Content-Type", path.read_bytes(), "application/json")


def test_multipart_without_the_file_field_is_refused(server, photo):
    path, _ = photo
    assert_refused(server, 400, "'file'", *multipart("photo", "photo.png", path.read_bytes()))


class BlockingSegmenter:
    """A segmenter whose predictions wait until the test lets them finish."""

    def __init__(self, segmenter):
        self.inner = segmenter
        self.started, self.release = threading.Event(), threading.Event()

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def predict(self, rgb):
        self.started.set()
        assert self.release.wait(timeout=60)
        return self.inner.predict(rgb)


def test_a_request_while_another_runs_gets_503_and_both_servers_stay_up(segmenter):
    blocking = BlockingSegmenter(segmenter)
    running = Running(blocking, queue=0)
    try:
        image = png_bytes(np.zeros((8, 8, 3), np.uint8))
        first = {}
        thread = threading.Thread(target=lambda: first.update(answer=post(running.url + "/predict", image, "image/png")))
        thread.start()
        assert blocking.started.wait(timeout=60)
        status, _, body = post(running.url + "/predict", image, "image/png")
        assert status == 503 and "busy" in json.loads(body)["detail"]
        with urllib.request.urlopen(running.url + "/health", timeout=10) as response:  # the loop is not blocked
            assert json.loads(response.read())["busy"] == 1
        blocking.release.set()
        thread.join(timeout=60)
        assert first["answer"][0] == 200
        assert post(running.url + "/predict", image, "image/png")[0] == 200
    finally:
        blocking.release.set()
        running.close()


@pytest.mark.slow
def test_the_page_shows_the_mask_and_legend_in_chromium(chromium, checkpoint, photo, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    path, rgb = photo
    port = free_port()
    with open(tmp_path / "serve.log", "wb") as log:
        process = start_script([serve.__file__, "--checkpoints", str(checkpoint), "--port", str(port), "--device", "cpu"],
                               f"http://127.0.0.1:{port}/health", log=log)
    try:
        chromium.get(f"http://127.0.0.1:{port}/")
        chromium.find_element(By.ID, "file").send_keys(str(path))
        WebDriverWait(chromium, 60).until(lambda d: d.find_element(By.ID, "overlay").get_attribute("data-ready"))
        legend = [item.get_attribute("data-class") for item in chromium.find_elements(By.CSS_SELECTOR, "#legend li")]
        names = coco_utils.Coco(path.parent / "test.json", path.parent, expect_annotations=False).class_names
        expected = expected_mask(checkpoint, rgb)
        assert sorted(legend) == sorted(names[i] for i in np.unique(expected))
        size = chromium.execute_script("const c = document.getElementById('overlay'); return [c.width, c.height];")
        assert size == [rgb.shape[1], rgb.shape[0]]
        assert chromium.find_element(By.ID, "download").get_attribute("href").startswith("data:image/png;base64,")
        screenshot = tmp_path / "serve-page.png"
        chromium.save_screenshot(str(screenshot))
        print(f"screenshot of the page: {screenshot}")
    finally:
        stop(process)
