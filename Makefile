# The README's two commands: `make run` (set up + main job on the embedded dataset) and `make test`.
# A second call reuses the virtual environment and the shards when nothing they depend on changed.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DATA := data/emoji
TEST_ENV := WANDB_MODE=disabled HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

.PHONY: setup data run test bench clean-venv

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

$(DATA)/manifest.json: | $(STAMP)
	$(PY) -m data_pipelines build-emoji --out $(DATA) --size 64

data: $(DATA)/manifest.json

# The main job: the three-stage chain on the emoji shards (VAE-GAN -> CLIP -> latents -> text-to-image denoiser ->
# evaluation -> report in runs/quickstart/report/); finished stages are skipped when run again.
run: $(STAMP) $(DATA)/manifest.json
	$(PY) -m lightning_diffusion pipeline --preset quickstart --out runs/quickstart

test: $(STAMP)
	$(TEST_ENV) $(PY) -m pytest

# `make run` under its old name; `make smoke` is the same chain shrunk to a few steps per stage (<= 5 min).
.PHONY: quickstart smoke
quickstart: run
smoke: $(STAMP) $(DATA)/manifest.json
	$(PY) -m lightning_diffusion pipeline --preset smoke --out runs/smoke

# Every ratio benchmark -> benchmarks/results/*.json and a table; `make bench BENCH_ARGS=--quick` for a smoke check.
bench: $(STAMP) $(DATA)/manifest.json
	$(PY) benchmarks/run_all.py $(BENCH_ARGS)

clean-venv:
	rm -rf $(VENV)
