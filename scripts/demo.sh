#!/usr/bin/env bash
# The main job: build a preset UNet, export it, check the graph against eager, print a report.
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$ROOT"
exec compiled-unet demo "$@"
