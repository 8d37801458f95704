# Two commands do all set-up: `make demo` runs the series, `make test` runs the tests.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
BUILD  := build
# the working tree's helpers win over any installed copy (also inside notebook kernels)
export PYTHONPATH := $(CURDIR)


.PHONY: demo test lab venv notebooks tiny-model clean set-repo rehearse

venv: $(STAMP)

$(STAMP): constraints.txt pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: a dependency must never pull a CUDA build here
	$(PY) -m pip install -q torch==$$(sed -n 's/^torch==//p' constraints.txt)
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)  ## the main job: run every notebook on the tiny default, results under build/
	$(PY) -m gptj_helpers run-notebooks notebooks/*.ipynb --out $(BUILD)

test: $(STAMP)  ## lint, unit tests, then every committed notebook checked by nbval
	$(VENV)/bin/ruff check .
	$(PY) -m pytest tests
	$(PY) -m pytest --nbval notebooks --nbval-sanitize-with tests/sanitize.cfg --nbval-cell-timeout=600 -p no:cacheprovider

notebooks: $(STAMP)  ## re-execute the committed notebooks in place (after changing the helpers)
	$(PY) -m gptj_helpers run-notebooks notebooks/*.ipynb --inplace

rehearse: $(STAMP)  ## every notebook at GPT-J-6B's size (random weights) on the CPU: 20 to 40 minutes, 14 GiB of RAM
	$(PY) benchmarks/rehearse.py

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
