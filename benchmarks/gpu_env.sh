# Sourced by the GPU check scripts: the environment of an offline GPU machine. Wheels for packages it lacks may be
# placed in .whl/ (diffusers, open_clip_torch, ...); jpsdxl runs from the repository root without installing.
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD" JPSDXL_CACHE="${JPSDXL_CACHE:-/tmp/jpsdxl-cache}" HF_HUB_OFFLINE=1
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
