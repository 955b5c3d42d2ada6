# Two commands set everything up on a fresh machine:
#   make demo   - create/reuse .venv, install edgepix, run the main job end to end
#   make test   - create/reuse .venv, install edgepix with test tools, run the test suite
# Machines without an NVIDIA driver get the CPU build of PyTorch (a bare `pip install torch` pulls a multi-GB
# CUDA build on Linux). Override with TORCH_SPEC / TORCH_INDEX, e.g. TORCH_INDEX= make test to use PyPI's build.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
PYTRITON_SPEC ?= nvidia-pytriton==0.7.0
HAS_NVIDIA := $(shell command -v nvidia-smi >/dev/null 2>&1 && echo yes)
ifeq ($(HAS_NVIDIA),yes)
TORCH_INDEX ?=
ORT_EXTRA ?= gpu
else
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
ORT_EXTRA ?= cpu
endif
STAMP := $(VENV)/.edgepix-installed
DEMO_DIR ?= .demo

.PHONY: setup system-tools system-opencv-env demo test clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@# The CPU wheel index is used when it answers; behind a mirror-only network pip's own index serves torch.
	if [ -n "$(TORCH_INDEX)" ] && $(PY) -c "import urllib.request as u; u.urlopen('$(TORCH_INDEX)', timeout=5)" 2>/dev/null; then \
		$(PY) -m pip install --quiet "$(TORCH_SPEC)" --index-url $(TORCH_INDEX); \
	else \
		$(PY) -m pip install --quiet "$(TORCH_SPEC)"; \
	fi
	$(PY) -m pip install --quiet -e ".[$(ORT_EXTRA),train,hub,triton,openvino,plot,scale,litert,tflite-convert,tflite-export,dev]"
	@# A real Triton Inference Server for tests/test_fleet.py: the tritonserver binary and its Python backend from
	@# NVIDIA's nvidia-pytriton wheel (x86_64 Linux, glibc >= 2.35), files only: pytriton's own Python dependencies
	@# pin numpy<2, which this environment does not take (tests/triton_server.py says how the server runs).
	if [ "$$(uname -sm)" = "Linux x86_64" ]; then \
		$(PY) -m pip install --quiet --no-deps --upgrade --target $(VENV)/pytriton "$(PYTRITON_SPEC)"; fi
	touch $(STAMP)

# The stream tests serve a real network stream with ffmpeg, screenshot the MJPEG page in headless Chromium and
# open display:// windows on Xvfb. Installed with apt-get when missing and running as root; otherwise this says
# how (the tests that need them skip). Entries are command:package.
SYSTEM_TOOLS := ffmpeg:ffmpeg chromium:chromium Xvfb:xvfb
# Real street footage for the tests of models as they come (tests/test_foreign_outputs.py, which falls back to the
# synthetic scenes without it): OpenCV's sample video vtest.avi, from Debian's opencv-doc.
REAL_VIDEO := /usr/share/doc/opencv-doc/examples/data/vtest.avi
# GLib's key-file parser for the system python3: the DeepStream config tests read the configs with it.
GLIB_KEYFILE_PACKAGES := python3-gi gir1.2-glib-2.0
# The GStreamer tests: the system's OpenCV (built with GStreamer), GStreamer's Python bindings, venv, and every
# element their pipelines use, each checked: GSTREAMER_ELEMENTS is tests/test_gstreamer.py's GST_ELEMENTS (which
# names each one's package; tests/test_setup.py fails when a pipeline there uses an element missing from either).
# capsfilter, filesrc: libgstreamer1.0-0; appsrc, appsink, decodebin, videoconvert, videotestsrc: -base;
# rtph264pay, rtph264depay, udpsrc, udpsink: -good; h264parse: -bad; x264enc: -ugly; avdec_h264: -libav;
# gst-launch-1.0, gst-inspect-1.0: -tools.
GSTREAMER_PACKAGES := python3-opencv python3-gst-1.0 python3-venv gstreamer1.0-tools libgstreamer1.0-0 \
	gstreamer1.0-plugins-base gstreamer1.0-plugins-good gstreamer1.0-plugins-bad gstreamer1.0-plugins-ugly \
	gstreamer1.0-libav
GSTREAMER_ELEMENTS := appsink appsrc avdec_h264 capsfilter decodebin filesrc h264parse rtph264depay rtph264pay \
	udpsink udpsrc videoconvert videotestsrc x264enc
GSTREAMER_CHECK := /usr/bin/python3 -c "import cv2, ensurepip, gi; gi.require_version('Gst', '1.0')" && \
	for e in $(GSTREAMER_ELEMENTS); do gst-inspect-1.0 --exists $$e || exit 1; done
