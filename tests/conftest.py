import sys
from pathlib import Path

# Make tests/ importable as plain modules (tests.oreal_reference -> oreal_reference) and the repo root
# importable for `benchmarks`, whatever directory pytest is started from.
TESTS_DIR = Path(__file__).resolve().parent
for path in (TESTS_DIR, TESTS_DIR.parent):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
