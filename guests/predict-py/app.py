"""`predict`: a JSON prediction API in Python, as a wasi:http component.

The model is a multinomial logistic regression for the Iris flowers: four
measurements in centimetres in, a species and its probabilities out. Its
weights (fitted with scikit-learn 1.9, `LogisticRegression(max_iter=1000)`
on the 150-sample Iris data, 97.3% training accuracy) are a JSON file the
function reads at each request from `MODEL_PATH` (`/model/iris.json`, the
folder `guests/predict-py/model` mounted with `files`), or from a model blob
(`MODEL_PATH=/inputs/model` with a blob input binding): a new model is a new
file or a new blob, not a new deploy. Only the standard library is needed.

    GET  /predict                 what the model expects
    POST /predict                 {"features": [5.1, 3.5, 1.4, 0.2]}
                                  or {"instances": [[...], [...]]}

Built with componentize-py (see docs/languages.md):

    componentize-py -d guests/wit -w kelvin:guest/http componentize \
        -p guests/predict-py app -o target/guests/predict.wasm
"""

import json
import math
import os
import sys

from componentize_py_types import Err, Ok
from wit_world import exports
from wit_world.imports.types import (
    Fields,
    IncomingRequest,
    Method_Get,
    Method_Post,
    OutgoingBody,
    OutgoingResponse,
    ResponseOutparam,
)

MAX_BODY = 64 * 1024
MAX_INSTANCES = 1000


class BadRequest(Exception):
    pass


class NoModel(Exception):
    pass


def load_model():
    """The model, read now: at request time, not when the component was built."""
    path = os.environ.get("MODEL_PATH", "/model/iris.json")
    try:
        with open(path) as f:
            model = json.load(f)
    except (OSError, ValueError) as e:
        raise NoModel(f"the model {path} cannot be read ({e}); mount it with `files` or bind a model blob")
    for key in ("features", "classes", "weights", "bias"):
        if key not in model:
            raise NoModel(f"the model {path} has no {key!r}")
    model["source"] = path
    return model


def predict(model, x):
    """Class probabilities for one feature vector (a softmax over the logits)."""
    classes = model["classes"]
    logits = [sum(w * v for w, v in zip(row, x)) + b for row, b in zip(model["weights"], model["bias"])]
    top = max(logits)
    exps = [math.exp(z - top) for z in logits]
    total = sum(exps)
    probabilities = [e / total for e in exps]
    best = max(range(len(classes)), key=lambda i: probabilities[i])
    return {
        "prediction": classes[best],
        "probabilities": {c: round(p, 4) for c, p in zip(classes, probabilities)},
    }


def features(model, value):
    """A feature vector from a list of numbers or an object naming them."""
    names = model["features"]
    if isinstance(value, dict):
        missing = [f for f in names if f not in value]
        if missing:
            raise BadRequest(f"missing feature(s): {', '.join(missing)}")
        value = [value[f] for f in names]
    if not isinstance(value, list) or len(value) != len(names):
        raise BadRequest(f"features must be a list of {len(names)} numbers: {', '.join(names)}")
    for v in value:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise BadRequest(f"features must be finite numbers, not {json.dumps(v)}")
    return [float(v) for v in value]


def answer(model, body):
    try:
        request = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise BadRequest(f"the body is not JSON: {e}")
    if not isinstance(request, dict):
        raise BadRequest('send an object: {"features": [...]} or {"instances": [[...], ...]}')
    if "instances" in request:
        instances = request["instances"]
        if not isinstance(instances, list) or not 0 < len(instances) <= MAX_INSTANCES:
            raise BadRequest(f"instances must be a list of 1 to {MAX_INSTANCES} feature vectors")
        return {"predictions": [predict(model, features(model, x)) for x in instances]}
    if "features" in request:
        return predict(model, features(model, request["features"]))
    raise BadRequest('send {"features": [...]} or {"instances": [[...], ...]}')


def read_body(request):
    """The whole request body, at most MAX_BODY bytes."""
    body = request.consume()
    stream = body.stream()
    chunks, size = [], 0
    while True:
        try:
            chunk = stream.blocking_read(16 * 1024)
        except Err:
            break  # the stream is closed: the body is complete
        size += len(chunk)
        if size > MAX_BODY:
            raise BadRequest(f"the body is larger than {MAX_BODY} bytes")
        chunks.append(chunk)
    stream.__exit__(None, None, None)
    return b"".join(chunks)


def respond(response_out, status, value):
    data = (json.dumps(value) + "\n").encode()
    response = OutgoingResponse(Fields.from_list([("content-type", b"application/json")]))
    response.set_status_code(status)
    body = response.body()
    ResponseOutparam.set(response_out, Ok(response))
    stream = body.write()
    # blocking-write-and-flush takes at most 4096 bytes at a time.
    for start in range(0, len(data), 4096):
        stream.blocking_write_and_flush(data[start : start + 4096])
    stream.__exit__(None, None, None)
    OutgoingBody.finish(body, None)


class IncomingHandler(exports.IncomingHandler):
    def handle(self, request: IncomingRequest, response_out: ResponseOutparam) -> None:
        method = request.method()
        try:
            if isinstance(method, Method_Get):
                model = load_model()
                respond(response_out, 200, {
                    "model": model.get("model", "a logistic regression"),
                    "source": model["source"],
                    "features": model["features"],
                    "classes": model["classes"],
                    "usage": 'POST {"features": [5.1, 3.5, 1.4, 0.2]}',
                })
            elif isinstance(method, Method_Post):
                body = read_body(request)
                result = answer(load_model(), body)
                # A log line: Kelvin forwards it under this invocation's id.
                print(f"predicted for {os.environ.get('KELVIN_INVOCATION_ID', '?')}", file=sys.stderr)
                respond(response_out, 200, result)
            else:
                respond(response_out, 405, {"error": "use GET or POST"})
        except BadRequest as e:
            respond(response_out, 400, {"error": str(e)})
        except NoModel as e:
            respond(response_out, 503, {"error": str(e)})
