"""``python -m raypd.distill`` with the tests' two-role method registered, as a user's plugin would register one."""

import sys

import tests.two_role  # noqa: F401 - registers critic_test here; Ray workers import it by the method's module
from raypd.distill import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
