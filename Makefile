# flowtune: two set-up commands, both self-contained on a fresh clone.
#   make demo   preprocess -> train -> sample on an embedded tiny model, offline, on the CPU
#   make test   the test suite (make test-extended: the few tests it leaves out for time)
# Both create .venv at the repo root and install everything into it.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.flowtune-installed
DEMO_DIR := .flowtune-demo

export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo demo-kontext demo-flux2 demo-flux2-klein demo-z-image demo-qwen-image demo-qwen-image-edit demo-wan demo-hunyuan-video test test-extended lint format docs clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first, pinned: the CPU build here, the CUDA build on GPU machines. No torchvision.
	# Every module is compiled once here: these machines set PYTHONDONTWRITEBYTECODE=1, so
	# without .pyc files every process would compile its imports anew. compileall on two cores
	# does it in less time than pip's own compilation (one core); like pip, it skips the files
	# this Python cannot compile (torch's Python 3.12-only test helpers), hence the || true.
	$(BIN)/pip install --quiet --no-compile torch==2.13.0
	$(BIN)/pip install --quiet --no-compile -e '.[dev,datasets]'
	$(BIN)/python -m compileall -q -j 2 $(VENV)/lib > /dev/null 2>&1 || true
	@touch $@

demo: $(STAMP)
	$(BIN)/python -m flowtune make-tiny flux $(DEMO_DIR)/tiny-flux --overwrite
	$(BIN)/python -m flowtune make-dataset $(DEMO_DIR)/dataset --count 16 --size 64x64 --size 96x64 --size 64x96 --overwrite
	$(BIN)/python -m flowtune preprocess recipes/tiny-flux-demo.yaml
	$(BIN)/python -m flowtune train recipes/tiny-flux-demo.yaml
	rm -rf $(DEMO_DIR)/samples
	$(BIN)/python -m flowtune sample --ckpt $(DEMO_DIR)/run --out $(DEMO_DIR)/samples --num-images 2 \
		--prompt "a red circle on a white background" --prompt "a blue square on a white background"
	@echo "demo outputs: model $(DEMO_DIR)/tiny-flux, dataset $(DEMO_DIR)/dataset, cache $(DEMO_DIR)/cache,"
	@echo "  run $(DEMO_DIR)/run (recipe.yaml, metrics.jsonl, checkpoints/, final/pytorch_lora_weights.safetensors,"
	@echo "  samples/step-*/ validation images), samples $(DEMO_DIR)/samples (grid.png, samples.jsonl)"

# The same chain for image editing: FLUX.1 Kontext on generated edit pairs (shape -> recoloured).
demo-kontext: $(STAMP)
	$(BIN)/python -m flowtune make-tiny flux-kontext $(DEMO_DIR)-kontext/tiny-kontext --overwrite
	$(BIN)/python -m flowtune make-dataset $(DEMO_DIR)-kontext/edits --edit-pairs --count 8 --overwrite
	$(BIN)/python -m flowtune preprocess recipes/tiny-kontext-demo.yaml
	$(BIN)/python -m flowtune train recipes/tiny-kontext-demo.yaml
	rm -rf $(DEMO_DIR)-kontext/samples
	$(BIN)/python -m flowtune sample --ckpt $(DEMO_DIR)-kontext/run --out $(DEMO_DIR)-kontext/samples \
		--image $(DEMO_DIR)-kontext/edits/control/0001.png --prompt "make it blue" --prompt "make it red"
	@echo "kontext demo outputs: run $(DEMO_DIR)-kontext/run, edits $(DEMO_DIR)-kontext/samples"

# The same chain on FLUX.2 (Mistral3 text embeddings, patchified latents, Flux2Pipeline sampling).
demo-flux2: $(STAMP)
	$(BIN)/python -m flowtune make-tiny flux2 $(DEMO_DIR)-flux2/tiny-flux2 --overwrite
	$(BIN)/python -m flowtune make-dataset $(DEMO_DIR)-flux2/dataset --count 16 --overwrite
	$(BIN)/python -m flowtune preprocess recipes/tiny-flux2-demo.yaml
	$(BIN)/python -m flowtune train recipes/tiny-flux2-demo.yaml
	rm -rf $(DEMO_DIR)-flux2/samples
	$(BIN)/python -m flowtune sample --ckpt $(DEMO_DIR)-flux2/run --out $(DEMO_DIR)-flux2/samples \
		--prompt "a red circle on a white background" --prompt "a blue square on a white background"
	@echo "flux2 demo outputs: run $(DEMO_DIR)-flux2/run, samples $(DEMO_DIR)-flux2/samples"

