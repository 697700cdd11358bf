#!/bin/sh
# Harness self-check: a scenario that never finishes. scripts/vm-test.sh
# runs it with a short timeout and passes only if scripts/vm.sh kills the
# guest and reports a TIMEOUT.
mkfifo /tmp/never
echo "hang: blocking forever on a FIFO nobody writes"
read -r _ </tmp/never
