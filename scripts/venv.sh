#!/usr/bin/env bash
# Where the project's Python environment lives: one rule for every script and for CMake.
# Outside the source tree, so a fresh clone on the same machine finds PyTorch (2.4 GB) again.
# Override with YUANMOE_VENV. Sourced: sets YUANMOE_VENV and YUANMOE_PYTHON. Run: prints YUANMOE_VENV.
YUANMOE_VENV=${YUANMOE_VENV:-${XDG_DATA_HOME:-$HOME/.local/share}/yuanmoe/venv}
YUANMOE_PYTHON=$YUANMOE_VENV/bin/python
if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then echo "$YUANMOE_VENV"; fi