# The same chain on FLUX.2 [klein] (Qwen3 text embeddings, Flux2KleinPipeline sampling).
demo-flux2-klein: $(STAMP)
	$(BIN)/python -m flowtune make-tiny flux2-klein $(DEMO_DIR)-flux2-klein/tiny --overwrite
	$(BIN)/python -m flowtune make-dataset $(DEMO_DIR)-flux2-klein/dataset --count 16 --overwrite
	$(BIN)/python -m flowtune preprocess recipes/tiny-flux2-klein-demo.yaml
	$(BIN)/python -m flowtune train recipes/tiny-flux2-klein-demo.yaml
	rm -rf $(DEMO_DIR)-flux2-klein/samples
	$(BIN)/python -m flowtune sample --ckpt $(DEMO_DIR)-flux2-klein/run --out $(DEMO_DIR)-flux2-klein/samples \
		--prompt "a red circle on a white background" --prompt "a blue square on a white background"
	@echo "flux2-klein demo outputs: run $(DEMO_DIR)-flux2-klein/run, samples $(DEMO_DIR)-flux2-klein/samples"

# The same chain on Z-Image (Qwen3 text embeddings, unpadded; ZImagePipeline sampling with CFG).
demo-z-image: $(STAMP)
	$(BIN)/python -m flowtune make-tiny z-image $(DEMO_DIR)-z-image/tiny-z-image --overwrite
	$(BIN)/python -m flowtune make-dataset $(DEMO_DIR)-z-image/dataset --count 16 --overwrite
	$(BIN)/python -m flowtune preprocess recipes/tiny-z-image-demo.yaml
	$(BIN)/python -m flowtune train recipes/tiny-z-image-demo.yaml
	rm -rf $(DEMO_DIR)-z-image/samples
	$(BIN)/python -m flowtune sample --ckpt $(DEMO_DIR)-z-image/run --out $(DEMO_DIR)-z-image/samples \
		--prompt "a red circle on a white background" --prompt "a blue square on a white background"
	@echo "z-image demo outputs: run $(DEMO_DIR)-z-image/run, samples $(DEMO_DIR)-z-image/samples"

# The same chain on Qwen-Image (Qwen2.5-VL text embeddings, a video VAE's packed latents,
# QwenImagePipeline sampling with true classifier-free guidance against the negative prompt " ").
demo-qwen-image: $(STAMP)
	$(BIN)/python -m flowtune make-tiny qwen-image $(DEMO_DIR)-qwen-image/tiny-qwen-image --overwrite
	$(BIN)/python -m flowtune make-dataset $(DEMO_DIR)-qwen-image/dataset --count 16 --overwrite
	$(BIN)/python -m flowtune preprocess recipes/tiny-qwen-image-demo.yaml
	$(BIN)/python -m flowtune train recipes/tiny-qwen-image-demo.yaml
	rm -rf $(DEMO_DIR)-qwen-image/samples
	$(BIN)/python -m flowtune sample --ckpt $(DEMO_DIR)-qwen-image/run --out $(DEMO_DIR)-qwen-image/samples \
		--prompt "a red circle on a white background" --prompt "a blue square on a white background"
	@echo "qwen-image demo outputs: run $(DEMO_DIR)-qwen-image/run, samples $(DEMO_DIR)-qwen-image/samples"

# The edit chain on Qwen-Image-Edit (instructions encoded with their reference by Qwen2.5-VL, the
# reference's latents appended to the target's; QwenImageEditPlusPipeline sampling).
demo-qwen-image-edit: $(STAMP)
	$(BIN)/python -m flowtune make-tiny qwen-image-edit $(DEMO_DIR)-qwen-image-edit/tiny --overwrite
	$(BIN)/python -m flowtune make-dataset $(DEMO_DIR)-qwen-image-edit/edits --edit-pairs --count 8 --overwrite
	$(BIN)/python -m flowtune preprocess recipes/tiny-qwen-image-edit-demo.yaml
	$(BIN)/python -m flowtune train recipes/tiny-qwen-image-edit-demo.yaml
	rm -rf $(DEMO_DIR)-qwen-image-edit/samples
	$(BIN)/python -m flowtune sample --ckpt $(DEMO_DIR)-qwen-image-edit/run --out $(DEMO_DIR)-qwen-image-edit/samples \
		--image $(DEMO_DIR)-qwen-image-edit/edits/control/0001.png --prompt "make it blue" --prompt "make it red"
	@echo "qwen-image-edit demo outputs: run $(DEMO_DIR)-qwen-image-edit/run, edits $(DEMO_DIR)-qwen-image-edit/samples"

