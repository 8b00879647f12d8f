"""python -m llm.judge --responses FILE --out DIR [--cache FILE] [--field F] [--set key=value ...]: run the judge stage."""
from llm.judge.stage import main

main()
