"""`predict`: a JSON prediction API in Python, as a wasi:http component.

The model is a multinomial logistic regression for the Iris flowers: four
measurements in centimetres in, a species and its probabilities out. Its
weights were fitted with scikit-learn 1.9 (`LogisticRegression(max_iter=1000)`
on the 150-sample Iris data, 97.3% training accuracy) and are written below,
so the function needs nothing but the standard library.

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

FEATURES = ["sepal_length", "sepal_width", "petal_length", "petal_width"]
CLASSES = ["setosa", "versicolor", "virginica"]
WEIGHTS = [
    [-0.4202, 0.9669, -2.5189, -1.0846],
    [0.5319, -0.3153, -0.2041, -0.9428],
    [-0.1116, -0.6517, 2.7230, 2.0274],
]
BIAS = [9.8417, 2.2245, -12.0662]

MAX_BODY = 64 * 1024
MAX_INSTANCES = 1000


class BadRequest(Exception):
    pass


def predict(x):
    """Class probabilities for one feature vector (a softmax over the logits)."""
    logits = [sum(w * v for w, v in zip(row, x)) + b for row, b in zip(WEIGHTS, BIAS)]
    top = max(logits)
    exps = [math.exp(z - top) for z in logits]
    total = sum(exps)
    probabilities = [e / total for e in exps]
    best = max(range(len(CLASSES)), key=lambda i: probabilities[i])
    return {
        "prediction": CLASSES[best],
        "probabilities": {c: round(p, 4) for c, p in zip(CLASSES, probabilities)},
    }


def features(value):
    """A feature vector from a list of four numbers or an object naming them."""
    if isinstance(value, dict):
        missing = [f for f in FEATURES if f not in value]
        if missing:
            raise BadRequest(f"missing feature(s): {', '.join(missing)}")
        value = [value[f] for f in FEATURES]
    if not isinstance(value, list) or len(value) != len(FEATURES):
        raise BadRequest(f"features must be a list of {len(FEATURES)} numbers: {', '.join(FEATURES)}")
    for v in value:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise BadRequest(f"features must be finite numbers, not {json.dumps(v)}")
    return [float(v) for v in value]


def answer(body):
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
        return {"predictions": [predict(features(x)) for x in instances]}
    if "features" in request:
        return predict(features(request["features"]))
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
                respond(response_out, 200, {
                    "model": "iris multinomial logistic regression",
                    "features": FEATURES,
                    "classes": CLASSES,
                    "usage": 'POST {"features": [5.1, 3.5, 1.4, 0.2]}',
                })
            elif isinstance(method, Method_Post):
                result = answer(read_body(request))
                # A log line: Kelvin forwards it under this invocation's id.
                print(f"predicted for {os.environ.get('KELVIN_INVOCATION_ID', '?')}", file=sys.stderr)
                respond(response_out, 200, result)
            else:
                respond(response_out, 405, {"error": "use GET or POST"})
        except BadRequest as e:
            respond(response_out, 400, {"error": str(e)})
