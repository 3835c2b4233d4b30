"""Print 'tests: N passed, N failed' from the log of Scipion's test runner (GTestResult)."""
import re
import sys


def main(path):
    text = open(path, errors="replace").read()
    text = re.sub(r"\x1b\[[0-9;]*m", "", text)  # colour codes
    run = re.findall(r"\[==========\] run (\d+) tests", text)
    failed = re.findall(r"\[  FAILED  \] (\d+) tests", text)
    if not run:
        print("tests: 0 passed, 0 failed (the runner reported no count)")
        return
    n, k = int(run[-1]), int(failed[-1]) if failed else 0
    print("tests: %d passed, %d failed" % (n - k, k))


if __name__ == "__main__":
    main(sys.argv[1])
