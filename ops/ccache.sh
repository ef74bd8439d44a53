# shellcheck shell=bash
# Sourced by ops/test.sh and .ci/run: llama.cpp (C and C++, built by cmake inside
# llama-cpp-sys-2's build script) is compiled once per cargo configuration, so the build and
# clippy's check each compiled it, about nine minutes apiece on two cores. Through ccache
# (installed by ops/setup.sh) the second is a cache hit. Paths under the checkout are
# rewritten relative (CCACHE_BASEDIR) and the working directory left out of the hash, since
# each configuration builds in a directory of its own.
if command -v ccache >/dev/null 2>&1; then
  export CMAKE_C_COMPILER_LAUNCHER=ccache CMAKE_CXX_COMPILER_LAUNCHER=ccache
  export CCACHE_BASEDIR="${CCACHE_BASEDIR:-$PWD}" CCACHE_NOHASHDIR=true
fi
