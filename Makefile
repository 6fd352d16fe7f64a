# Two commands: `make demo` (the main job) and `make test` (the suite). Both build .venv when missing.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo demo-distill test test-fast lint bench clean-runs

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

# The demo: synthetic rooms, two experiments x 5 folds as submitit jobs (--launcher local --jobs 2: one
# process and one CPU thread per fold; the two experiments' launchers run side by side, so the 2 cores stay
# busy to the last fold), the status table, the blend (per-class weights; it also reports the global blend it
# started from), the submission and its score; then the paired comparison of the two experiments and the blend.
# Re-running it skips finished folds and resumes unfinished ones from last.pt. Ctrl-C reaches the launchers
# (kfold.cli re-enables SIGINT, which background jobs start with ignored); they cancel their fold jobs.
DEMO_DATA := data/synthetic
DEMO_EXPERIMENTS := exp093_2 exp093_5
DEMO_ARGS := --preset demo --data-root $(DEMO_DATA) --launcher local --jobs 2
# Different seeds give the two demo models different initial weights and augmentations, as separately
# launched experiments would have; with one seed they differ only in the depth channel.
DEMO_SEED_exp093_2 := 42
DEMO_SEED_exp093_5 := 43

demo: $(STAMP)
	@test -f $(DEMO_DATA)/scenes.csv || \
	  $(PY) -m kfold.data.synthetic --out $(DEMO_DATA) --train 200 --test 50 --size 120x160 --seed 0
	@mkdir -p runs
	@echo "training $(DEMO_EXPERIMENTS) on 5 folds each as local submitit jobs, 2 per experiment at once;"
	@echo "logs in runs/<experiment>/fold<k>/train.log and runs/<experiment>/jobs/, launcher errors in runs/<experiment>.stderr"
	@set -o pipefail; \
	trap 'echo "interrupted: run make demo again to finish"; wait; exit 130' INT; \
	trap 'trap - TERM; kill -TERM 0' TERM; \
	$(foreach exp,$(DEMO_EXPERIMENTS),($(PY) experiments/$(exp).py $(DEMO_ARGS) \
	  --opts train.seed $(DEMO_SEED_$(exp)) 2>runs/$(exp).stderr | sed -u "s/^/[$(exp)] /") & ) \
	failed=0; for job in $$(jobs -p); do wait $$job || failed=1; done; \
	$(PY) -m kfold.status $(DEMO_EXPERIMENTS); \
	if [ $$failed = 1 ]; then tail -n 3 runs/*.stderr; exit 1; fi
	$(PY) ensemble/blend.py --runs $(DEMO_EXPERIMENTS) --per-class --name demo_blend
	$(PY) -m ensemble.compare $(DEMO_EXPERIMENTS) demo_blend

# After the demo: exp097_1 distilled from demo_blend (teacher passes, 5 student folds), the same recipe without
# a teacher (exp097_1_baseline), then the recovered share of the blend's gain and the speed ratio (docs/distill.md).
demo-distill: $(STAMP)
	@test -f submissions/demo_blend.json || { echo "error: run make demo first (it makes demo_blend)"; exit 2; }
	$(PY) experiments/exp097_1.py $(DEMO_ARGS) --opts distill.teacher demo_blend --baseline

# The whole suite, one worker process per core (pytest-xdist; a file's tests stay on one worker, so its module
# fixtures are built once). test-fast: the unit tier, leaving out the end-to-end tests (marker e2e).
test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest -n auto --dist loadfile --durations=12

test-fast: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest -m "not e2e"

bench: $(STAMP)
	$(PY) bench/run_all.py --quick

clean-runs:
	rm -rf runs data/synthetic submissions/*.csv submissions/*.json submissions/*.lock submissions/plots
