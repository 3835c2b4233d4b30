"""Print 'tests: N passed, N failed' from the log of Scipion's test runner (GTestResult).

Each failed test is listed after the count with the last line of its traceback, so that a
log's tail (what CI keeps) names what failed.
"""
import re
import sys


def failures(text):
    """[(test name, exception line)] for each '[   FAILED ] name' block of the log: the
    first unindented line after the block's last 'Traceback' header."""
    out = []
    for block in re.split(r"^\[   FAILED \] ", text, flags=re.M)[1:]:
        lines = block.splitlines()
        name = lines[0].strip() if lines else "?"
        last = ""
        starts = [k for k, line in enumerate(lines) if line.startswith("Traceback (most recent")]
        for line in lines[starts[-1] + 1:] if starts else []:
            if line.strip() and not line.startswith(" "):
                last = line.strip()
                break
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
