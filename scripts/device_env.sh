# Source on the H200 machine, in the repository root of the tree the device tool sent (bash):
#   . scripts/device_env.sh && python3 -m pytest -q -m gpu tests/
# Installs the wheels of scripts/device_wheels.sh (carried as .whl) into /tmp/site once per machine, links the
# package's top-level parts where an editable install would find them, and puts both on PYTHONPATH; a GemLite
# source tree carried as .devstage/gemlite (bench/kernels.py's peer) joins the path when present.
if [ ! -d /tmp/site ] && ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
fi
for p in engine evaluation calib_data; do ln -sfn "../$p" "quantlab/$p"; done
export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
[ -d .devstage ] && export PYTHONPATH="$PYTHONPATH:$PWD/.devstage"
