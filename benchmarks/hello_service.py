"""A hello-world BentoML service: one float in, the same float out. benchmarks/serving.py serves it
beside twin-serve with the same client, so the latency that is BentoML's own (its HTTP server,
middlewares and API machinery, with nothing to compute) stays visible beside the model's.

    bentoml serve hello_service:Hello --working-dir benchmarks --host 127.0.0.1 --port 3000
"""

import os

import bentoml


@bentoml.service(
    name="hello",
    workers=int(os.environ.get("HELLO_WORKERS") or 1),
    http={"host": "127.0.0.1"},
    logging={"access": {"enabled": False}},
)
class Hello:
    @bentoml.api
    async def echo(self, x: float) -> float:
        return x
