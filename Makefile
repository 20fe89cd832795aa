# Two commands do all the set-up from a fresh clone: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DET_STAMP := $(VENV)/.detectron2
RUN_DIR ?= runs/make-run
DET_DEMO_DIR ?= runs/det-demo

.PHONY: install install-det run det-demo test test-slow clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# detectron2 is not on PyPI: det/install_detectron2.sh installs the upstream wheel (or keeps
# the user's own detectron2) into the venv; the det tests need it.
$(DET_STAMP): $(STAMP) det/install_detectron2.sh
	bash det/install_detectron2.sh $(BIN)/python
	touch $(DET_STAMP)

install-det: $(DET_STAMP)

# A short real AugLocal run on scikit-learn's digits (ships with a dependency: no download).
# RUN_DIR is a demo folder, started afresh each time.
run: install
	rm -rf $(RUN_DIR)
	$(BIN)/python tools/train.py --config configs/quick/digits_resnet20_auglocal.yaml --output-dir $(RUN_DIR)

# The detection counterpart of `make run`: a ResNet-34 trained with AugLocal on digits, exported, then
# Mask R-CNN R34-FPN trained on it for 60 iterations on a generated COCO-format set; prints the AP table.
det-demo: install-det
	rm -rf $(DET_DEMO_DIR)
	$(BIN)/python tools/train.py --config configs/quick/digits_resnet34_auglocal.yaml --output-dir $(DET_DEMO_DIR)/backbone
	$(BIN)/python tools/make_tiny_coco.py $(DET_DEMO_DIR)/coco
	$(BIN)/python tools/det_train.py --config-file configs/det/demo_tiny.yaml \
	    --train-json $(DET_DEMO_DIR)/coco/train/annotations.json --train-images $(DET_DEMO_DIR)/coco/train/images \
	    --test-json $(DET_DEMO_DIR)/coco/test/annotations.json --test-images $(DET_DEMO_DIR)/coco/test/images \
	    MODEL.TIMM.WEIGHTS $(DET_DEMO_DIR)/backbone OUTPUT_DIR $(DET_DEMO_DIR)/det

test: install install-det
	$(BIN)/python -m pytest

test-slow: install install-det
	$(BIN)/python -m pytest -m slow

clean:
	rm -rf $(VENV) runs
