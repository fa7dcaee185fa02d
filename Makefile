# Long-running checks that are not part of the test suite (CI runs bounded versions of them).

.PHONY: test chaos

test:
	python -m pytest

# Half a million events, 50 worker SIGKILLs and 5 driver SIGKILLs; prints its seed and figures.
chaos:
	python -m bench.chaos --events 500000 --users 50000 --worker-kills 50 --driver-kills 5
