"""The Python side of the test convention (see test/test.h): one line per check, "ok - name" or
"FAIL - name: detail", counted by test/run."""
import sys

failures = 0


def check(cond, name, detail=""):
    """Report one named check; returns cond so a test can stop early on a missing precondition."""
    global failures
    if cond:
        print(f"ok - {name}")
    else:
        failures += 1
        print(f"FAIL - {name}: {detail}")
    sys.stdout.flush()
    return cond
