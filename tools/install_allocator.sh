#!/usr/bin/env bash
# Make tcmalloc (and jemalloc) available to PyTorch's CPU launcher, `python -m torch.backends.xeon.run_cpu`.
#
# Why: on the CPU, glibc's malloc keeps most of the activation memory that local learning frees block
# by block; tcmalloc hands it back and re-uses it (docs/memory.md has the measurements). run_cpu looks
# for lib<name>.so in $VIRTUAL_ENV/lib (among a few system folders), while Debian and Ubuntu install
# libtcmalloc_minimal.so.4 / libjemalloc.so.2 in the multiarch folder, where it does not look; so this
# links them into the venv's lib/ folder, installing the Debian packages first where they are missing.
#
# usage: tools/install_allocator.sh VENV_LIB_DIR
# Exits 0 when it cannot install (no apt-get, no root or password-less sudo) after saying how to: the
# launcher then warns and training runs on the default malloc, with a higher peak memory.
set -euo pipefail
dest=${1:?usage: $0 VENV_LIB_DIR}
declare -A package=([libtcmalloc_minimal.so.4]=libtcmalloc-minimal4 [libjemalloc.so.2]=libjemalloc2)
declare -A link=([libtcmalloc_minimal.so.4]=libtcmalloc.so [libjemalloc.so.2]=libjemalloc.so)

find_lib() {  # the path the dynamic linker knows for library $1, or nothing
  local ldconfig
  ldconfig=$(command -v ldconfig || echo /sbin/ldconfig)
  # awk reads to the end: leaving at the first match would close the pipe while ldconfig still writes,
  # and under pipefail its SIGPIPE (status 141) would end this script.
  "$ldconfig" -p 2>/dev/null | awk -v name="$1" '$1 == name && !found {print $NF; found = 1}'
}

missing=()
for lib in "${!package[@]}"; do
  [ -n "$(find_lib "$lib")" ] || missing+=("${package[$lib]}")
done
if [ ${#missing[@]} -gt 0 ]; then
  how="install ${missing[*]} (Debian/Ubuntu: sudo apt-get install -y ${missing[*]}; conda: conda install -c conda-forge gperftools jemalloc)"
  if ! command -v apt-get >/dev/null; then
    echo "allocator: not found here; $how. Training still runs, on the default malloc (docs/memory.md)." >&2
    exit 0
  fi
  if [ "$(id -u)" = 0 ]; then sudo=""
  elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then sudo="sudo"
  else
    echo "allocator: cannot install without root; $how, then run 'make allocator' again. Training still runs, on glibc's malloc (docs/memory.md)." >&2
    exit 0
  fi
  echo "allocator: installing ${missing[*]} (apt-get)"
  if ! { $sudo apt-get install -y -q "${missing[@]}" || { $sudo apt-get update -q && $sudo apt-get install -y -q "${missing[@]}"; }; } >/dev/null; then
    echo "allocator: apt-get could not install ${missing[*]}; $how. Training still runs, on glibc's malloc." >&2
    exit 0
  fi
fi
mkdir -p "$dest"
for lib in "${!package[@]}"; do
  path=$(find_lib "$lib")
  if [ -n "$path" ]; then
    ln -sf "$path" "$dest/${link[$lib]}"
    echo "allocator: $dest/${link[$lib]} -> $path"
  fi
done
