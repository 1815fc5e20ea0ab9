"""A tool written with Flask (run it under gunicorn): echoes, as JSON, what Flask parsed.

gunicorn -b 127.0.0.1:PORT tests.security.frameworks.flask_echo:app
"""

from __future__ import annotations

import json

from flask import Flask, Response, request

app = Flask(__name__)
SEEN = {"n": 0}
METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE"]


@app.get("/_count")
def count() -> Response:
    return Response(json.dumps(SEEN), mimetype="application/json")


@app.route("/", defaults={"tail": ""}, methods=METHODS)
@app.route("/<path:tail>", methods=METHODS)
def echo(tail: str) -> Response:
    SEEN["n"] += 1
    out: dict = {
        "server": "flask",
        "paths": {"request.path": request.path},
        "pairs": {"args": [list(kv) for kv in request.args.items(multi=True)],
                  # args and form together, as request.values gives them
                  "values": [list(kv) for kv in request.values.items(multi=True)]},
        # request.args[k] / to_dict(): the first value.
        "dicts": {"args.to_dict()": request.args.to_dict(), "values.to_dict()": request.values.to_dict()},
        "json": {},
        "form": [[k, v] for k, v in request.form.items(multi=True)],
        "content_type": request.headers.get("Content-Type"),
        "judged": request.headers.get("X-Judged"),
    }
    parsed = request.get_json(silent=True)  # only for application/json and application/*+json
    if parsed is not None:
        out["json"]["get_json(silent=True)"] = parsed
    if request.get_data():
        forced = request.get_json(force=True, silent=True)  # whatever the Content-Type
        if forced is not None:
            out["json"]["get_json(force=True)"] = forced
    return Response(json.dumps(out), mimetype="application/json")
