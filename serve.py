"""A web page and an HTTP endpoint that segment a photo.

    python serve.py --checkpoints runs/demo               # or model.onnx; then open http://127.0.0.1:8000
    curl -F file=@photo.jpg http://127.0.0.1:8000/predict                            # JSON
    curl --data-binary @photo.jpg -H "Content-Type: image/jpeg" "http://127.0.0.1:8000/predict?format=png" > mask.png

POST /predict takes the image as the multipart field `file` or as the raw body
(Content-Type image/* or application/octet-stream) and answers JSON: the image
size, the classes found with the share of the photo each covers, and the mask
as a paletted PNG (base64; raw labels, coloured in any viewer). With
?format=png or `Accept: image/png` it answers the PNG itself. One prediction
runs at a time, off the event loop; up to --queue more wait, later ones get 503.
An upload that sends nothing for --read-timeout seconds gets 408. Huge photos are
labelled band by band from the models' own resolution, so memory stays bounded.
Everything the page needs is inline: nothing is fetched from the internet.
"""
import argparse
import asyncio
import base64
import io

import numpy as np
import torch
from fastapi import FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, JSONResponse, Response
from PIL import Image

import ensemble as ensembles
import images as imaging
import utils

RAW_TYPES = ("image/", "application/octet-stream")


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=utils.HelpFormatter)
    p.add_argument("--checkpoints", nargs="+", default=[ensembles.DEFAULT_CHECKPOINTS],
                   help="checkpoint files, run folders, ONNX files from export.py or globs (an ensemble)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="TCP port to listen on")
    utils.add_device_args(p, amp_help=None)
    p.add_argument("--max-upload-mb", type=utils.positive_float, default=20, help="larger uploads are refused (413)")
    p.add_argument("--max-image-pixels", type=utils.positive_int, default=imaging.MAX_IMAGE_PIXELS,
                   help="larger images are refused (413), as every script refuses them")
    p.add_argument("--queue", type=int, default=4, help="requests that may wait while one runs; more get 503")
    p.add_argument("--read-timeout", type=utils.positive_float, default=30,
                   help="seconds an upload may send nothing before it is dropped (408)")
    return p


class BadUpload(Exception):
    def __init__(self, status, message):
        super().__init__(message)
        self.status = status


def decode_upload(data, max_pixels):
    """An uploaded photo's bytes -> RGB uint8 H x W x 3 as a person sees it, read as every script reads a file."""
    try:
        return imaging.decode_image(data, "upload", max_pixels)
    except imaging.ImageTooLarge as err:
        raise BadUpload(413, f"the image is {err.width}x{err.height} = {err.width * err.height} pixels, more than "
                             f"the limit of {max_pixels} (--max-image-pixels): send a smaller one") from None
    except utils.UserError as err:
        raise BadUpload(400, str(err)) from None


class Segmenter:
    """Photo -> label map at the photo's size, with an ensemble loaded as inference.py loads it."""

    def __init__(self, checkpoints, device="cpu"):
        self.device = device
        self.ensemble, self.class_names = ensembles.load_ensemble(checkpoints, device)
        self.palette = utils.class_palette(len(self.class_names))

    @torch.inference_mode()
    def predict(self, rgb):
        """The labels, made band by band from the probabilities at the models' size (bounded memory)."""
        images = torch.from_numpy(rgb).permute(2, 0, 1)[None].to(self.device)
        return self.ensemble.summarise_images(images, ensembles.labels_of)[0].cpu().numpy()

    def describe(self, mask):
        """The classes in the mask, largest first: id, name, colour and share of the photo's pixels."""
        counts = np.bincount(mask.ravel(), minlength=len(self.class_names))
        return [{"id": int(i), "name": self.class_names[i], "color": "#%02x%02x%02x" % tuple(self.palette[i]),
                 "share": float(counts[i] / mask.size)} for i in np.argsort(-counts, kind="stable") if counts[i]]

    def mask_png(self, mask):
        image = Image.fromarray(mask, mode="P")
        image.putpalette(utils.label_palette(len(self.class_names)).ravel().tolist())
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return buffer.getvalue()


async def read_body(request, max_bytes, timeout):
    """The request body, refused with 413 as soon as it is known to exceed `max_bytes`, and with 408 when
    nothing arrives for `timeout` seconds (uvicorn's timeouts cover idle connections, not a stalled body)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise BadUpload(413, f"the upload is {int(declared)} bytes, more than the limit of {max_bytes} "
                             f"(--max-upload-mb): send a smaller image")
    chunks, size, stream = [], 0, request.stream()
    while True:
        try:
            chunk = await asyncio.wait_for(anext(stream), timeout)
        except StopAsyncIteration:
            break
        except TimeoutError:
            raise BadUpload(408, f"the upload stalled: nothing arrived for {timeout:g} s (--read-timeout) after "
                                 f"{size} bytes; send it again") from None
        size += len(chunk)
        if size > max_bytes:
            raise BadUpload(413, f"the upload is more than the limit of {max_bytes} bytes (--max-upload-mb)")
        chunks.append(chunk)
    return b"".join(chunks)


async def upload_bytes(request, max_bytes, timeout):
    """The image bytes of a request: multipart field `file`, or the raw body."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != "multipart/form-data" and not content_type.startswith(RAW_TYPES):
        raise BadUpload(415, f"Content-Type {content_type or '(none)'} is not accepted: send the image as the "
                             f"multipart field 'file', or as the body with Content-Type image/* or "
                             f"application/octet-stream")
    body = await read_body(request, max_bytes, timeout)
    if content_type == "multipart/form-data":
        body = await multipart_file(request, body)
    if not body:
        raise BadUpload(400, "the upload is empty: send an image as the multipart field 'file' or as the body")
    return body


async def multipart_file(request, body):
    async def replay():
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, replay).form(max_files=1, max_fields=10)
    except Exception as err:  # python-multipart's parse errors, Starlette's limits
        raise BadUpload(400, f"the multipart body cannot be parsed: {err}") from None
    upload = form.get("file")
    if upload is None or isinstance(upload, str):
        raise BadUpload(400, "the multipart body has no file field named 'file'")
    return await upload.read()


