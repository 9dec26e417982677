# C++ runtime targets, included from the top-level Makefile.
#
#   make cpp-deps            apt packages (when missing) + ONNX Runtime headers into third_party/
#   make cpp-build           library, tests, example controller (build/cpp, ninja)
#   make cpp-test            ctest
#   make cpp-test-asan       the tests again with AddressSanitizer + UndefinedBehaviorSanitizer
#   make cpp-consumer-test   install into build/cpp-install, build cpp/tests/consumer against it, run it
CPP_PYTHON ?= $(CURDIR)/.venv/bin/python
CPP_BUILD ?= build/cpp
CPP_ASAN_BUILD ?= build/cpp-asan
CPP_INSTALL ?= build/cpp-install
CPP_JOBS ?= 2
CPP_CMAKE_ARGS := -G Ninja -DDPKIT_BUILD_TESTS=ON -DDPKIT_BUILD_EXAMPLES=ON -DDPKIT_TEST_PYTHON=$(CPP_PYTHON)
CPP_ORT_LIB = $$($(CPP_PYTHON) -c "from dpkit.runtime.cpp_policy import onnxruntime_library as f; print(f())" 2>/dev/null || \
  $(CPP_PYTHON) -c "import glob, os, onnxruntime as o; print(sorted(glob.glob(os.path.join(os.path.dirname(o.__file__), 'capi', 'libonnxruntime.so*')))[0])")

.PHONY: cpp-deps cpp-build cpp-test cpp-test-asan cpp-consumer-test

cpp-deps:
	@missing=""; \
	command -v cmake >/dev/null 2>&1 || missing="$$missing cmake"; \
	command -v ninja >/dev/null 2>&1 || missing="$$missing ninja-build"; \
	command -v g++ >/dev/null 2>&1 || missing="$$missing g++"; \
	for p in nlohmann-json3-dev libgtest-dev; do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then echo "apt-get install$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; fi
	cpp/scripts/fetch_ort_headers.sh

cpp-build: cpp-deps
	cmake -S . -B $(CPP_BUILD) $(CPP_CMAKE_ARGS) -DCMAKE_BUILD_TYPE=Release
	cmake --build $(CPP_BUILD) -j $(CPP_JOBS)

cpp-test: cpp-build
	ctest --test-dir $(CPP_BUILD) --output-on-failure -j $(CPP_JOBS)

# Reuses the release build's test bundles (exporting them again would only cost time).
cpp-test-asan: cpp-build
	cmake -S . -B $(CPP_ASAN_BUILD) $(CPP_CMAKE_ARGS) -DCMAKE_BUILD_TYPE=Debug -DDPKIT_SANITIZE=ON \
	  -DDPKIT_BUILD_EXAMPLES=OFF -DDPKIT_TEST_BUNDLES_DIR=$(CURDIR)/$(CPP_BUILD)/cpp/tests/bundles
	cmake --build $(CPP_ASAN_BUILD) -j $(CPP_JOBS)
	ctest --test-dir $(CPP_ASAN_BUILD) --output-on-failure -j $(CPP_JOBS)

cpp-consumer-test: cpp-build
	rm -rf $(CPP_INSTALL) $(CPP_BUILD)-consumer
	cmake --install $(CPP_BUILD) --prefix $(CURDIR)/$(CPP_INSTALL)
	cmake -S cpp/tests/consumer -B $(CPP_BUILD)-consumer -G Ninja -DCMAKE_PREFIX_PATH=$(CURDIR)/$(CPP_INSTALL)
	cmake --build $(CPP_BUILD)-consumer
	$(CPP_BUILD)-consumer/consumer $(CPP_BUILD)/cpp/tests/bundles/lowdim "$(CPP_ORT_LIB)"
