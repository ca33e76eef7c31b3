#!/usr/bin/env bash
# Install velda and run the example ML pipeline on the embedded local server.
#   scripts/demo.sh
# velda goes into the virtual environment .venv; the pipeline runs in a copy of
# examples/ml-pipeline under ./demo-run, with its own server state in ./demo-run/.velda.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check .
export PATH=$PWD/.venv/bin:$PATH
run=$PWD/demo-run
[ -f "$run/.velda/server.json" ] && VELDA_HOME=$run/.velda velda server stop >/dev/null
rm -rf "$run" && cp -r examples/ml-pipeline "$run" && chmod -R u+w "$run" && cd "$run"
export VELDA_HOME=$run/.velda VELDA_CONFIG=$run/velda.toml
python3 make_data.py 20
echo "== pipeline.sh: fan-out preprocessing, then train, then eval"
./pipeline.sh
velda task watch eval
echo "== recursive.sh: per file, inference then evaluation"
root=$(./recursive.sh)
velda task watch "$root"
velda task list
echo "== the model and one evaluation"
cat model.txt
velda task log eval
echo "== look around: export VELDA_HOME=$VELDA_HOME; velda task list; velda ui"
