#!/usr/bin/env bash
# The GPU check of issue 14, prepared to run as ONE command on the device machine (an H200; about 15 minutes of
# device time per task). It installs the [gpu] extra (cupy-cuda13x + onnxruntime-gpu, never both onnxruntime
# packages in one environment), runs the whole test suite with the GPU cases enabled, then the engine benchmark on
# the device. Everything it prints and writes goes under $OUT (the device tool fetches it back).
#
#   run: bash tools/gpu_check.sh            (timeout_s ~540, leaving time for one rerun)
#
# Not yet run: no device was lent to the task that prepared it. What still needs the GPU (issue 14): IOBinding
# calibration with the Gram products in CuPy, buffer tuning, and the EfficientNet/MiniLM --device cuda runs.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python -m pip install --quiet --upgrade pip
  python -m pip uninstall --yes --quiet onnxruntime 2>/dev/null
  python -m pip install --quiet -e ".[dev,gpu]"
  python -c "import cupy, onnxruntime as ort; print('cupy', cupy.__version__, cupy.cuda.runtime.getDeviceCount(), 'GPU'); print('ort', ort.__version__, ort.get_available_providers())"
} > "$OUT/setup.txt" 2>&1
timeout 300 python -m pytest -q -m gpu -rs > "$OUT/pytest_gpu.txt" 2>&1; echo "gpu tests rc=$?" >> "$OUT/pytest_gpu.txt"
timeout 200 python tools/bench_engine.py --device cuda > "$OUT/bench_engine_cuda.txt" 2>&1; echo "rc=$?" >> "$OUT/bench_engine_cuda.txt"
tail -n 3 "$OUT"/*.txt
