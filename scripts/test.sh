#!/usr/bin/env bash
# Install everything the tests need on a fresh Debian/Ubuntu machine, then run the whole suite.
#   scripts/test.sh                 # all tests
#   scripts/test.sh -k vrun         # extra arguments go to pytest
# Installs: Debian's chromium (browser tests), a virtual environment .venv with velda, its test
# tools and Ray (the Ray tests start a real local cluster on loopback).
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

if ! command -v chromium >/dev/null 2>&1; then
  echo "== installing chromium (Debian package) for the browser tests"
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq chromium >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
  echo "== creating .venv"
  python3 -m venv .venv
fi
echo "== installing velda with its test and ray extras into .venv"
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test,ray]'

echo "== running the tests"
exec .venv/bin/python -m pytest "$@"
