#!/usr/bin/env bash
# Install everything the tests need on a fresh Debian/Ubuntu machine, then run the whole suite.
#   scripts/test.sh                 # all tests
#   scripts/test.sh -k vrun         # extra arguments go to pytest
# Installs: Debian's chromium (browser tests), slurm-wlm and munge (the Slurm tests start a real
# two-node cluster in a network namespace, as root), a virtual environment .venv with velda, its
# test tools and Ray (the Ray tests start a real local cluster on loopback).
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

debs=()
command -v chromium >/dev/null 2>&1 || debs+=(chromium)             # the browser tests
command -v slurmctld >/dev/null 2>&1 || debs+=(slurm-wlm munge)      # the Slurm tests
command -v ip >/dev/null 2>&1 || debs+=(iproute2)                    # their network namespace
if [ ${#debs[@]} -gt 0 ]; then
  echo "== installing ${debs[*]} (Debian packages) for the browser and Slurm tests"
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "${debs[@]}" >/dev/null
fi

if ! python3 -c 'import ensurepip' >/dev/null 2>&1; then
  echo "== installing python3-venv (Debian package) to create .venv"
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq python3-venv >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
  echo "== creating .venv"
  python3 -m venv .venv
fi
# What is installed is recorded in a stamp: the hash of pyproject.toml, the extras and the
# interpreter. pip runs only when that changed (or the venv is new), so a second run starts
# testing at once; source edits need no reinstall (velda is installed editable).
extras='.[test,ray]'
want=$( (cat pyproject.toml; echo "$extras"; .venv/bin/python -VV) | sha256sum | cut -d' ' -f1)
stamp=.venv/velda-installed
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ] || [ ! -x .venv/bin/vrun ]; then
  echo "== installing velda with its test and ray extras into .venv"
  .venv/bin/python -m pip install -q --disable-pip-version-check -e "$extras"
  echo "$want" > "$stamp"
else
  echo "== .venv is up to date with pyproject.toml (delete $stamp to reinstall)"
fi

echo "== running the tests"
exec .venv/bin/python -m pytest "$@"
