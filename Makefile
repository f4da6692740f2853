# lipforcing: every target runs from a fresh checkout; the first one creates .venv.
# Config overrides for any job target: make distill ARGS="profile=tiny dmd.train.steps=10"

PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
ARGS ?=
PYTEST_ARGS ?=
IMAGE ?= ghcr.io/lipforcing/lipforcing
TAG ?= $(shell git rev-parse --short HEAD 2>/dev/null || echo latest)

export RAY_USAGE_STATS_ENABLED ?= 0
export GLOO_SOCKET_IFNAME ?= lo
export PYTHONUNBUFFERED := 1
# DeepSpeed's CPU ops compile into here: one build per checkout, not a shared cache that two
# checkouts on one machine keep rebuilding for each other
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/$(VENV)/torch_extensions

.PHONY: help setup demo data syncnet encode distill analyze eval infer app retrain compare bench ui lint test clean status logs stop box box-down image

help: ## list the targets
	@grep -E '^[a-z]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-9s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip>=24"
	$(PY) -m pip install --quiet -e ".[dev]"
	@touch $(STAMP)

setup: $(STAMP) ## create .venv and install the project (idempotent)

demo: $(STAMP) ## the whole pipeline on the embedded default (sample data, tiny profile, CPU)
	$(PY) -m pipelines.demo $(ARGS)

data: $(STAMP) ## shard raw videos into aligned WebDataset shards (ARGS="input=... output=...")
	$(PY) -m pipelines.data $(ARGS)

syncnet: $(STAMP) ## train the SyncNet used by the data filter, the reward and the metrics
	$(PY) -m pipelines.syncnet $(ARGS)

encode: $(STAMP) ## cache VAE latents + audio features of the shards for training (Ray Data)
	$(PY) -m pipelines.encode $(ARGS)

distill: $(STAMP) ## teacher -> student -> DMD on Ray Train + DeepSpeed, tracked in MLflow (config=recipe.yaml adds a config file)
	$(PY) -m pipelines.distill $(if $(config),config=$(config)) $(ARGS)

analyze: $(STAMP) ## teacher-trajectory analysis -> outputs/analyze/recipe.yaml (use: make distill ARGS="config=...")
	$(PY) -m pipelines.analyze $(ARGS)

eval: $(STAMP) ## streaming inference + metrics for a trained student
	$(PY) -m pipelines.evaluate $(ARGS)

infer: $(STAMP) ## lip-sync a video to new speech: make infer VIDEO=talk.mp4 AUDIO=speech.wav OUT=out.mp4 (ARGS="student_weights=...")
	$(PY) -m pipelines.infer $(if $(VIDEO),video=$(VIDEO)) $(if $(AUDIO),audio=$(AUDIO)) $(if $(OUT),output=$(OUT)) $(ARGS)

app: $(STAMP) ## a web page on 127.0.0.1:7860 that lip-syncs an uploaded video with a registered student
	$(PY) -m pipelines.app $(ARGS)

retrain: $(STAMP) ## one scheduled retraining cycle: new data -> fine-tune the champion -> gate -> promote (ARGS="date=... dry_run=true")
	$(PY) -m pipelines.retrain $(ARGS)

compare: $(STAMP) ## a report (HTML + Markdown) comparing runs across experiments (ARGS="runs=... experiments=... tag=...")
	$(PY) -m pipelines.compare $(ARGS)

bench: $(STAMP) ## benchmarks; results go to benchmarks/RESULTS.md
	$(PY) -m benchmarks $(ARGS)

status: $(STAMP) ## state of the last job submitted to RAY_ADDRESS (ARGS="job=<id>" for another)
	$(PY) -m pipelines.job_control status $(ARGS)

logs: $(STAMP) ## follow the logs of the last submitted job
	$(PY) -m pipelines.job_control logs $(ARGS)

stop: $(STAMP) ## stop the last submitted job
	$(PY) -m pipelines.job_control stop $(ARGS)

box: $(STAMP) ## a multi-node Ray cluster in a box on this machine (root): then `source outputs/box/env.sh`
	$(PY) -m pipelines.cluster_box up $(ARGS)

box-down: $(STAMP) ## stop the cluster in a box
	$(PY) -m pipelines.cluster_box down $(ARGS)

ui: $(STAMP) ## open the MLflow UI on 127.0.0.1 for the local store
	$(PY) -m pipelines.ui $(ARGS)

lint: $(STAMP) ## ruff
	$(VENV)/bin/ruff check .

test: $(STAMP) ## the whole test suite (real Ray, DeepSpeed, MLflow, S3 API, codecs)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest $(PYTEST_ARGS)

image: ## build the cluster image $(IMAGE):$(TAG) (docker); the manifests take it from cluster/kuberay/kustomization.yaml
	docker build -t $(IMAGE):$(TAG) .
	@echo "push it, then: (cd cluster/kuberay && kustomize edit set image lipforcing=$(IMAGE):$(TAG))"

clean: ## remove outputs and caches (keeps .venv)
	rm -rf outputs .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -prune -not -path './$(VENV)/*' -exec rm -rf {} +
