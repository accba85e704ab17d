"""`python -m atlaskv.cli ...`: the same as the `atlaskv` console script."""
from atlaskv.cli import main

main()