class Gate:
    """One prediction at a time; up to `queue` requests wait for it, the rest are told to come back."""

    def __init__(self, queue):
        self.queue = queue
        self.lock = asyncio.Lock()
        self.pending = 0  # only touched on the event loop, so no lock is needed for it

    async def run(self, function, *args):
        if self.pending >= 1 + self.queue:
            raise BadUpload(503, f"busy: {self.pending} requests are running or waiting; try again in a moment")
        self.pending += 1
        try:
            async with self.lock:
                return await run_in_threadpool(function, *args)
        finally:
            self.pending -= 1


def create_app(segmenter, max_upload_bytes=20_000_000, max_pixels=imaging.MAX_IMAGE_PIXELS, queue=4,
               read_timeout=30):
    app = FastAPI(title="recycleseg", docs_url=None, redoc_url=None, openapi_url=None)
    gate = Gate(queue)

    def segment(data):
        mask = segmenter.predict(decode_upload(data, max_pixels))
        return mask, segmenter.describe(mask), segmenter.mask_png(mask)

    @app.get("/", response_class=HTMLResponse)
    async def index():
        return PAGE

    @app.get("/health")
    async def health():
        return {"status": "ok", "classes": segmenter.class_names, "busy": gate.pending}

    @app.post("/predict")
    async def predict(request: Request, format: str = "json"):
        try:
            data = await upload_bytes(request, max_upload_bytes, read_timeout)
            mask, classes, png = await gate.run(segment, data)
        except BadUpload as err:
            headers = {"Retry-After": "1"} if err.status == 503 else None
            raise HTTPException(err.status, str(err), headers=headers) from None
        if format == "png" or request.headers.get("accept", "").startswith("image/png"):
            return Response(png, media_type="image/png")
        return JSONResponse({"width": int(mask.shape[1]), "height": int(mask.shape[0]), "classes": classes,
                             "background_color": segmenter.palette[0].tolist(),
                             "mask_png": base64.b64encode(png).decode("ascii")})

    return app


