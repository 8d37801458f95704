# Two commands do all set-up: `make demo` runs the series, `make test` runs the tests.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
BUILD  := build
# the working tree's helpers win over any installed copy (also inside notebook kernels)
export PYTHONPATH := $(CURDIR)
# `make test` runs some tests again on other versions, each installed (pure Python, --no-deps) into a folder that
# goes first on PYTHONPATH; kept under .venv, so only a changed version downloads again.
# 1. pyproject's lowest transformers, huggingface_hub and tokenizers (Colab ships transformers 5.15, GPU images 5.17)
TRANSFORMERS_FLOOR := $(shell sed -n 's/^ *"transformers>=\([0-9.]*\).*/\1/p' pyproject.toml)
HUB_FLOOR          := $(shell sed -n 's/^ *"huggingface_hub>=\([0-9.]*\).*/\1/p' pyproject.toml)
TOKENIZERS_FLOOR   := $(shell sed -n 's/^ *"tokenizers>=\([0-9.]*\).*/\1/p' pyproject.toml)
FLOORS             := transformers==$(TRANSFORMERS_FLOOR) huggingface_hub==$(HUB_FLOOR) tokenizers==$(TOKENIZERS_FLOOR)
FLOORS_PARENT      := $(VENV)/floors
FLOORS_DIR         := $(FLOORS_PARENT)/transformers$(TRANSFORMERS_FLOOR)-hub$(HUB_FLOOR)-tokenizers$(TOKENIZERS_FLOOR)
FLOOR_TESTS        := tests/test_plan_and_place.py tests/test_generate.py tests/test_pipeline.py tests/test_tensor_parallel.py \
                      tests/test_compiled.py
# 2. ipywidgets as Colab ships it (7 needs ipython_genutils; widgetsnbextension 3 is only the classic
#    notebook's frontend, which the Python side never imports)
WIDGETS7           := ipywidgets==7.7.1 ipython_genutils==0.2.0
WIDGETS7_DIR       := $(VENV)/ipywidgets7.7.1


.PHONY: demo test test-old-versions test-widgets7 test-floors lab venv notebooks tiny-model clean set-repo rehearse \
        gpu-check

venv: $(STAMP)

$(STAMP): constraints.txt pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: a dependency must never pull a CUDA build here
	$(PY) -m pip install -q torch==$$(sed -n 's/^torch==//p' constraints.txt)
	$(PY) -m pip install -q -c constraints.txt -e '.[dev,quant]'
	touch $(STAMP)

