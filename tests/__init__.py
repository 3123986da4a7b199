"""The test suite (a regular package, so `tests.*` resolves here before any `tests` package that an installed
distribution ships at top level, such as latex2sympy2, an lmms-eval dependency)."""
