# The two commands of the README. Both create or reuse .venv in the project root.
.PHONY: demo test setup
demo:
	bash .ci/setup
	.venv/bin/target-sft demo

test:
	bash .ci/test

setup:
	bash .ci/setup