system-tools:
	@missing=""; for t in $(SYSTEM_TOOLS); do command -v $${t%%:*} >/dev/null 2>&1 || missing="$$missing $${t#*:}"; done; \
	/usr/bin/python3 -c "import gi" >/dev/null 2>&1 || missing="$$missing $(GLIB_KEYFILE_PACKAGES)"; \
	[ -f $(REAL_VIDEO) ] || missing="$$missing opencv-doc"; \
	($(GSTREAMER_CHECK)) >/dev/null 2>&1 || missing="$$missing $(GSTREAMER_PACKAGES)"; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing$$missing (for the stream tests)"; \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq$$missing >/dev/null) \
			|| echo "could not install$$missing; the stream tests that need them will be skipped"; \
	else \
		echo "note: the stream tests need$$missing: sudo apt-get install$$missing (they are skipped without)"; \
	fi

# An environment of the system's Python and OpenCV (python3-opencv, with GStreamer), edgepix installed in it as
# docs/install.md says for such systems (no opencv-python wheel): tests/test_gstreamer.py runs the CLI there. Made
# where python3-opencv is installed (the tests skip elsewhere), again when pyproject.toml changes.
# In the checkout, like .venv: edgepix is installed into it editable from this folder. The real Triton server's
# Python-backend models run in it too (tests/triton_server.py): the backend stub links against the system's
# libpython and needs numpy<2.
SYSTEM_OPENCV_ENV ?= $(CURDIR)/.venv-system
export EDGEPIX_SYSTEM_OPENCV_ENV := $(abspath $(SYSTEM_OPENCV_ENV))
system-opencv-env: system-tools
	@stamp=$(SYSTEM_OPENCV_ENV)/.edgepix-installed; \
	if ! /usr/bin/python3 -c "import cv2" >/dev/null 2>&1; then \
		echo "note: no python3-opencv, so no $(SYSTEM_OPENCV_ENV): the GStreamer tests are skipped"; \
	elif [ ! -f $$stamp ] || [ pyproject.toml -nt $$stamp ]; then \
		echo "making $(SYSTEM_OPENCV_ENV) (the system's Python and OpenCV, for the GStreamer tests)"; \
		{ test -x $(SYSTEM_OPENCV_ENV)/bin/python || /usr/bin/python3 -m venv --system-site-packages $(SYSTEM_OPENCV_ENV); } \
		&& $(SYSTEM_OPENCV_ENV)/bin/python -m pip install --quiet -e . onnxruntime "numpy<2" && touch $$stamp \
		|| echo "could not make $(SYSTEM_OPENCV_ENV); the GStreamer tests will be skipped"; \
	fi

setup: $(STAMP) system-tools system-opencv-env

# The docs build into build/ (ignored); --strict fails on broken links, missing anchors and pages left out of the nav
# (without --quiet, which hides the warnings that --strict counts; tests/test_docs_links.py checks README.md's).
test: setup
	$(VENV)/bin/ruff check .
	$(PY) -m mkdocs build --strict --site-dir build/docs-site
	$(PY) -m pytest -q

# The main job end to end, small enough for a laptop CPU (a few minutes): data, training, verified export,
# a live-style stream segmented into a video file, and a benchmark against PyTorch.
demo: setup
	$(PY) -m edgepix doctor
	$(PY) -m edgepix data synth --out $(DEMO_DIR)/data --n 1000 --size 256 256 --seed 0
	$(PY) -m edgepix train seg --data $(DEMO_DIR)/data --model fastscnn --imgsz 256 --epochs 5 --out $(DEMO_DIR)/run --exist-ok
	$(PY) -m edgepix val seg $(DEMO_DIR)/run/best.pt --data $(DEMO_DIR)/data
	$(PY) -m edgepix export $(DEMO_DIR)/run/best.pt --format onnx --out $(DEMO_DIR)/fastscnn.onnx
	$(PY) -m edgepix export $(DEMO_DIR)/run/best.pt --format onnx-int8 --argmax --out $(DEMO_DIR)/fastscnn.int8.argmax.onnx
	$(PY) -m edgepix info $(DEMO_DIR)/fastscnn.int8.argmax.onnx
	$(PY) -m edgepix segment $(DEMO_DIR)/fastscnn.int8.argmax.onnx --source "synthetic://?size=640x480" --sink $(DEMO_DIR)/segmented.mp4 --max-frames 150 --stats $(DEMO_DIR)/stream_stats.json
	$(PY) -m edgepix bench $(DEMO_DIR)/fastscnn.onnx $(DEMO_DIR)/fastscnn.int8.argmax.onnx --torch $(DEMO_DIR)/run/best.pt --runs 30 --out $(DEMO_DIR)/bench

clean:
	rm -rf $(VENV) $(SYSTEM_OPENCV_ENV) $(DEMO_DIR)
