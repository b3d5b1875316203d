# randport: every recipe calls a script in ci/, the same scripts CI runs (.ci/run).

# List the recipes.
default:
    @just --list

# The demo cluster (2 nodes x 3 pods); for now what randport decides for it, the simulator comes next.
demo *ARGS:
    ci/demo.sh {{ARGS}}

# Everything that can run here: format check, clippy -D warnings, nextest, doctests.
test:
    ci/test.sh

# Benchmarks (criterion micro-benchmarks of the core).
bench *ARGS:
    ci/bench.sh {{ARGS}}

# Format the code.
fmt:
    ci/fmt.sh

# Clippy with warnings denied.
lint:
    ci/lint.sh
