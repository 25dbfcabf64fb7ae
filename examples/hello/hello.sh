#!/bin/sh
# The example app: prints the greeting baked in at build time.
[ "$1" = "--check" ] && exit 0
echo "$(cat /app/greeting.txt), ${1:-world}!"
