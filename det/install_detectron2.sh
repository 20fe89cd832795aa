#!/usr/bin/env bash
# Install detectron2 into the Python environment of the interpreter given as the first argument
# (or $PYTHON; default: python).
#
# Why this route: detectron2 is not published on PyPI, and building it from source needs a
# compiler plus a CUDA toolkit matching torch. The det plug-in only uses pure-Python parts of
# detectron2 (Mask R-CNN with FPN needs none of its compiled ops: ROIAlign and NMS come from
# torchvision), so we take the pure-Python files of the `sal-detectron2` wheel on PyPI (a
# repackaging of detectron2 0.7.x) and install them without its pinned dependencies.
#
# Idempotent: if `import detectron2` already works (a user's own detectron2, or a previous run),
# nothing is touched.
#
# Usage:  bash det/install_detectron2.sh .venv/bin/python    (or PYTHON=.venv/bin/python ...)
set -euo pipefail

PYTHON="${1:-${PYTHON:-python}}"
D2_VERSION="${D2_VERSION:-0.7.2}"

if found="$("$PYTHON" -c 'import detectron2, os; print(detectron2.__version__, os.path.dirname(detectron2.__file__))' 2>/dev/null)"; then
    echo "detectron2 already importable with $PYTHON ($found); leaving it as is."
    exit 0
fi

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

# The wheel is tagged cp310 but contains only Python sources (plus a cp310 _C extension that is
# never imported by the code paths we use), so it is renamed to a py3 tag to install on any 3.x.
"$PYTHON" -m pip download --no-deps --python-version 3.10 --only-binary=:all: \
    "sal-detectron2==${D2_VERSION}" -d "$tmp"
wheels=("$tmp"/sal_detectron2-"${D2_VERSION}"-*.whl)  # a glob, not `ls | head`: no SIGPIPE under pipefail
cp "${wheels[0]}" "$tmp/sal_detectron2-${D2_VERSION}-py3-none-any.whl"
"$PYTHON" -m pip install --no-deps "$tmp/sal_detectron2-${D2_VERSION}-py3-none-any.whl"

# Runtime dependencies. Its metadata asks for numpy<2, which is stale for the parts we use:
# we do not downgrade numpy (torch/timm wheels need numpy 2), so `pip check` will complain.
# setuptools<81 because detectron2.model_zoo imports pkg_resources.
"$PYTHON" -m pip install yacs "omegaconf>=2.1,<2.4" "hydra-core>=1.1" fvcore iopath \
    pycocotools cloudpickle tabulate termcolor matplotlib tensorboard \
    "setuptools>=77.0.3,<81"

"$PYTHON" -c "import detectron2, detectron2.modeling, detectron2.engine; print('detectron2', detectron2.__version__, 'installed')"
