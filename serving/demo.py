"""Ask a running twin-ml server for one scenario (its own /docs.json example) and print the answer.

    python -m serving.demo [--url http://127.0.0.1:3000] [--wait 60]

With TWIN_ML_TOKEN set (a server started with a token), it is sent as the bearer token.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.request


def wait_ready(url: str, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if urllib.request.urlopen(f"{url}/readyz", timeout=1).status == 200:
                return
        except OSError:
            time.sleep(0.3)
    raise SystemExit(f"error: no server ready at {url} after {seconds:g} s")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--url", default="http://127.0.0.1:3000")
    ap.add_argument("--wait", type=float, default=60.0, help="seconds to wait for /readyz")
    args = ap.parse_args(argv)
    wait_ready(args.url, args.wait)
    token = os.environ.get("TWIN_ML_TOKEN")
    auth = {"Authorization": f"Bearer {token}"} if token else {}
    docs = urllib.request.Request(f"{args.url}/docs.json", headers=auth)
    spec = json.load(urllib.request.urlopen(docs, timeout=10))
    scenario = spec["components"]["schemas"]["Scenario"]["example"]
    req = urllib.request.Request(
        f"{args.url}/simulate",
        data=json.dumps({"scenarios": [scenario]}).encode(),
        headers={"Content-Type": "application/json", **auth},
    )
    t0 = time.perf_counter()
    answer = json.load(urllib.request.urlopen(req, timeout=30))[0]
    ms = 1000 * (time.perf_counter() - t0)
    print(f"POST /simulate  {json.dumps(scenario)[:160]}...")
    print(
        f"model {answer['model']['name']}:{answer['model']['version']}  "
        f"in_domain={answer['in_domain']}  "
        f"({ms:.1f} ms round trip)"
    )
    for name, out in answer["outputs"].items():
        lo, hi = out["quantiles"].get("0.05"), out["quantiles"].get("0.95")
        print(f"{'t':>8} {name + ' mean':>12} {'std':>10} {'5%':>10} {'95%':>10}")
        for k in range(0, len(answer["times"]), max(1, len(answer["times"]) // 5)):
            print(
                f"{answer['times'][k]:8.3g} {out['mean'][k]:12.5g} {out['std'][k]:10.3g} "
                f"{lo[k] if lo else float('nan'):10.5g} {hi[k] if hi else float('nan'):10.5g}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
