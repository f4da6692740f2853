"""`make app`: a small web page on 127.0.0.1 that lip-syncs a video with a registered student.

Upload a talking-head video and a speech file, choose a version of the registered student (its
aliases are shown), and the page plays the result. Each request runs the version's MLflow model with
`full_frame` (the code of `make infer`); the last `loaded_models` versions used stay loaded. Uploads and results
live under `output/<request>/`. It serves one user at a time (requests run in turn): a local tool,
not a service.
"""

from __future__ import annotations

import html
import logging
import sys
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from flask import Flask, abort, redirect, request, send_from_directory

from lipforcing.config import ConfigError, load_config
from pipelines import tracking

log = logging.getLogger("lipforcing.app")
PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>lipforcing: lip-sync a video</title>
<style>body{{font-family:sans-serif;max-width:900px;margin:2em auto}} label{{display:block;margin:.8em 0}}</style>
</head><body><h1>Lip-sync a video</h1>{body}</body></html>"""


@dataclass
class AppConfig:
    host: str = "127.0.0.1"  # loopback only unless told otherwise
    port: int = 7860
    registered_name: str = "lipforcing-student"
    output: str = "outputs/app"  # <output>/<request>/ holds the uploads and the result
    loaded_models: int = 2  # versions kept loaded between requests; the least recently used goes first


class LoadedModels:
    """The last `limit` models used, by URI: a request for another loads it and drops the least
    recently used, so memory holds at most `limit` students whatever the number of versions tried."""

    def __init__(self, limit: int, load: Callable[[str], Any]):
        self.limit, self.load = limit, load
        self.models: OrderedDict[str, Any] = OrderedDict()

    def __getitem__(self, uri: str) -> Any:
        if uri in self.models:
            self.models.move_to_end(uri)
        else:
            model = self.load(uri)  # first: a version that fails to load unloads nothing
            while len(self.models) >= self.limit:
                dropped, _ = self.models.popitem(last=False)
                log.info("unloading %s (app.loaded_models = %d)", dropped, self.limit)
            self.models[uri] = model
        return self.models[uri]


def versions(name: str) -> list[tuple[str, str]]:
    """(version, label) of every registered version, newest first; the label names its aliases."""
    client = mlflow.tracking.MlflowClient()
    try:
        found = client.search_model_versions(f"name = '{name}'")
        aliases = client.get_registered_model(name).aliases  # alias -> version (a search leaves them out)
    except mlflow.exceptions.MlflowException:
        return []
    named: dict[str, list[str]] = {}
    for alias, version in aliases.items():
        named.setdefault(str(version), []).append(f"@{alias}")
    numbers = sorted((str(v.version) for v in found), key=int, reverse=True)
    return [(n, f"version {n}" + (f" ({', '.join(sorted(named[n]))})" if n in named else "")) for n in numbers]


def form(name: str, message: str = "") -> str:
    choices = versions(name)
    if not choices:
        return PAGE.format(body=f"<p>No version of <code>{html.escape(name)}</code> is registered: run <code>make distill</code> first.</p>")
    options = "".join(f'<option value="{v}">{html.escape(label)}</option>' for v, label in choices)
    note = f'<p id="error" style="color:#b00">{html.escape(message)}</p>' if message else ""
    return PAGE.format(body=f"""{note}<form method="post" action="/lipsync" enctype="multipart/form-data">
<label>Video (a talking head) <input type="file" name="video" id="video" accept="video/*" required></label>
<label>New speech <input type="file" name="audio" id="audio" accept="audio/*,video/*" required></label>
<label>Student <select name="version" id="version">{options}</select> of <code>{html.escape(name)}</code></label>
<button type="submit" id="run">Lip-sync</button></form>
<p>Tiny-profile students are random-init: their output shows the plumbing, not lip-sync.</p>""")


def create_app(config: AppConfig) -> Flask:
    app = Flask(__name__)
    root = Path(config.output).resolve()
    models = LoadedModels(config.loaded_models, mlflow.pyfunc.load_model)
    busy = threading.Lock()  # one generation at a time: each holds a student and its activations

    @app.get("/")
    def index() -> str:
        return form(config.registered_name)

    @app.post("/lipsync")
    def lipsync():
        version = request.form.get("version", "")
        if version not in {v for v, _ in versions(config.registered_name)}:
            return form(config.registered_name, f"unknown version {version!r}"), 400
        if "video" not in request.files or "audio" not in request.files:
            return form(config.registered_name, "both a video and a speech file are needed"), 400
        job = uuid.uuid4().hex[:12]
        folder = root / job
        folder.mkdir(parents=True)
        paths = {}
        for field in ("video", "audio"):
            upload = request.files[field]
            paths[field] = folder / f"{field}{Path(upload.filename or '').suffix or '.bin'}"
            upload.save(paths[field])
        rows = pd.DataFrame({"video": [str(paths["video"])], "audio": [str(paths["audio"])],
                             "output": [str(folder / "lipsync.mp4")], "full_frame": [True]})  # fmt: skip
        with busy:
            uri = f"models:/{config.registered_name}/{version}"
            model = models[uri]
            if "full_frame" not in model.metadata.get_input_schema().input_names():  # MLflow would drop the column
                return form(config.registered_name, f"version {version} was registered before whole-video lip-sync: pick a newer one"), 400
            try:
                made = model.predict(rows)
            except Exception as err:  # a clip it cannot lip-sync (too short, unreadable): say why on the page
                log.warning("request %s failed: %s", job, err)
                return form(config.registered_name, f"could not lip-sync: {err}"), 400
        (folder / "about.txt").write_text(f"{uri}: {int(made['frames'][0])} frames, student {made['fps'][0]:.1f} fps")
        return redirect(f"/result/{job}", code=303)

    @app.get("/result/<job>")
    def result(job: str) -> str:
        about = root / job / "about.txt"
        if not job.isalnum() or not about.exists():
            abort(404)
        return PAGE.format(body=f"""<p id="about">{html.escape(about.read_text())}</p>
<video id="result" controls src="/files/{job}/lipsync.mp4" width="640"></video>
<p><a href="/files/{job}/lipsync.mp4" download>download</a> · <a href="/">another</a></p>""")

    @app.get("/files/<job>/<name>")
    def files(job: str, name: str):
        if not job.isalnum():
            abort(404)
        return send_from_directory(root / job, name)

    return app


def main(argv: list[str] | None = None) -> int:
    try:
        config = load_config(AppConfig, overrides=list(sys.argv[1:] if argv is None else argv))
        if config.loaded_models < 1:
            raise ConfigError(f"config key 'loaded_models' is {config.loaded_models}; allowed values: an integer >= 1")
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO)
    tracking.setup_tracking()  # the store the jobs register into
    print(f"lip-sync app on http://{config.host}:{config.port}/ (registered model {config.registered_name})", flush=True)
    create_app(config).run(host=config.host, port=config.port, threaded=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
