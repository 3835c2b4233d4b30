"""Print 'tests: N passed, N failed' from the log of Scipion's test runner (GTestResult).

Each failed test is listed after the count with the last line of its traceback, so that a
log's tail (what CI keeps) names what failed.
"""
import re
import sys


def failures(text):
    """[(test name, last traceback line)] for each '[   FAILED ] name' block of the log."""
    out = []
    blocks = re.split(r"^\[   FAILED \] ", text, flags=re.M)[1:]
    for block in blocks:
        lines = block.splitlines()
        name = lines[0].strip() if lines else "?"
        last = ""
        for line in lines[1:]:
            if line.startswith("[") and ("RUN" in line or "====" in line or "FAILED" in line):
                break
            if line.strip() and not line.startswith(" "):
                last = line.strip()
        out.append((name, last))
    return out


def main(path):
    with open(path, errors="replace") as f:
        text = f.read()
    text = re.sub(r"\x1b\[[0-9;]*m", "", text)  # colour codes
    run = re.findall(r"\[==========\] run (\d+) tests", text)
    failed = re.findall(r"\[  FAILED  \] (\d+) tests", text)
    if not run:
        print("tests: 0 passed, 0 failed (the runner reported no count)")
        return
    n, k = int(run[-1]), int(failed[-1]) if failed else 0
    for name, last in failures(text):
        print("failed: %s: %s" % (name, last[:300]))
    print("tests: %d passed, %d failed" % (n - k, k))


if __name__ == "__main__":
    main(sys.argv[1])