demo-wan: $(STAMP)
	$(BIN)/python -m flowtune make-tiny wan $(DEMO_DIR)-wan/tiny-wan --overwrite
	$(BIN)/python -m flowtune make-dataset $(DEMO_DIR)-wan/dataset --count 16 --video --frames 17 --overwrite
	$(BIN)/python -m flowtune preprocess recipes/tiny-wan-demo.yaml
	$(BIN)/python -m flowtune train recipes/tiny-wan-demo.yaml
	rm -rf $(DEMO_DIR)-wan/samples
	$(BIN)/python -m flowtune sample --ckpt $(DEMO_DIR)-wan/run --out $(DEMO_DIR)-wan/samples --frames 9 \
		--prompt "a small red circle moving right on a white background" --prompt "a small blue square moving up on a black background"
	@echo "wan demo outputs: run $(DEMO_DIR)-wan/run, samples (MP4 + frame strips) $(DEMO_DIR)-wan/samples"

# The same chain on HunyuanVideo 1.5 (Qwen2.5-VL + ByT5 text embeddings, 32-channel video latents,
# HunyuanVideo15Pipeline sampling with classifier-free guidance through its guider).
demo-hunyuan-video: $(STAMP)
	$(BIN)/python -m flowtune make-tiny hunyuan-video $(DEMO_DIR)-hunyuan-video/tiny --overwrite
	$(BIN)/python -m flowtune make-dataset $(DEMO_DIR)-hunyuan-video/dataset --count 8 --video --frames 9 --fps 24 --overwrite
	$(BIN)/python -m flowtune preprocess recipes/tiny-hunyuan-video-demo.yaml
	$(BIN)/python -m flowtune train recipes/tiny-hunyuan-video-demo.yaml
	rm -rf $(DEMO_DIR)-hunyuan-video/samples
	$(BIN)/python -m flowtune sample --ckpt $(DEMO_DIR)-hunyuan-video/run --out $(DEMO_DIR)-hunyuan-video/samples --frames 5 \
		--prompt "a small red circle moving right on a white background"
	@echo "hunyuan-video demo outputs: run $(DEMO_DIR)-hunyuan-video/run, samples (MP4 + frame strips) $(DEMO_DIR)-hunyuan-video/samples"

# The test files run on TEST_WORKERS processes (pytest-xdist), each file's tests in one of them so
# that a file's module-scoped tiny models and runs are made once; then the tests marked
# `processes`, which start several processes of their own, run alone.  The tests marked
# `extended` (a 4-process launch, FSDP2 with a bf16 base, FLUX.2 [dev]'s and Qwen-Image-Edit's learning
# runs, Kontext's 1 MP control latents, Wan 2.2 experts on two processes) are left to `make test-extended`.
TEST_WORKERS ?= 2
test: $(STAMP)
	$(BIN)/pytest -q -n $(TEST_WORKERS) --dist loadfile -m "not processes and not extended"
	$(BIN)/pytest -q -m "processes and not extended"

test-extended: $(STAMP)
	$(BIN)/pytest -q -m extended

lint: $(STAMP)
	$(BIN)/ruff check flowtune tests scripts
	$(BIN)/ruff format --check flowtune tests scripts

format: $(STAMP)
	$(BIN)/ruff format flowtune tests scripts
	$(BIN)/ruff check --fix flowtune tests scripts

docs: $(STAMP)
	$(BIN)/python scripts/gen_recipe_docs.py

clean:
	rm -rf $(DEMO_DIR) $(DEMO_DIR)-kontext $(DEMO_DIR)-flux2 $(DEMO_DIR)-flux2-klein $(DEMO_DIR)-z-image \
		$(DEMO_DIR)-qwen-image $(DEMO_DIR)-qwen-image-edit $(DEMO_DIR)-wan $(DEMO_DIR)-hunyuan-video .pytest_cache .ruff_cache