demo: $(STAMP)  ## the main job: run every notebook on the tiny default, results under build/
	$(PY) -m gptj_helpers run-notebooks notebooks/*.ipynb --out $(BUILD)

# test files and notebooks run on 2 workers, a whole file (a notebook's cells in order) on one, the longest files
# first (tests/conftest.py orders them), so that no long one starts last
XDIST  := -n 2 --dist loadfile --no-loadscope-reorder
# the tests keep torch.compile's kernels between runs (their temporary folders are new each run)
test: export TORCHINDUCTOR_CACHE_DIR := $(CURDIR)/$(VENV)/inductor-cache

# the run on old versions (one process, one thread) goes on beside the main run, in the CPU time its two workers
# leave while they wait on the processes they start; its output follows the main run's
OLD_LOG := $(VENV)/test-old-versions.log

test: $(STAMP) $(WIDGETS7_DIR)/.installed $(FLOORS_DIR)/.installed  ## lint; every committed notebook checked by nbval, with the unit tests; beside them, again on ipywidgets 7 and on the version floors
	$(VENV)/bin/ruff check .
	OMP_NUM_THREADS=1 $(MAKE) --no-print-directory test-old-versions > $(OLD_LOG) 2>&1 & old=$$!; \
	$(PY) -m pytest --nbval notebooks tests --nbval-sanitize-with tests/sanitize.cfg --nbval-cell-timeout=600 \
	  -p no:cacheprovider --durations=15 $(XDIST); main=$$?; \
	wait $$old; old_status=$$?; \
	echo "=== make test-old-versions, run beside it (exit status $$old_status):"; cat $(OLD_LOG); \
	test $$main = 0 && test $$old_status = 0

test-old-versions: $(WIDGETS7_DIR)/.installed $(FLOORS_DIR)/.installed  ## test-widgets7 and test-floors in one process (torch imported once), as on Colab: old ipywidgets and transformers together
	GPTJ_EXPECT_VERSIONS="$(WIDGETS7) $(FLOORS)" PYTHONPATH=$(WIDGETS7_DIR):$(FLOORS_DIR):$(CURDIR) $(PY) -m pytest \
	  tests/test_widget.py $(FLOOR_TESTS) -m "widget or floor" -k "not 3stages and not three_ranks" \
	  --deselect tests/test_widget.py::test_widget_in_a_real_browser -p no:cacheprovider \
	  -W "ignore::DeprecationWarning:ipywidgets.widgets.widget"

test-widgets7: $(WIDGETS7_DIR)/.installed  ## the prompt widget's unit tests on ipywidgets 7.7.1 (Colab's); the browser test needs 8
	GPTJ_EXPECT_VERSIONS="$(WIDGETS7)" PYTHONPATH=$(WIDGETS7_DIR):$(CURDIR) $(PY) -m pytest tests/test_widget.py \
	  --deselect tests/test_widget.py::test_widget_in_a_real_browser -p no:cacheprovider \
	  -W "ignore::DeprecationWarning:ipywidgets.widgets.widget"

test-floors: $(FLOORS_DIR)/.installed  ## the version-sensitive tests (marked floor; 2 stages and 2 ranks: more run the same paths) on pyproject's lowest transformers and huggingface_hub, in one process (faster than two workers importing torch)
	GPTJ_EXPECT_VERSIONS="$(FLOORS)" PYTHONPATH=$(FLOORS_DIR):$(CURDIR) $(PY) -m pytest $(FLOOR_TESTS) -m floor \
	  -k "not 3stages and not three_ranks" -p no:cacheprovider

$(FLOORS_DIR)/.installed: | $(STAMP)
	rm -rf $(FLOORS_PARENT)
	$(PY) -m pip install -q --no-deps --target $(FLOORS_DIR) $(FLOORS)
	touch $@

$(WIDGETS7_DIR)/.installed: | $(STAMP)
	rm -rf $(WIDGETS7_DIR)
	$(PY) -m pip install -q --no-deps --target $(WIDGETS7_DIR) $(WIDGETS7)
	touch $@

notebooks: $(STAMP)  ## re-execute the committed notebooks in place (after changing the helpers), and the README's picture
	$(PY) -m gptj_helpers run-notebooks notebooks/*.ipynb --inplace $(if $(FORCE),--force)
	$(PY) -m gptj_helpers notebook-figure notebooks/05_pipeline_parallelism.ipynb 05_timelines assets/readme_timeline.png

rehearse: $(STAMP)  ## every notebook at GPT-J-6B's size (random weights) in README's setups, on the CPU: about an hour, 16 GiB of RAM, 12 GB of disk
	$(PY) benchmarks/rehearse.py

# the GPU machine lent to some sessions has its own python3 with torch (CUDA), transformers and accelerate, and reaches
# no package registry: gpu-check runs there without the venv
GPU_PY ?= python3

gpu-check:  ## on a GPU machine, one command: benchmarks/gpu_check.py at full size (NCCL with cuda:0,cuda:1 where there are two GPUs, budget slices over gloo on one) and the GPU rehearsal of README's Colab and Kaggle lines
	$(GPU_PY) -c "import torch; print('GPUs:', torch.cuda.device_count(), [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])"
	PYTHONUNBUFFERED=1 $(GPU_PY) benchmarks/gpu_check.py --full-size; check=$$?; \
	PYTHONUNBUFFERED=1 $(GPU_PY) benchmarks/gpu_rehearsal.py; rehearsal=$$?; \
	echo "gpu_check.py exit $$check, gpu_rehearsal.py exit $$rehearsal"; test $$check = 0 && test $$rehearsal = 0

tiny-model: $(STAMP)  ## retrain the tiny default that speaks into gptj_split/tiny-gptj (about 10 minutes on 2 CPU cores)
	$(PY) assets/train_tiny.py gptj_split/tiny-gptj

lab: $(STAMP)  ## JupyterLab on notebooks/, for people
	$(PY) -m jupyter lab notebooks/

clean:
	rm -rf $(BUILD)

REPO_SLUG := OWNER/REPO
set-repo:  ## fill the repository's address into badges and install lines: make set-repo REPO=you/repo
	@test -n "$(REPO)" || (echo "usage: make set-repo REPO=owner/name" && exit 2)
	grep -rl --include='*.md' --include='*.ipynb' --include='*.toml' '$(REPO_SLUG)' README.md notebooks pyproject.toml \
	  | xargs -r sed -i 's#$(REPO_SLUG)#$(REPO)#g'
	sed -i 's#^REPO_SLUG := .*#REPO_SLUG := $(REPO)#' Makefile
