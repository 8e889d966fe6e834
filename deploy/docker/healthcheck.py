#!/opt/venv/bin/python
"""Container health check of the pbs2p image: `pbs2p-healthcheck [api|ray]` (installed in the image's PATH).

api (the default, the image's own HEALTHCHECK): GET /healthz of `pbs2p serve` on 127.0.0.1:$PBS2P_PORT.
ray: GET /api/healthz of the local Ray node's dashboard agent (raylet, and GCS on the head; open without a
Ray token). Exit status 0 when the endpoint answers 200, 1 otherwise, as Docker's HEALTHCHECK expects.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request


def url(role: str) -> str:
    if role == "api":
        return f"http://127.0.0.1:{os.environ.get('PBS2P_PORT', '8000')}/healthz"
    if role == "ray":
        return f"http://127.0.0.1:{os.environ.get('RAY_DASHBOARD_AGENT_LISTEN_PORT', '52365')}/api/healthz"
    raise SystemExit(f"pbs2p-healthcheck: unknown role {role!r}; use api or ray")


def main(argv: list[str]) -> int:
    target = url(argv[0] if argv else "api")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never through a proxy
    try:
        with opener.open(target, timeout=4) as resp:
            ok = resp.status == 200
    except (urllib.error.URLError, OSError) as exc:
        print(f"{target}: {exc}", file=sys.stderr)
        return 1
    if not ok:
        print(f"{target}: HTTP {resp.status}", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