# The page: plain HTML, CSS and JavaScript, all inline (no CDN, nothing fetched but /predict).
PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>recycleseg</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
#drop { display: block; max-width: 40em; border: 2px dashed #888; border-radius: 8px; padding: 1.5em; text-align: center; cursor: pointer; }
#drop.over { background: #eef; }
#result { display: none; margin-top: 1em; gap: 2em; flex-wrap: wrap; }
#stage { position: relative; width: min(70vw, 640px); }
#stage img { display: block; width: 100%; height: auto; }
#overlay { position: absolute; left: 0; top: 0; width: 100%; height: 100%; }
#legend { list-style: none; padding: 0; }
#legend li { margin: .3em 0; }
.swatch { display: inline-block; width: 1em; height: 1em; margin-right: .5em; vertical-align: middle;
          border: 1px solid #444; }
#status.error { color: #b00; }
</style></head>
<body>
<h1>What is what in this photo?</h1>
<label id="drop">Drop a photo here or click to choose one
  <input id="file" type="file" accept="image/*" hidden></label>
<p id="status"></p>
<div id="result">
  <div id="stage"><img id="photo" alt="your photo"><canvas id="overlay"></canvas></div>
  <div>
    <label>Mask opacity <input id="opacity" type="range" min="0" max="100" value="60"></label>
    <ul id="legend"></ul>
    <a id="download" download="mask.png"><button>Download the mask PNG</button></a>
  </div>
</div>
<script>
const $ = (id) => document.getElementById(id);
const status = (text, error) => { $("status").textContent = text; $("status").className = error ? "error" : ""; };
$("opacity").oninput = () => { $("overlay").style.opacity = $("opacity").value / 100; };
$("file").onchange = () => { if ($("file").files.length) send($("file").files[0]); };
const drop = $("drop");
drop.ondragover = (e) => { e.preventDefault(); drop.classList.add("over"); };
drop.ondragleave = () => drop.classList.remove("over");
drop.ondrop = (e) => { e.preventDefault(); drop.classList.remove("over"); if (e.dataTransfer.files.length) send(e.dataTransfer.files[0]); };

async function send(file) {
  status("Segmenting " + file.name + " ...");
  $("overlay").removeAttribute("data-ready");
  const form = new FormData();
  form.append("file", file);
  let answer;
  try {
    const response = await fetch("/predict", { method: "POST", body: form });
    answer = await response.json();
    if (!response.ok) throw new Error(answer.detail || response.statusText);
  } catch (err) { status("Could not segment " + file.name + ": " + err.message, true); return; }
  // the server applied the EXIF orientation, and so does the browser when it shows the photo
  $("photo").src = URL.createObjectURL(file);
  await showMask(answer);
  showLegend(answer.classes);
  $("download").href = "data:image/png;base64," + answer.mask_png;
  $("result").style.display = "flex";
  $("overlay").style.opacity = $("opacity").value / 100;
  $("overlay").setAttribute("data-ready", "1");
  status(file.name + ": " + answer.width + "x" + answer.height + " pixels");
}

async function showMask(answer) {
  const mask = new Image();
  mask.src = "data:image/png;base64," + answer.mask_png;
  await mask.decode();
  const canvas = $("overlay");
  canvas.width = answer.width; canvas.height = answer.height;
  const context = canvas.getContext("2d");
  context.drawImage(mask, 0, 0);
  const pixels = context.getImageData(0, 0, canvas.width, canvas.height);
  const background = answer.background_color;
  for (let i = 0; i < pixels.data.length; i += 4) {  // background stays see-through
    if (pixels.data[i] === background[0] && pixels.data[i + 1] === background[1] && pixels.data[i + 2] === background[2])
      pixels.data[i + 3] = 0;
  }
  context.putImageData(pixels, 0, 0);
}

function showLegend(classes) {
  const legend = $("legend");
  legend.replaceChildren();
  for (const c of classes) {
    const item = document.createElement("li");
    item.dataset.class = c.name;
    const swatch = document.createElement("span");
    swatch.className = "swatch"; swatch.style.background = c.color;
    item.append(swatch, c.name + " " + (100 * c.share).toFixed(1) + " %");
    legend.append(item);
  }
}
</script>
</body></html>
"""


def main(args):
    import uvicorn

    segmenter = Segmenter(args.checkpoints, args.device)
    app = create_app(segmenter, int(args.max_upload_mb * 1e6), args.max_image_pixels, args.queue, args.read_timeout)
    print(f"serving {len(segmenter.class_names)} classes on http://{args.host}:{args.port}", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    utils.run_main(main, get_args_parser())
